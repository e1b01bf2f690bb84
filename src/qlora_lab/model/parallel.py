"""Wrap the adapted model for several processes: DDP (whole base per GPU, LoRA gradients all-reduced) or FSDP2
(`fully_shard` per decoder layer, then the root: base, LoRA weights, gradients and AdamW states split N ways)."""

from __future__ import annotations

import contextlib

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.schema import CheckpointingConfig, DistributedConfig
from qlora_lab.model.layers import decoder_layers


def wrap(model: torch.nn.Module, cfg: DistributedConfig, ck: CheckpointingConfig, d: Dist) -> torch.nn.Module:
    """The module to call for forward/backward: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if not d.active:
        return model
    if d.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch_dtype(cfg.param_dtype), reduce_dtype=torch_dtype(cfg.reduce_dtype))
        for layer in decoder_layers(model):
            fully_shard(layer, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        fully_shard(model, mp_policy=mp, reshard_after_forward=cfg.reshard_after_forward)
        return model
    from torch.nn.parallel import DistributedDataParallel

    # Reentrant checkpointing runs each layer's backward in a nested autograd call that DDP's hooks cannot see
    # through; a static graph (the same parameters used every step, which LoRA training is) makes it work.
    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device == "cuda" else None,
                                   static_graph=ck.enabled and ck.use_reentrant)


@contextlib.contextmanager
def gathered_root(model: torch.nn.Module):
    """The root's own shards (embeddings, final norm, head) gathered for calls that enter below it.

    FSDP2 gathers a module's parameters in its forward hook; `generate()` enters the base model under the sharded
    root (the PEFT model), so that hook never runs and the embedding would see DTensor shards. The decoder layers
    are called normally and gather their own. A no-op for an unsharded model.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()
