"""Stage 6 (train): the optimization loop, top to bottom.

One optimizer step = `optim.grad_accum_steps` micro-batches (`step.forward_backward`), then either the update or,
for a non-finite loss or gradient norm, the guard. Around it: evaluation every `eval.every_steps` steps and at the
end, one flat metrics dict per step to every sink, checkpoints every `save.every_steps` and on Ctrl-C/SIGTERM.
With several processes every process runs this loop and the numbers it logs (loss, tokens, grad norm, peak
memory) are over all of them.

What one run does after its gradients exist is a `Job`: its optimizer, schedule, guard, records, evaluations and
checkpoints. `train` drives one job; a fused sweep (`train_group`) drives several on one model and one batch stream,
each job exactly as it would run alone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import TrainingInterrupted
from qlora_lab.core.log import PREFIX
from qlora_lab.core.spec import RunSpec
from qlora_lab.data.batching import BatchStream, Collator
from qlora_lab.memory.readings import PhaseReadings, memory_now, reset_peak, synchronize
from qlora_lab.model import BuiltModel
from qlora_lab.sinks.logger import MetricLogger
from qlora_lab.train import checkpoint as ckpt_io
from qlora_lab.train import step as step_mod
from qlora_lab.train.evaluate import Evaluator
from qlora_lab.train.guard import NonFiniteGuard
from qlora_lab.train.optim import build_optimizer, build_scheduler, total_steps
from qlora_lab.train.signals import StopRequest
from qlora_lab.train.state import TrainState

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """The console progress bar (rank 0 only). The jobs of a fused group each have their own, one line each
    (`position`), named by the job (`desc`), so that they do not overwrite one another."""

    total: int
    initial: int
    enabled: bool
    desc: str = "train"
    position: int = 0

    def __post_init__(self) -> None:
        self.bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=self.desc, position=self.position,
                            dynamic_ncols=True, leave=True)

    def update(self, loss: float, tokens_per_s: float, peak_gib: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mem_gib=f"{peak_gib:.2f}",
                                 refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        """A console line that does not tear the progress bar (the bar writes it), else through the log."""
        if self.bar is not None:
            self.bar.write(PREFIX + line)
        else:
            log.info(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Job:
    """One run's side of the loop: what it does with each step's gradients and what it records.

    `model` is what its checkpoints, optimizer and guard reports read (the PEFT model, or in a fused group a view of
    this job's adapter under PEFT's default names, model/grouped.py); `generator` the PEFT model that generates and
    `engine` what computes the eval loss (the DDP/FSDP wrapper); `evaluate_as` makes them compute this job's adapter
    alone (a fused group's; none alone).
    """

    def __init__(self, spec: RunSpec, model, generator, engine, n_items: int, evaluator: Evaluator,
                 logger: MetricLogger, *, run_dir: Path, checkpointer: ckpt_io.Checkpointer | None,
                 dist: Dist = Dist(), evaluate_as: Callable[[], Any] | None = None, label: str = ""):
        cfg = spec.cfg
        self.spec, self.model, self.generator, self.engine = spec, model, generator, engine
        self.dist, self.label = dist, label
        self.evaluator, self.logger, self.checkpointer, self.run_dir = evaluator, logger, checkpointer, run_dir
        self.evaluate_as = evaluate_as or contextlib.nullcontext
        self.steps = total_steps(cfg.optim, n_items, int(cfg.data.micro_batch_size))
        self.params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, cfg.optim, spec.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, self.steps)
        self.clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        self.state = TrainState(sink_ids=logger.run_ids)
        self.guard = NonFiniteGuard(cfg.guard, run_dir, logger, writer=dist.main)
        self.progress: Progress | None = None

    @property
    def cfg(self):
        return self.spec.cfg

    def restore(self, ckpt: Path) -> dict[str, Any]:
        """Adapter, optimizer, scheduler, RNG and the loop's state from `ckpt`; returns the saved data position."""
        saved = ckpt_io.load(ckpt, self.model, self.optimizer, self.scheduler, self.dist)
        self.state = TrainState.from_checkpoint(saved)
        return saved["data"]

    def start(self, resumed_from: int, position: int = 0) -> None:
        """Ready to train after step `resumed_from`; `position` is the line of its progress bar (a group's jobs)."""
        self.resumed_from = resumed_from
        self.progress = Progress(self.steps, resumed_from, self.cfg.log.progress_bar and self.dist.main,
                                 desc=self.label.rstrip(": ") or "train", position=position)
        if resumed_from == 0 and self.evaluator.cfg.at_start and self.evaluator.eval_set:
            self.logger.log(self.evaluate(0), 0)  # the baseline: what the model does before any update

    def evaluate(self, step: int) -> dict[str, float]:
        with self.evaluate_as():
            evaluation, samples = self.evaluator.run(self.generator, self.engine)
        self.state.record_eval(step, evaluation)
        if samples:
            self.logger.table("eval/samples", samples, step)
        if self.dist.main:
            self.progress.write(f"{self.label}eval @ step {step}: "
                                + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}" for k, v in self.state.eval.items()))
        return self.state.eval

    def checkpoint(self, stream: BatchStream) -> Path | None:
        if self.checkpointer is None:
            return None
        self.state.sink_ids = self.logger.run_ids
        return self.checkpointer.save(self.state.step, self.model, self.optimizer, self.scheduler,
                                      {"data": stream.state(), "trainer": self.state.to_checkpoint()})

    def update(self, step: int, result: step_mod.StepResult, rows: Callable[[], list[int]]) -> None:
        """The optimizer step for these gradients, or the guard's decision (skip, or NonFiniteLossError)."""
        if result.finite:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip, result.norm)
            self.optimizer.step()
            self.state.last_finite_loss = result.loss
        else:  # writes the diagnostic, then returns (skip the update) or raises (stop the run)
            self.guard.handle(self.model, step, rows(), result, self.state, self.scheduler.get_last_lr()[0])
        self.scheduler.step()
        # Free the gradients now rather than at the next backward: no need for this memory any more.
        self.optimizer.zero_grad(set_to_none=True)

    def record(self, step: int, result: step_mod.StepResult, dt: float, mem: dict[str, Any], epoch: int,
               phases: PhaseReadings | None) -> None:
        """The step's record to every sink (and its evaluation when one is due)."""
        self.state.record(result.loss, result.tokens, dt, mem["peak_allocated_gib"])
        metrics = {
            "train/loss": result.loss,
            "train/lr": self.scheduler.get_last_lr()[0],
            "train/grad_norm": result.grad_norm,
            "train/tokens_per_s": result.tokens / dt,  # real tokens: padding is not counted
            "train/fill_fraction": result.tokens / max(result.capacity, 1),  # real tokens / tokens computed
            "train/step_time_s": dt,
            "train/tokens": self.state.tokens_seen,
            "train/epoch": epoch,
            "memory/peak_allocated_gib": mem["peak_allocated_gib"],
            "memory/peak_reserved_gib": mem["peak_reserved_gib"],
        }
        if not result.finite:
            metrics["guard/skipped_steps"] = self.state.skipped
        if phases is not None:  # the one-off phase readings ride on the first step's record
            metrics.update(phases.metrics)
        if "alloc_retries" in mem:
            metrics["memory/alloc_retries"] = mem["alloc_retries"]
        evaluated = self.evaluator.due(step, self.steps)
        if evaluated:
            metrics.update(self.evaluate(step))
        if evaluated or step % self.cfg.log.every_steps == 0 or step == self.steps:
            self.logger.log(metrics, step)
        self.progress.update(result.loss, result.tokens / dt, mem["peak_allocated_gib"])

    def periodic_checkpoint(self, step: int, stream: BatchStream) -> None:
        every = self.cfg.save.every_steps
        if every and step % every == 0 and step < self.steps:
            self.checkpoint(stream)

    def interrupted(self, step: int, signum: int, stream: BatchStream) -> TrainingInterrupted:
        where = self.checkpoint(stream)
        return TrainingInterrupted(
            f"stopped by {StopRequest.name(signum)} after step {step}"
            + (f"; checkpoint {where}; continue with resume=auto hydra.run.dir={self.run_dir}" if where else
               "; no checkpoint was written (no checkpointer)"))

    def summary(self) -> dict[str, Any]:
        self.progress.close()
        return self.state.summary(self.steps, self.resumed_from, self.dist.world)


def step_memory(device: str, dist: Dist) -> dict[str, Any]:
    """The step's memory reading (the fullest process's, with several), then the peak is reset for the next."""
    mem = memory_now(device)
    if dist.world > 1:  # the fullest device is the one that limits the run
        mem["peak_allocated_gib"], mem["peak_reserved_gib"] = dist.reduce(
            [mem["peak_allocated_gib"], mem["peak_reserved_gib"]], "max")
    return mem


def train(built: BuiltModel, items: list, collator: Collator, evaluator: Evaluator, spec: RunSpec,
          logger: MetricLogger, phases: PhaseReadings, *, run_dir: Path, checkpointer: ckpt_io.Checkpointer | None = None,
          resume_from: Path | None = None, dist: Dist = Dist()) -> dict[str, Any]:
    """Run the loop over the training `items` (examples, or packed rows of examples, as `collator` makes batches of
    them); returns the summary metrics.

    `phases` holds the memory readings of the phases before training; the first step adds its own (first forward,
    backward, optimizer step) and logs them all with step 1. With `resume_from`, adapter, optimizer, scheduler, RNG,
    data position and the loop's state come from that checkpoint and the loop continues after its step.
    """
    cfg, device = spec.cfg, spec.device
    job = Job(spec, built.model, built.model, built.engine, len(items), evaluator, logger, run_dir=run_dir,
              checkpointer=checkpointer, dist=dist)
    stream = BatchStream(items, int(cfg.data.micro_batch_size), shuffle=cfg.data.shuffle, seed=cfg.seed,
                         world=dist.world)
    if resume_from is not None:
        stream.restore(job.restore(resume_from))
    job.start(job.state.step)
    built.model.train()
    accum = cfg.optim.grad_accum_steps
    with StopRequest(cfg.save.on_signal) as stop:
        for step in range(job.resumed_from + 1, job.steps + 1):
            first = step == 1
            synchronize(device)
            t0 = time.perf_counter()
            window = stream.take(accum)
            result = step_mod.forward_backward(built.engine, job.params, [b for _, b in window], collator, device,
                                               dist, phases if first else None, micro=built.micro,
                                               first_micro=(step - 1) * accum)
            job.update(step, result, lambda: sorted(e.row for _, b in window for e in collator.examples(b)))
            synchronize(device)
            dt = time.perf_counter() - t0
            mem = step_memory(device, dist)
            if first:
                phases.read("first_optimizer_step", mem)
            reset_peak(device)
            job.record(step, result, dt, mem, window[-1][0], phases if first else None)

            # Processes may see a signal at different steps; they stop together at the first step any saw it.
            signum = int(dist.reduce([stop.signum or 0], "max")[0]) if dist.world > 1 else stop.signum
            if not signum:
                job.periodic_checkpoint(step, stream)
            else:
                raise job.interrupted(step, signum, stream)
    return job.summary()


@dataclass
class GroupMember:
    """A job of a fused group as the group loop drives it: its name (its adapter's) and its Job; `failed` is set,
    with the exception, when the job stopped (a NaN, a write error): the others go on."""

    name: str
    job: Job
    resume_from: Path | None = None  # its checkpoint (every member of a group resumes from the same step)
    failed: BaseException | None = None


def train_group(model, routing, members: list[GroupMember], items: list, collator: Collator, spec: RunSpec,
                phases: PhaseReadings, *, micro, on_failure: Callable[[GroupMember, BaseException], None] = lambda m, e: None) -> None:
    """The loop of a fused group (runner/fuse.py): every job draws the same micro-batches from one stream, the
    group's forward and backward give each its gradients (`step.group_forward_backward`), and each job then does
    what it does alone (`Job.update`, `Job.record`, its checkpoints); a job that reaches its own last step leaves the
    stack. A job that fails is handed to `on_failure` (it records it) and the others go on. Each member's summary is
    `member.job.summary()` afterwards."""
    cfg, device = spec.cfg, spec.device
    stream = BatchStream(items, int(cfg.data.micro_batch_size), shuffle=cfg.data.shuffle, seed=cfg.seed)
    for m in members:
        if m.resume_from is not None:
            stream.restore(m.job.restore(m.resume_from))
    for position, m in enumerate(members):
        m.job.start(m.job.state.step, position)
    start = min(m.job.resumed_from for m in members)
    model.train()
    accum = cfg.optim.grad_accum_steps

    def fail(m: GroupMember, e: BaseException) -> None:
        m.failed = e
        on_failure(m, e)

    with StopRequest(cfg.save.on_signal) as stop:
        for step in range(start + 1, max(m.job.steps for m in members) + 1):
            active = [m for m in members if m.failed is None and step <= m.job.steps]
            if not active:
                break
            first = step == 1
            synchronize(device)
            t0 = time.perf_counter()
            window = stream.take(accum)
            results = step_mod.group_forward_backward(
                model, [(m.name, m.job.cfg.run_name, m.job.params) for m in active], routing, [b for _, b in window], collator, device,
                kernels=str(cfg.model.kernels), micro=micro, first_micro=(step - 1) * accum,
                phases=phases if first else None)
            for m in active:
                try:
                    m.job.update(step, results[m.name],
                                 lambda: sorted(e.row for _, b in window for e in collator.examples(b)))
                except Exception as e:  # its NaN guard said stop: this job ends, the others go on
                    fail(m, e)
            synchronize(device)
            dt = time.perf_counter() - t0
            mem = step_memory(device, Dist())
            if first:
                phases.read("first_optimizer_step", mem)
            reset_peak(device)
            for m in active:
                if m.failed is not None:
                    continue
                try:
                    m.job.record(step, results[m.name], dt, mem, window[-1][0], phases if first else None)
                    if not stop.signum:
                        m.job.periodic_checkpoint(step, stream)
                except Exception as e:
                    fail(m, e)
            if stop.signum:
                for m in active:
                    if m.failed is None:
                        fail(m, m.job.interrupted(step, stop.signum, stream))
                return
