"""One optimizer step's forward and backward passes, and the loss they compute.

The loss of each micro-batch is a sum over its label tokens divided by the label tokens of the whole
accumulation window (over every process), so accumulating k micro-batches gives exactly the gradient of one
k-times larger batch (a mean of per-micro-batch means would weight short sequences more).

`forward_loss` is the seam tests use to inject a fault (a NaN loss on a poisoned batch): the step calls it through
this module, so patching `qlora_lab.train.step.forward_loss` reaches every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.data.batching import shard_batch
from qlora_lab.data.tokenize import IGNORE_INDEX
from qlora_lab.memory.readings import PhaseReadings


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


@dataclass
class StepResult:
    loss: float  # the window's mean loss per label token, over every process
    tokens: int  # real tokens of the window, over every process
    grad_norm: float  # of all LoRA gradients, before clipping
    norm: torch.Tensor  # the same, as the tensor clipping takes

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def forward_backward(engine, params: list[torch.nn.Parameter], window: list[dict[str, torch.Tensor]], device: str,
                     dist: Dist = Dist(), phases: PhaseReadings | None = None) -> StepResult:
    """Gradients of one optimizer step's window (global micro-batches; this process trains on its share of each).

    `phases` (the first step only) reads memory after the first forward and the first backward.
    """
    num_items = max(sum(count_label_tokens(b) for b in window), 1)
    loss_sum, tokens = 0.0, 0
    for micro, batch in enumerate(window):
        batch = shard_batch(batch, dist)
        loss = forward_loss(engine, batch, device, num_items)
        if phases is not None and micro == 0:
            phases.read("first_forward")
        # DDP and FSDP average gradients over processes; the loss is this process's share of the global
        # window's mean, so scaling by N makes the averaged gradient the global one.
        (loss * dist.world if dist.world > 1 else loss).backward()
        if phases is not None and micro == 0:
            phases.read("first_backward")
        loss_sum += float(loss.detach())
        tokens += count_tokens(batch)
    loss_sum, tokens = dist.reduce([loss_sum, tokens])
    # The norm before any clipping: clipping by a NaN norm would turn every gradient into NaN and the guard's
    # diagnostic could no longer say which tensors went bad.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP: a norm over this process's gradient shards, made whole
        norm = norm.full_tensor()
    return StepResult(loss_sum, int(tokens), float(norm), norm)
