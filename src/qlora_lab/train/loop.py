"""Stage 6 (train): the optimization loop, top to bottom.

One optimizer step = `optim.grad_accum_steps` micro-batches (`step.forward_backward`), then either the update or,
for a non-finite loss or gradient norm, the guard. Around it: evaluation every `logger.eval_every` steps and at
the end, one flat metrics dict per step to every sink, checkpoints every `save.every_steps` and on Ctrl-C/SIGTERM.
With several processes every process runs this loop and the numbers it logs (loss, tokens, grad norm, peak
memory) are over all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.errors import TrainingInterrupted
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


@dataclass
class Progress:
    """The console progress bar (rank 0 only)."""

    total: int
    initial: int
    enabled: bool

    def __post_init__(self) -> None:
        self.bar = None
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc="train", dynamic_ncols=True, leave=True)

    def update(self, loss: float, tokens_per_s: float, peak_gib: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", mem_gib=f"{peak_gib:.2f}",
                                 refresh=False)
            self.bar.update(1)

    def write(self, line: str) -> None:
        """A console line that does not tear the progress bar."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    model, engine = built.model, built.engine
    micro_batch = int(cfg.data.micro_batch_size)
    steps = total_steps(cfg.optim, len(items), micro_batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.optim, device)
    scheduler = build_scheduler(optimizer, cfg.optim, steps)
    clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    stream = BatchStream(items, micro_batch, shuffle=cfg.data.shuffle, seed=cfg.seed, world=dist.world)
    state = TrainState(wandb_id=logger.run_id)
    if resume_from is not None:
        saved = ckpt_io.load(resume_from, model, optimizer, scheduler, dist)
        stream.restore(saved["data"])
        state = TrainState.from_checkpoint(saved)
    resumed_from = state.step
    guard = NonFiniteGuard(cfg.guard, run_dir, logger, writer=dist.main)
    progress = Progress(steps, resumed_from, cfg.logger.progress_bar and dist.main)

    def checkpoint() -> Path | None:
        if checkpointer is None:
            return None
        state.wandb_id = logger.run_id
        return checkpointer.save(state.step, model, optimizer, scheduler,
                                 {"data": stream.state(), "trainer": state.to_checkpoint()})

    def evaluate(step: int) -> dict[str, float]:
        evaluation, samples = evaluator.run(model, engine)
        state.record_eval(step, evaluation)
        if samples:
            logger.table("eval/samples", samples, step)
        if dist.main:
            progress.write(f"qlora-lab: eval @ step {step}: " + ", ".join(f"{k.split('/', 1)[1]} {v:.4g}"
                                                                        for k, v in state.eval.items()))
        return state.eval

    if resumed_from == 0 and evaluator.cfg.at_start and evaluator.eval_set:
        logger.log(evaluate(0), 0)  # the baseline: what the model does before any update
    model.train()
    with StopRequest(cfg.save.on_signal) as stop:
        for step in range(resumed_from + 1, steps + 1):
            first = step == 1
            synchronize(device)
            t0 = time.perf_counter()
            window = stream.take(cfg.optim.grad_accum_steps)
            result = step_mod.forward_backward(engine, params, [b for _, b in window], collator, device, dist,
                                               phases if first else None)
            if result.finite:
                torch.nn.utils.clip_grads_with_norm_(params, clip, result.norm)
                optimizer.step()
                state.last_finite_loss = result.loss
            else:  # writes the diagnostic, then returns (skip the update) or raises (stop the run)
                rows = sorted(e.row for _, b in window for e in collator.examples(b))
                guard.handle(model, step, rows, result, state, scheduler.get_last_lr()[0])
            scheduler.step()
            # Free the gradients now rather than at the next backward: no need for this memory any more.
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            dt = time.perf_counter() - t0

            mem = memory_now(device)
            if dist.world > 1:  # the fullest device is the one that limits the run
                mem["peak_allocated_gib"], mem["peak_reserved_gib"] = dist.reduce(
                    [mem["peak_allocated_gib"], mem["peak_reserved_gib"]], "max")
            if first:
                phases.read("first_optimizer_step", mem)
            reset_peak(device)
            state.record(result.loss, result.tokens, dt, mem["peak_allocated_gib"])

            metrics = {
                "train/loss": result.loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": result.grad_norm,
                "train/tokens_per_s": result.tokens / dt,  # real tokens: padding is not counted
                "train/fill_fraction": result.tokens / max(result.capacity, 1),  # real tokens / tokens computed
                "train/step_time_s": dt,
                "train/tokens": state.tokens_seen,
                "train/epoch": window[-1][0],
                "memory/peak_allocated_gib": mem["peak_allocated_gib"],
                "memory/peak_reserved_gib": mem["peak_reserved_gib"],
            }
            if not result.finite:
                metrics["guard/skipped_steps"] = state.skipped
            if first:  # the one-off phase readings ride on the first step's record
                metrics.update(phases.metrics)
            if device == "cuda":
                metrics["memory/alloc_retries"] = mem["alloc_retries"]
            evaluated = evaluator.due(step, steps)
            if evaluated:
                metrics.update(evaluate(step))
            if evaluated or step % cfg.logger.log_every == 0 or step == steps:
                logger.log(metrics, step)
            progress.update(result.loss, result.tokens / dt, mem["peak_allocated_gib"])

            # Processes may see a signal at different steps; they stop together at the first step any saw it.
            signum = int(dist.reduce([stop.signum or 0], "max")[0]) if dist.world > 1 else stop.signum
            every = cfg.save.every_steps
            if not signum and every and step % every == 0 and step < steps:
                checkpoint()
            if signum:
                where = checkpoint()
                raise TrainingInterrupted(
                    f"stopped by {StopRequest.name(signum)} after step {step}"
                    + (f"; checkpoint {where}; continue with resume=auto hydra.run.dir={run_dir}" if where else
                       "; no checkpoint was written (no checkpointer)"))
    progress.close()
    return state.summary(steps, resumed_from, dist.world)
