"""What Hydra composes against: the run's schema (core/schema.py) and each plug-in's own, registered once in
Hydra's ConfigStore before anything is composed (train.py, the tests, the benchmarks).

conf/train.yaml starts from `train_schema`; conf/quantization/<x>.yaml from /quantization_schema/<backend>
(model/quantize/<backend>.py); conf/logger/<sink>.yaml from /logger_schema/<sink> (sinks/<sink>.py).
"""

from __future__ import annotations

import functools
import re
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from qlora_lab import sinks
from qlora_lab.core.effects import Declared, declared, effects
from qlora_lab.core.resolvers import register_resolvers
from qlora_lab.core.schema import TrainConfig
from qlora_lab.model import quantize


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    quantize.register_schemas(store)
    sinks.register_schemas(store)
    register_resolvers(named=named)


@functools.cache
def _all_declarations() -> dict[str, Declared]:
    """Every key any backend or sink may bring, declared: what names a run before its config is composed."""
    table = effects(TrainConfig)
    for _, schema in quantize.BACKENDS.values():
        table.update({f"quantization.{k}": d for k, d in effects(schema).items()})
    for name, module in sinks.SINKS.items():
        table.update({f"logger.{name}.{k}": d for k, d in effects(module.SCHEMA).items()})
    return table


def named(key: str) -> bool:
    """Whether an override of `key` names a run and tags it: every key but a location (a group choice such as
    `quantization=nf4` or `experiment=...` does)."""
    d = declared(_all_declarations(), key)
    return d is None or d.effect.named


def key_table(config: dict[str, Any]) -> dict[str, Declared]:
    """What each key of a recorded config (`RunSpec.config()`, a checkpoint's config.json) affects: the run schema's
    declarations, its quantization backend's and its sinks'."""
    table = effects(TrainConfig)
    backend = quantize.BACKENDS.get(config.get("quantization", {}).get("backend"))
    if backend is not None:
        table.update({f"quantization.{k}": d for k, d in effects(backend[1]).items()})
    for name in config.get("logger", {}) or {}:
        if name in sinks.SINKS:
            table.update({f"logger.{name}.{k}": d for k, d in effects(sinks.SINKS[name].SCHEMA).items()})
    return table


def literal(value: Any) -> Any:
    """A resolved config as OmegaConf literals: a string holding `${...}` (what an escaped `\\${oc.env:X}` resolved
    to) escaped again, so that making a config of it does not resolve it a second time (into the variable's value,
    in a sweep job, where a single run kept the text)."""
    if isinstance(value, str):
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1)) + 1) + "${", value)
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    return value


def typed(config: dict[str, Any]) -> DictConfig:
    """A recorded config (a sweep job's, run_info.json's) back into the typed schema it was composed from: the run
    schema with its quantization backend's and its sinks' schemas in place, so that it validates and converts to a
    TrainConfig as the composed one did. Its values are what they resolved to once (`literal`): nothing in it is
    resolved again."""
    config = literal(config)
    node = OmegaConf.structured(TrainConfig)
    backend = config.get("quantization", {}).get("backend")
    if backend in quantize.BACKENDS:
        node.quantization = OmegaConf.structured(quantize.BACKENDS[backend][1])
    node.logger = {name: OmegaConf.structured(sinks.SINKS[name].SCHEMA) for name in config.get("logger", {}) or {}
                   if name in sinks.SINKS}
    return OmegaConf.merge(node, config)
