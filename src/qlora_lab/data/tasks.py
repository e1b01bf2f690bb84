"""The shipped synthetic task: string transforms (reverse, sort, repeat, ...) on short random words.

Every response is a deterministic function of its prompt, so a small model can learn it and a generation can be
scored exactly. `python -m qlora_lab.data.tasks` regenerates the shipped file after a change to the task.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from qlora_lab.core.paths import TINY_DATA

_OPS = {
    "reverse": lambda w: w[::-1],
    "sort": lambda w: "".join(sorted(w)),
    "repeat": lambda w: w + w,
    "first": lambda w: w[0],
    "last": lambda w: w[-1],
    "length": lambda w: str(len(w)),
}


def generate_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` prompt/response rows of the string-transform task, the same for the same seed."""
    rng = random.Random(seed)
    letters = "abcdefghij"  # a small alphabet keeps the task learnable by a tiny model
    rows = []
    for _ in range(n):
        op = rng.choice(sorted(_OPS))
        word = "".join(rng.choice(letters) for _ in range(rng.randint(3, 6)))
        rows.append({"prompt": f"{op} {word}", "response": _OPS[op](word)})
    return rows


def write_tiny_data(path: Path = TINY_DATA, n: int = 4000, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in generate_rows(n, seed):
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write_tiny_data()
    print(f"wrote {TINY_DATA}")
