"""One flat dict per record, the same dict to every sink (metrics.jsonl, W&B). Names carry their unit
(`memory/peak_allocated_gib`, `train/tokens_per_s`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


class MetricLogger:
    """Fans one flat dict out to every sink."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @property
    def run_id(self) -> str | None:
        """The W&B run id, kept in checkpoints so that a resumed run continues the same W&B run."""
        return next((s.run_id for s in self.sinks if hasattr(s, "run_id")), None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for s in self.sinks:
            s.summary(values)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of one table (e.g. eval samples) logged at `step`, to every sink that keeps tables."""
        for s in self.sinks:
            s.table(name, rows, step)

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None:
        """A directory the run produced (e.g. the adapter) as a versioned artifact, to every sink that keeps them."""
        for s in self.sinks:
            s.artifact(path, name, kind, metadata)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # one sink failing to close must not hide the others' data
                print(f"warning: closing {type(s).__name__} failed: {e}", file=sys.stderr)
