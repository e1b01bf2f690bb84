"""OmegaConf resolvers used by conf/: registered once, before Hydra composes anything."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from omegaconf import OmegaConf

from qlora_lab.core.paths import ASSET_DIR


def job_name(override_dirname: str) -> str:
    """A file-system- and W&B-safe run name from Hydra's `key=value,key=value` override string."""
    name = re.sub(r"[^A-Za-z0-9=,._+-]+", "-", override_dirname).strip("-")
    return name[:120] or "default"


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


def register_resolvers() -> None:
    for name, fn in {"qlab.job_name": job_name, "qlab.sweep_id": sweep_id, "qlab.asset": asset,
                     "qlab.launch_time": launch_time}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
