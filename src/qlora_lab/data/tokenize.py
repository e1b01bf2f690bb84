"""Render rows with the chat template and label only what the model should learn to write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qlora_lab.core.errors import DataError

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    row: int  # index of the source row, so a bad batch can be traced to its rows


def to_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The row as chat messages; `system_prompt` (data.system_prompt) opens a conversation that has no system turn."""
    if "messages" in row:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS it wants; letting the tokenizer add one would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_row(row: dict[str, Any], index: int, tokenizer, max_len: int, mask_prompt: bool,
                 system_prompt: str | None = None) -> Example:
    """Render one row with the chat template; label only the assistant turns when `mask_prompt`."""
    messages = to_messages(row, system_prompt)
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


def build_examples(rows: list[dict[str, Any]], tokenizer, max_len: int, mask_prompt: bool,
                   system_prompt: str | None = None) -> list[Example]:
    examples = [tokenize_row(r, i, tokenizer, max_len, mask_prompt, system_prompt) for i, r in enumerate(rows)]
    kept = [e for e in examples if any(t != IGNORE_INDEX for t in e.labels[1:])]
    if not kept:
        raise DataError(f"no row keeps a response token within model.max_seq_len={max_len}; raise it")
    return kept
