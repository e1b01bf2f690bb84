"""The W&B sink: a W&B run whose files live under the run dir (offline by default; `wandb sync` uploads them).

conf/logger/wandb.yaml (`logger=wandb`, the default; `logger=[wandb,mlflow]` with MLflow).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Iterator, Optional

from qlora_lab.core.effects import Effect, key
from qlora_lab.core.schema import Frozen
from qlora_lab.core.scrub import scrub_text
from qlora_lab.sinks import RunRecord

log = logging.getLogger(__name__)

NAME = "wandb"
MAX_SUMMARY = ("memory/peak_allocated_gib", "memory/peak_reserved_gib")  # a run's memory is its largest reading


class WandbMode(StrEnum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class WandbConfig(Frozen):
    project: str = key(Effect.location)
    entity: Optional[str] = key(Effect.location)
    mode: WandbMode = key(Effect.location)  # offline (files in the run dir) | online (needs `wandb login`) | disabled


SCHEMA = WandbConfig


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def problems(cfg: WandbConfig) -> list[str]:
    if cfg.mode == "online" and not _has_credentials():
        return ["logger.wandb.mode=online but no W&B credentials were found; run `wandb login` (or set "
                "WANDB_API_KEY), or keep logger.wandb.mode=offline and `wandb sync` later"]
    return []


def open_sink(cfg: WandbConfig, run: RunRecord) -> "WandbSink | None":
    if cfg.mode == "disabled":
        return None
    return WandbSink(cfg, run)


@contextlib.contextmanager
def _argv_scrubbed() -> Iterator[None]:
    """W&B records the command line (sys.argv) in its run's metadata while it starts: let it read the scrubbed one
    (core/scrub.py), as every other record holds."""
    saved = list(sys.argv)
    sys.argv[:] = [scrub_text(a) for a in saved]
    try:
        yield
    finally:
        sys.argv[:] = saved


class WandbSink:
    """A W&B run in the run dir. On a resume (`run.resume_id`) it continues that run: rewound to its start and
    refilled from `run.history` (metrics.jsonl up to the checkpoint), since the W&B copy of a crashed process may lack
    its last seconds (W&B flushes its run file every few seconds; a SIGKILL loses the rest). Synced in order
    (`wandb sync <run dir>/wandb/offline-run-*`), the files make one run."""

    def __init__(self, cfg: WandbConfig, run: RunRecord):
        import wandb  # lazy: a run without W&B never pays for it

        self._wandb = wandb
        kw = dict(project=cfg.project, entity=cfg.entity, mode=str(cfg.mode), dir=str(run.run_dir), name=run.name,
                  group=run.group, tags=[t[:64] for t in run.tags], config=run.config, job_type="train",
                  # several runs at once in one process: a fused sweep's jobs each have theirs
                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True, reinit="create_new"))
        if run.resume_id is None:
            with _argv_scrubbed():
                self.run = wandb.init(**kw)
            self._define_metrics(run.goals)
            return
        try:
            with _argv_scrubbed():
                self.run = wandb.init(resume_from=f"{run.resume_id}?_step=0", **kw)
        except Exception as e:  # online, on a server without run rewind: continue after the steps it holds
            log.warning(f"W&B cannot rewind run {run.resume_id} ({type(e).__name__}: {e}); continuing it after the "
                        "last step the server holds")
            with _argv_scrubbed():
                self.run = wandb.init(id=run.resume_id, resume="allow", **kw)
        self._define_metrics(run.goals)
        for record in run.history:
            if record["step"] >= self.run.step:
                self.log({k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])

    def _define_metrics(self, goals: dict[str, str]) -> None:
        """What a W&B runs table shows for a metric: each eval metric at its best (as the metric declares it;
        `summary/best_eval_<m>_step` says when), memory at its max, instead of the last value logged."""
        for name, goal in goals.items():
            self.run.define_metric(name, summary=goal)
        for name in MAX_SUMMARY:
            self.run.define_metric(name, summary="max")

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
