"""A W&B run whose files live under the run dir (offline by default; `wandb sync` uploads them)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from qlora_lab.core.goals import goal
from qlora_lab.core.schema import Metric

MAX_SUMMARY = ("memory/peak_allocated_gib", "memory/peak_reserved_gib")  # a run's memory is its largest reading


class WandbSink:
    """A W&B run whose files live under the run dir (offline by default; `wandb sync` uploads them)."""

    def __init__(self, *, project: str, entity: str | None, mode: str, run_dir: Path, name: str,
                 group: str | None, tags: list[str], config: dict[str, Any],
                 resume: tuple[str, list[dict[str, Any]]] | None = None):
        """`resume=(run id, records)` continues W&B run `run id` and first re-logs `records` (metrics.jsonl up to
        the checkpoint): the W&B copy of a crashed process may lack its last seconds (W&B flushes its run file
        every few seconds; a SIGKILL loses the rest), so the run is rewound to its start and refilled from the
        durable local log. Synced in order (`wandb sync <run dir>/wandb/offline-run-*`), the files make one run.
        """
        import wandb  # lazy: logger=none never pays for it

        self._wandb = wandb
        kw = dict(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name, group=group,
                  tags=[t[:64] for t in tags], config=config, job_type="train",
                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        if resume is None:
            self.run = wandb.init(**kw)
            self._define_metrics()
            return
        run_id, history = resume
        try:
            self.run = wandb.init(resume_from=f"{run_id}?_step=0", **kw)
        except Exception as e:  # online, on a server without run rewind: continue after the steps it holds
            print(f"qlora-lab: warning: W&B cannot rewind run {run_id} ({type(e).__name__}: {e}); continuing it "
                  "after the last step the server holds", file=sys.stderr)
            self.run = wandb.init(id=run_id, resume="allow", **kw)
        self._define_metrics()
        for record in history:
            if record["step"] >= self.run.step:
                self.log({k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])

    def _define_metrics(self) -> None:
        """What a W&B runs table shows for a metric: each eval metric at its best (min for losses, max for scores;
        `summary/best_eval_<m>_step` says when), memory at its max, instead of the last value logged."""
        for m in Metric:
            self.run.define_metric(f"eval/{m}", summary=goal(f"eval/{m}"))
        for key in MAX_SUMMARY:
            self.run.define_metric(key, summary="max")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        if rows:
            columns = ["step", *rows[0]]
            data = [[step, *(r.get(c) for c in columns[1:])] for r in rows]
            self.run.log({name: self._wandb.Table(columns=columns, data=data)}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None:
        """`path` as artifact `<name>-<run id>`. Its files are referenced where they are (policy immutable), not
        copied to W&B's staging dir in the home directory: the offline run syncs from the run dir alone."""
        art = self._wandb.Artifact(f"{name}-{self.run.id}", type=kind, metadata=metadata)
        art.add_dir(str(Path(path).resolve()), policy="immutable")
        self.run.log_artifact(art)

    @property
    def run_id(self) -> str:
        return self.run.id

    def close(self) -> None:
        self.run.finish()
