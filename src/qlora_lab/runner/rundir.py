"""A run dir is never silently reused: what a dir holds, moving an old run aside, what a resume may still do, and
the Hydra callback that guards run and sweep dirs before Hydra writes its own record into them.

A dir "holds a run" when it has a file a run writes (`RUN_FILES`), not when it merely exists: Hydra creates the run
dir and its `.hydra/` before any of our code runs, and a run dir named on the command line may exist and be empty.

One process writes a run dir at a time: the first to open it holds its lock file (`.lock`, core/lock.py: pid,
host, start time), taken before Hydra writes `.hydra/` into it, and a second is refused naming the holder. A
default (time-stamped) run or sweep dir that another launch of the same second took gets a suffix instead
(`<time>_<name>-2`). Under the lock, what a killed writer left half-done is cleaned (`clean_leftovers`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from qlora_lab import closed
from qlora_lab.core import lock
from qlora_lab.core.dist import launched_rank, launched_world_size
from qlora_lab.core.errors import CheckpointError, RunDirInUse, Status
from qlora_lab.core.resolvers import safe
from qlora_lab.core.schema import OptimConfig
from qlora_lab.core.scrub import scrub_text
from qlora_lab.sinks.summary import read_summary

log = logging.getLogger(__name__)

RUN_FILES = ("run_info.json", "metrics.jsonl", "summary.json", "checkpoints", "adapter")
REPLACED = "replaced"  # overwrite=true moves an old run to <run dir>/replaced/<time>/
HYDRA = ".hydra"
# Where Hydra writes its record of a command into a dir that already holds a run, so the run's own record stays
# until we know whether the command replaces the run (overwrite), continues it (resume) or is refused.
HYDRA_NEW = ".hydra.new"
LOCK = ".lock"  # the run dir's lock file (core/lock.py): who writes this run dir now
# Files of the current launch, never part of the old run: Hydra's job log, a sweep job's config, the lock.
LAUNCH_FILES = (HYDRA_NEW, "train.log", "job_config.json", REPLACED, LOCK, LOCK + ".break")

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


def refused_run(run_dir: Path) -> bool:
    """`run_dir` holds only the record of a run refused before it trained (a bad config or data file: status
    failed_config, no step logged, no checkpoint, no adapter): the fixed command may start there again, the record
    moving aside as overwrite=true moves a run."""
    summary = read_summary(run_dir)
    if not summary or summary.get("summary/status") != Status.failed_config:
        return False
    if (run_dir / "adapter").exists() or any((run_dir / "checkpoints").glob("*")):
        return False
    return _last_step(run_dir / "metrics.jsonl") is None


def reuse_problem(run_dir: Path, resume: str | None, overwrite: bool) -> str | None:
    """Why a new run may not start in `run_dir`, with the three ways on; None when it may."""
    if resume is not None or overwrite or not held_run(run_dir) or refused_run(run_dir):
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
    lock.release(run_dir / LOCK)
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


def hold(run_dir: Path | str) -> contextlib.AbstractContextManager:
    """Hold `run_dir`'s lock for the block (re-entrant: a process that holds it already goes on); another live
    process holding it: RunDirInUse naming it. Whatever a killed writer left half-done there is cleaned."""
    return _held(Path(run_dir))


@contextlib.contextmanager
def _held(run_dir: Path):
    try:
        lock.acquire(run_dir / LOCK, f"the run dir {run_dir}")
    except lock.LockHeld as e:
        raise RunDirInUse([in_use(run_dir, e)]) from None
    try:
        clean_leftovers(run_dir)
        yield
    finally:
        lock.release(run_dir / LOCK)


def in_use(run_dir: Path, e: lock.LockHeld, key: str = "hydra.run.dir") -> str:
    who = e.holder.line() if e.holder else "a process that is taking it"
    return (f"{run_dir} is in use: another {'sweep' if 'sweep' in key else 'run'} writes there ({who}); wait for it "
            f"to end, or give this one another dir ({key}=<new dir>); a lock whose process is gone is taken over by "
            "the next one to start")


def clean_leftovers(run_dir: Path) -> list[str]:
    """What a killed writer of `run_dir` left half-done (the caller holds the run dir's lock, so no live process is
    writing them): checkpoints being written (`checkpoints/.tmp-step_*`), an adapter being replaced, a summary or
    metrics file being rewritten. An adapter killed between its two renames is put back. Returns what was removed."""
    removed = []
    adapter, old = run_dir / "adapter", run_dir / ".adapter.old"
    if old.is_dir() and not adapter.exists():  # killed after moving the old adapter aside: the old one stands
        os.replace(old, adapter)
    leftovers = [*run_dir.glob(".*.tmp"), *run_dir.glob(".adapter.old"), *(run_dir / "checkpoints").glob(".tmp-*")]
    for p in leftovers:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(str(p.relative_to(run_dir)))
    if removed:
        log.info(f"{run_dir}: removed what a killed run left half-written: {', '.join(sorted(removed))}")
    return removed


def _timestamped(node: DictConfig, key: str) -> bool:
    """Whether the dir `key` of a Hydra node is the default kind, named by the launch time (not one a user fixed)."""
    raw = str(OmegaConf.to_container(node, resolve=False).get(key, ""))
    return "${qlab.launch_time:" in raw or "${now:" in raw


def claim_new(path: Path) -> Path:
    """A dir named like `path` that this process created: `path`, else `path-2`, `path-3`, ... (two launches in the
    same second would otherwise share a time-stamped dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1


def scrub_hydra_record(*paths: Path) -> None:
    """Hydra's own records (`.hydra/*.yaml`, a sweep's multirun.yaml) with every credential redacted
    (core/scrub.py): they hold the command line and the config as composed."""
    for path in paths:
        for f in ([*path.glob("*.yaml")] if path.is_dir() else [path] if path.is_file() else []):
            text = f.read_text()
            clean = scrub_text(text)
            if clean != text:
                f.write_text(clean)


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
    """Runs before Hydra creates the run dir and writes `.hydra/` into it (conf/hydra/default.yaml): the config's
    keys are the schema's, the run dir is this process's alone, and Hydra's record of the command holds no
    credential."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if launched_rank() > 0 or config.hydra.output_subdir is None:  # rank 0 alone writes the run dir
            return
        # The run dir's name reads ${hydra:...} (the overrides, the job): Hydra sets the config those resolve from
        # only when the job starts, after this callback; set it now, as the job will.
        if OmegaConf.get_type(config.hydra) is HydraConf:  # (a hand-made config in a test has none to set)
            HydraConfig.instance().set_config(config)
        _refuse_unknown_keys(config, [])
        _safe_job_name(config)
        raw = str(config.hydra.run.dir)
        why = _dir_problem("hydra.run.dir", raw)
        if why:
            _refuse(why)
        run_dir = Path(raw).absolute()
        existed = run_dir.is_dir()
        before = {p.name for p in run_dir.iterdir()} if existed else set()
        if _timestamped(config.hydra.run, "dir") and launched_world_size() == 1:
            run_dir = claim_new(run_dir)  # two launches of one second: each its own dir
            existed, before = False, set()
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.run.dir = str(run_dir)
        try:
            lock.acquire(run_dir / LOCK, f"the run dir {run_dir}")
        except lock.LockHeld as e:
            _refuse(in_use(run_dir, e))
        LAUNCH.update(dir=str(run_dir), existed=existed, before=before)
        if held_run(run_dir):  # keep the run's own record until the command is known to replace it
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.output_subdir = HYDRA_NEW

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _refuse_unknown_keys(config, list(config.hydra.overrides.task))
        _safe_job_name(config)
        raw = str(config.hydra.sweep.dir)
        why = _dir_problem("hydra.sweep.dir", raw)
        if why:
            _refuse(why)
        sweep_dir = Path(raw)
        if _timestamped(config.hydra.sweep, "dir") and config.get("mode") == "train":
            sweep_dir = claim_new(sweep_dir.absolute())
            _set_for_jobs(config, "hydra.sweep.dir", str(sweep_dir))
        if config.get("mode") == "train":
            why = sweep_dir_problem(sweep_dir, bool(config.sweep.resume), bool(config.get("overwrite")))
            if why:
                _refuse(why)
            try:  # one sweep at a time in a sweep dir; each job's own dir is locked by the process that trains it
                lock.acquire(sweep_dir.absolute() / LOCK, f"the sweep dir {sweep_dir}")
            except lock.LockHeld as e:
                _refuse(in_use(sweep_dir, e, "hydra.sweep.dir"))

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """After Hydra wrote its record of the job (and of the sweep): redact what is secret in it."""
        hc = config.hydra
        if hc.output_subdir is not None:
            scrub_hydra_record(Path(hc.runtime.output_dir) / hc.output_subdir)
        if str(hc.mode).endswith("MULTIRUN"):
            scrub_hydra_record(Path(hc.sweep.dir) / "multirun.yaml")


def _refuse_unknown_keys(config: DictConfig, overrides: list[str]) -> None:
    """A key the schema lacks, from the command line (`+lora.rank=64`, swept or not) or a YAML: refused before
    Hydra writes anything."""
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    problems = closed.problems(config) + closed.override_problems(overrides, choices.keys())
    problems = list(dict.fromkeys(problems))
    if problems:
        _refuse(f"{len(problems)} problem(s) in the config:\n" + "\n".join(f"  - {p}" for p in problems))


def _safe_job_name(config: DictConfig) -> None:
    """hydra.job.name names the job's log file (<run dir>/<job name>.log): a name with a path in it
    (`hydra.job.name=../../x`) would write it elsewhere, so it is cut to what a file name may hold."""
    name = str(config.hydra.job.name)
    cleaned = safe_name(name)
    if cleaned != name:
        log.warning(f"hydra.job.name={name!r} is not a plain file name; the job log is {cleaned}.log")
        _set_for_jobs(config, "hydra.job.name", cleaned)


def _set_for_jobs(config: DictConfig, key: str, value: str) -> None:
    """Set a Hydra key in `config` and in what a multirun composes each job from (its `hydra.overrides.hydra`:
    Hydra composes every job anew from those, not from this config)."""
    with read_write(config.hydra), open_dict(config.hydra):
        OmegaConf.update(config, key, value)
        if str(config.hydra.mode).endswith("MULTIRUN"):
            config.hydra.overrides.hydra.append(f"{key}={value}")


def safe_name(name: str) -> str:
    """`name` as one path component (core/resolvers.py `safe`), `job` if nothing is left."""
    return safe(name) or "job"
