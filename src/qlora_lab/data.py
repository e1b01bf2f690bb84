"""Stage 5 (data): read rows, check them, render them with the chat template, mask prompts, batch.

Rows are read and checked before any model loads (a bad row at line 9,000 should not cost a model load);
tokenization happens once the tokenizer is there.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from qlora_lab.config import DataConfig

IGNORE_INDEX = -100  # label value that cross-entropy skips
MAX_REPORTED = 10


class DataError(ValueError):
    """Rows that cannot be used; the message names each bad row and what it lacks."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    row: int  # index of the source row, so a bad batch can be traced to its rows


def _row_problem(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "has 'messages' that is not a non-empty list"
        for j, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                return f"message {j} is not an object with string 'role' and 'content'"
        if not any(msg["role"] == "assistant" and msg["content"] for msg in msgs):
            return "has no non-empty assistant message to learn from"
        return None
    missing = [k for k in ("prompt", "response") if k not in row]
    if missing:
        return f"lacks {' and '.join(repr(k) for k in missing)} (expected 'prompt'+'response' or 'messages'; " \
               f"it has keys {sorted(row)})"
    for k in ("prompt", "response"):
        if not isinstance(row[k], str):
            return f"has {k!r} of type {type(row[k]).__name__}, expected a string"
    if not row["response"]:
        return "has an empty 'response'"
    return None


def check_rows(rows: list[Any], where: str) -> None:
    """Raise DataError naming every bad row (up to MAX_REPORTED) of `rows` read from `where`."""
    if not rows:
        raise DataError(f"{where} has no rows; give a dataset with at least one prompt/response row")
    bad = [(i, why) for i, row in enumerate(rows) if (why := _row_problem(row))]
    if bad:
        lines = "\n".join(f"  - row {i + 1} {why}" for i, why in bad[:MAX_REPORTED])
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{len(bad)} bad row(s) in {where} (rows counted from 1):\n{lines}{more}")


def _read_jsonl(path: Path) -> list[Any]:
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                "re-encode the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid JSON ({e.msg}); each line must be one object") from e
    return rows


def read_rows(d: DataConfig) -> list[dict[str, Any]]:
    """All rows of the configured dataset, checked."""
    if d.source == "jsonl":
        rows = _read_jsonl(Path(d.path))
        where = d.path
    else:
        import datasets

        rows = list(datasets.load_dataset(d.path, d.config_name, split=d.split))
        where = f"dataset {d.path} (split {d.split})"
    check_rows(rows, where)
    return rows


def eval_count(n_rows: int, d: DataConfig) -> int:
    """How many of `n_rows` rows are held out for the eval loss."""
    return min(int(n_rows * d.eval_fraction), d.max_eval_rows)


def check_size(rows: list[Any], d: DataConfig, processes: int = 1) -> None:
    """At least one full micro-batch per process must be left for training once the eval rows are held out."""
    n_eval = eval_count(len(rows), d)
    n_train, mb = len(rows) - n_eval, d.micro_batch_size
    if isinstance(mb, int) and n_train < mb * processes:
        per = f" x {processes} processes" if processes > 1 else ""
        raise DataError(f"the dataset has {len(rows)} rows, {n_train} left for training after {n_eval} eval rows: "
                        f"fewer than one micro-batch (data.micro_batch_size={mb}{per}); set "
                        f"data.micro_batch_size<={n_train // processes} or add rows")


def fingerprint(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def to_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" in row:
        return [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    return [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS it wants; letting the tokenizer add one would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_row(row: dict[str, Any], index: int, tokenizer, max_len: int, mask_prompt: bool) -> Example:
    """Render one row with the chat template; label only the assistant turns when `mask_prompt`."""
    messages = to_messages(row)
    if tokenizer.chat_template is None:
        if "messages" in row:
            raise DataError("the dataset has 'messages' rows but the tokenizer has no chat template; "
                            "use a chat/instruct model's tokenizer or give prompt/response rows")
        prompt = _encode(tokenizer, row["prompt"])
        response = _encode(tokenizer, row["response"]) + [tokenizer.eos_token_id]
        ids = prompt + response
        labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + response
        return Example(ids[:max_len], labels[:max_len], index)

    render = tokenizer.apply_chat_template
    ids = _encode(tokenizer, render(messages, tokenize=False))
    if not mask_prompt:
        return Example(ids[:max_len], list(ids[:max_len]), index)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(_encode(tokenizer, render(messages[:i], tokenize=False, add_generation_prompt=True)))
        end = len(_encode(tokenizer, render(messages[: i + 1], tokenize=False)))
        if end > len(ids) or start > end:
            raise DataError("the chat template does not render a conversation's prefix as a prefix of the whole; "
                            "prompt masking cannot find the assistant turns: set data.mask_prompt=false")
        labels[start:end] = ids[start:end]
    return Example(ids[:max_len], labels[:max_len], index)


def build_examples(rows: list[dict[str, Any]], tokenizer, max_len: int, mask_prompt: bool) -> list[Example]:
    examples = [tokenize_row(r, i, tokenizer, max_len, mask_prompt) for i, r in enumerate(rows)]
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e.labels[1:])]
    if not kept:
        raise DataError(f"no row keeps a response token within model.max_seq_len={max_len}; raise it")
    return kept


def split_eval(examples: list[Example], d: DataConfig, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = eval_count(len(examples), d)
    eval_set = [examples[i] for i in order[:n_eval]]
    train_set = [examples[i] for i in sorted(order[n_eval:])]
    return train_set, eval_set


def collate(batch: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch; padding is masked from attention and loss."""
    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask,
            "row": torch.tensor([e.row for e in batch])}


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> list[int]:
    """The sample order of one epoch: a function of (seed, epoch) only, so a resumed run replays it."""
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def batches(examples: list[Example], batch_size: int, pad_id: int, shuffle: bool, seed: int,
            epoch: int) -> Iterator[dict[str, torch.Tensor]]:
    """One epoch of micro-batches in `epoch_order`."""
    order = epoch_order(len(examples), shuffle, seed, epoch)
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start:start + batch_size]], pad_id)
