"""metrics.jsonl in the run dir: one JSON object per line, each with a `step` key; flushed per record, so a crash
loses nothing logged before it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qlora_lab.sinks.summary import json_safe, write_summary


TABLES = ("eval/samples", "ledger/items", "ledger/phases")  # written beside metrics.jsonl, as <name, / as _>.jsonl


def roll_back(path: Path, step: int) -> None:
    """Resuming from the checkpoint of `step`: the records of `path` after it (logged before the crash, about to be
    recomputed) move to <stem>.rolled_back.jsonl, so `path` never holds a step twice and nothing is deleted."""
    if not path.is_file():
        return
    keep, drop = [], []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
        try:
            ok = json.loads(line)["step"] <= step
        except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash
            ok = False
        (keep if ok else drop).append(line if line.endswith("\n") else line + "\n")
    if drop:
        with open(path.with_name(f"{path.stem}.rolled_back.jsonl"), "a", encoding="utf-8") as f:
            f.writelines(drop)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


def table_path(run_dir: Path, name: str) -> Path:
    return run_dir / (name.replace("/", "_") + ".jsonl")


class JsonlSink:
    """metrics.jsonl in the run dir: one JSON object per line, each with a `step` key."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None:
            for p in (path, *(table_path(path.parent, t) for t in TABLES)):
                roll_back(p, resume_step)
        self._f = open(path, "a", encoding="utf-8")

    @property
    def run_id(self) -> None:
        return None  # the run dir is its id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._f.write(json.dumps({"step": step, **json_safe(metrics)}) + "\n")
        self._f.flush()  # a crash must not lose the steps before it

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]

    def summary(self, values: dict[str, Any]) -> None:
        write_summary(self.path.parent, values)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Appends the rows to <run dir>/<name with / as _>.jsonl (eval/samples -> eval_samples.jsonl)."""
        with open(table_path(self.path.parent, name), "a", encoding="utf-8") as f:
            f.writelines(json.dumps({"step": step, **row}) + "\n" for row in rows)

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None:
        """Nothing to do: the directory is in the run dir already."""

    def close(self) -> None:
        self._f.close()
