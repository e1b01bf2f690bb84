"""Read the dataset's rows and check them, before any model loads (a bad row at line 9,000 should not cost a
model load); hold some out for evaluation.

What a row means is never guessed. A row is either a conversation (`messages`: each message's `role` and `content`)
or a `prompt` and its `response`; a row with both, a `system` key beside prompt/response (a system turn belongs in
`messages`, or in data.system_prompt for every row), a message's `weight` (every assistant turn trains) and a key
that appears twice in one JSON object (a reader keeps the last, silently) are refused, each named by its row. Any
other key is not read: the run says which, in how many rows (`ignored_keys`). Roles are checked against the chat
template once the tokenizer is known (data/tokenize.py `check_roles`)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any, Sequence

from qlora_lab.core.errors import DataError
from qlora_lab.core.schema import DataConfig

log = logging.getLogger(__name__)

MAX_REPORTED = 10


PAIR_KEYS, MESSAGES, MESSAGE_KEYS = ("prompt", "response"), "messages", ("role", "content")


def _present(row: dict, key: str) -> bool:
    """A key with a value (a datasets table of mixed rows gives every row every column, None where it had none)."""
    return row.get(key) is not None


def _row_problem(row: Any) -> str | None:
    if isinstance(row, list):  # a whole JSON array on one line
        return "is a list, not a JSON object (a JSON array file? write one object per line: jq -c '.[]' in.json)"
    if not isinstance(row, dict):
        return f"is a {type(row).__name__}, not a JSON object"
    if _present(row, MESSAGES) and any(_present(row, k) for k in PAIR_KEYS):
        return ("has both 'messages' and 'prompt'/'response', two forms of one example; keep one (the prompt as a "
                "user turn and the response as an assistant turn in 'messages', or the pair alone)")
    if _present(row, MESSAGES):
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            return "has 'messages' that is not a non-empty list"
        for j, msg in enumerate(msgs):
            if not isinstance(msg, dict) or not isinstance(msg.get("role"), str) \
                    or not isinstance(msg.get("content"), str):
                return f"message {j} is not an object with string 'role' and 'content'"
            if _present(msg, "weight"):
                return (f"message {j} has a 'weight', which is not read (every assistant turn trains); drop it, and "
                        "remove the turns that should not train")
        if not any(msg["role"] == "assistant" and msg["content"].strip() for msg in msgs):
            return "has no non-empty assistant message to learn from"
        return None
    if _present(row, "system"):
        return ("has a 'system' key beside 'prompt'/'response', which such rows do not read; write the row as "
                "'messages' with a system turn first, or set data.system_prompt for every row")
    missing = [k for k in ("prompt", "response") if k not in row]
    if missing:
        return f"lacks {' and '.join(repr(k) for k in missing)} (expected 'prompt'+'response' or 'messages'; " \
               f"it has keys {sorted(row)})"
    for k in ("prompt", "response"):
        if not isinstance(row[k], str):
            return f"has {k!r} of type {type(row[k]).__name__}, expected a string"
    if not row["response"].strip():
        return "has an empty (or whitespace-only) 'response'"
    return None


def check_rows(rows: list[Any], where: str) -> None:
    """Raise DataError naming every bad row (up to MAX_REPORTED) of `rows` read from `where`; say which keys the
    good rows hold that nothing reads."""
    if not rows:
        raise DataError(f"{where} has no rows; give a dataset with at least one prompt/response row")
    bad = [(i, why) for i, row in enumerate(rows) if (why := _row_problem(row))]
    if bad:
        lines = "\n".join(f"  - row {i + 1} {why}" for i, why in bad[:MAX_REPORTED])
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        raise DataError(f"{len(bad)} bad row(s) in {where} (rows counted from 1):\n{lines}{more}")
    ignored = ignored_keys(rows)
    if ignored:
        log.warning(f"data: {where}: keys not read, ignored: "
                    + ", ".join(f"{k!r} ({n:,} row{'s' if n > 1 else ''})" for k, n in ignored.items())
                    + "; a row is read as 'prompt'+'response' or as 'messages' (each message's 'role' and 'content')")


def ignored_keys(rows: list[dict[str, Any]]) -> dict[str, int]:
    """Keys of `rows` (and of their messages, as `messages[].key`) that nothing reads, with how many rows hold each."""
    counts: dict[str, int] = {}
    for row in rows:
        keys = {k for k in row if _present(row, k) and k not in (*PAIR_KEYS, MESSAGES)}
        for msg in row.get(MESSAGES) or []:
            keys |= {f"messages[].{k}" for k in msg if _present(msg, k) and k not in MESSAGE_KEYS}
        for k in keys:
            counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a key given twice (the standard reader keeps the last, silently)."""
    seen: dict[str, Any] = {}
    for k, v in pairs:
        if k in seen:
            raise _DuplicateKey(k)
        seen[k] = v
    return seen


# Files that are not text at all: named by their first bytes, instead of "line 1 is not valid UTF-8".
BINARY_FORMATS = {b"\x1f\x8b": "gzip-compressed; decompress it first (gunzip -k FILE)",
                  b"PAR1": "a Parquet file; write its rows as JSON lines, or load it with data=hf",
                  b"PK\x03\x04": "a zip archive; extract the .jsonl file from it"}


def _read_jsonl(path: Path) -> list[Any]:
    with open(path, "rb") as f:
        head = f.read(4)
    for magic, what in BINARY_FORMATS.items():
        if head.startswith(magic):
            raise DataError(f"{path} is {what.replace('FILE', str(path))}")
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM (some Windows editors write one)
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: line {n} is not valid UTF-8 ({e.reason} at byte {e.start}); "
                                "re-encode the file as UTF-8") from e
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line, object_pairs_hook=_unique_keys))
            except _DuplicateKey as e:
                raise DataError(f"{path}: line {n} has the key {e.args[0]!r} twice in one object; a JSON reader keeps "
                                "the last one without a word, so which one trains would be an accident: keep one") \
                    from None
            except json.JSONDecodeError as e:
                array = n == 1 and line.lstrip().startswith("[")
                control = "control character" in e.msg  # a raw tab or newline inside a string
                why = f"{e.msg.removesuffix(' at')} at column {e.colno}"
                raise DataError(f"{path}: line {n} is not valid JSON ({why}); each line must be one object"
                                + (" (inside a string a tab is written \\t, a newline \\n)" if control else "")
                                + ("; this looks like a JSON array: convert it to JSON lines with "
                                   f"jq -c '.[]' {path} > train.jsonl" if array else "")) from e
    return rows


def read_rows(d: DataConfig) -> list[dict[str, Any]]:
    """The configured dataset's rows (the first `data.num_rows` when set), checked."""
    if d.source == "jsonl":
        rows = _read_jsonl(Path(d.path).expanduser())
        where = d.path
    else:
        import datasets

        local = Path(d.path).expanduser()
        rows = list(datasets.load_dataset(str(local) if local.exists() else d.path, d.config_name, split=d.split))
        where = f"dataset {d.path} (split {d.split})"
    if d.num_rows:
        rows = rows[:d.num_rows]
    check_rows(rows, where)
    return rows


def eval_count(n_rows: int, d: DataConfig) -> int:
    """How many of `n_rows` rows are held out for evaluation."""
    return min(int(n_rows * d.eval_fraction), d.max_eval_rows)


def check_size(n_rows: int, d: DataConfig, micro_batch: int, processes: int = 1, after: str = "") -> None:
    """At least one full micro-batch per process must be left for training once the eval rows are held out, and an
    eval split asked for must hold a row; both problems are named at once. `after` says what reduced the rows
    (truncation), for the message."""
    n_eval = eval_count(n_rows, d)
    n_train = n_rows - n_eval
    need = micro_batch * processes
    has = f"the dataset has {n_rows} row{'s' if n_rows != 1 else ''}{after}"
    problems = []
    if n_train < need:
        per = f" x {processes} processes" if processes > 1 else ""
        problems.append(f"{n_train} left for training after {n_eval} eval rows: fewer than one micro-batch "
                        f"(data.micro_batch_size={micro_batch}{per}); set data.micro_batch_size<="
                        f"{max(n_train // processes, 1)} or add rows")
    if n_eval == 0 and d.eval_fraction > 0 and d.max_eval_rows > 0:
        # raising the fraction helps only while one held-out row still leaves a micro-batch to train on
        fraction = 1 / n_rows if n_rows else 1.0
        raise_it = (f"raise data.eval_fraction to {fraction:.2g} or more, "
                    if fraction < 1 and n_rows - 1 >= need else "")
        problems.append(f"data.eval_fraction={d.eval_fraction} of them holds out no row, so the eval loss would be "
                        f"undefined; add rows, {raise_it}or set data.eval_fraction=0 to train without evaluation")
    if problems:
        raise DataError(f"{has}, " + "; and ".join(problems))


def fingerprint(rows: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True).encode())
    return h.hexdigest()[:16]


def split_indices(n: int, d: DataConfig, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) positions of `n` items: a seeded random `eval_count` held out; the training ones in order."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_eval = eval_count(n, d)
    return sorted(order[n_eval:]), order[:n_eval]


def split_eval(items: Sequence, d: DataConfig, seed: int) -> tuple[Sequence, Sequence]:
    """(train, eval) of `items` as `split_indices` splits them; a view that can `select` (the tokenized store's)
    stays a view, so no example is built here."""
    train, held = split_indices(len(items), d, seed)
    if hasattr(items, "select"):
        return items.select(train), items.select(held)
    return [items[i] for i in train], [items[i] for i in held]
