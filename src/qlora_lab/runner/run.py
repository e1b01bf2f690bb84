"""One run, in pipeline order: validate -> resolve -> load -> quantize -> prepare -> adapt -> data -> train -> save.

`run(cfg)` is what `train.py` calls and what the tests call; it returns the run's summary metrics. Ordering
constraints, each for a reason:
- validate and resolve first: every problem is reported before anything loads, and every `auto` is settled
  before anything is recorded;
- rows are read and checked before the tokenizer loads, and tokenized before the weights load: a bad dataset
  fails in seconds, not after a model load;
- the sinks open once the run spec is final (after the micro-batch probe on CUDA), so run_info.json, W&B and
  checkpoints record what runs.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from qlora_lab.core import dist as dist_mod
from qlora_lab.core.dist import Dist
from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.checks import missing_problems
from qlora_lab.core.errors import ConfigError, DataError, OutputError, Status, TrainingInterrupted
from qlora_lab.core.flat import flatten
from qlora_lab.core.schema import TrainConfig
from qlora_lab.core.spec import RunSpec
from qlora_lab.core.timing import Timeline
from qlora_lab.data import store
from qlora_lab.data.batching import Collator
from qlora_lab.data.packing import PackedRows, lengths_of, pack
from qlora_lab.data.rows import check_size, fingerprint, read_rows, split_eval
from qlora_lab.data.tokenize import Example, Tokenized
from qlora_lab.memory import plan
from qlora_lab.memory.ledger import Ledger
from qlora_lab.memory.readings import PhaseReadings, peak_scope, reset_peak
from qlora_lab.model import BuiltModel, build_model, model_source
from qlora_lab.model.attention import packed_path
from qlora_lab.runner.preflight import validate
from qlora_lab.runner.resolve import resolve_spec
from qlora_lab.runner.rundir import check_steps_left, describe, finished_run, held_run, move_aside
from qlora_lab.sinks.jsonl import JsonlSink
from qlora_lab.sinks.logger import MetricLogger
from qlora_lab.sinks.provenance import record_resume, recorded_wandb_id, write_run_info
from qlora_lab.sinks.summary import SUMMARY, read_summary, record_failure, write_summary
from qlora_lab.sinks.wandb import WandbSink
from qlora_lab.train import checkpoint
from qlora_lab.train.evaluate import Evaluator
from qlora_lab.train.loop import train
from qlora_lab.train.optim import total_steps
from qlora_lab.train.save import save_adapter
from qlora_lab.train.signals import SignalsRaise

# Overrides that change where or how a run reports, not what it computes: no W&B tag for them.
NOT_TAGS = ("cache_dir", "output_dir", "logger.progress_bar", "logger.mode", "sweep.resume", "resume=", "overwrite=",
            "hydra.")
# The config keys that say what an adapter artifact is (the base model, its quantization, the LoRA shape).
ADAPTER_METADATA = ("model.name", "model.path", "quantization.", "lora.", "seed")


def process_age_s() -> float:
    """Seconds since this process started: a sweep job's own process, so its interpreter start and imports count."""
    return time.time() - psutil.Process().create_time()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def open_logger(spec: RunSpec, out_dir: Path, resume: tuple[str | None, int] | None = None) -> MetricLogger:
    """metrics.jsonl and W&B; `resume=(wandb run id, step)` continues both after that step."""
    cfg = spec.cfg
    jsonl = JsonlSink(out_dir / "metrics.jsonl", resume_step=resume[1] if resume else None)
    sinks: list = [jsonl]
    if cfg.logger.name == "wandb" and cfg.logger.mode != "disabled":
        tags = [o for o in spec.overrides if not o.startswith(NOT_TAGS)]
        sinks.append(WandbSink(project=cfg.logger.project, entity=cfg.logger.entity, mode=str(cfg.logger.mode),
                               run_dir=out_dir, name=cfg.run_name, group=cfg.sweep_id,
                               tags=list(cfg.tags) + tags, config=flatten(spec.config()),
                               resume=(resume[0], jsonl.records()) if resume and resume[0] else None))
    return MetricLogger(sinks)


@dataclass
class Resume:
    """Where a run continues: after a checkpoint's step, or from step 0 in a run dir whose run died before its first
    checkpoint (a restart: the earlier records move aside and the same W&B run is refilled)."""

    ckpt: Path | None
    step: int
    allowed: list[str]  # config differences the checkpoint allows, recorded in run_info.json
    wandb_id: str | None
    done: dict[str, Any] | None = None  # resume=auto on a finished run asking for no more steps: its summary


def find_resume(spec: RunSpec, out_dir: Path, data_fingerprint: str, dist: Dist) -> tuple[RunSpec, Resume | None]:
    """Where `resume` continues, checked against the run spec and the data (None: a new run).

    An auto micro-batch resumes with the checkpoint's: a resumed run continues what it started.
    """
    cfg = spec.cfg
    if not cfg.resume:
        return spec, None
    ckpt = checkpoint.find(cfg.resume, out_dir)
    allowed = []
    if ckpt is not None:
        saved = json.loads((ckpt / "config.json").read_text())
        if spec.resolved.get("data.micro_batch_size", [None])[0] == "auto":
            spec = spec.evolve("data.micro_batch_size", saved["config"]["data"]["micro_batch_size"])
        allowed = checkpoint.check_compatible(ckpt, spec.config(), data_fingerprint, dist.world)
    done = finished_run(out_dir, cfg.optim) if cfg.resume == "auto" else None
    if done is not None:
        if dist.main:
            print(f"qlora-lab: resume=auto: {out_dir} holds a finished run ({done.get('summary/steps')} steps) and "
                  "optim.max_steps asks for no more; nothing to continue, nothing changed (raise optim.max_steps to "
                  "train on, or start again with overwrite=true)")
        return spec, Resume(ckpt, 0, allowed, None, done=done)
    if ckpt is None:
        held = bool(held_run(out_dir))
        if dist.main:
            print(f"qlora-lab: resume=auto: no checkpoint in {out_dir / checkpoint.CKPT_DIR}; "
                  + (f"it holds {describe(out_dir)}: restarting from step 0 (its records move to "
                     "metrics.rolled_back.jsonl, the same W&B run continues)" if held else
                     "no earlier run there, starting from step 0 (to continue one, give its dir: "
                     "hydra.run.dir=<run dir>)"))
        return spec, Resume(None, 0, [], recorded_wandb_id(out_dir)) if held else None
    trainer = json.loads((ckpt / "trainer_state.json").read_text())
    return spec, Resume(ckpt, checkpoint.step_of(ckpt), allowed, trainer["trainer"]["wandb_id"])


def run(cfg: DictConfig | TrainConfig, overrides: list[str] | None = None) -> dict[str, Any]:
    """Train (or plan) one run described by `cfg`; returns its summary metrics."""
    timeline = Timeline()
    timeline.mark("launch")  # the interpreter's start, imports, Hydra's composition
    if isinstance(cfg, DictConfig) and OmegaConf.missing_keys(cfg):  # `???` left in a YAML: say which, not a trace
        raise ConfigError(missing_problems(sorted(OmegaConf.missing_keys(cfg))))
    tcfg: TrainConfig = OmegaConf.to_object(cfg) if isinstance(cfg, DictConfig) else cfg
    device = validate(tcfg)  # every problem that can be found without a model, all at once
    spec, ledger, budget = resolve_spec(tcfg, device, list(overrides or []))
    timeline.mark("validate")
    if spec.cfg.mode == "plan":
        print(plan.plan_report(spec.cfg, ledger, budget, list(spec.overrides)))
        return {"summary/status": str(Status.planned), "summary/predicted_peak_gib": ledger.peak_gib,
                "summary/predicted_card_gib": ledger.card_gib, "summary/micro_batch": ledger.micro_batch,
                "summary/fits": plan.fits(ledger, budget, spec.cfg.plan.safety_margin)}
    dist = dist_mod.setup(spec.cfg.distributed, device)
    try:
        with SignalsRaise():  # SIGTERM while loading or saving is recorded like Ctrl-C, not a silent exit
            return _train_run(spec, ledger, budget, dist, timeline)
    finally:
        dist_mod.teardown(dist)


def _train_run(spec: RunSpec, ledger: Ledger, budget: float | None, dist: Dist, timeline: Timeline) -> dict[str, Any]:
    cfg, device = spec.cfg, spec.device
    # Every process writes into rank 0's run dir (their Hydra dirs agree anyway, see resolvers.launch_time).
    out_dir = Path(dist.broadcast(cfg.output_dir))
    if cfg.overwrite and dist.main and held_run(out_dir):  # validate allowed it; before anything is written
        print(f"qlora-lab: overwrite=true: the earlier run in {out_dir} moved to {move_aside(out_dir)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.plan.skip_unfit and plan.fits(ledger, budget, cfg.plan.safety_margin) is False:
        return _skip(out_dir, ledger, budget, spec, dist.main)
    logger: MetricLogger | None = None
    loading = False  # past the data checks: a failure from here on goes into W&B too (a sweep's failed job shows)
    # A resume records into the run dir only once it is known to continue it: a refused one leaves the earlier
    # attempt's files (a finished run's summary.json among them) exactly as they were.
    own_dir = not cfg.resume
    try:
        rows = read_rows(cfg.data)
        micro_batch = int(cfg.data.micro_batch_size)
        check_size(len(rows), cfg.data, micro_batch, dist.world)
        data_fingerprint = fingerprint(rows)
        spec, resume = find_resume(spec, out_dir, data_fingerprint, dist)
        own_dir = own_dir or resume is None  # resume=auto with nothing to resume: a new run
        if resume and resume.done:
            return resume.done
        if resume and resume.ckpt:  # training continues in the checkpoint's run dir (resume=<path> may name another)
            out_dir = checkpoint.run_dir_of(resume.ckpt)
        seed_everything(cfg.seed)
        loading = True
        timeline.mark("read_data")

        phases = PhaseReadings(device)
        source = model_source(spec, dist)
        # After the source: building a random-init model (the first job of a sweep on a shape) is not this run's
        # memory. From here every peak is the run's own, loading and quantizing included (readings.peak_scope).
        reset_peak(device)
        timeline.mark("model_source")  # a random-init build or a GGUF conversion, else the tokenizer's load
        # Tokenize before loading weights: a dataset the tokenizer cannot render fails in seconds, not after a load.
        data, store_metrics = tokenized(spec, rows, data_fingerprint, source.tokenizer, dist)
        phases.metrics.update({**data.metrics(), **store_metrics})  # logged with step 1 and in the summary
        train_set, eval_set = split_eval(data.examples, cfg.data, cfg.seed)
        items, collator = batching(spec, train_set, source.tokenizer.pad_token_id, dist.main)
        if resume and resume.ckpt:  # every process: they refuse together, before anything is touched
            check_steps_left(resume.step, resume.ckpt.name, total_steps(cfg.optim, len(items), micro_batch),
                             out_dir)
        previous = _continue(resume, out_dir) if resume and dist.main else None
        own_dir = True
        timeline.mark("tokenize")
        built = build_model(spec, source, dist, phases.read)
        timeline.mark("build_model")  # load, quantize, prepare, adapt, wrap
        if "data.micro_batch_size" in spec.resolved and device == "cuda" and (resume is None or resume.ckpt is None):
            spec, ledger = _prove_micro_batch(spec, ledger, built)
        phases.metrics.update(plan.predicted_metrics(ledger))

        logger = _open_records(spec, out_dir, resume, previous, ledger, data_fingerprint, built.path, dist)
        timeline.mark("open_records")  # run_info.json, W&B's start
        if dist.main:
            print(f"qlora-lab: {cfg.run_name}: {built.trainable:,} trainable / {built.total:,} parameters, "
                  f"{len(train_set)} train / {len(eval_set)} eval rows, device={device}, out={out_dir}"
                  + (f", {dist.world} processes ({dist.strategy})" if dist.active else ""))

        startup_s = process_age_s()
        checkpointer = checkpoint.Checkpointer(out_dir, cfg.save.keep_last, spec.config(), data_fingerprint, dist)
        evaluator = Evaluator(cfg.eval, list(cfg.data.metrics), rows, eval_set, built.tokenizer,
                              int(spec.cfg.data.micro_batch_size), device, dist, cfg.data.system_prompt)
        summary = train(built, items, collator, evaluator, spec, logger, phases, run_dir=out_dir,
                        checkpointer=checkpointer, resume_from=resume.ckpt if resume else None, dist=dist)
        timeline.mark("train")  # the steps, step 1's compile, evaluations, checkpoints
        timeline.part("eval", "train", evaluator.seconds)
        adapter_dir = save_adapter(built.model, built.tokenizer, out_dir, dist)
        if not dist.main:
            return summary
        if cfg.logger.log_adapter:  # what the adapter is, for a reader of the artifact (W&B allows 100 keys)
            about = {k: v for k, v in flatten(spec.config()).items() if k.startswith(ADAPTER_METADATA)}
            logger.artifact(adapter_dir, "adapter", "model", {"run_name": cfg.run_name, **about})
        timeline.mark("save_adapter")
        wall_s = process_age_s()
        ledger_table = _ledger_vs_measured(ledger, phases, summary, logger) if device == "cuda" else ""
        summary.update({
            "summary/trainable_params": built.trainable,
            "summary/total_params": built.total,
            "summary/train_rows": len(train_set),
            "summary/dropped_rows": len(data.dropped),
            "summary/truncated_rows": len(data.truncated),
            "summary/peak_memory_scope": peak_scope(device),
            # how the process began: its own interpreter, or forked from a sweep's warm process (sweep.warm_start),
            # whose imports its time spans do not include
            "summary/process_start": "warm_fork" if multiprocessing.parent_process() else "interpreter",
            "summary/startup_s": startup_s,  # process start -> the first step: imports, data, load, W&B
            "summary/wall_time_s": wall_s,  # process start -> now
            "summary/overhead_s": wall_s - summary["summary/train_time_s"],  # what was not the steps
            "summary/status": str(Status.finished),
            "summary/micro_batch": int(spec.cfg.data.micro_batch_size),
            "summary/kernels": str(spec.cfg.model.kernels),
            "summary/predicted_peak_gib": ledger.peak_gib,
            "summary/adapter_dir": str(adapter_dir),
        })
        summary.update(timeline.metrics())
        logger.summary({**summary, **phases.metrics})
        _print_summary(summary, phases)
        if ledger_table:
            print("qlora-lab: memory ledger, predicted vs measured (GiB allocated):\n" + ledger_table)
        return summary
    except BaseException as e:  # recorded in the run dir and in W&B, so a sweep table can say why it ended
        failure = _explain(e, out_dir, logger is not None)
        if dist.main and own_dir:
            record = record_failure(out_dir, failure)
            if logger is None and loading:
                logger = _failure_logger(spec, out_dir)
            if logger is not None:
                logger.summary(record)
        if failure is e:
            raise
        raise failure from e
    finally:
        if logger is not None:
            logger.close()
            if dist.main:  # after the summary: W&B's close is the one span it cannot hold
                timeline.mark("close_records")
                print(f"qlora-lab: time: {timeline.line()}")


def tokenized(spec: RunSpec, rows: list[dict[str, Any]], rows_fingerprint: str, tokenizer, dist: Dist
              ) -> tuple[Tokenized, dict[str, Any]]:
    """The rows rendered and labelled, from the tokenized store (built once, or read back from data.tokenize_cache);
    what truncation did is printed, and a run it would leave with too few rows (data.max_dropped_fraction, or too
    few to split and batch) is refused here, before the weights load. Returns it with the store's metrics."""
    cfg = spec.cfg
    settings = store.Settings(cfg.model.max_seq_len, cfg.data.mask_prompt, cfg.data.system_prompt, cfg.data.num_rows)
    cache = cfg.cache_dir if cfg.data.tokenize_cache else None

    def load() -> store.Outcome:
        return store.load_or_build(rows, rows_fingerprint, tokenizer, settings, cache, cfg.data.num_proc)

    if cache is None or dist.world == 1:
        outcome = load()
    else:  # rank 0 builds the store while the others wait, then they read it back: tokenized once, not N times
        outcome, failure = None, None
        if dist.main:
            try:
                outcome = load()
            except Exception as e:  # the others raise too, instead of waiting for a store that never comes
                failure = e
        why = dist.broadcast(f"{type(failure).__name__}: {failure}" if failure else None)
        if failure is not None:
            raise failure
        if why is not None:
            raise DataError(f"rank 0 could not tokenize the rows ({why})")
        outcome = outcome or load()
    if dist.main:
        print("qlora-lab: data: " + outcome.line(len(rows)))
    data = store.tokenized_from(outcome.dataset, len(rows), cfg.model.max_seq_len)
    report = data.report()
    if report and dist.main:
        print("qlora-lab: data: " + report.replace("\n", "\nqlora-lab: data: "))
    data.check(cfg.data)
    if data.dropped:
        check_size(len(data.examples), cfg.data, int(cfg.data.micro_batch_size), dist.world,
                   after=f" left after truncation dropped {len(data.dropped)}")
    return data, outcome.metrics()


def batching(spec: RunSpec, train_set: Sequence[Example], pad_id: int, verbose: bool) -> tuple[Sequence, Collator]:
    """What the loop draws micro-batches of: the examples themselves, padded per micro-batch; or, with
    data.packing, rows of model.max_seq_len tokens packed with whole examples, micro_batch_size rows a batch,
    planned from the stored lengths and built when drawn."""
    if not spec.cfg.data.packing:
        return train_set, Collator(pad_id)
    length = spec.cfg.model.max_seq_len
    lengths = lengths_of(train_set)
    bins = pack(lengths, length)
    if verbose:
        print(f"qlora-lab: packed {len(train_set)} rows into {len(bins)} rows of {length} tokens "
              f"(fill {int(lengths.sum()) / max(len(bins) * length, 1):.1%}); attention: "
              f"{packed_path(spec.device, torch_dtype(spec.cfg.model.dtype))}")
    return PackedRows(train_set, bins), Collator(pad_id, rows=int(spec.cfg.data.micro_batch_size), length=length)


def _open_records(spec: RunSpec, out_dir: Path, resume: Resume | None, previous: dict[str, Any] | None,
                  ledger: Ledger, data_fingerprint: str, model_path: str, dist: Dist) -> MetricLogger:
    """The run's sinks, and what re-creates and explains it: run_info.json for a new run (or a restart), the resume
    record for a continued one, the predicted ledger as a table. Only rank 0 reports: one metrics.jsonl, one W&B
    run, whatever the number of processes."""
    if not dist.main:
        return MetricLogger([])
    logger = open_logger(spec, out_dir, (resume.wandb_id, resume.step) if resume else None)
    if resume is None or resume.ckpt is None:
        write_run_info(out_dir, spec, dataset_fingerprint=data_fingerprint, model_path=model_path,
                       wandb_id=logger.run_id)
        logger.table("ledger/items", plan.item_rows(ledger), step=0)  # beside what the run then measures
    if resume:
        record_resume(out_dir, checkpoint=resume.ckpt, step=resume.step, overrides=list(spec.overrides),
                      differences=resume.allowed, previous=previous)
    return logger


def _continue(resume: Resume, out_dir: Path) -> dict[str, Any] | None:
    """A resume that passed every check: say so, and take the earlier attempt's summary.json out of the way (it is
    recorded in run_info.json's `resumes`); returns it."""
    if resume.ckpt is not None:
        print(f"qlora-lab: resuming {out_dir} from {resume.ckpt.name} (step {resume.step})"
              + ("; config differences, allowed:\n" + "\n".join(f"  - {a}" for a in resume.allowed)
                 if resume.allowed else ""))
    previous = read_summary(out_dir)
    (out_dir / SUMMARY).unlink(missing_ok=True)
    return previous


def _explain(e: BaseException, out_dir: Path, training: bool) -> BaseException:
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
        print(f"qlora-lab: warning: could not record the failure in W&B ({type(e).__name__}: {e})", file=sys.stderr)
        return None


def _prove_micro_batch(spec: RunSpec, ledger: Ledger, built: BuiltModel) -> tuple[RunSpec, Ledger]:
    """data.micro_batch_size=auto on CUDA: one real step at the ledger's pick, halved on out-of-memory."""
    seq = spec.cfg.model.max_seq_len
    mb, attempts = plan.verify_micro_batch(int(spec.cfg.data.micro_batch_size),
                                           lambda n: _probe_step(built.model, n, seq))
    print(f"qlora-lab: micro_batch_size=auto -> {mb} (ledger picked {ledger.micro_batch}; tries {attempts})")
    if mb == ledger.micro_batch:
        return spec, ledger
    spec = spec.evolve("data.micro_batch_size", mb)
    return spec, plan.predict(spec.cfg, mb)


def _probe_step(model, micro_batch: int, seq: int) -> None:
    """One forward and backward at full sequence length, to prove a micro-batch fits before training on it."""
    try:
        ids = torch.randint(0, model.config.vocab_size, (micro_batch, seq), device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
    finally:
        model.zero_grad(set_to_none=True)
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
        print(f"qlora-lab: {spec.cfg.run_name}: skipped: {reason}")
    return summary


def _print_summary(summary: dict[str, Any], phases: PhaseReadings) -> None:
    print("qlora-lab: memory by phase (GiB, allocated / peak allocated):")
    for name in ("load", "prepare", "wrap", "first_forward", "first_backward", "first_optimizer_step"):
        a, p = phases.measured(name), phases.measured(name, "peak_allocated_gib")
        if a is not None:
            print(f"  {name:<22} {a:8.3f} / {p:8.3f}")
    print("qlora-lab: " + ", ".join(f"{k.split('/', 1)[1]}={v:.4g}" if isinstance(v, float) else
                                    f"{k.split('/', 1)[1]}={v}" for k, v in summary.items()), file=sys.stdout)
