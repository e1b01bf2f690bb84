"""A study's runs at one scale, into a fresh dir: each command as train.py runs it (a sweep through the sweep
launcher, so fused groups fuse), a `mode=plan` command in this process (the ledger needs no weights and writes no run
dir of its own: its items, summary and config go into plan.json). What each job wrote is read back as a `Job`.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from qlora_lab.memory import plan as plan_mod
from qlora_lab.runner.preflight import validate
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.sinks.provenance import device_info
from qlora_lab.study.now import provenance_now
from qlora_lab.study.spec import CONF, Command, Needs, Study, StudyError, commands

log = logging.getLogger(__name__)

TRAIN_PY = CONF.parent / "train.py"
PLAN_FILE = "plan.json"


@dataclass
class Job:
    """What one job of a study wrote: its resolved config, summary, loss curve and ledger."""

    name: str
    dir: Path
    command: int
    config: dict[str, Any]
    summary: dict[str, Any]
    device: dict[str, Any]
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl
    ledger: list[dict[str, Any]] = field(default_factory=list)  # ledger_items.jsonl: component, gib, ...
    phases: list[dict[str, Any]] = field(default_factory=list)  # ledger_phases.jsonl (CUDA): predicted vs measured
    provenance: dict[str, Any] = field(default_factory=dict)  # git commit, uv.lock, packages (run_info.json)

    def curve(self, key: str = "train/loss") -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in self.records if r.get(key) is not None]


@dataclass
class Outcome:
    jobs: list[Job]
    skipped: list[Command]  # commands this machine cannot run (needs cuda)
    device: str  # cpu | cuda: this machine's kind


def device_kind() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def read_job(job_dir: Path, command: int) -> Job:
    """A job dir as a train.py run writes it (run_info.json, summary.json, metrics.jsonl, ledger tables), or a plan's
    plan.json."""
    if (job_dir / PLAN_FILE).is_file():
        p = json.loads((job_dir / PLAN_FILE).read_text())
        return Job(job_dir.name, job_dir, command, p["config"], p["summary"], p["device"], ledger=p["items"],
                   provenance=p["provenance"])
    info = json.loads((job_dir / "run_info.json").read_text()) if (job_dir / "run_info.json").is_file() else {}
    summary = json.loads((job_dir / "summary.json").read_text()) if (job_dir / "summary.json").is_file() else {}
    prov = {k: info.get(k) for k in ("git_commit", "git_dirty", "uv_lock", "packages")}
    return Job(job_dir.name, job_dir, command, info.get("config", {}), summary, info.get("device", {}),
               records=_jsonl(job_dir / "metrics.jsonl"), ledger=_jsonl(job_dir / "ledger_items.jsonl"),
               phases=_jsonl(job_dir / "ledger_phases.jsonl"), provenance=prov)


def read_jobs(run_dir: Path, command: int) -> list[Job]:
    """The jobs of one command's dir: itself (a single run or a plan) or its sweep's job dirs, in job order."""
    if (run_dir / "summary.json").is_file() or (run_dir / PLAN_FILE).is_file():
        return [read_job(run_dir, command)]
    dirs = [p for p in run_dir.iterdir() if p.is_dir() and ((p / "summary.json").is_file() or (p / PLAN_FILE).is_file())]
    return [read_job(p, command) for p in sorted(dirs, key=lambda p: (int(p.name.split("_")[0])
                                                                       if p.name.split("_")[0].isdigit() else 1 << 30,
                                                                       p.name))]


def _plan(cmd: Command, run_dir: Path, cache_dir: str | None) -> None:
    """A mode=plan command, job by job, in this process: what `python train.py mode=plan ...` prints, kept."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for j, job in enumerate(cmd.jobs):
            out = run_dir / (f"{j}_plan" if len(cmd.jobs) > 1 else "")
            out.mkdir(parents=True, exist_ok=True)
            extra = [f"cache_dir={cache_dir}"] if cache_dir else []
            cfg = compose(config_name="train", overrides=[*job, *extra, f"output_dir={out}", "run_name=plan",
                                                          "sweep_id=null"])
            tcfg = OmegaConf.to_object(cfg)
            device = validate(tcfg)
            spec, ledger, budget = resolve_spec(tcfg, device, list(job))
            summary = {"summary/status": "planned", "summary/predicted_peak_gib": ledger.peak_gib,
                       "summary/predicted_card_gib": ledger.card_gib, "summary/micro_batch": ledger.micro_batch,
                       "summary/fits": plan_mod.fits(ledger, budget, spec.cfg.plan.safety_margin),
                       "summary/peak_where": ledger.peak_where,
                       "summary/checkpointing_layers": str(spec.cfg.checkpointing.layers)}
            run_plan = ledger.extra.get("run_plan")
            if run_plan is not None and run_plan.layers is not None:
                summary["summary/predicted_tokens_per_s"] = run_plan.layers.chosen.tokens_per_s
            (out / PLAN_FILE).write_text(json.dumps({
                "overrides": job, "config": spec.config(), "summary": summary, "items": plan_mod.item_rows(ledger),
                "device": device_info(device), "provenance": provenance_now()}, indent=1, default=str))
            log.info(f"  plan {' '.join(job)}: predicted peak {ledger.peak_gib:.3f} GiB ({ledger.peak_where})")


def _train(cmd: Command, run_dir: Path, cache_dir: str | None, logs: Path) -> None:
    """A training command exactly as a user types it (`python train.py [-m] ...`), its output in a log file."""
    where = f"hydra.sweep.dir={run_dir}" if cmd.sweep else f"hydra.run.dir={run_dir}"
    argv = [sys.executable, str(TRAIN_PY), *(["-m"] if cmd.sweep else []), *cmd.args, "log.progress_bar=false",
            where, *([f"cache_dir={cache_dir}"] if cache_dir else [])]
    log_file = logs / f"run{cmd.index + 1}.log"
    log.info(f"  python train.py {' '.join(argv[2:])}  (log: {log_file})")
    t0 = time.perf_counter()
    with open(log_file, "w") as f:
        res = subprocess.run(argv, cwd=TRAIN_PY.parent, stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "HYDRA_FULL_ERROR": "0"})
    if res.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-25:])
        raise StudyError(f"run {cmd.index + 1} exited {res.returncode} after {time.perf_counter() - t0:.0f} s; "
                         f"the end of {log_file}:\n{tail}")
    log.info(f"  done in {time.perf_counter() - t0:.0f} s")


def run_scale(study: Study, scale: str, out_dir: Path, cache_dir: str | None = None) -> Outcome:
    """Every command of `study` at `scale` into `out_dir/run<i>/` (which must not hold an earlier reproduction)."""
    if out_dir.exists() and any(out_dir.iterdir()):
        raise StudyError(f"{out_dir} is not empty: a reproduction goes into a fresh dir (give another --out)")
    out_dir.mkdir(parents=True, exist_ok=True)
    here, kind = device_kind(), study.scale(scale).device
    jobs, skipped = [], []
    todo = commands(study, scale)
    for cmd in todo:
        run_dir = out_dir / f"run{cmd.index + 1}"
        if cmd.needs == Needs.device and here != kind:
            log.info(f"run {cmd.index + 1}: measures the {kind} device of scale {scale}; skipped on this {here} "
                     f"machine (python train.py {' '.join(cmd.args)})")
            skipped.append(cmd)
            continue
        log.info(f"run {cmd.index + 1} of {len(todo)} ({len(cmd.jobs)} job{'s' * (len(cmd.jobs) > 1)}):")
        if cmd.plan:
            _plan(cmd, run_dir, cache_dir)
        else:
            _train(cmd, run_dir, cache_dir, out_dir)
        found = read_jobs(run_dir, cmd.index)
        if len(found) != len(cmd.jobs):
            raise StudyError(f"run {cmd.index + 1}: {len(cmd.jobs)} jobs expected, {len(found)} wrote a summary in "
                             f"{run_dir}")
        jobs += found
    return Outcome(jobs, skipped, here)
