"""A run dir is never silently reused: what a dir holds, moving an old run aside, what a resume may still do, and
the Hydra callback that guards run and sweep dirs before Hydra writes its own record into them.

A dir "holds a run" when it has a file a run writes (`RUN_FILES`), not when it merely exists: Hydra creates the run
dir and its `.hydra/` before any of our code runs, and a run dir named on the command line may exist and be empty.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from qlora_lab.core.dist import launched_rank
from qlora_lab.core.errors import CheckpointError, Status
from qlora_lab.core.schema import OptimConfig
from qlora_lab.sinks.summary import read_summary

log = logging.getLogger(__name__)

RUN_FILES = ("run_info.json", "metrics.jsonl", "summary.json", "checkpoints", "adapter")
REPLACED = "replaced"  # overwrite=true moves an old run to <run dir>/replaced/<time>/
HYDRA = ".hydra"
# Where Hydra writes its record of a command into a dir that already holds a run, so the run's own record stays
# until we know whether the command replaces the run (overwrite), continues it (resume) or is refused.
HYDRA_NEW = ".hydra.new"
# Files of the current launch, never part of the old run: Hydra's job log and a sweep job's config.
LAUNCH_FILES = (HYDRA_NEW, "train.log", "job_config.json", REPLACED)

# What on_run_start saw, for train.py's clean-up after a failure: {"dir": str, "existed": bool, "before": the names
# in the dir before the launch}.
LAUNCH: dict[str, Any] = {}


def held_run(run_dir: Path | str) -> list[str]:
    """The run files in `run_dir` (empty: it holds no run)."""
    return [n for n in RUN_FILES if (Path(run_dir) / n).exists()]


def _last_step(metrics: Path) -> int | None:
    try:
        lines = metrics.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):  # a line cut short by a crash
            continue
    return None


def describe(run_dir: Path) -> str:
    """What the run in `run_dir` is, in a few words: `a finished run (300 steps)`."""
    summary = read_summary(run_dir)
    if summary and summary.get("summary/status"):
        steps = summary.get("summary/steps")
        return f"a {summary['summary/status']} run" + (f" ({steps} steps)" if steps else "")
    step = _last_step(run_dir / "metrics.jsonl")
    if step is not None:
        return f"an unfinished run (metrics.jsonl up to step {step}, no summary.json)"
    return f"a run's files ({', '.join(held_run(run_dir))})"


def reuse_problem(run_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """Why a new run may not start in `run_dir`, with the three ways on; None when it may."""
    if resume is not None or overwrite or not held_run(run_dir):
        return None
    return (f"output_dir={run_dir} holds {describe(run_dir)}, which a new run would overwrite; continue it with "
            f"resume=auto, start a new run in another dir (hydra.run.dir=<new dir>), or replace it with "
            f"overwrite=true (the old run moves to {run_dir / REPLACED}/<time>)")


def move_aside(run_dir: Path) -> Path:
    """overwrite=true: move the old run's files into <run_dir>/replaced/<time>/ (nothing is deleted); returns it."""
    dest = run_dir / REPLACED / time.strftime("%Y-%m-%d_%H-%M-%S")
    n = 1
    while dest.exists():
        n += 1
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
    dest.mkdir(parents=True)
    own_record = (run_dir / HYDRA_NEW).is_dir()  # else .hydra is this launch's (a sweep job: Hydra replaced it)
    for p in sorted(run_dir.iterdir()):
        if p.name in LAUNCH_FILES or (p.name == HYDRA and not own_record):
            continue
        os.replace(p, dest / p.name)
    if own_record:
        os.replace(run_dir / HYDRA_NEW, run_dir / HYDRA)
    return dest


def finished_run(run_dir: Path, optim: OptimConfig) -> dict[str, Any] | None:
    """The summary of the finished run in `run_dir` when `optim` asks for no more training than it did; else None
    (there is something to continue, or no finished run)."""
    summary = read_summary(run_dir)
    if not summary or summary.get("summary/status") != Status.finished:
        return None
    if optim.max_steps > 0:
        return summary if optim.max_steps <= (summary.get("summary/steps") or 0) else None
    try:  # trained by epochs: compare with what the run recorded
        done = json.loads((run_dir / "run_info.json").read_text())["config"]["optim"]
    except (OSError, ValueError, KeyError):
        return None
    return summary if done["max_steps"] == 0 and optim.epochs <= done["epochs"] else None


def check_steps_left(ckpt_step: int, ckpt_name: str, steps: int, run_dir: Path) -> None:
    """A resume must train at least one step, and never end a finished run earlier than it ended: either would
    replace the run's adapter with an older one and its summary with one that says nothing trained."""
    if steps <= ckpt_step:
        raise CheckpointError(
            f"resume: {ckpt_name} is at step {ckpt_step} and this run stops at step {steps}, so nothing would train "
            f"and the run's adapter would be replaced by the checkpoint's; raise optim.max_steps above {ckpt_step} "
            "to train on, or start a new run without resume")
    summary = read_summary(run_dir) or {}
    done = summary.get("summary/steps") or 0
    if summary.get("summary/status") == Status.finished and steps < done:
        raise CheckpointError(
            f"resume: {run_dir} finished {done} steps; continuing {ckpt_name} to step {steps} would replace its "
            f"adapter with a shorter run's; give optim.max_steps>={done}, or start a new run in another dir "
            "(hydra.run.dir=<new dir>)")


def not_writable(path: str | Path) -> str | None:
    """None if `path` is a directory this process can write into, or can be created as one; else why not.

    Nothing is created: the nearest existing ancestor must be a writable directory.
    """
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def settle_hydra_record(run_dir: Path) -> None:
    """After a command into a dir that held a run: the run keeps its own .hydra/ (a resume, a refusal) or, when it
    was moved aside (overwrite), this command's record takes its place."""
    new = run_dir / HYDRA_NEW
    if new.is_dir():
        if (run_dir / HYDRA).exists():
            shutil.rmtree(new, ignore_errors=True)
        else:
            os.replace(new, run_dir / HYDRA)


def forget_launch(run_dir: Path, refused: bool = False) -> None:
    """A command that failed: a run that started keeps its dir as its record; a command that wrote nothing of a run
    (a config problem) or was `refused` (the dir holds another run) has Hydra's files for it removed, and the dir
    too if the launch created it, so nothing is left behind that looks like a run."""
    if refused:
        shutil.rmtree(run_dir / HYDRA_NEW, ignore_errors=True)
    settle_hydra_record(run_dir)
    if LAUNCH.get("dir") != str(run_dir) or (held_run(run_dir) and not refused):
        return
    before = LAUNCH.get("before", set())
    if HYDRA not in before:
        shutil.rmtree(run_dir / HYDRA, ignore_errors=True)
    log = run_dir / "train.log"
    if "train.log" not in before and log.is_file() and log.stat().st_size == 0:
        log.unlink()
    if not LAUNCH.get("existed", True):
        try:
            run_dir.rmdir()  # only if nothing else is in it
        except OSError:
            pass


def _refuse(message: str) -> None:
    log.error(message)
    raise SystemExit(2)


def _dir_problem(key: str, path: str) -> str | None:
    if path.startswith("~"):
        return (f"{key}={path}: the shell does not expand ~ after key= (the dir would be named '~'); write "
                f"{key}=$HOME{path[1:]} or an absolute path")
    why = not_writable(path)
    return f"{key}={path} cannot be created or written ({why}); point {key} at a writable directory" if why else None


def sweep_dir_problem(sweep_dir: Path, resume: bool, overwrite: bool) -> str | None:
    """Why a new sweep may not start in `sweep_dir` (its jobs hold runs of an earlier sweep); None when it may."""
    if resume or overwrite or not sweep_dir.is_dir():
        return None
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir() and held_run(p))
    if not jobs:
        return None
    return (f"hydra.sweep.dir={sweep_dir} holds {len(jobs)} job(s) of an earlier sweep ({', '.join(jobs[:3])}"
            f"{', ...' if len(jobs) > 3 else ''}), which a new sweep would overwrite; finish that sweep with "
            "sweep.resume=true (finished jobs are skipped, the others continue from their checkpoints), give a new "
            "hydra.sweep.dir, or replace them with overwrite=true (each job's old run moves to <job dir>/replaced/)")


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class RunDirGuard(Callback):
    """Runs before Hydra creates the run dir and writes `.hydra/` into it (conf/hydra/default.yaml)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launched_rank() > 0 or config.hydra.output_subdir is None:  # rank 0 alone writes the run dir
            return
        # The run dir's name reads ${hydra:...} (the overrides, the job): Hydra sets the config those resolve from
        # only when the job starts, after this callback; set it now, as the job will.
        if OmegaConf.get_type(config.hydra) is HydraConf:  # (a hand-made config in a test has none to set)
            HydraConfig.instance().set_config(config)
        raw = str(config.hydra.run.dir)
        why = _dir_problem("hydra.run.dir", raw)
        if why:
            _refuse(why)
        run_dir = Path(raw).absolute()
        LAUNCH.update(dir=str(run_dir), existed=run_dir.is_dir(),
                      before={p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set())
        if held_run(run_dir):  # keep the run's own record until the command is known to replace it
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = HYDRA_NEW

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        raw = str(config.hydra.sweep.dir)
        why = _dir_problem("hydra.sweep.dir", raw)
        if why:
            _refuse(why)
        if config.get("mode") == "train":
            why = sweep_dir_problem(Path(raw), bool(config.sweep.resume), bool(config.get("overwrite")))
            if why:
                _refuse(why)
