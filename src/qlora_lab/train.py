"""Stage 6 (train): the optimization loop, top to bottom.

One optimizer step = `grad_accum_steps` micro-batches. The loss of each micro-batch is a sum over its label
tokens divided by the label tokens of the whole accumulation window, so accumulating k micro-batches gives
exactly the gradient of one k-times larger batch (a mean of per-micro-batch means would weight short
sequences more).
"""

from __future__ import annotations

import json
import math
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from qlora_lab.checkpoint import Checkpointer, CheckpointError
from qlora_lab.checkpoint import load as load_checkpoint
from qlora_lab.config import TrainConfig
from qlora_lab.data import IGNORE_INDEX, Example, batches, collate, epoch_order
from qlora_lab.distributed import Dist, shard_batch
from qlora_lab.metrics import MetricLogger, memory_now, reset_peak, synchronize


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the dataset rows of the batch."""


def build_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig, device: str) -> torch.optim.Optimizer:
    o = cfg.optim
    kw = dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=device == "cuda", **kw)


def total_steps(cfg: TrainConfig, n_train: int) -> int:
    if cfg.optim.max_steps > 0:
        return cfg.optim.max_steps
    per_epoch = math.ceil(math.ceil(n_train / cfg.data.micro_batch_size) / cfg.optim.grad_accum_steps)
    return per_epoch * cfg.optim.epochs


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[cfg.optim.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=steps)


class BatchStream:
    """Micro-batches epoch after epoch; its position (epoch, offset into that epoch's order) goes into checkpoints.

    With N processes each global micro-batch is N x data.micro_batch_size rows (every process draws the same
    ones, then trains on its share), so the rows of every optimizer step do not depend on N.
    """

    def __init__(self, examples: list[Example], cfg: TrainConfig, pad_id: int, world: int = 1):
        self.examples, self.cfg, self.pad_id, self.world = examples, cfg, pad_id, world
        self.epoch, self.offset = 0, 0
        self.order = self._order(0)

    def _order(self, epoch: int) -> list[int]:
        return epoch_order(len(self.examples), self.cfg.data.shuffle, self.cfg.seed, epoch)

    def __next__(self) -> tuple[int, dict[str, torch.Tensor]]:
        if self.offset >= len(self.order):
            self.epoch, self.offset = self.epoch + 1, 0
            self.order = self._order(self.epoch)
        idx = self.order[self.offset:self.offset + self.cfg.data.micro_batch_size * self.world]
        self.offset += len(idx)
        return self.epoch, collate([self.examples[i] for i in idx], self.pad_id)

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "offset": self.offset, "order": self.order}

    def restore(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self.order = self._order(self.epoch)
        if self.order != state["order"]:
            raise CheckpointError("the checkpoint's sample order differs from this run's (other rows, seed or "
                                  "shuffle); resume with the dataset and seed it was trained on")


class StopRequest:
    """Ctrl-C / SIGTERM while training: note it, let the step finish, stop at the step boundary.

    A second signal stops at once. Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nqlora-lab: {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(signal again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C or SIGTERM at a step boundary; the message says where the checkpoint is."""


def nonfinite_report(model, step: int, rows: list[int], loss: float, grad_norm: float, last_finite_loss: float | None,
                     lr: float) -> dict[str, Any]:
    """What a NaN/inf step looked like: which rows, which LoRA tensors have non-finite or the largest gradients."""
    tensors = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = float(p.grad.float().norm()) if p.grad is not None else None
        tensors.append({"name": name, "grad_norm": g, "weight_norm": float(p.detach().float().norm()),
                        "weight_finite": bool(torch.isfinite(p.detach()).all())})
    bad = [t["name"] for t in tensors if t["grad_norm"] is not None and not math.isfinite(t["grad_norm"])]
    return {
        "step": step, "loss": loss, "grad_norm": grad_norm, "last_finite_loss": last_finite_loss, "lr": lr,
        "sample_rows": rows, "nonfinite_grad_tensors": len(bad), "first_nonfinite_grads": bad[:10],
        "nonfinite_weights": [t["name"] for t in tensors if not t["weight_finite"]],
        "tensors": sorted(tensors, key=lambda t: -(t["grad_norm"] if t["grad_norm"] is not None
                                                      and math.isfinite(t["grad_norm"]) else math.inf)),
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels are shifted by one inside the model."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens of the batch's real rows (not of a process's stand-in row, see `shard_batch`)."""
    return int(batch["attention_mask"][batch["row"] >= 0].sum())


def forward_loss(model, batch: dict[str, torch.Tensor], device: str, num_items: int) -> torch.Tensor:
    """Sum of token losses of `batch` divided by `num_items` (the accumulation window's label tokens)."""
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                labels=batch["labels"].to(device), num_items_in_batch=num_items)
    return out.loss


@torch.no_grad()
def evaluate(model, eval_set: list[Example], cfg: TrainConfig, pad_id: int, device: str) -> float:
    """Mean loss per label token over the eval split."""
    if not eval_set:
        return float("nan")
    model.eval()
    total, count = 0.0, 0
    for batch in batches(eval_set, cfg.data.micro_batch_size, pad_id, shuffle=False, seed=0, epoch=0):
        n = count_label_tokens(batch)
        total += float(forward_loss(model, batch, device, 1)) if n else 0.0
        count += n
    model.train()
    return total / max(count, 1)


def train(model, tokenizer, train_set: list[Example], eval_set: list[Example], cfg: TrainConfig,
          logger: MetricLogger, device: str, phase_log: dict[str, float], *, run_dir: Path,
          checkpointer: Checkpointer | None = None, resume_from: Path | None = None,
          engine: torch.nn.Module | None = None, dist: Dist = Dist()) -> dict[str, Any]:
    """Run the loop; returns summary metrics.

    `phase_log` holds the memory readings of the phases before training; the first step adds its own
    (first forward, backward, optimizer step) and logs them all with step 1. With `resume_from`, adapter,
    optimizer, scheduler, RNG and data position come from that checkpoint and the loop continues after its step.
    With several processes, `engine` is the DDP/FSDP-wrapped model that runs forward and backward (`model`
    itself when FSDP shards it in place), `dist` says who this process is; every process runs this loop and
    the numbers it logs (loss, tokens, grad norm, peak memory) are over all of them.
    """
    engine = model if engine is None else engine
    steps = total_steps(cfg, len(train_set))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    pad_id = tokenizer.pad_token_id
    accum = cfg.optim.grad_accum_steps
    clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
    stream = BatchStream(train_set, cfg, pad_id, dist.world)

    state: dict[str, Any] = {"losses": [], "throughputs": [], "tokens_seen": 0, "eval_loss": None, "peak_gib": 0.0,
                             "skipped": 0, "last_finite_loss": None, "wandb_id": logger.run_id}
    first = 1
    if resume_from is not None:
        saved = load_checkpoint(resume_from, model, optimizer, scheduler, dist)
        stream.restore(saved["data"])
        state.update(saved["trainer"])
        first = saved["step"] + 1

    bar = None
    if cfg.logger.progress_bar and dist.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=first - 1, desc="train", dynamic_ncols=True, leave=True)

    def checkpoint(step: int) -> Path:
        state["wandb_id"] = logger.run_id
        return checkpointer.save(step, model, optimizer, scheduler, {"data": stream.state(), "trainer": state})

    model.train()
    with StopRequest(cfg.save.on_signal) as stop:
        for step in range(first, steps + 1):
            synchronize(device)
            t0 = time.perf_counter()
            window = [next(stream) for _ in range(accum)]
            num_items = max(sum(count_label_tokens(b) for _, b in window), 1)
            step_loss = 0.0
            step_tokens = 0
            for micro, (epoch, batch) in enumerate(window):
                batch = shard_batch(batch, dist)
                loss = forward_loss(engine, batch, device, num_items)
                if step == 1 and micro == 0:
                    phase_log.update({f"phase/first_forward/{k}": v for k, v in memory_now(device).items()})
                # DDP and FSDP average gradients over processes; the loss is this process's share of the
                # global window's mean, so scaling by N makes the averaged gradient the global one.
                (loss * dist.world if dist.world > 1 else loss).backward()
                if step == 1 and micro == 0:
                    phase_log.update({f"phase/first_backward/{k}": v for k, v in memory_now(device).items()})
                step_loss += float(loss.detach())
                step_tokens += count_tokens(batch)
            step_loss, step_tokens = dist.reduce([step_loss, step_tokens])
            step_tokens = int(step_tokens)
            # The norm first and the clipping only when it is finite: clipping by a NaN norm would turn every
            # gradient into NaN and the diagnostic could no longer say which tensors went bad.
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            if hasattr(norm, "full_tensor"):  # FSDP: a norm over this process's gradient shards, made whole
                norm = norm.full_tensor()
            grad_norm = float(norm)
            skipped = False
            if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                skipped = _guard(model, step, window, step_loss, grad_norm, state, scheduler, cfg, logger, run_dir,
                                 dist.main)
            else:
                torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
                state["last_finite_loss"] = step_loss
                optimizer.step()
            scheduler.step()
            # Free the gradients now rather than at the next backward: no need for this memory any more.
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
            dt = time.perf_counter() - t0
            mem = memory_now(device)
            if dist.world > 1:  # the fullest device is the one that limits the run
                mem["peak_allocated_gib"], mem["peak_reserved_gib"] = dist.reduce(
                    [mem["peak_allocated_gib"], mem["peak_reserved_gib"]], "max")
            if step == 1:
                phase_log.update({f"phase/first_optimizer_step/{k}": v for k, v in mem.items()})
            reset_peak(device)

            state["tokens_seen"] += step_tokens
            state["losses"].append(_finite(step_loss))
            state["throughputs"].append(step_tokens / dt)
            state["peak_gib"] = max(state["peak_gib"], mem["peak_allocated_gib"])
            metrics = {
                "train/loss": step_loss,
                "train/lr": scheduler.get_last_lr()[0],
                "train/grad_norm": grad_norm,
                "train/tokens_per_s": step_tokens / dt,
                "train/step_time_s": dt,
                "train/tokens": state["tokens_seen"],
                "train/epoch": window[-1][0],
                "memory/peak_allocated_gib": mem["peak_allocated_gib"],
                "memory/peak_reserved_gib": mem["peak_reserved_gib"],
            }
            if skipped:
                metrics["guard/skipped_steps"] = state["skipped"]
            if step == 1:  # the one-off phase readings ride on the first step's record
                metrics.update(phase_log)
            if device == "cuda":
                metrics["memory/alloc_retries"] = mem["alloc_retries"]
            ev = cfg.logger.eval_every
            if eval_set and (step == steps or (ev and step % ev == 0)):
                state["eval_loss"] = evaluate(engine, eval_set, cfg, pad_id, device)
                metrics["eval/loss"] = state["eval_loss"]
            if step % cfg.logger.log_every == 0 or step == steps or "eval/loss" in metrics:
                logger.log(metrics, step)
            if bar is not None:
                bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}",
                                mem_gib=f"{mem['peak_allocated_gib']:.2f}", refresh=False)
                bar.update(1)
            every = cfg.save.every_steps
            # Processes may see a signal at different steps; they stop together at the first step any saw it.
            signum = int(dist.reduce([stop.signum or 0], "max")[0]) if dist.world > 1 else stop.signum
            if checkpointer is not None and not signum and every and step % every == 0 and step < steps:
                checkpoint(step)
            if signum:
                where = checkpoint(step) if checkpointer is not None else None
                raise TrainingInterrupted(
                    f"stopped by {signal.Signals(signum).name} after step {step}"
                    + (f"; checkpoint {where}; continue with resume=auto hydra.run.dir={run_dir}" if where else ""))
    if bar is not None:
        bar.close()

    finite = [x for x in state["losses"] if x is not None]
    # Skip the first steps in the throughput figure: they include allocator warm-up and lazy init.
    steady = state["throughputs"][min(3, len(state["throughputs"]) - 1):]
    tokens_per_s = statistics.median(steady) if steady else float("nan")
    eval_loss = state["eval_loss"]
    return {
        "summary/first_loss": finite[0] if finite else float("nan"),
        "summary/final_loss": finite[-1] if finite else float("nan"),
        "summary/eval_loss": float("nan") if eval_loss is None else eval_loss,
        "summary/tokens_per_s": tokens_per_s,
        "summary/peak_memory_gib": state["peak_gib"],
        "summary/steps": steps,
        "summary/tokens": state["tokens_seen"],
        "summary/skipped_steps": state["skipped"],
        "summary/resumed_from_step": first - 1,
        "summary/processes": dist.world,
        "summary/tokens_per_s_per_process": tokens_per_s / dist.world,
    }


def _guard(model, step: int, window, loss: float, grad_norm: float, state: dict[str, Any], scheduler,
           cfg: TrainConfig, logger: MetricLogger, run_dir: Path, writer: bool = True) -> bool:
    """A non-finite step: write its diagnostic, then skip it (True) or stop the run (NonFiniteLossError).

    Every process takes the same decision (loss and norm are global); only the `writer` writes the report.
    """
    rows = sorted(int(r) for _, b in window for r in b["row"])
    report = nonfinite_report(model, step, rows, loss, grad_norm, state["last_finite_loss"],
                              scheduler.get_last_lr()[0])
    out = run_dir / "nonfinite"
    path = out / f"step_{step:07d}.json"
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1, default=str))
    will_skip = cfg.guard.nonfinite == "skip" and state["skipped"] < cfg.guard.max_skips
    logger.log({"guard/nonfinite_step": step, "guard/loss": _finite(loss), "guard/grad_norm": _finite(grad_norm),
                "guard/nonfinite_grad_tensors": report["nonfinite_grad_tensors"],
                "guard/last_finite_loss": state["last_finite_loss"], "guard/action": "skip" if will_skip else "stop",
                "guard/report": str(path)}, step)
    if will_skip:
        state["skipped"] += 1
        print(f"qlora-lab: warning: non-finite loss {loss} / grad norm {grad_norm} at step {step}: update skipped "
              f"({state['skipped']}/{cfg.guard.max_skips}); diagnostic {path}", file=sys.stderr)
        return True
    gave_up = f" after {state['skipped']} skipped steps (guard.max_skips)" if cfg.guard.nonfinite == "skip" else ""
    first_bad = report["first_nonfinite_grads"][:3]
    raise NonFiniteLossError(
        f"non-finite loss {loss} / grad norm {grad_norm} at step {step}{gave_up} (dataset rows {rows[:16]}; "
        f"last finite loss {state['last_finite_loss']}; first non-finite gradients {first_bad}); diagnostic {path}. "
        "Lower optim.lr, or try model.upcast=norms, or guard.nonfinite=skip; resume=auto restarts from the last "
        "checkpoint with a changed lr")
