"""One flat dict per record, the same dict to every sink (metrics.jsonl, W&B, MLflow). Names carry their unit
(`memory/peak_allocated_gib`, `train/tokens_per_s`). Every record is scrubbed of credentials on its way
(core/scrub.py): an eval sample or a failure's reason may quote what it should not."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qlora_lab.core.scrub import scrub
from qlora_lab.sinks import Sink

log = logging.getLogger(__name__)


class MetricLogger:
    """Fans one flat dict out to every sink; `sinks` are (name, sink), metrics.jsonl's first."""

    def __init__(self, sinks: list[tuple[str, Sink]]):
        self.sinks = sinks

    @property
    def run_ids(self) -> dict[str, str]:
        """Each tracking sink's id of this run, kept in checkpoints so that a resumed run continues it everywhere."""
        return {name: s.run_id for name, s in self.sinks if s.run_id is not None}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        metrics = scrub(metrics)
        for _, s in self.sinks:
            s.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        values = scrub(values)
        for _, s in self.sinks:
            s.summary(values)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Rows of one table (e.g. eval samples) logged at `step`, to every sink that keeps tables."""
        rows = scrub(rows)
        for _, s in self.sinks:
            s.table(name, rows, step)

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None:
        """A directory the run produced (e.g. the adapter) as a versioned artifact, to every sink that keeps them."""
        metadata = scrub(metadata)
        for _, s in self.sinks:
            s.artifact(path, name, kind, metadata)

    def close(self) -> None:
        for name, s in self.sinks:
            try:
                s.close()
            except Exception as e:  # one sink failing to close must not hide the others' data
                log.warning(f"closing the {name} sink failed: {e}")
