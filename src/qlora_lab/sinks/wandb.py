"""A W&B run whose files live under the run dir (offline by default; `wandb sync` uploads them)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


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
            return
        run_id, history = resume
        try:
            self.run = wandb.init(resume_from=f"{run_id}?_step=0", **kw)
        except Exception as e:  # online, on a server without run rewind: continue after the steps it holds
            print(f"qlora-lab: warning: W&B cannot rewind run {run_id} ({type(e).__name__}: {e}); continuing it "
                  "after the last step the server holds", file=sys.stderr)
            self.run = wandb.init(id=run_id, resume="allow", **kw)
        for record in history:
            if record["step"] >= self.run.step:
                self.log({k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])

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

    @property
    def run_id(self) -> str:
        return self.run.id

    def close(self) -> None:
        self.run.finish()
