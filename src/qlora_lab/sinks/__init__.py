"""Where a run's records go: metrics.jsonl in the run dir always, and the tracking sinks `logger` names.

A tracking sink is a plug-in: one module in this package that defines `NAME`, `SCHEMA` (the dataclass of its keys,
`logger.<name>.*`), `problems(cfg)` (what stops it on this machine, e.g. credentials) and `open_sink(cfg, run) -> Sink`;
one YAML under conf/logger/ selects it (`logger=[wandb,mlflow]` takes several). The run holds a list of sinks
(`MetricLogger`) and never names one: it gives each the same flat metrics dict, tables, summary and artifacts,
and keeps each sink's own run id in its checkpoints so that a resume continues the same run in every sink.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

from qlora_lab.core.scrub import scrub, scrub_text


@dataclass
class RunRecord:
    """What a sink is told about the run it records."""

    run_dir: Path
    name: str  # the run's name (a sweep job's: by what the sweep varies)
    group: str | None  # the sweep's id: the jobs of one sweep are one group
    group_dir: Path | None  # the sweep dir, for a sink whose store the jobs share; None for a single run
    tags: list[str]
    config: dict[str, Any]  # flat: `lora.r`, `quantization.name`
    goals: dict[str, str]  # `eval/<metric>` -> "min" | "max", as the metric declares it (evaluation/metrics.py)
    # A resume: this sink's run id from the checkpoint (None: it did not record the run before) and the records of
    # metrics.jsonl up to the checkpoint, to refill what a killed process may not have flushed.
    resume_id: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    resuming: bool = False


class Sink(Protocol):
    @property
    def run_id(self) -> str | None:
        """The sink's id of this run, kept in checkpoints so that a resume continues it."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def table(self, name: str, rows: list[dict[str, Any]], step: int) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def artifact(self, path: Path, name: str, kind: str, metadata: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


SCHEMA_GROUP = "logger_schema"  # conf/logger/<name>.yaml starts from /logger_schema/<name>@<name>


def _discover() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "SCHEMA") and hasattr(module, "NAME"):
            found[module.NAME] = module
    return found


SINKS = _discover()


def register_schemas(store) -> None:
    """Each sink's schema in Hydra's ConfigStore, as /logger_schema/<name>."""
    for name, module in SINKS.items():
        store.store(group=SCHEMA_GROUP, name=name, node=module.SCHEMA)


def config_problems(logger: dict[str, Any]) -> list[str]:
    """A `logger` entry that is not a sink, or whose keys are not its sink's (a YAML that forgot its schema)."""
    p = []
    for name, cfg in logger.items():
        if name not in SINKS:
            p.append(f"logger.{name} is not a sink; the sinks are {', '.join(sorted(SINKS))} "
                     "(logger=[wandb,mlflow], or logger=none for metrics.jsonl alone)")
        elif not isinstance(cfg, SINKS[name].SCHEMA):
            p.append(f"logger.{name} holds {type(cfg).__name__}, not {SINKS[name].SCHEMA.__name__}; start "
                     f"conf/logger/{name}.yaml from /{SCHEMA_GROUP}/{name}@{name}")
    return p


def machine_problems(logger: dict[str, Any]) -> list[str]:
    return [p for name, cfg in logger.items() if name in SINKS for p in SINKS[name].problems(cfg)]


def open_sinks(logger: dict[str, Any], run: RunRecord, resume_ids: dict[str, str] | None = None
               ) -> list[tuple[str, Sink]]:
    """(name, sink) for each sink `logger` names, opened for `run`; on a resume (`resume_ids`: each sink's run id
    from the checkpoint) each continues its own earlier run. What a sink is told is scrubbed of credentials first
    (core/scrub.py); what it is given later goes through MetricLogger, which scrubs it too."""
    run = replace(run, name=scrub_text(run.name), group=scrub_text(run.group) if run.group else None,
                  tags=scrub(list(run.tags)), config=scrub(run.config), history=scrub(list(run.history)))
    sinks = []
    for name, cfg in logger.items():
        record = run if resume_ids is None else replace(run, resume_id=resume_ids.get(name), resuming=True)
        sink = SINKS[name].open_sink(cfg, record)
        if sink is not None:  # e.g. W&B with mode=disabled
            sinks.append((name, sink))
    return sinks
