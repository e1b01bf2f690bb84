"""OmegaConf resolvers used by conf/: registered once, before Hydra composes anything."""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from qlora_lab.core.paths import ASSET_DIR
from qlora_lab.core.scrub import scrub_text


# Set by the multirun callback (runner.sweep.SweptKeys) for the jobs it launches: the keys the sweep varies.
SWEPT_ENV = "QLAB_SWEPT_KEYS"
NAME_CAP = 60  # characters; W&B tables, `ls` and terminal columns stay readable


def swept_keys(task_overrides: Iterable[str], sweeper_params: Mapping[str, Any] | None = None) -> list[str]:
    """The keys a multirun varies: command-line sweeps (`a,b`, `range()`, `choice()`, `glob()`, `interval()`) and
    the keys of `hydra.sweeper.params`, in command-line order."""
    parsed = OverridesParser.create().parse_overrides(list(task_overrides))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in (sweeper_params or {}) if str(k) not in keys]


def _short_keys(keys: list[str]) -> dict[str, str]:
    """Each key by its last dotted part (`lora.r` -> `r`) where no other key ends the same, else in full."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _last_part(value: str) -> str:
    """A path or hub id by its last part (`/data/v2/train.jsonl` -> `train.jsonl`, `Qwen/Qwen2.5-0.5B` ->
    `Qwen2.5-0.5B`): what tells runs apart; the whole value is in the run's tags and config."""
    return value.rstrip("/").rsplit("/", 1)[-1] if "/" in value else value


def safe(value: str) -> str:
    """A user's value as (part of) one path component and a W&B name: any credential in it redacted (core/scrub.py),
    every run of characters a path or W&B would trip on (`/`, spaces, brackets) as one `-`, no leading or trailing
    dot or dash (so never `.`, `..` or a hidden name)."""
    return re.sub(r"[^A-Za-z0-9=,._+-]+", "-", scrub_text(value)).strip("-.")


def capped(name: str, cap: int = NAME_CAP) -> str:
    """`name` if it fits in `cap` characters, else its head and a hash of the whole (still unique, still stable)."""
    if len(name) <= cap:
        return name
    return name[:cap - 9] + "-" + hashlib.sha1(name.encode()).hexdigest()[:8]


def job_name(overrides: Iterable[str], swept: str | None, num: int | None,
             named: Callable[[str], bool] = lambda key: True) -> str:
    """A short, file-system- and W&B-safe name for a run dir and a W&B run, stable across re-runs of a command.

    A single run (`num` None) is named by its overrides whose key `named` accepts (not a location: where a run
    writes or reads, as each key declares, core/effects.py; `hydra.*`); a
    multirun job by the keys its sweep varies (`swept`, comma-separated; None when the launcher did not pass them
    on: then by every override), prefixed with its job number: `0_r=8`, `1_r=16`. Keys are shortened to their last
    part where unambiguous, paths to their last part, keys sorted, and the whole is cut at NAME_CAP characters with a
    hash of the rest.
    """
    parsed = {o.key_or_group: o.get_value_element_as_str()
              for o in OverridesParser.create().parse_overrides([str(o) for o in overrides])}
    keep = {k for k in parsed if not k.startswith("hydra") and named(k)}
    if num is not None and swept:
        keep &= set(swept.split(","))
    keys = sorted(keep)
    short = _short_keys(keys)
    name = capped(",".join(f"{safe(short[k])}={safe(_last_part(parsed[k]))}" for k in keys)) or "default"
    return name if num is None else f"{num}_{name}"


def sweep_id(mode: object, sweep_dir: str) -> str | None:
    """The W&B group of a multirun (its sweep dir's name); None for a single run."""
    return Path(sweep_dir).name if str(mode).endswith("MULTIRUN") else None


def launch_time(fmt: str) -> str:
    """Now, formatted; under torchrun / accelerate launch, the launcher's start time, so that every process of
    the job composes the same run dir (each starts a moment apart and rank 0 may cross a second boundary)."""
    t = time.time()
    if "LOCAL_RANK" in os.environ:
        import psutil

        try:
            t = psutil.Process(os.getppid()).create_time()
        except psutil.Error:
            pass
    return time.strftime(fmt, time.localtime(t))


def asset(name: str) -> str:
    return str(ASSET_DIR / name)


def register_resolvers(named: Callable[[str], bool] = lambda key: True) -> None:
    """`named(key)`: whether an override of `key` names a run (configs.py passes the keys' declarations)."""

    def name_of(overrides: Iterable[str], swept: str | None, num: int | None) -> str:
        return job_name(overrides, swept, num, named)

    for name, fn in {"qlab.job_name": name_of, "qlab.sweep_id": sweep_id, "qlab.asset": asset,
                     "qlab.launch_time": launch_time}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
