"""The MLflow sink: params, per-step metrics, the summary, tables and the adapter in an MLflow tracking store.

conf/logger/mlflow.yaml (`logger=mlflow`, or `logger=[wandb,mlflow]` for both). By default the store is local and
needs no server: a SQLite database `mlflow.db` with artifacts in `mlartifacts/` beside it, in the run dir (a
single run) or in the sweep dir (a sweep: its jobs are runs of one experiment under one parent run named after the
sweep). `logger.mlflow.tracking_uri` names another store (a server's http URI, another sqlite file). Read it with
`mlflow ui --backend-store-uri sqlite:///<dir>/mlflow.db` or `MlflowClient(tracking_uri=...)`.

A resume continues the same MLflow run (its id is kept in every checkpoint). MLflow cannot delete a logged value:
steps a crashed process logged after its last checkpoint stay in the run's history beside their recomputed values
(same step, a later timestamp); metrics.jsonl and W&B hold only the recomputed ones.
"""

from __future__ import annotations

import fcntl
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from qlora_lab.core.effects import Effect, key
from qlora_lab.core.schema import Frozen
from qlora_lab.sinks import RunRecord

NAME = "mlflow"
STORE = "mlflow.db"
ARTIFACTS = "mlartifacts"
SWEEP_TAG, PARENT_TAG = "qlora_lab.sweep", "qlora_lab.sweep_parent"
BATCH = 100  # params per log_batch (MLflow's limit); metrics go 1000 at a time


@dataclass
class MlflowConfig(Frozen):
    tracking_uri: Optional[str] = key(Effect.location)  # null: sqlite:///<run dir or sweep dir>/mlflow.db
    experiment: str = key(Effect.location)  # the experiment the run (a sweep: its parent and jobs) goes into


SCHEMA = MlflowConfig


def problems(cfg: MlflowConfig) -> list[str]:
    import importlib.util

    missing = [m for m in ("mlflow", "sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if missing:
        return [f"logger=mlflow needs {', '.join(missing)} (pip install mlflow-skinny sqlalchemy alembic), or drop "
                "mlflow from logger"]
    return []


def open_sink(cfg: MlflowConfig, run: RunRecord) -> "MlflowSink":
    return MlflowSink(cfg, run)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    """What MLflow takes as metrics: finite numbers (a NaN loss is logged as NaN, which MLflow keeps)."""
    return {k: float(v) for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and (math.isfinite(v) or math.isnan(v))}


class MlflowSink:
    def __init__(self, cfg: MlflowConfig, run: RunRecord):
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its store migrations log at INFO on every open
        logging.getLogger("alembic").setLevel(logging.WARNING)
        from mlflow.tracking import MlflowClient

        home = (run.group_dir or run.run_dir).resolve()
        self.uri = cfg.tracking_uri or f"sqlite:///{home / STORE}"
        self.client = MlflowClient(tracking_uri=self.uri)
        self._status = "FINISHED"
        with _lock(home if cfg.tracking_uri is None else None):  # a sweep's jobs share the store
            experiment = self._experiment(cfg.experiment, None if cfg.tracking_uri else home / ARTIFACTS)
            self.parent = self._parent(experiment, run) if run.group else None
        if run.resume_id is not None:
            self.id = run.resume_id
            self.client.update_run(self.id, status="RUNNING")
            logged = {m.step for m in self.client.get_metric_history(self.id, "train/loss")}
            for record in run.history:  # what a killed process may not have written (MLflow logs synchronously)
                if "train/loss" in record and record["step"] not in logged:
                    self.log({k: v for k, v in record.items() if k != "step"}, record["step"])
            return
        tags = {"qlora_lab.run_dir": str(run.run_dir.resolve()), **{f"tag.{t[:200]}": "" for t in run.tags}}
        if self.parent:
            tags.update({"mlflow.parentRunId": self.parent, SWEEP_TAG: run.group})
        self.id = self.client.create_run(experiment, run_name=run.name, tags=tags).info.run_id
        self._params(run.config)

    def _experiment(self, name: str, artifacts: Path | None) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)

    def _parent(self, experiment: str, run: RunRecord) -> str:
        """The sweep's parent run: found by its tag, or created by the sweep's first job."""
        found = self.client.search_runs([experiment], filter_string=f"tags.`{SWEEP_TAG}` = '{run.group}' and "
                                                                     f"tags.`{PARENT_TAG}` = 'true'", max_results=1)
        if found:
            return found[0].info.run_id
        return self.client.create_run(experiment, run_name=run.group,
                                      tags={SWEEP_TAG: run.group, PARENT_TAG: "true"}).info.run_id

    def _params(self, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        params = [Param(k[:250], str(v)[:6000]) for k, v in config.items()]
        for i in range(0, len(params), BATCH):
            self.client.log_batch(self.id, params=params[i:i + BATCH])

    @property
    def run_id(self) -> str:
        return self.id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        ts = _now_ms()
        batch = [Metric(k, v, ts, step) for k, v in _numbers(metrics).items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.id, metrics=batch[i:i + 1000])

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """A JSON artifact per table and step, in pandas' split orientation (what mlflow.log_table writes)."""
        if rows:
            columns = list(rows[0])
            self.client.log_dict(self.id, {"columns": columns, "data": [[r.get(c) for c in columns] for r in rows]},
                                 f"tables/{name.replace('/', '_')}_step{step}.json")

    def summary(self, values: dict[str, Any]) -> None:
        """Numbers as metrics at the run's last step, the rest as tags; the status decides how the run ends."""
        step = int(values.get("summary/steps") or 0)
        self.log({k: v for k, v in values.items() if k.startswith("summary/")}, step)
        for k, v in values.items():
            if isinstance(v, str):
                self.client.set_tag(self.id, k, v[:5000])
        status = values.get("summary/status")
        if status is not None:
            self._status = "FINISHED" if status in ("finished", "planned", "skipped") else \
                "KILLED" if status == "interrupted" else "FAILED"

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None:
        self.client.log_artifacts(self.id, str(path), name)
        self.client.log_dict(self.id, {"type": kind, **metadata}, f"{name}.metadata.json")

    def close(self) -> None:
        self.client.set_terminated(self.id, self._status)
        if self.parent:  # the parent ends as its jobs do: FAILED once any failed
            parent = self.client.get_run(self.parent).info.status
            self.client.set_terminated(self.parent, "FAILED" if "FAILED" in (parent, self._status) else "FINISHED")


class _lock:
    """An exclusive lock on <dir>/.mlflow.lock while a job finds or creates the experiment and the sweep's parent run
    (jobs of a parallel launcher start at once); nothing to lock for a store the user named."""

    def __init__(self, home: Path | None):
        self.path = None if home is None else home / ".mlflow.lock"

    def __enter__(self):
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.f = open(self.path, "w")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.path is not None:
            self.f.close()
