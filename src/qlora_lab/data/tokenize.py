"""Render rows with the chat template and label only what the model should learn to write; say what truncation at
`model.max_seq_len` did to them."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from jinja2 import TemplateError

from qlora_lab.core.errors import DataError
from qlora_lab.core.schema import DataConfig

IGNORE_INDEX = -100  # label value that cross-entropy skips
SHOWN_ROWS = 5  # row numbers named in a report


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    row: int  # index of the source row, so a bad batch can be traced to its rows
    truncated: bool = False  # the rendered row was longer than max_len and was cut


def _cut(ids: list[int], labels: list[int], index: int, max_len: int) -> Example:
    return Example(ids[:max_len], labels[:max_len], index, truncated=len(ids) > max_len)


def _rows(indices: list[int]) -> str:
    """Row numbers counted from 1, as the row checks name them: `rows 3, 9, 12, ... (+40 more)`."""
    shown = ", ".join(str(i + 1) for i in indices[:SHOWN_ROWS])
    return f"row{'s' if len(indices) > 1 else ''} {shown}" + \
        (f", ... (+{len(indices) - SHOWN_ROWS} more)" if len(indices) > SHOWN_ROWS else "")


@dataclass
class Tokenized:
    """The examples that keep a response token, and what truncation did to the rows."""

    examples: Sequence[Example]  # a list, or a lazy view over the tokenized store (data/store.py)
    rows: int  # rows tokenized
    dropped: list[int]  # rows whose every response token lies beyond max_len: nothing to learn, left out
    truncated: list[int]  # kept rows cut at max_len (part of their response may be lost)
    max_len: int

    def metrics(self) -> dict[str, int]:
        return {"data/rows": self.rows, "data/dropped_rows": len(self.dropped),
                "data/truncated_rows": len(self.truncated)}

    def report(self) -> str | None:
        """One line per kind of row that truncation touched, with the first row numbers; None when it touched none."""
        lines = []
        if self.dropped:
            lines.append(f"{len(self.dropped)} of {self.rows} rows dropped: no response token within "
                         f"model.max_seq_len={self.max_len} ({_rows(self.dropped)})")
        if self.truncated:
            lines.append(f"{len(self.truncated)} of {self.rows} rows truncated to model.max_seq_len={self.max_len} "
                         f"tokens ({_rows(self.truncated)})")
        return "\n".join(lines) or None

    def check(self, d: DataConfig) -> None:
        """Refuse a run that truncation would leave training on much less than the dataset."""
        share = len(self.dropped) / self.rows
        if share > d.max_dropped_fraction:
            raise DataError(
                f"{len(self.dropped)} of {self.rows} rows ({share:.1%}) have no response token within "
                f"model.max_seq_len={self.max_len} ({_rows(self.dropped)}), more than data.max_dropped_fraction="
                f"{d.max_dropped_fraction}; raise model.max_seq_len, shorten or remove those rows, or raise "
                "data.max_dropped_fraction to train without them")


def to_messages(row: dict[str, Any], system_prompt: str | None = None) -> list[dict[str, str]]:
    """The row as chat messages; `system_prompt` (data.system_prompt) opens a conversation that has no system turn."""
    if row.get("messages") is not None:
        messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    else:
        messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["response"]}]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


STANDARD_ROLES = ("system", "user", "assistant")


def template_roles(template: str | None) -> set[str]:
    """The roles a chat template knows: system, user and assistant, and every other role it names (a quoted word it
    compares a message's role with, e.g. 'tool' or 'ipython')."""
    named = set(re.findall(r"""role['"]?\]?\s*==\s*['"]([\w-]+)['"]""", template or ""))
    named |= set(re.findall(r"""['"]([\w-]+)['"]\s*==\s*(?:message|m|msg)\b""", template or ""))
    return set(STANDARD_ROLES) | named


def check_roles(rows: list[dict[str, Any]], tokenizer) -> None:
    """Refuse conversations with a role the chat template does not know (`human`, `gpt` from a ShareGPT export): a
    template that writes any role as text would train on `<|human|>` as words, one that only knows its own would
    drop or misplace the turn, and prompt masking trains on `assistant` turns alone."""
    known = template_roles(getattr(tokenizer, "chat_template", None))
    unknown: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        for msg in row.get("messages") or []:
            if msg["role"] not in known:
                unknown.setdefault(msg["role"], []).append(i)
    if unknown:
        lines = "; ".join(f"role {r!r} in {_rows(sorted(set(ix)))}" for r, ix in unknown.items())
        raise DataError(f"{lines}: not a role the chat template knows ({', '.join(sorted(known))}); rename it "
                        "(ShareGPT's human/gpt are user/assistant), or use a tokenizer whose chat template has it")


def _encode(tokenizer, text: str) -> list[int]:
    # The template already wrote any BOS it wants; letting the tokenizer add one would double it.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def tokenize_row(row: dict[str, Any], index: int, tokenizer, max_len: int, mask_prompt: bool,
                 system_prompt: str | None = None) -> Example:
    """Render one row with the chat template; label only the assistant turns when `mask_prompt`."""
    messages = to_messages(row, system_prompt)
    if tokenizer.chat_template is None:
        if row.get("messages") is not None:
            raise DataError("the dataset has 'messages' rows but the tokenizer has no chat template; "
                            "use a chat/instruct model's tokenizer or give prompt/response rows")
        prompt = _encode(tokenizer, row["prompt"])
        response = _encode(tokenizer, row["response"]) + [tokenizer.eos_token_id]
        ids = prompt + response
        labels = ([IGNORE_INDEX] * len(prompt) if mask_prompt else prompt) + response
        return _cut(ids, labels, index, max_len)

    def render(msgs: list[dict[str, str]], **kw) -> str:
        try:
            return tokenizer.apply_chat_template(msgs, tokenize=False, **kw)
        except TemplateError as e:  # the template's own raise_exception, e.g. roles that do not alternate
            raise DataError(f"row {index + 1}: the tokenizer's chat template refuses it ({e}); fix or remove the row "
                            "(e.g. alternate user/assistant turns), or give prompt/response rows") from e

    ids = _encode(tokenizer, render(messages))
    if not mask_prompt:
        return _cut(ids, list(ids), index, max_len)
    labels = [IGNORE_INDEX] * len(ids)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start = len(_encode(tokenizer, render(messages[:i], add_generation_prompt=True)))
        end = len(_encode(tokenizer, render(messages[: i + 1])))
        if end > len(ids) or start > end:
            raise DataError("the chat template does not render a conversation's prefix as a prefix of the whole; "
                            "prompt masking cannot find the assistant turns: set data.mask_prompt=false")
        labels[start:end] = ids[start:end]
    return _cut(ids, labels, index, max_len)


# The project's own row tokenizer: `tokenize_row` being anything else at run time means a hook replaced it (a test's
# fault injection, a user's instrumentation), whose side effects the tokenized store must not skip (data/store.py).
OWN_TOKENIZE_ROW = tokenize_row


def learns(e: Example) -> bool:
    """The example keeps a response token the loss can use (label 0 is never a target: nothing precedes it)."""
    return any(t != IGNORE_INDEX for t in e.labels[1:])


def nothing_to_learn(max_len: int) -> DataError:
    return DataError(f"no row keeps a response token within model.max_seq_len={max_len}; raise it")


def build_examples(rows: list[dict[str, Any]], tokenizer, max_len: int, mask_prompt: bool,
                   system_prompt: str | None = None) -> Tokenized:
    """Every row rendered and labelled; rows left without a response token are counted and left out."""
    examples = [tokenize_row(r, i, tokenizer, max_len, mask_prompt, system_prompt) for i, r in enumerate(rows)]
    kept = [e for e in examples if learns(e)]
    if not kept:
        raise nothing_to_learn(max_len)
    kept_rows = {e.row for e in kept}
    return Tokenized(kept, len(rows), [e.row for e in examples if e.row not in kept_rows],
                     [e.row for e in kept if e.truncated], max_len)
