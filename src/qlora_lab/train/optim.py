"""The optimizer, the learning-rate schedule, and how many steps a run takes."""

from __future__ import annotations

import math

import torch

from qlora_lab.core.schema import OptimConfig


def build_optimizer(params: list[torch.nn.Parameter], o: OptimConfig, device: str) -> torch.optim.Optimizer:
    kw = dict(lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "paged_adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=device == "cuda", **kw)


def total_steps(o: OptimConfig, n_train: int, micro_batch: int) -> int:
    if o.max_steps > 0:
        return o.max_steps
    per_epoch = math.ceil(math.ceil(n_train / micro_batch) / o.grad_accum_steps)
    return per_epoch * o.epochs


def build_scheduler(optimizer: torch.optim.Optimizer, o: OptimConfig, steps: int):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[o.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=steps)
