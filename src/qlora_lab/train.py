"""Stage 6 (train): the optimization loop, top to bottom.

One optimizer step = `grad_accum_steps` micro-batches. The loss of each micro-batch is a sum over its label
tokens divided by the label tokens of the whole accumulation window, so accumulating k micro-batches gives
exactly the gradient of one k-times larger batch (a mean of per-micro-batch means would weight short
sequences more).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import torch

from qlora_lab.config import TrainConfig
from qlora_lab.data import IGNORE_INDEX, Example, batches
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


def _micro_batches(train_set: list[Example], cfg: TrainConfig, pad_id: int):
    """Micro-batches forever (epoch after epoch), each tagged with its epoch."""
    epoch = 0
    while True:
        for batch in batches(train_set, cfg.data.micro_batch_size, pad_id, cfg.data.shuffle, cfg.seed, epoch):
            yield epoch, batch
        epoch += 1


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels are shifted by one inside the model."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


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
          logger: MetricLogger, device: str, phase_log: dict[str, float]) -> dict[str, Any]:
    """Run the loop; returns summary metrics.

    `phase_log` holds the memory readings of the phases before training; the first step adds its own
    (first forward, backward, optimizer step) and logs them all with step 1.
    """
    steps = total_steps(cfg, len(train_set))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg, device)
    scheduler = build_scheduler(optimizer, cfg, steps)
    pad_id = tokenizer.pad_token_id
    accum = cfg.optim.grad_accum_steps
    clip = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")

    bar = None
    if cfg.logger.progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="train", dynamic_ncols=True, leave=True)

    stream = _micro_batches(train_set, cfg, pad_id)
    losses: list[float] = []
    throughputs: list[float] = []
    peak_gib = 0.0
    eval_loss = float("nan")
    tokens_seen = 0
    model.train()
    for step in range(1, steps + 1):
        synchronize(device)
        t0 = time.perf_counter()
        window = [next(stream) for _ in range(accum)]
        num_items = max(sum(count_label_tokens(b) for _, b in window), 1)
        step_loss = 0.0
        step_tokens = 0
        for micro, (epoch, batch) in enumerate(window):
            loss = forward_loss(model, batch, device, num_items)
            if step == 1 and micro == 0:
                phase_log.update({f"phase/first_forward/{k}": v for k, v in memory_now(device).items()})
            loss.backward()
            if step == 1 and micro == 0:
                phase_log.update({f"phase/first_backward/{k}": v for k, v in memory_now(device).items()})
            step_loss += float(loss.detach())
            step_tokens += int(batch["attention_mask"].sum())
        if not math.isfinite(step_loss):
            rows = sorted(int(r) for _, b in window for r in b["row"])
            raise NonFiniteLossError(f"non-finite loss {step_loss} at step {step} (dataset rows {rows[:16]}); "
                                     "lower optim.lr, or try model.upcast=norms")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        optimizer.step()
        scheduler.step()
        # Free the gradients now rather than at the next backward: no need for this memory any more.
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        dt = time.perf_counter() - t0
        mem = memory_now(device)
        if step == 1:
            phase_log.update({f"phase/first_optimizer_step/{k}": v for k, v in mem.items()})
        reset_peak(device)

        tokens_seen += step_tokens
        losses.append(step_loss)
        throughputs.append(step_tokens / dt)
        peak_gib = max(peak_gib, mem["peak_allocated_gib"])
        metrics = {
            "train/loss": step_loss,
            "train/lr": scheduler.get_last_lr()[0],
            "train/grad_norm": grad_norm,
            "train/tokens_per_s": step_tokens / dt,
            "train/step_time_s": dt,
            "train/tokens": tokens_seen,
            "train/epoch": window[-1][0],
            "memory/peak_allocated_gib": mem["peak_allocated_gib"],
            "memory/peak_reserved_gib": mem["peak_reserved_gib"],
        }
        if step == 1:  # the one-off phase readings ride on the first step's record
            metrics.update(phase_log)
        if device == "cuda":
            metrics["memory/alloc_retries"] = mem["alloc_retries"]
        ev = cfg.logger.eval_every
        if eval_set and (step == steps or (ev and step % ev == 0)):
            eval_loss = evaluate(model, eval_set, cfg, pad_id, device)
            metrics["eval/loss"] = eval_loss
        if step % cfg.logger.log_every == 0 or step == steps or "eval/loss" in metrics:
            logger.log(metrics, step)
        if bar is not None:
            bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{step_tokens / dt:,.0f}",
                            mem_gib=f"{mem['peak_allocated_gib']:.2f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()

    # Skip the first steps in the throughput figure: they include allocator warm-up and lazy init.
    steady = throughputs[min(3, len(throughputs) - 1):]
    return {
        "summary/first_loss": losses[0],
        "summary/final_loss": losses[-1],
        "summary/eval_loss": eval_loss,
        "summary/tokens_per_s": statistics.median(steady),
        "summary/peak_memory_gib": peak_gib,
        "summary/steps": steps,
        "summary/tokens": tokens_seen,
    }
