"""Fused sweeps: jobs that share a base and a batch stream train together, in one process, on one loaded base.

Which jobs may fuse is read from the config keys' declarations (core/effects.py): two jobs fuse when every key in
which they differ is declared fusable (LoRA's shape and init, optimization, reporting, locations) and neither asks
for what the grouped forward cannot do (model/grouped.py `unsupported`: DoRA, trainable biases, PiSSA/LoftQ); a
sweep over data, quantization, the model, max_seq_len or the micro-batch forms one group per value. The memory
ledger plans a group (one base, every job's adapter, optimizer state and activations, `plan.predict_group`) and a
group that would not fit is split into groups that do.

`run_group` is the group's process: each job is validated, resolved and resumed as a run alone is (runner/run.py),
the rows are tokenized once and the base loaded once, then the group loop (train/loop.py `train_group`) trains every
job on the same micro-batches; each job writes exactly what it writes alone (its run dir, metrics.jsonl,
summary.json, its run in every sink, checkpoints, adapter), and a job that fails ends alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab.configs import key_table, typed
from qlora_lab.core.dist import Dist
from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.errors import RunDirInUse
from qlora_lab.core.effects import declared
from qlora_lab.core.flat import flatten
from qlora_lab.core.schema import TrainConfig
from qlora_lab.core.spec import RunSpec
from qlora_lab.core.timing import Timeline
from qlora_lab.data.prepare import prepare_data
from qlora_lab.data.rows import check_size, fingerprint, read_rows
from qlora_lab.memory import frontier, plan
from qlora_lab.memory.ledger import read_arch
from qlora_lab.memory.readings import PhaseReadings, reset_peak
from qlora_lab.model import build_group, model_source
from qlora_lab.model.attention import packed_path
from qlora_lab.model.grouped import JobView, save_job_adapter, unsupported
from qlora_lab.runner import rundir
from qlora_lab.runner import run as run_mod
from qlora_lab.runner.preflight import validate
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.sinks.summary import record_failure
from qlora_lab.train import checkpoint
from qlora_lab.train.evaluate import Evaluator
from qlora_lab.train.loop import GroupMember, Job, train_group
from qlora_lab.train.optim import total_steps
from qlora_lab.train.signals import SignalsRaise

log = logging.getLogger(__name__)


def identity(config: dict[str, Any]) -> dict[str, Any]:
    """What a job shares with every job it may train beside: its flattened config without the keys declared
    fusable (`logger` sinks aside: each job opens its own)."""
    table = key_table(config)
    out = {}
    for key, value in flatten(config).items():
        d = declared(table, key)
        if d is None or not d.effect.fusable:
            out[key] = value
    return out


def why_alone(config: dict[str, Any]) -> str | None:
    """Why this job cannot train in a group (None: it can)."""
    if str(config["sweep"]["fuse"]).lower() == "false":
        return "sweep.fuse=false"
    if config["mode"] != "train":
        return f"mode={config['mode']}"
    if config["distributed"]["name"] != "none":
        return f"distributed={config['distributed']['name']} (a group is one process)"
    if not config["sweep"]["isolate"]:
        return "sweep.isolate=false"
    lora = typed(config).lora
    return unsupported(OmegaConf.to_object(lora))


def groups(configs: list[dict[str, Any]], resume_steps: list[int] | None = None) -> list[list[int]]:
    """Indices of the jobs that may train together, in sweep order: jobs with the same identity (and the same step
    to resume from), each job that cannot join a group alone."""
    resume_steps = resume_steps or [0] * len(configs)
    out: dict[Any, list[int]] = {}
    singles = []
    for i, config in enumerate(configs):
        if why_alone(config) is not None:
            singles.append([i])
            continue
        key = (repr(sorted(identity(config).items())), resume_steps[i])
        out.setdefault(key, []).append(i)
    return sorted(list(out.values()) + singles, key=lambda g: g[0])


def resume_step(cfg: DictConfig) -> int:
    """The step a job of `sweep.resume=true` continues from: its latest whole checkpoint's (0 without one)."""
    if not cfg.sweep.resume:
        return 0
    kept = checkpoint.valid_checkpoints(Path(cfg.output_dir))
    return checkpoint.step_of(kept[-1]) if kept else 0


def _budget(cfg: TrainConfig) -> float | None:
    """The card a sweep plans for, from its parent process: plan.gpu_memory_gib, else the visible GPU's total
    (the parent never initialises CUDA: its jobs' processes are forked from it)."""
    if cfg.plan.gpu_memory_gib is not None:
        return cfg.plan.gpu_memory_gib
    try:  # the driver's tool: no CUDA context in this process
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
        return float(out.split()[0]) / 1024  # MiB -> GiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def split_configs(cfgs: list[DictConfig]) -> list[list[int]]:
    """A group's jobs in consecutive parts whose planned memory fits the budget: all at once when they fit, when
    there is no budget to judge by (the CPU), or with sweep.fuse=true; an auto micro-batch is planned per group when
    it starts (the smallest fitting one: see `_settle_micro_batch`)."""
    tcfgs = [OmegaConf.to_object(c) for c in cfgs]
    first = tcfgs[0]
    budget = _budget(first)
    planned_later = first.data.micro_batch_size == "auto" or first.checkpointing.layers == "auto"
    if str(first.sweep.fuse).lower() == "true" or budget is None or len(tcfgs) == 1 or planned_later:
        return [list(range(len(tcfgs)))]
    parts, current = [], []
    for i in range(len(tcfgs)):
        trial = current + [i]
        if current and not plan.fits(plan.predict_group([tcfgs[j] for j in trial]), budget,
                                     first.plan.safety_margin):
            parts.append(current)
            current = [i]
        else:
            current = trial
    return parts + [current]


def side_by_side(first: DictConfig, units: list[list[DictConfig]]) -> int:
    """How many units run at once on the GPU: sweep.max_parallel, or with `auto` as many as the plan says fit the card
    together (the largest units first); 1 without a budget to judge by."""
    setting = str(first.sweep.max_parallel)
    if setting != "auto":
        return max(1, int(setting))
    tcfg = OmegaConf.to_object(first)
    budget = _budget(tcfg)
    if budget is None:
        return 1
    needs = []
    for unit in units:
        cfgs = [OmegaConf.to_object(c) for c in unit]
        if any(c.data.micro_batch_size == "auto" or c.checkpointing.layers == "auto" for c in cfgs):
            return 1  # each would plan itself for the whole card
        needs.append(plan.predict_group(cfgs).card_gib)
    needs.sort(reverse=True)
    width, total = 0, 0.0
    for need in needs:
        if total + need > budget * (1 - tcfg.plan.safety_margin):
            break
        width, total = width + 1, total + need
    return max(1, width)


@dataclass
class Entry:
    """One job of a group, as the launcher hands it over: its resolved config and overrides."""

    config: dict[str, Any]
    overrides: list[str]


@dataclass
class Member:
    spec: RunSpec
    out_dir: Path
    name: str  # its adapter's name in the group
    resume: Any = None  # run.Resume or None
    previous: dict[str, Any] | None = None
    records: Any = None  # run.Records
    group: GroupMember | None = None
    own: Any = None  # the BuiltModel as this job alone sees it (its parameter counts)


def run_group(entries: list[Entry]) -> None:
    """Train the jobs of one group in this process; each records its own ending (summary.json) and nothing raised
    by one job stops another."""
    # SIGTERM while loading or saving (a sweep stopped by Ctrl-C sends it) raises KeyboardInterrupt, recorded in every
    # job like Ctrl-C, as run() does; its default would end the process without a word, no job's summary written.
    with SignalsRaise():
        _run_group(entries)


def _run_group(entries: list[Entry]) -> None:
    timeline = Timeline()
    timeline.mark("launch")
    members = []
    for i, e in enumerate(entries):
        cfg = OmegaConf.to_object(typed(e.config))
        try:
            device = validate(cfg)
            spec, _, _ = resolve_spec(cfg, device, list(e.overrides))
        except Exception as exc:  # a job refused alone is refused here too; the others go on
            record_failure(Path(cfg.output_dir), exc)
            log.error(f"{cfg.run_name}: {exc}")
            continue
        members.append(Member(spec, Path(spec.cfg.output_dir), f"j{i}"))
    with contextlib.ExitStack() as stack:
        members = [m for m in members if _hold(stack, m)]  # one writer per run dir: each job's lock, in this process
        if not members:
            return
        _settle_plan(members)
        for m in members:
            m.out_dir.mkdir(parents=True, exist_ok=True)
            # the first job's records close last: it alone prints the group's time line, every close included
            m.records = stack.enter_context(run_mod.recorded(m.spec, m.out_dir, Dist(), timeline,
                                                             say_time=m is members[0]))
        _train(members, timeline)


def _hold(stack: contextlib.ExitStack, m: Member) -> bool:
    """Take `m`'s run dir lock for the group's life; a dir another process writes is left alone (its records are
    that process's) and the job is dropped from the group."""
    try:
        stack.enter_context(rundir.hold(m.out_dir))
        return True
    except RunDirInUse as exc:
        log.error(f"{m.spec.cfg.run_name}: {exc}")
        return False


def _settle_plan(members: list[Member]) -> None:
    """One micro-batch and one set of layer modes for the whole group (its jobs share every batch and the base): what
    the group's plan fits (`plan.predict_group`: one base, every adapter), the same for every job, each recording
    what it was resolved from. A job resolved alone would plan the whole card for itself."""
    first = members[0].spec
    auto_mb = [m for m in members if m.spec.resolved.get("data.micro_batch_size", [None])[0] == "auto"]
    auto_layers = [m for m in members if m.spec.resolved.get("checkpointing.layers", [None])[0] == "auto"]
    if not auto_mb and not auto_layers:
        return
    cfgs = [m.spec.cfg for m in members]
    budget = plan.gpu_budget_gib(first.cfg, first.device)
    if auto_layers:
        cfg = first.cfg
        if auto_mb:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, micro_batch_size="auto"))
        cfg = dataclasses.replace(cfg, checkpointing=dataclasses.replace(cfg.checkpointing, layers="auto"))
        name = torch.cuda.get_device_name() if first.device == "cuda" and torch.cuda.is_available() else None
        chosen = frontier.plan_layers(cfg, read_arch(cfg), budget, name, adapters=plan.grouped_adapters(cfgs)).chosen
        mb, layers = chosen.micro_batch, chosen.layers
    else:
        mb = plan.pick_group_micro_batch(cfgs, budget) if budget else min(int(c.data.micro_batch_size) for c in cfgs)
        layers = None
    for m in members:
        if auto_mb and int(m.spec.cfg.data.micro_batch_size) != mb:
            m.spec = m.spec.evolve("data.micro_batch_size", mb)
        if layers is not None and m.spec.cfg.checkpointing.layers != layers:
            m.spec = m.spec.evolve("checkpointing.layers", layers)


def _train(members: list[Member], timeline: Timeline) -> None:
    first = members[0].spec
    cfg, device, dist = first.cfg, first.device, Dist()
    rows = read_rows(cfg.data)
    data_fingerprint = fingerprint(rows)
    for m in members:
        m.spec, m.resume = run_mod.find_resume(m.spec, m.out_dir, data_fingerprint, dist)
        m.records.own = m.records.own or m.resume is None
        if m.resume and m.resume.ckpt:
            m.records.out_dir = m.out_dir = checkpoint.run_dir_of(m.resume.ckpt)
            m.records.held.enter_context(rundir.hold(m.out_dir))
    check_size(len(rows), cfg.data, int(cfg.data.micro_batch_size), 1)
    run_mod.seed_everything(cfg.seed)
    for m in members:
        m.records.loading = True
    timeline.mark("read_data")
    phases = PhaseReadings(device)
    source = model_source(first, dist)
    reset_peak(device)
    timeline.mark("model_source")
    data = prepare_data(first, rows, data_fingerprint, source.tokenizer, dist,
                        attention=packed_path(device, torch_dtype(cfg.model.dtype)))
    phases.metrics.update(data.metrics)
    for m in members:
        if m.resume and m.resume.ckpt:
            run_mod.check_steps_left(m.resume.step, m.resume.ckpt.name,
                                     total_steps(m.spec.cfg.optim, len(data.items), int(cfg.data.micro_batch_size)),
                                     m.out_dir)
        m.previous = run_mod.continue_resume(m.resume, m.out_dir) if m.resume else None
        m.records.own = True
    timeline.mark("tokenize")
    group = build_group([m.spec for m in members], [m.name for m in members], source, phases.read)
    built = group.built
    timeline.mark("build_model")
    ledger = plan.predict_group([m.spec.cfg for m in members])
    phases.metrics.update(plan.predicted_metrics(ledger))
    log.info(f"fused group of {len(members)} jobs on one base: {', '.join(m.spec.cfg.run_name for m in members)}")
    base_params = built.total - built.trainable
    for m in members:
        view = JobView(built.model, m.name)
        trainable = sum(p.numel() for p in view.parameters())
        own = dataclasses.replace(built, trainable=trainable, total=base_params + trainable)
        m.records.logger = run_mod.open_records(m.spec, m.out_dir, m.resume, m.previous, ledger, data_fingerprint,
                                                 built.path, dist)
        evaluator = Evaluator(m.spec.cfg.eval, list(m.spec.cfg.data.metrics), rows, data.eval_set, built.tokenizer,
                              int(cfg.data.micro_batch_size), device, dist, m.spec.cfg.data.system_prompt)
        checkpointer = checkpoint.Checkpointer(m.out_dir, m.spec.cfg.save.keep_last, m.spec.config(),
                                               data_fingerprint, dist)
        job = Job(m.spec, view, built.model, built.model, len(data.items), evaluator, m.records.logger,
                  run_dir=m.out_dir, checkpointer=checkpointer, dist=dist,
                  evaluate_as=lambda name=m.name: group.routing.only(name), label=f"{m.spec.cfg.run_name}: ")
        m.group = GroupMember(m.name, job, resume_from=m.resume.ckpt if m.resume else None)
        m.own = own
        log.info(f"{m.spec.cfg.run_name}: {trainable:,} trainable / {own.total:,} parameters, "
                 f"{len(data.train_set)} train / {len(data.eval_set)} eval rows, device={device}, out={m.out_dir}")
    timeline.mark("open_records")
    startup_s = run_mod.process_age_s()
    train_group(built.model, group.routing, [m.group for m in members], data.items, data.collator, first, phases,
                micro=built.micro, on_failure=lambda gm, e: _failed(members, gm, e))
    timeline.mark("train")
    for m in members:
        if m.group.failed is not None:
            continue
        try:
            _finish(m, group, data, phases, ledger, startup_s, timeline)
        except Exception as e:  # its own records fail alone
            _failed(members, m.group, e)


def _failed(members: list[Member], gm: GroupMember, e: BaseException) -> None:
    """A job of the group ended with `e`: its summary.json and sinks say so, its sinks close; the group goes on."""
    m = next(x for x in members if x.group is gm)
    failure = run_mod.explain(e, m.out_dir, True)
    summary = record_failure(m.out_dir, failure)
    if m.records.logger is not None:
        m.records.logger.summary(summary)
        m.records.logger.close()
        m.records.logger = None
    log.error(f"{m.spec.cfg.run_name}: {type(failure).__name__}: {failure}")


def _finish(m: Member, group, data, phases: PhaseReadings, ledger, startup_s: float, timeline: Timeline) -> None:
    summary = m.group.job.summary()
    adapter_dir = m.out_dir / "adapter"
    tmp = m.out_dir / ".adapter.tmp"
    save_job_adapter(group.built.model, m.name, tmp)
    group.built.tokenizer.save_pretrained(tmp)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    tmp.rename(adapter_dir)
    logger = m.records.logger
    if m.spec.cfg.log.adapter_artifact:
        logger.artifact(adapter_dir, "adapter", "model",
                        {"run_name": m.spec.cfg.run_name, **run_mod.adapter_metadata(m.spec)})
    summary = run_mod.finish_summary(summary, m.spec, ledger, m.own, data, phases, startup_s, adapter_dir, logger)
    summary["summary/fused_jobs"] = len(group.names)
    summary["summary/peak_memory_scope"] += f" (a fused group of {len(group.names)} jobs: the group's process)"
    summary.update(timeline.metrics())
    logger.summary({**summary, **phases.metrics})  # summary.json among them


def describe(groups_: Iterable[list[int]], names: list[str]) -> str:
    return "; ".join(("fused: " if len(g) > 1 else "alone: ") + ", ".join(names[i] for i in g) for g in groups_)

