"""Sweeps researchers can trust: each job in a fresh process, failures recorded, the sweep goes on.

Hydra's launchers run a multirun's jobs in one process (basic) or in reused worker processes (joblib/loky), so
CUDA peak statistics, cached allocations and a process's peak RSS leak from one job into the next; submitit's
local launcher starts every job at once on all GPUs. So each job's task function here spawns a fresh Python
process for the training itself (`sweep.isolate=true`): the launcher decides how many jobs run at once
(`hydra/launcher=joblib hydra.launcher.n_jobs=N` for N GPUs), and each child takes a free GPU through a lock file
in the sweep dir, so two jobs never share a card. A job that fails (OOM, NaN, any error) is recorded in its run
dir, in W&B and in the sweep's `sweep_summary.jsonl`; the sweep carries on and its exit code says whether any
job failed. Ctrl-C stops the sweep and says which jobs finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import json
import importlib.util
import multiprocessing
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from qlora_lab.configs import typed
from qlora_lab.core.errors import BadFile, Status
from qlora_lab.core.files import read_json
from qlora_lab.core.log import to_file
from qlora_lab.core.resolvers import SWEPT_ENV, swept_keys
from qlora_lab.core.scrub import restore, scrub, split_secrets
from qlora_lab.model.source import model_config
from qlora_lab.runner import fuse
from qlora_lab.runner.run import run
from qlora_lab.runner.rundir import held_run
from qlora_lab.sinks.summary import read_summary, record_failure

log = logging.getLogger(__name__)

SUMMARY_FILE = "sweep_summary.jsonl"
COMPILE_CACHE = ".compile_cache"  # in the sweep dir
# What the warm process imports once for every job it forks (sweep.warm_start): the package's pipeline with torch,
# transformers and peft under it, W&B, torch.compile's front end and FSDP; `preload` adds the sweep's model class.
# Nothing here may initialise CUDA (a fork after that cannot use the GPU; `_forked` says so if one did): the
# imports that read the GPU's properties (bitsandbytes, liger's kernels, inductor's Triton check) are each job's.
PRELOAD = ["qlora_lab.runner.run", "qlora_lab.runner.sweep", "wandb", "datasets", "torch._dynamo",
           "torch.distributed.fsdp"]
# torch.cuda.is_available() asks NVML instead of initialising the CUDA driver, so that the warm process stays
# forkable whatever its imports ask (torch's documented switch for this).
NVML_CHECK = {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}


def job_env(sweep_dir: Path) -> dict[str, str]:
    """The environment of a job's training process. torch.compile's caches (inductor's FX graphs and kernels, AOT
    autograd's graphs, Triton's kernels) go into the sweep dir, on any node that sees it (Slurm) and whatever a
    machine does with /tmp: a job whose layers compile to the graphs an earlier job compiled (a sweep over lr, seed,
    data) loads them instead of compiling; a sweep over shapes (lora.r, micro-batch) shares the kernels its graphs
    have in common. The caches key on the graph, the inputs' shapes and dtypes and the torch/Triton versions, so a
    job never gets kernels of another graph. A variable the user set is kept."""
    cache = sweep_dir.resolve() / COMPILE_CACHE
    env = dict(os.environ)
    for key, value in {"TORCHINDUCTOR_CACHE_DIR": cache / "inductor", "TRITON_CACHE_DIR": cache / "triton",
                       "TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}.items():
        env.setdefault(key, str(value))
    return env


def _append(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:  # jobs of a parallel launcher append concurrently
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write(json.dumps(scrub(record), default=str) + "\n")


# A job's config travels to its process in a file (job_config.json, group_<job>.json) with every credential
# redacted (core/scrub.py); what the redaction replaced travels in this variable of the process's environment,
# which no record holds, and is put back before the job runs: the job trains on exactly what it was given.
SECRETS_ENV = "QLAB_JOB_CONFIG_SECRETS"


def write_handoff(path: Path, container: dict[str, Any], env: dict[str, str]) -> None:
    """`container` into `path` for a job's process, its credentials into that process's `env` instead."""
    clean, secrets = split_secrets(container)
    path.write_text(json.dumps(clean, default=str))
    env.pop(SECRETS_ENV, None)
    if secrets:
        env[SECRETS_ENV] = json.dumps(secrets)


def read_handoff(path: Path) -> dict[str, Any]:
    """What `write_handoff` wrote, with its credentials back (taken out of this process's environment)."""
    container = read_json(path, "it is not a job's config the sweep wrote whole; run the sweep again")
    secrets = os.environ.pop(SECRETS_ENV, None)
    return restore(container, json.loads(secrets)) if secrets else container


def _take_gpu(lock_dir: Path, gpus: list[int] | None):
    """Hold a lock on a free GPU (one job per card) and make it the only one this process sees."""
    import torch

    visible = gpus if gpus is not None else list(range(torch.cuda.device_count()))
    if len(visible) <= 1:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for gpu in visible:
            handle = open(lock_dir / f"gpu{gpu}.lock", "w")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)  # before the first CUDA call of this process
            return handle
        time.sleep(1.0)


def _forked(config_path: str, env: dict[str, str], cwd: str) -> None:
    """A job forked from the warm process: the job's environment and directory, then the job."""
    import torch

    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    # A preloaded import initialised CUDA in the warm process (on a machine without a GPU, merely asking for one
    # marks the fork: harmless there, as nothing will use CUDA).
    if torch.cuda._is_in_bad_fork() and torch.cuda.is_available():
        raise RuntimeError("the sweep's warm process initialised CUDA, so its forks cannot use the GPU; run the "
                           "sweep with sweep.warm_start=false (and report the model, kernels and versions)")
    _child(Path(config_path))


def preload(cfg: DictConfig) -> list[str]:
    """PRELOAD and the transformers modeling module of this sweep's model (the server skips a module that does not
    exist). Not the modeling module where torchao is installed: transformers then imports torchao with it, and
    torchao asks the GPU's compute capability at import, which initialises CUDA (no fork could use the GPU after
    that); hiding the GPU from the server instead leaves every fork with torch's cached answer that Triton cannot run.
    """
    kind = model_config(cfg.model).model_type
    if importlib.util.find_spec("torchao") is not None:
        return list(PRELOAD)
    return PRELOAD + [f"transformers.models.{kind}.modeling_{kind}"]


_warm: multiprocessing.context.BaseContext | None = None


def _warm_context(cfg: DictConfig, env: dict[str, str]) -> multiprocessing.context.BaseContext:
    """The forkserver context whose server has imported `preload(cfg)` (started, once per sweep process, by the
    first job: that job pays the imports, every later one forks from them). The server starts with `env`, the
    jobs' environment, so that what the compiler reads at import (its cache settings) is the jobs'."""
    global _warm
    if _warm is None:
        # the server inherits this process's environment when it starts (a job's credentials are that job's alone)
        os.environ.update({**{k: v for k, v in env.items() if k != SECRETS_ENV}, **NVML_CHECK})
        _warm = multiprocessing.get_context("forkserver")
        _warm.set_forkserver_preload(preload(cfg))
    return _warm


# Ctrl-C reaches a sweep's main thread only; the launcher's threads (units side by side) wait on their jobs and never
# see it. The main thread then calls stop_running: no job starts any more, and each running one gets SIGTERM.
_stopping = threading.Event()
_running: set["_Job"] = set()
_running_lock = threading.Lock()


def stop_running() -> None:
    """Stop the sweep's jobs from another thread than the ones waiting on them: none starts any more, and each
    running one is sent SIGTERM, on which it checkpoints and records itself interrupted (its waiting thread then
    records it in the sweep's table as any job that ended)."""
    with _running_lock:
        _stopping.set()
        for job in list(_running):
            job.proc.terminate()


class _Job:
    """A job's training process: forked from the warm process (sweep.warm_start) or a fresh interpreter."""

    def __init__(self, config_path: Path, env: dict[str, str], warm: DictConfig | None):
        with _running_lock:
            if _stopping.is_set():
                raise KeyboardInterrupt("the sweep is stopping: no job starts")
            if warm is not None:
                self.proc = _warm_context(warm, env).Process(
                    target=_forked, args=(str(config_path), {**env, **NVML_CHECK}, os.getcwd()),
                    name=config_path.parent.name)
                self.proc.start()
            else:
                self.proc = subprocess.Popen([sys.executable, "-m", "qlora_lab.runner.sweep", str(config_path)],
                                             env=env)
            _running.add(self)

    def wait(self) -> None:
        try:
            if isinstance(self.proc, subprocess.Popen):
                self.proc.wait()
            else:
                self.proc.join()
        finally:
            with _running_lock:
                _running.discard(self)

    def stop(self) -> None:
        self.proc.terminate()  # SIGTERM: the job records itself as interrupted
        self.wait()


def _child(config_path: Path) -> None:
    """The training process of one job (or of a fused group of jobs): a new process, so nothing of another job's
    memory is in it."""
    container = read_handoff(config_path)
    if "group" in container:
        _group_child(container)
        return
    gpus = container["config"]["sweep"]["gpus"]
    gpu_lock = _take_gpu(config_path.parent.parent / ".gpu_locks", list(gpus) if gpus is not None else None)
    cfg = typed(container["config"])
    try:
        with to_file(Path(cfg.output_dir) / "train.log", own=True):  # Hydra's log of the job is the parent's
            run(cfg, overrides=container["overrides"])
    except BaseException as e:  # run() recorded what it could; make sure the job dir says why it ended
        record_failure(Path(cfg.output_dir), e)
        traceback.print_exc()
        sys.exit(1)
    finally:
        if gpu_lock is not None:
            gpu_lock.close()


def _group_child(container: dict[str, Any]) -> None:
    entries = [fuse.Entry(job["config"], job["overrides"]) for job in container["group"]]
    gpus = entries[0].config["sweep"]["gpus"]
    gpu_lock = _take_gpu(Path(container["sweep_dir"]) / ".gpu_locks", list(gpus) if gpus is not None else None)
    try:
        fuse.run_group(entries)
    except BaseException as e:  # what no job recorded: each job dir says why the group ended
        for entry in entries:
            record_failure(Path(entry.config["output_dir"]), e)
        traceback.print_exc()
        sys.exit(1)
    finally:
        if gpu_lock is not None:
            gpu_lock.close()


def job_config(cfg: DictConfig) -> DictConfig:
    """A job's config as it trains: with sweep.resume, a job that did not finish continues (resume=auto)."""
    if cfg.sweep.resume and held_run(Path(cfg.output_dir)) and cfg.resume is None:
        cfg = cfg.copy()
        OmegaConf.update(cfg, "resume", "auto")
    return cfg


def job_summary(job_dir: Path) -> dict[str, Any]:
    """What a job's process left in its summary.json, or why there is nothing to read: one job's damaged or missing
    summary is that job's failure, never the sweep's end."""
    try:
        summary = read_summary(job_dir)
    except BadFile as e:
        return {"summary/status": str(Status.failed), "summary/reason": str(e)}
    return summary or {"summary/status": str(Status.failed), "summary/reason": "the job wrote no summary"}


def finished_before(cfg: DictConfig, job_name: str) -> dict[str, Any] | None:
    """sweep.resume: the summary of a job that finished in an earlier run of this sweep (it is skipped), else None.
    A summary.json that is not JSON is no finished job: the job runs, and its run says what is wrong."""
    try:
        previous = read_summary(Path(cfg.output_dir))
    except BadFile as e:
        log.warning(f"{job_name}: {e}")
        return None
    if cfg.sweep.resume and previous and previous.get("summary/status") == Status.finished:
        log.info(f"{job_name}: finished in an earlier run of this sweep; skipped (sweep.resume=true)")
        return {**previous, "resumed": True}
    return None


def run_group(cfgs: list[DictConfig], overrides: list[list[str]], sweep_dir: Path, names: list[str],
              start_lock: Any = contextlib.nullcontext()) -> list[dict[str, Any]]:
    """A fused group of multirun jobs (runner/fuse.py) trained in one child process; each job's record goes into
    the sweep's summary as a job run alone puts it there."""
    cfgs = [job_config(c) for c in cfgs]
    group = [{"config": OmegaConf.to_container(c, resolve=True), "overrides": o} for c, o in zip(cfgs, overrides)]
    path = sweep_dir / f"group_{names[0]}.json"
    env = job_env(sweep_dir)
    write_handoff(path, {"group": group, "sweep_dir": str(sweep_dir)}, env)
    t0 = time.perf_counter()
    with start_lock:
        job = _Job(path, env, cfgs[0] if cfgs[0].sweep.warm_start else None)
    try:
        job.wait()
    except KeyboardInterrupt:
        job.stop()
        for name, o in zip(names, overrides):
            _append(sweep_dir / SUMMARY_FILE, {"job": name, "overrides": o, "summary/status": str(Status.interrupted)})
        raise
    wall = time.perf_counter() - t0
    records = []
    for cfg, o, name in zip(cfgs, overrides, names):
        record = job_summary(Path(cfg.output_dir))
        record["job_wall_s"] = wall  # the group's: its jobs trained at once
        record["fused_with"] = [n for n in names if n != name]
        if record.get("summary/train_time_s") is not None:
            record["job_overhead_s"] = wall - record["summary/train_time_s"]
        record = {"job": name, "overrides": o, "dir": cfg.output_dir, **record}
        _append(sweep_dir / SUMMARY_FILE, record)
        records.append(record)
    return records


def refuse_under_launcher() -> None:
    """A sweep started under torchrun / accelerate launch would run every job in every process: refuse it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.error("a sweep (-m) fans its jobs out itself (hydra/launcher=local_gpus: one job per GPU); run it with "
                  "python, not under torchrun / accelerate launch")
        raise SystemExit(2)


def record_skip(sweep_dir: Path, job_name: str, overrides: list[str], cfg: DictConfig, previous: dict[str, Any]) -> None:
    """A job sweep.resume skips (it finished before) in the sweep's summary, as run_job records it."""
    _append(sweep_dir / SUMMARY_FILE, {"job": job_name, "overrides": overrides, "dir": str(cfg.output_dir), **previous})


def run_job(cfg: DictConfig, overrides: list[str], sweep_dir: Path, job_name: str,
            start_lock: Any = contextlib.nullcontext()) -> dict[str, Any]:
    """One multirun job: with sweep.resume, skipped if it finished and continued (resume=auto) if it did not; else
    trained in a child process. (RunDirGuard refused a sweep into a dir with earlier jobs before any job ran.)"""
    job_dir = Path(cfg.output_dir)
    record = finished_before(cfg, job_name)
    if record is None:
        cfg = job_config(cfg)
        container = OmegaConf.to_container(cfg, resolve=True)
        t0 = time.perf_counter()
        if cfg.sweep.isolate:
            # A process of its own: no CUDA context, allocator cache or peak RSS inherited from earlier jobs. Forked
            # from a warm process that imported the libraries once (sweep.warm_start: a fork is a new process,
            # with its own CUDA context and peaks; its interpreter start and imports are already done), or a fresh
            # interpreter. multiprocessing's explicit forkserver context leaves launchers' own start methods alone.
            job_dir.mkdir(parents=True, exist_ok=True)
            config_path = job_dir / "job_config.json"
            env = job_env(sweep_dir)
            write_handoff(config_path, {"config": container, "overrides": overrides}, env)
            with start_lock:  # units side by side (sweep.max_parallel): one fork from the warm process at a time
                job = _Job(config_path, env, cfg if cfg.sweep.warm_start else None)
            try:
                job.wait()
            except KeyboardInterrupt:
                job.stop()
                _append(sweep_dir / SUMMARY_FILE, {"job": job_name, "overrides": overrides,
                                                   "summary/status": str(Status.interrupted)})
                raise
        else:
            try:
                run(cfg, overrides=overrides)
            except Exception as e:  # in-process: record and go on, as the isolated path does
                record_failure(job_dir, e)
        record = job_summary(job_dir)
        # The job as the sweep saw it, process start and exit included; overhead = all that was not its steps.
        record["job_wall_s"] = time.perf_counter() - t0
        if record.get("summary/train_time_s") is not None:
            record["job_overhead_s"] = record["job_wall_s"] - record["summary/train_time_s"]
    record = {"job": job_name, "overrides": overrides, "dir": str(job_dir), **record}
    _append(sweep_dir / SUMMARY_FILE, record)
    return record


def report(sweep_dir: Path) -> tuple[str, int]:
    """The sweep's table of jobs and how many did not end well (last record per job wins)."""
    path = sweep_dir / SUMMARY_FILE
    if not path.is_file():
        return "", 0
    latest: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        try:
            rec = json.loads(line)
            latest[str(rec["job"])] = rec
        except (ValueError, KeyError, TypeError):  # a line cut short by a killed sweep, or not one of its records
            log.warning(f"{path} line {n} is not a job's record (cut short by a killed sweep?); left out of the "
                        "table")
    lines = [f"{'job':<40} {'status':<14} {'final loss':>10} {'peak GiB':>9} {'overhead s':>10}  reason"]
    bad = 0
    for job, rec in latest.items():
        status = rec.get("summary/status", "?")
        bad += status not in [s for s in Status if s.ok]
        loss, peak, over = (rec.get(k) for k in ("summary/final_loss", "summary/peak_memory_gib", "job_overhead_s"))
        loss_s = "-" if loss is None else f"{loss:.4f}"
        peak_s = "-" if peak is None else f"{peak:.3f}"
        over_s = "-" if over is None else f"{over:.1f}"
        lines.append(f"{job[:40]:<40} {status:<14} {loss_s:>10} {peak_s:>9} {over_s:>10}  "
                     f"{str(rec.get('summary/reason', ''))[:80]}")
    return "\n".join(lines), bad


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[misc,assignment]


class SweptKeys(Callback):
    """At the start of a multirun: the keys it varies, for its jobs' names (`core.resolvers.job_name`). A job's own
    config holds only its values, not the sweep's, so they travel in the environment, which every launcher hands on
    to its jobs (in process, joblib workers, submitit)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        keys = swept_keys(config.hydra.overrides.task, OmegaConf.select(config, "hydra.sweeper.params"))
        os.environ[SWEPT_ENV] = ",".join(keys)


class SweepReport(Callback):
    """At the end of a multirun: print every job's status and exit non-zero if any failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        table, bad = report(sweep_dir)
        if not table:
            return
        log.info(f"sweep {sweep_dir}\n{table}")
        if bad:
            log.error(f"{bad} job(s) did not finish; see {sweep_dir / SUMMARY_FILE}")
            raise SystemExit(1)


if __name__ == "__main__":
    _child(Path(sys.argv[1]))
