"""The shipped synthetic tasks: string transforms on short random words (`first abc -> a`).

Every response is a deterministic function of its prompt, so a model can learn it and a generation can be scored
exactly. Two files ship, each the task a model can learn in a short CPU run:
- tiny_tasks.jsonl (data=tiny): first, last, length. The tiny random-init model learns these to ~95% exact match in
  300 steps; reverse, sort and repeat it cannot (measured: exact match stays near 0 however long it trains).
- string_tasks.jsonl (data=strings): upper, copy, first, last, for a real pretrained model (model=smollm2_135m:
  0% zero-shot, ~77% after 32 steps of 8 rows).
`python -m qlora_lab.data.tasks` regenerates both after a change to a task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlora_lab.core.paths import ASSET_DIR, TINY_DATA

_OPS = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "repeat": lambda w: w + w,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "length": lambda w: str(len(w)),
    "upper": lambda w: w.upper(),
    "copy": lambda w: w,
}
TINY_OPS = ("first", "last", "length")
STRING_OPS = ("upper", "copy", "first", "last")
STRING_DATA = ASSET_DIR / "string_tasks.jsonl"


def generate_rows(n: int, ops: tuple[str, ...], seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/response rows of the string transforms `ops`, the same for the same seed."""
    rng = random.Random(seed)
    letters = "abcdefghij"  # a small alphabet keeps the task learnable by a tiny model
    rows = []
    for _ in range(n):
        op = rng.choice(sorted(ops))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"{op} {word}", "response": _OPS[op](word)})
    return rows


def write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    write_rows(TINY_DATA, generate_rows(4000, TINY_OPS))
    write_rows(STRING_DATA, generate_rows(2000, STRING_OPS, seed=1))
    print(f"wrote {TINY_DATA} and {STRING_DATA}")
