"""A closed schema: every key of a run's config is one its schema declares, however it got there.

Hydra refuses `lora.rank=64` (no such key) but takes `+lora.rank=64` and `++lora.rank=64` (append) into a typed
config without a word, and a run would train with lora.r unchanged, recording the stray key (and its value: a token,
say) in `.hydra/`, run_info.json and every sink. Here any key the schema lacks is refused with the nearest valid
key, before Hydra writes anything (runner/rundir.py's callback) and again when `run()` is given a config.

Where the schema is deliberately open it says so on the field (`key(..., open=...)`, core/effects.py): today only
`model.build`, whose keys are the transformers config's of its `model_type`, checked against that config class
(model/source.py `build_problems`). The `logger` dict is closed by the sink registry: its keys are sink names, each
with its own schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from typing import Any, Iterable, get_type_hints

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from qlora_lab import sinks
from qlora_lab.core.schema import QuantizationConfig, TrainConfig
from qlora_lab.core.scrub import secret_name
from qlora_lab.model import quantize


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _schemas_at(cls: type, name: str) -> list[type]:
    """The schema(s) a field holds: its dataclass; for `quantization`, every backend's (the composed config holds
    one, an override may name a key of any)."""
    hint = _hints(cls).get(name)
    if hint is QuantizationConfig:
        return [schema for _, schema in quantize.BACKENDS.values()]
    return [hint] if isinstance(hint, type) and dataclasses.is_dataclass(hint) else []


@functools.cache
def all_keys() -> tuple[str, ...]:
    """Every dotted key the schema declares (each backend's and sink's included): what a suggestion is taken from."""
    out: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for name, f in _fields(cls).items():
            inner = _schemas_at(cls, name)
            if inner:
                for schema in inner:
                    walk(schema, f"{prefix}{name}.")
            elif name == "logger" and cls is TrainConfig:
                for sink, module in sinks.SINKS.items():
                    walk(module.SCHEMA, f"{prefix}logger.{sink}.")
            else:
                out.append(prefix + name)

    walk(TrainConfig, "")
    return tuple(dict.fromkeys(out))


def _nearest(parent: str, key: str, siblings: Iterable[str]) -> str | None:
    """The valid key a user most likely meant by `parent.key`: a sibling that reads alike (`lora.rnak` ->
    `lora.r`... `lora.rank` -> `lora.r`: one is the other's abbreviation), else a key elsewhere with this name
    (`model.lr` -> `optim.lr`), else one that reads alike anywhere."""
    siblings = list(siblings)
    at = f"{parent}." if parent else ""
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    if close:
        return at + close[0]
    prefix = sorted((s for s in siblings if key.startswith(s) or s.startswith(key)), key=len, reverse=True)
    if prefix:
        return at + prefix[0]
    same = [k for k in all_keys() if k.rsplit(".", 1)[-1] == key]
    if same:
        return same[0]
    close = difflib.get_close_matches(at + key, all_keys(), n=1, cutoff=0.75)
    return close[0] if close else None


def unknown_key(parent: str, key: str, siblings: Iterable[str], holder: str) -> str:
    """The problem of `parent.key`, a key `holder` (a schema's name) does not have; never its value."""
    full = f"{parent}.{key}" if parent else key
    siblings = sorted(siblings)
    if secret_name(key):
        return (f"{full} is not a config key, and credentials never are (a config is recorded with the run: "
                f".hydra/, run_info.json, every sink); set it in the environment instead (HF_TOKEN, WANDB_API_KEY, "
                "MLFLOW_TRACKING_PASSWORD), which no record holds")
    guess = _nearest(parent, key, siblings)
    if guess == full:  # the key of another option of the group (quantization=none with +quantization.double_quant)
        return (f"{full} is not a key of {holder}, the schema of the {parent} option this config chose; it belongs to "
                f"another {parent} option: choose that option ({parent}=<option>) or drop the key ({parent} takes: "
                f"{', '.join(siblings)})")
    return (f"{full} is not a key of {holder}" + (f"; did you mean {guess}?" if guess else "")
            + f" ({parent or 'the config'} takes: {', '.join(siblings)}); a key the schema lacks is refused, with "
            "or without +")


def _walk(node: DictConfig, cls: type, path: str, out: list[str]) -> None:
    fields = _fields(cls)
    for key in node.keys():
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key not in fields:
            out.append(unknown_key(path, key, fields, cls.__name__))
            continue
        meta = fields[key].metadata
        child = node._get_node(key)
        if meta.get("open") or not isinstance(child, DictConfig) or child._is_missing() or child._is_none():
            continue
        if cls is TrainConfig and key == "logger":  # a dict of sinks, each with its own schema
            for name in child.keys():
                if name not in sinks.SINKS:
                    out.append(unknown_key("logger", str(name), sinks.SINKS, "the sinks"))
                else:
                    _walk(child[name], sinks.SINKS[name].SCHEMA, f"logger.{name}", out)
            continue
        typ = OmegaConf.get_type(child)
        if isinstance(typ, type) and dataclasses.is_dataclass(typ):
            _walk(child, typ, full, out)


def problems(cfg: DictConfig) -> list[str]:
    """Every key of the composed config `cfg` (Hydra's node aside) that its schema does not declare."""
    out: list[str] = []
    with_hydra = "hydra" in cfg
    view = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if with_hydra else cfg
    _walk(view, TrainConfig, "", out)
    return out


def _path_problem(dotted: str) -> str | None:
    """The problem of an override's key that is no path of the schema (None: it is one)."""
    parts = dotted.split(".")
    classes: list[type] = [TrainConfig]
    for i, part in enumerate(parts):
        parent = ".".join(parts[:i])
        if parent == "logger":
            if part not in sinks.SINKS:
                return unknown_key("logger", part, sinks.SINKS, "the sinks")
            classes = [sinks.SINKS[part].SCHEMA]
            continue
        holders = [c for c in classes if part in _fields(c)]
        if not holders:
            siblings = {name for c in classes for name in _fields(c)}
            return unknown_key(parent, part, siblings, " / ".join(c.__name__ for c in classes))
        f = _fields(holders[0])[part]
        if f.metadata.get("open"):
            return None
        if i + 1 < len(parts) and not (holders[0] is TrainConfig and part == "logger"):
            classes = [s for c in holders for s in _schemas_at(c, part)]
            if not classes:
                return f"{dotted}: {'.'.join(parts[:i + 1])} is a value, not a group of keys"
    return None


def override_problems(overrides: Iterable[str], groups: Iterable[str]) -> list[str]:
    """The keys of command-line overrides (sweeps among them, which the multirun's own config does not apply) that
    are no path of the schema; `groups` are Hydra's config groups (`model=tiny`, `experiment=...`)."""
    groups = set(groups)
    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        key = o.key_or_group
        if key.startswith("hydra") or key in groups or "/" in key or "@" in key:
            continue
        why = _path_problem(key)
        if why:
            out.append(why)
    return out
