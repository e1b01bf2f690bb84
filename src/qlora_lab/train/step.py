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
from qlora_lab.data.batching import Collator, share
from qlora_lab.data.tokenize import IGNORE_INDEX
from qlora_lab.memory.readings import PhaseReadings
from qlora_lab.model.dropout import MicroBatch
from qlora_lab.model.grouped import Routing, head_loss, stack_inputs

# What the model's forward takes from a batch (the rest, e.g. `row` and `real_tokens`, is bookkeeping).
MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k",
                "max_length_q", "max_length_k")


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that contribute to the loss: labels are shifted by one inside the model."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Real tokens of the batch: not padding, not a process's stand-in row (see `Collator.stand_in`)."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"].sum())
    return int(batch["attention_mask"][batch["row"] >= 0].sum())


def model_inputs(batch: dict[str, torch.Tensor], device: str) -> dict:
    if "cu_seq_lens_q" in batch and "attention_mask" in batch:
        raise ValueError("a packed batch with an attention_mask: a padding mask would stand in for the document "
                         "boundaries; packed batches carry cu_seq_lens and no attention_mask")
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items() if k in MODEL_INPUTS}
    if "cu_seq_lens_q" in inputs:  # one tensor for both (varlen kernels may check identity; one mask is built)
        inputs["cu_seq_lens_k"] = inputs["cu_seq_lens_q"]
    return inputs


def forward_loss(model, batch: dict[str, torch.Tensor], device: str, num_items: int) -> torch.Tensor:
    """Sum of token losses of `batch` divided by `num_items` (the accumulation window's label tokens)."""
    return model(**model_inputs(batch, device), num_items_in_batch=num_items).loss


@dataclass
class StepResult:
    loss: float  # the window's mean loss per label token, over every process
    tokens: int  # real tokens of the window, over every process
    capacity: int  # tokens the window's batches hold, padding included, over every process
    grad_norm: float  # of all LoRA gradients, before clipping
    norm: torch.Tensor  # the same, as the tensor clipping takes

    @property
    def finite(self) -> bool:
        return math.isfinite(self.loss) and math.isfinite(self.grad_norm)


def forward_backward(engine, params: list[torch.nn.Parameter], window: list[list], collator: Collator, device: str,
                     dist: Dist = Dist(), phases: PhaseReadings | None = None, micro: MicroBatch | None = None,
                     first_micro: int = 0) -> StepResult:
    """Gradients of one optimizer step's window: its global micro-batches (lists of items), of which this process
    collates and trains on its share.

    `phases` (the first step only) reads memory after the first forward and the first backward. `micro` is told the
    global index of each micro-batch (`first_micro` + its place in the window): the key of the LoRA dropout masks.
    """
    num_items = max(sum(collator.labels(items) for items in window), 1)
    loss_sum, tokens, capacity = 0.0, 0, 0
    for micro_i, items in enumerate(window):
        if micro is not None:
            micro.set(first_micro + micro_i)
        mine = share(items, dist)
        batch = collator(mine) if mine else collator.stand_in(items)
        loss = forward_loss(engine, batch, device, num_items)
        if phases is not None and micro_i == 0:
            phases.read("first_forward")
        # DDP and FSDP average gradients over processes; the loss is this process's share of the global
        # window's mean, so scaling by N makes the averaged gradient the global one.
        (loss * dist.world if dist.world > 1 else loss).backward()
        if phases is not None and micro_i == 0:
            phases.read("first_backward")
        loss_sum += float(loss.detach())
        tokens += count_tokens(batch)
        capacity += batch["input_ids"].numel() if mine else 0
    loss_sum, tokens, capacity = dist.reduce([loss_sum, tokens, capacity])
    # The norm before any clipping: clipping by a NaN norm would turn every gradient into NaN and the guard's
    # diagnostic could no longer say which tensors went bad.
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP: a norm over this process's gradient shards, made whole
        norm = norm.full_tensor()
    return StepResult(loss_sum, int(tokens), int(capacity), float(norm), norm)


def job_loss(causal_lm, run_name: str, hidden: torch.Tensor, labels: torch.Tensor, num_items: int,
             kernels: str) -> torch.Tensor:
    """A fused group's job's loss (the job named `run_name`), from its rows' last hidden states: the seam tests patch
    to fail one job of a group (tests/faults)."""
    return head_loss(causal_lm, hidden, labels, num_items, kernels)


def group_forward_backward(model, jobs: list[tuple[str, str, list[torch.nn.Parameter]]], routing: Routing,
                           window: list[list], collator: Collator, device: str, *, kernels: str,
                           micro: MicroBatch | None = None, first_micro: int = 0,
                           phases: PhaseReadings | None = None) -> dict[str, StepResult]:
    """One optimizer step's gradients for every job of a fused group: each micro-batch once through the decoder for
    all of them (their copies stacked, model/grouped.py), each job's loss from its own rows, one backward of their
    sum (a job's loss reaches its own adapter only). `jobs`: (adapter name, run name, its parameters) each. Returns
    each job's StepResult by adapter name, as `forward_backward` would return it for that job alone."""
    names = [name for name, _, _ in jobs]
    routing.jobs[:] = names
    causal_lm = model.get_base_model()
    decoder = causal_lm.get_decoder()
    num_items = max(sum(collator.labels(items) for items in window), 1)
    sums = torch.zeros(len(names), dtype=torch.float64)
    tokens, capacity = 0, 0
    for micro_i, items in enumerate(window):
        if micro is not None:
            micro.set(first_micro + micro_i)
        batch = collator(items)
        inputs = model_inputs(batch, device)
        labels = inputs.pop("labels")
        hidden = decoder(**stack_inputs(inputs, len(names))).last_hidden_state
        if phases is not None and micro_i == 0:
            phases.read("first_forward")
        losses = [job_loss(causal_lm, run_name, h, labels, num_items, kernels)
                  for (_, run_name, _), h in zip(jobs, hidden.chunk(len(names)))]
        total = torch.stack(losses)
        total.sum().backward()
        if phases is not None and micro_i == 0:
            phases.read("first_backward")
        sums += total.detach().double().cpu()
        tokens += count_tokens(batch)
        capacity += batch["input_ids"].numel()
    out = {}
    for (name, _, params), loss in zip(jobs, sums.tolist()):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        out[name] = StepResult(loss, tokens, capacity, float(norm), norm)
    return out
