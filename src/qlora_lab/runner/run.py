"""One run, in pipeline order: validate -> resolve -> load -> quantize -> prepare -> adapt -> data -> train -> save.

`run(cfg)` is what `train.py` calls and what the tests call; it returns the run's summary metrics. Ordering
constraints, each for a reason:
- validate and resolve first: every problem is reported before anything loads, and every `auto` is settled
  before anything is recorded;
- a resume is settled next (it may put back the checkpoint's micro-batch), before anything reads the spec; every
  change of the spec re-plans its memory, so what is checked, logged and trained is one spec;
- rows are read and checked before the tokenizer loads, and tokenized before the weights load: a bad dataset
  fails in seconds, not after a model load;
- the sinks open once the run spec is final (after the micro-batch probe on CUDA), so run_info.json, every sink and
  checkpoints record what runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab import closed, sinks
from qlora_lab.configs import key_table
from qlora_lab.core import dist as dist_mod
from qlora_lab.core.checks import missing_problems
from qlora_lab.core.dist import Dist
from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.effects import declared
from qlora_lab.core.errors import CheckpointError, ConfigError, OutputError, Status, TrainingInterrupted
from qlora_lab.core.flat import flatten
from qlora_lab.core.log import to_file
from qlora_lab.core.schema import TrainConfig
from qlora_lab.core.spec import RunSpec
from qlora_lab.core.timing import Timeline
from qlora_lab.data.prepare import prepare_data
from qlora_lab.data.rows import check_size, fingerprint, read_rows
from qlora_lab.evaluation.metrics import goals
from qlora_lab.memory import plan
from qlora_lab.memory.ledger import Ledger
from qlora_lab.memory.readings import PhaseReadings, peak_scope, reset_peak
from qlora_lab.model import BuiltModel, build_model, model_source
from qlora_lab.model.attention import packed_path
from qlora_lab.model.prepare import set_modes
from qlora_lab.runner.preflight import validate
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.runner import rundir
from qlora_lab.runner.rundir import check_steps_left, describe, finished_run, held_run, move_aside, refused_run
from qlora_lab.sinks.jsonl import JsonlSink
from qlora_lab.sinks.logger import MetricLogger
from qlora_lab.sinks.provenance import record_resume, recorded_sink_ids, write_run_info
from qlora_lab.sinks.summary import SUMMARY, read_summary, record_failure, write_summary
from qlora_lab.train import checkpoint
from qlora_lab.train.evaluate import Evaluator
from qlora_lab.train.loop import train
from qlora_lab.train.optim import total_steps
from qlora_lab.train.save import save_adapter
from qlora_lab.train.signals import SignalsRaise
from qlora_lab.train.state import sink_ids_of

log = logging.getLogger(__name__)


def process_age_s() -> float:
    """Seconds since this process started: a sweep job's own process, so its interpreter start and imports count."""
    return time.time() - psutil.Process().create_time()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


# Keys whose `auto` the plan resolves from the machine: a resume takes the checkpoint's values.
PLANNED = ("data.micro_batch_size", "checkpointing.layers")


def get_key(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


def tags_of(spec: RunSpec) -> list[str]:
    """The run's tags in every sink: cfg.tags, `study=<name>` and each override of a key that is not a location
    (core/effects.py)."""
    table = key_table(spec.config())
    keep = []
    for o in spec.overrides:
        key = o.split("=", 1)[0].lstrip("+~")
        d = declared(table, key)
        if not key.startswith("hydra") and (d is None or d.effect.named):
            keep.append(o)
    study = [f"study={spec.cfg.study}"] if spec.cfg.study else []  # also when set by a YAML, not an override
    return list(dict.fromkeys([*spec.cfg.tags, *study, *keep]))


def adapter_metadata(spec: RunSpec) -> dict[str, Any]:
    """What an adapter is and what it was trained on (the keys declared base, data or adapter), for its artifact."""
    table = key_table(spec.config())
    return {k: v for k, v in flatten(spec.config()).items()
            if (d := declared(table, k)) is not None and d.effect.describes_adapter}


def open_logger(spec: RunSpec, out_dir: Path, resume: tuple[dict[str, str], int] | None = None) -> MetricLogger:
    """metrics.jsonl and the sinks `logger` names; `resume=(each sink's run id, step)` continues all of them after
    that step."""
    cfg = spec.cfg
    jsonl = JsonlSink(out_dir / "metrics.jsonl", resume_step=resume[1] if resume else None)
    group_dir = out_dir.parent if cfg.sweep_id else None
    record = sinks.RunRecord(run_dir=out_dir, name=cfg.run_name, group=cfg.sweep_id, group_dir=group_dir,
                             tags=tags_of(spec), config=flatten(spec.config()), goals=goals(),
                             history=jsonl.records() if resume else [])
    return MetricLogger([("jsonl", jsonl), *sinks.open_sinks(cfg.logger, record, resume[0] if resume else None)])


@dataclass
class Resume:
    """Where a run continues: after a checkpoint's step, or from step 0 in a run dir whose run died before its first
    checkpoint (a restart: the earlier records move aside and the same runs in every sink are refilled)."""

    ckpt: Path | None
    step: int
    allowed: list[str]  # config differences the checkpoint allows, recorded in run_info.json
    sink_ids: dict[str, str]  # each sink's run id, so that every sink continues its run
    done: dict[str, Any] | None = None  # resume=auto on a finished run asking for no more steps: its summary


def find_resume(spec: RunSpec, out_dir: Path, data_fingerprint: str, dist: Dist) -> tuple[RunSpec, Resume | None]:
    """Where `resume` continues, checked against the run spec and the data (None: a new run).

    An auto micro-batch and checkpointing=auto's layer modes resume as the checkpoint recorded them: a resumed run
    continues what it started, whatever the plan picks on this machine today.
    """
    cfg = spec.cfg
    if not cfg.resume:
        return spec, None
    ckpt = checkpoint.find(cfg.resume, out_dir)
    allowed = []
    if ckpt is not None:
        saved = checkpoint.saved(ckpt, "config.json")["config"]
        for key in PLANNED:  # what the plan chose is what the run continues with, not what it would choose today
            if spec.resolved.get(key, [None])[0] == "auto" and get_key(saved, key) is not None:
                spec = spec.evolve(key, get_key(saved, key))
        allowed = checkpoint.check_compatible(ckpt, spec.config(), data_fingerprint, dist.world)
    done = finished_run(out_dir, cfg.optim) if cfg.resume == "auto" else None
    if done is not None:
        if dist.main:
            log.info(f"resume=auto: {out_dir} holds a finished run ({done.get('summary/steps')} steps) and "
                     "optim.max_steps asks for no more; nothing to continue, nothing changed (raise optim.max_steps "
                     "to train on, or start again with overwrite=true)")
        return spec, Resume(ckpt, 0, allowed, {}, done=done)
    if ckpt is None and checkpoint.all_checkpoints(out_dir):  # it saved some, none is whole: never start it over
        damaged = "; ".join(f"{p.name} {checkpoint.verify(p)}" for p in checkpoint.all_checkpoints(out_dir))
        raise CheckpointError(f"resume=auto: {out_dir} holds {describe(out_dir)} whose checkpoints are all damaged "
                              f"({damaged}); restarting it from step 0 would replace it: start again in another dir "
                              "(hydra.run.dir=<new dir>) or replace it with overwrite=true")
    if ckpt is None:
        held = bool(held_run(out_dir))
        if dist.main:
            log.info(f"resume=auto: no checkpoint in {out_dir / checkpoint.CKPT_DIR}; "
                     + (f"it holds {describe(out_dir)}: restarting from step 0 (its records move to "
                        "metrics.rolled_back.jsonl, the same runs continue in every sink)" if held else
                        "no earlier run there, starting from step 0 (to continue one, give its dir: "
                        "hydra.run.dir=<run dir>)"))
        return spec, Resume(None, 0, [], recorded_sink_ids(out_dir)) if held else None
    checkpoint.readable(ckpt)  # every file, before anything of the run is touched (a bad one: BadFile, one line)
    trainer = checkpoint.saved(ckpt, "trainer_state.json")["trainer"]
    return spec, Resume(ckpt, checkpoint.step_of(ckpt), allowed, sink_ids_of(trainer))


def run(cfg: DictConfig | TrainConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train (or plan) one run described by `cfg`; returns its summary metrics."""
    timeline = Timeline()
    timeline.mark("launch")  # the interpreter's start, imports, Hydra's composition
    if isinstance(cfg, DictConfig):  # a key the schema lacks (`+lora.rank=64`), `???` left in a YAML: say which
        problems = closed.problems(cfg) + (missing_problems(sorted(OmegaConf.missing_keys(cfg)))
                                           if OmegaConf.missing_keys(cfg) else [])
        if problems:
            raise ConfigError(problems)
    tcfg: TrainConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    device = validate(tcfg)  # every problem that can be found without a model, all at once
    spec, ledger, budget = resolve_spec(tcfg, device, list(overrides or []))
    timeline.mark("validate")
    if spec.cfg.mode == "plan":
        run_plan = ledger.extra.get("run_plan")
        log.info(plan.plan_report(spec.cfg, ledger, budget, list(spec.overrides), run_plan))
        out = {"summary/status": str(Status.planned), "summary/predicted_peak_gib": ledger.peak_gib,
               "summary/predicted_card_gib": ledger.card_gib, "summary/micro_batch": ledger.micro_batch,
               "summary/fits": plan.fits(ledger, budget, spec.cfg.plan.safety_margin),
               "summary/checkpointing_layers": str(spec.cfg.checkpointing.layers),
               "summary/max_seq_len": spec.cfg.model.max_seq_len}
        if run_plan is not None and run_plan.layers is not None:
            out["summary/predicted_tokens_per_s"] = run_plan.layers.chosen.tokens_per_s
            out["plan/candidates"] = [run_plan.layers.chosen.row()] + [c.row() for c in run_plan.layers.runners_up]
        return out
    dist = dist_mod.setup(spec.cfg.distributed, device)
    try:
        # SIGTERM while loading or saving is recorded like Ctrl-C, not a silent exit. One writer per run dir: rank 0
        # holds its lock (train.py's took it before Hydra wrote there; another process holding it: RunDirInUse).
        with SignalsRaise(), rundir.hold(spec.cfg.output_dir) if dist.main else contextlib.nullcontext(), \
                to_file(Path(spec.cfg.output_dir) / "train.log") if dist.main else contextlib.nullcontext():
            return _train_run(spec, ledger, budget, dist, timeline)
    finally:
        dist_mod.teardown(dist)


@dataclass
class Records:
    """What a run may write about how it ended, as it goes: into its run dir once the run dir is its own (a refused
    resume leaves the earlier attempt's files, a finished run's summary.json among them, exactly as they were), and
    into the sinks once past the data checks (a sweep's failed job then shows in W&B/MLflow too)."""

    out_dir: Path
    own: bool
    loading: bool = False
    logger: MetricLogger | None = None
    held: contextlib.ExitStack = dataclasses.field(default_factory=contextlib.ExitStack)  # run dirs' locks


@contextlib.contextmanager
def recorded(spec: RunSpec, out_dir: Path, dist: Dist, timeline: Timeline, say_time: bool = True) -> Iterator[Records]:
    """Records a failure of the block (in summary.json and the sinks, as `Records` allows) and closes the sinks;
    `say_time`: print the run's time line at the end (a fused group's jobs share one timeline: it is printed once)."""
    rec = Records(out_dir, own=not spec.cfg.resume)
    try:
        yield rec
    except BaseException as e:
        failure = explain(e, rec.out_dir, rec.logger is not None)
        if dist.main and rec.own:
            summary = record_failure(rec.out_dir, failure)
            if rec.logger is None and rec.loading:
                rec.logger = _failure_logger(spec, rec.out_dir)
            if rec.logger is not None:
                rec.logger.summary(summary)
        if failure is e:
            raise
        raise failure from e
    finally:
        rec.held.close()
        if rec.logger is not None:
            rec.logger.close()
            if dist.main:  # after the summary: the sinks' close is the one span the summary cannot hold
                timeline.mark("close_records")
                if say_time:
                    log.info(f"time: {timeline.line()}")


def _replanned(spec: RunSpec, ledger: Ledger) -> Ledger:
    """The ledger of `spec` as it now stands (the plan is redone whenever the spec changes)."""
    mb = int(spec.cfg.data.micro_batch_size)
    if ledger.micro_batch == mb and ledger.extra.get("layers") == spec.cfg.checkpointing.layers:
        return ledger
    new = plan.predict(spec.cfg, mb)
    new.extra.update({k: v for k, v in ledger.extra.items() if k == "run_plan"})
    new.extra["layers"] = spec.cfg.checkpointing.layers
    return new


def _train_run(spec: RunSpec, ledger: Ledger, budget: float | None, dist: Dist, timeline: Timeline) -> dict[str, Any]:
    cfg, device = spec.cfg, spec.device
    # Every process writes into rank 0's run dir (their Hydra dirs agree anyway, see resolvers.launch_time).
    out_dir = Path(dist.broadcast(cfg.output_dir))
    if cfg.overwrite and dist.main and held_run(out_dir):  # validate allowed it; before anything is written
        log.info(f"overwrite=true: the earlier run in {out_dir} moved to {move_aside(out_dir)}")
    elif cfg.resume is None and dist.main and refused_run(out_dir):
        log.info(f"the run refused earlier in {out_dir} (it trained nothing) moved to {move_aside(out_dir)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.plan.skip_unfit and plan.fits(ledger, budget, cfg.plan.safety_margin) is False:
        return _skip(out_dir, ledger, budget, spec, dist.main)
    with recorded(spec, out_dir, dist, timeline) as rec:
        rows = read_rows(cfg.data)
        data_fingerprint = fingerprint(rows)
        spec, resume = find_resume(spec, out_dir, data_fingerprint, dist)
        cfg, ledger = spec.cfg, _replanned(spec, ledger)
        rec.own = rec.own or resume is None  # resume=auto with nothing to resume: a new run
        if resume and resume.done:
            return resume.done
        micro_batch = int(cfg.data.micro_batch_size)
        check_size(len(rows), cfg.data, micro_batch, dist.world)
        if resume and resume.ckpt:  # training continues in the checkpoint's run dir (resume=<path> may name another)
            rec.out_dir = out_dir = checkpoint.run_dir_of(resume.ckpt)
            if dist.main:  # whose lock this process then holds too
                rec.held.enter_context(rundir.hold(out_dir))
        seed_everything(cfg.seed)
        rec.loading = True
        timeline.mark("read_data")

        phases = PhaseReadings(device)
        source = model_source(spec, dist)
        # After the source: building a random-init model (the first job of a sweep on a shape) is not this run's
        # memory. From here every peak is the run's own, loading and quantizing included (readings.peak_scope).
        reset_peak(device)
        timeline.mark("model_source")  # a random-init build or a GGUF conversion, else the tokenizer's load
        data = prepare_data(spec, rows, data_fingerprint, source.tokenizer, dist,
                            attention=packed_path(device, torch_dtype(cfg.model.dtype)))
        phases.metrics.update(data.metrics)  # logged with step 1 and in the summary
        if resume and resume.ckpt:  # every process: they refuse together, before anything is touched
            check_steps_left(resume.step, resume.ckpt.name, total_steps(cfg.optim, len(data.items), micro_batch),
                             out_dir)
        previous = continue_resume(resume, out_dir) if resume and dist.main else None
        rec.own = True
        timeline.mark("tokenize")
        built = build_model(spec, source, dist, phases.read)
        timeline.mark("build_model")  # load, quantize, prepare, adapt, wrap
        if device == "cuda" and (resume is None or resume.ckpt is None):
            prove = (_prove_plan if "checkpointing.layers" in spec.resolved else
                     _prove_micro_batch if "data.micro_batch_size" in spec.resolved else None)
            if prove is not None:
                spec, ledger = prove(spec, ledger, built)
                cfg = spec.cfg
                phases.read("prove")  # the proving step's peak is its own, not step 1's
                reset_peak(device)
            timeline.mark("prove_plan")  # the real step(s) that proved an auto plan or micro-batch (CUDA only)
        phases.metrics.update(plan.predicted_metrics(ledger))

        rec.logger = logger = open_records(spec, out_dir, resume, previous, ledger, data_fingerprint, built.path, dist)
        timeline.mark("open_records")  # run_info.json, the sinks' start
        if dist.main:
            log.info(f"{cfg.run_name}: {built.trainable:,} trainable / {built.total:,} parameters, "
                     f"{len(data.train_set)} train / {len(data.eval_set)} eval rows, device={device}, out={out_dir}"
                     + (f", {dist.world} processes ({dist.strategy})" if dist.active else ""))

        startup_s = process_age_s()
        checkpointer = checkpoint.Checkpointer(out_dir, cfg.save.keep_last, spec.config(), data_fingerprint, dist)
        evaluator = Evaluator(cfg.eval, list(cfg.data.metrics), rows, data.eval_set, built.tokenizer,
                              int(cfg.data.micro_batch_size), device, dist, cfg.data.system_prompt)
        summary = train(built, data.items, data.collator, evaluator, spec, logger, phases, run_dir=out_dir,
                        checkpointer=checkpointer, resume_from=resume.ckpt if resume else None, dist=dist)
        timeline.mark("train")  # the steps, step 1's compile, evaluations, checkpoints
        timeline.part("eval", "train", evaluator.seconds)
        adapter_dir = save_adapter(built.model, built.tokenizer, out_dir, dist)
        if not dist.main:
            return summary
        if cfg.log.adapter_artifact:  # what the adapter is, for a reader of the artifact (W&B allows 100 keys)
            logger.artifact(adapter_dir, "adapter", "model", {"run_name": cfg.run_name, **adapter_metadata(spec)})
        timeline.mark("save_adapter")
        summary = finish_summary(summary, spec, ledger, built, data, phases, startup_s, adapter_dir, logger)
        summary.update(timeline.metrics())
        logger.summary({**summary, **phases.metrics})
        _print_summary(summary, phases)
        return summary


def finish_summary(summary: dict[str, Any], spec: RunSpec, ledger: Ledger, built: BuiltModel, data, phases: PhaseReadings,
            startup_s: float, adapter_dir: Path, logger: MetricLogger) -> dict[str, Any]:
    """The loop's summary and what the run knows beside it; on CUDA the ledger's prediction against the readings."""
    wall_s = process_age_s()
    if spec.device == "cuda":
        table = _ledger_vs_measured(ledger, phases, summary, logger)
        log.info("memory ledger, predicted vs measured (GiB allocated):\n" + table)
    summary.update({
        "summary/trainable_params": built.trainable,
        "summary/total_params": built.total,
        "summary/train_rows": len(data.train_set),
        "summary/dropped_rows": len(data.data.dropped),
        "summary/truncated_rows": len(data.data.truncated),
        "summary/peak_memory_scope": peak_scope(spec.device),
        # how the process began: its own interpreter, or forked from a sweep's warm process (sweep.warm_start),
        # whose imports its time spans do not include
        "summary/process_start": "warm_fork" if multiprocessing.parent_process() else "interpreter",
        "summary/startup_s": startup_s,  # process start -> the first step: imports, data, load, the sinks
        "summary/wall_time_s": wall_s,  # process start -> now
        "summary/overhead_s": wall_s - summary["summary/train_time_s"],  # what was not the steps
        "summary/status": str(Status.finished),
        "summary/micro_batch": int(spec.cfg.data.micro_batch_size),
        "summary/kernels": str(spec.cfg.model.kernels),
        "summary/predicted_peak_gib": ledger.peak_gib,
        "summary/adapter_dir": str(adapter_dir),
    })
    return summary


def open_records(spec: RunSpec, out_dir: Path, resume: Resume | None, previous: dict[str, Any] | None,
                  ledger: Ledger, data_fingerprint: str, model_path: str, dist: Dist) -> MetricLogger:
    """The run's sinks, and what re-creates and explains it: run_info.json for a new run (or a restart), the resume
    record for a continued one, the predicted ledger as a table. Only rank 0 reports: one metrics.jsonl, one run in
    each sink, whatever the number of processes."""
    if not dist.main:
        return MetricLogger([])
    logger = open_logger(spec, out_dir, (resume.sink_ids, resume.step) if resume else None)
    if resume is None or resume.ckpt is None:
        planned = plan_record(ledger)
        write_run_info(out_dir, spec, dataset_fingerprint=data_fingerprint, model_path=model_path,
                       sink_ids=logger.run_ids, extra={"plan": planned} if planned else None)
        logger.table("ledger/items", plan.item_rows(ledger), step=0)  # beside what the run then measures
        if planned:  # checkpointing=auto: what it chose and the runners-up, predicted
            logger.table("plan/candidates", planned["candidates"], step=0)
    if resume:
        record_resume(out_dir, checkpoint=resume.ckpt, step=resume.step, overrides=list(spec.overrides),
                      differences=resume.allowed, previous=previous)
    return logger


def plan_record(ledger: Ledger) -> dict[str, Any] | None:
    """What checkpointing=auto chose, with the predicted tokens/s and memory of the runners-up (run_info.json)."""
    run_plan = ledger.extra.get("run_plan")
    if run_plan is None or run_plan.layers is None:
        return None
    lp = run_plan.layers
    return {"chosen": lp.chosen.row(), "limit": lp.limit, "budget_gib": lp.budget_gib, "host_gib": lp.host_gib,
            "candidates": [{"chosen": i == 0, **c.row()} for i, c in enumerate([lp.chosen] + lp.runners_up)]}


def continue_resume(resume: Resume, out_dir: Path) -> dict[str, Any] | None:
    """A resume that passed every check: say so, and take the earlier attempt's summary.json out of the way (it is
    recorded in run_info.json's `resumes`); returns it."""
    if resume.ckpt is not None:
        log.info(f"resuming {out_dir} from {resume.ckpt.name} (step {resume.step})"
                 + ("; config differences, allowed:\n" + "\n".join(f"  - {a}" for a in resume.allowed)
                    if resume.allowed else ""))
    previous = read_summary(out_dir)
    (out_dir / SUMMARY).unlink(missing_ok=True)
    return previous


def explain(e: BaseException, out_dir: Path, training: bool) -> BaseException:
    """The exception a run that raised `e` ends with: `e`, or one whose message says what happened and what to do
    (an interrupt outside the loop's own handling, a run dir that stopped taking writes)."""
    if isinstance(e, KeyboardInterrupt) and not isinstance(e, TrainingInterrupted):
        kept = checkpoint.valid_checkpoints(out_dir)
        return TrainingInterrupted(
            f"stopped by {e.args[0] if e.args else 'SIGINT (Ctrl-C)'} "
            f"{'during training' if training else 'before training started'}; "
            + (f"the last whole checkpoint is {kept[-1].name}: continue with resume=auto hydra.run.dir={out_dir}"
               if kept else f"no checkpoint was written: start again with resume=auto hydra.run.dir={out_dir} "
                            "(one history: earlier records move aside)"))
    if isinstance(e, OSError) and e.errno in checkpoint.WRITE_ERRORS \
            and (e.filename is None or Path(e.filename).absolute().is_relative_to(out_dir.absolute())):
        return OutputError(f"writing {e.filename or 'into the run dir'} failed ({checkpoint.WRITE_ERRORS[e.errno]}); "
                           f"the run dir {out_dir} must stay writable: free space or make it writable again, then "
                           f"continue with resume=auto hydra.run.dir={out_dir}")
    return e


def _failure_logger(spec: RunSpec, out_dir: Path) -> MetricLogger | None:
    """The sinks of a run that failed before they opened, to record the failure; None if they cannot open."""
    try:
        return open_logger(spec, out_dir)
    except Exception as e:  # the original failure is what matters; say why this record is missing
        log.warning(f"could not record the failure in the sinks ({type(e).__name__}: {e})")
        return None


def _prove_micro_batch(spec: RunSpec, ledger: Ledger, built: BuiltModel) -> tuple[RunSpec, Ledger]:
    """data.micro_batch_size=auto on CUDA: one real step at the ledger's pick, halved on out-of-memory."""
    seq = spec.cfg.model.max_seq_len
    mb, attempts = plan.verify_micro_batch(int(spec.cfg.data.micro_batch_size),
                                           lambda n: _probe_step(built.model, n, seq))
    log.info(f"micro_batch_size=auto -> {mb} (ledger picked {ledger.micro_batch}; tries {attempts})")
    spec = spec if mb == ledger.micro_batch else spec.evolve("data.micro_batch_size", mb)
    return spec, _replanned(spec, ledger)


def _prove_plan(spec: RunSpec, ledger: Ledger, built: BuiltModel) -> tuple[RunSpec, Ledger]:
    """checkpointing=auto on CUDA: one real step at the chosen plan; on out-of-memory the next runner-up that needs
    less memory (its layer modes set on the model already built), until one runs."""
    run_plan = ledger.extra["run_plan"].layers
    seq, tried = spec.cfg.model.max_seq_len, []
    for candidate in [run_plan.chosen] + run_plan.runners_up:
        set_modes(built.model, spec.cfg.checkpointing, candidate.modes, spec.device)
        try:
            _probe_step(built.model, candidate.micro_batch, seq)
        except torch.OutOfMemoryError as e:
            tried.append(f"micro-batch {candidate.micro_batch} {candidate.layers}: out of memory")
            torch.cuda.empty_cache()
            log.warning(f"checkpointing=auto: {tried[-1]} ({str(e).splitlines()[0][:120]}); trying the next plan")
            continue
        log.info(f"checkpointing=auto -> micro-batch {candidate.micro_batch}, layers {candidate.layers} "
                 f"(predicted {candidate.tokens_per_s:,.0f} tokens/s, {candidate.ledger.card_gib:.2f} GiB)")
        if candidate is not run_plan.chosen:
            spec = spec.evolve("checkpointing.layers", candidate.layers)
            if "data.micro_batch_size" in spec.resolved:
                spec = spec.evolve("data.micro_batch_size", candidate.micro_batch)
        return spec, _replanned(spec, ledger)
    raise RuntimeError("checkpointing=auto: every plan ran out of memory on its proving step (" + "; ".join(tried)
                       + "); lower plan.gpu_memory_gib or model.max_seq_len")


def _probe_step(model, micro_batch: int, seq: int, device: str = "cuda") -> None:
    """One forward and backward at full sequence length, to prove a micro-batch fits before training on it: one
    document a row, with the boundaries a packed batch carries (packed attention needs them; SDPA ignores them).
    In training mode, as the steps run: a model in eval mode (as it is built) checkpoints no layer and, with liger,
    computes the full logits, so its step would prove (or refuse) another plan than the one chosen."""
    was_training = model.training
    model.train()
    try:
        ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq), device=device)
        cu = torch.arange(0, (micro_batch + 1) * seq, seq, dtype=torch.int32, device=device)
        positions = torch.arange(seq, device=device).expand(micro_batch, seq)
        model(input_ids=ids, labels=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=seq, max_length_k=seq).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if device == "cuda":
            torch.cuda.empty_cache()


def _ledger_vs_measured(ledger: Ledger, phases: PhaseReadings, summary: dict[str, Any],
                        logger: MetricLogger) -> str:
    """The ledger predicts CUDA allocator bytes (CPU RSS is not comparable): log predicted, measured and the
    difference per phase to every sink; returns the printable table."""
    measured = {p: phases.measured(p) for p in plan.PHASES[:-1] if phases.measured(p) is not None}
    measured["step_peak"] = summary["summary/peak_memory_gib"]
    metrics, table, rows = plan.compare(ledger, measured)
    logger.log(metrics, step=summary["summary/steps"])
    logger.table("ledger/phases", rows, step=summary["summary/steps"])
    summary.update(metrics)
    return table


def _skip(out_dir: Path, ledger: Ledger, budget: float | None, spec: RunSpec, writer: bool) -> dict[str, Any]:
    """plan.skip_unfit: record the run as skipped, with the reason, instead of starting it."""
    reason = plan.verdict(ledger, budget, spec.cfg.plan.safety_margin)
    summary = {"summary/status": str(Status.skipped), "summary/reason": reason,
               "summary/predicted_peak_gib": ledger.peak_gib, "summary/predicted_card_gib": ledger.card_gib}
    if writer:
        write_summary(out_dir, summary)
        log.info(f"{spec.cfg.run_name}: skipped: {reason}")
    return summary


def _print_summary(summary: dict[str, Any], phases: PhaseReadings) -> None:
    lines = ["memory by phase (GiB, allocated / peak allocated):"]
    for name in ("load", "prepare", "wrap", "first_forward", "first_backward", "first_optimizer_step"):
        a, p = phases.measured(name), phases.measured(name, "peak_allocated_gib")
        if a is not None:
            lines.append(f"  {name:<22} {a:8.3f} / {p:8.3f}")
    log.info("\n".join(lines))
    log.info(", ".join(f"{k.split('/', 1)[1]}={v:.4g}" if isinstance(v, float) else f"{k.split('/', 1)[1]}={v}"
                       for k, v in summary.items()))
