"""Several processes, one per GPU: `torchrun --nproc_per_node=N train.py distributed=ddp|fsdp ...`.

Every process runs the whole pipeline on its own device. What differs from one process:

- data: each optimizer step takes the same rows a one-process run with an N times larger micro-batch takes,
  and process r trains on its r-th share of them (`shard`);
- the model: `wrap` puts it under DDP (whole base per GPU, LoRA gradients all-reduced) or FSDP2 (`fully_shard`
  per decoder layer, then the root: base, LoRA weights, gradients and AdamW states split N ways);
- the loss: divided by the label tokens of the whole global window, times N because both wrappers average
  gradients over processes, so gradients equal the one-process ones;
- who writes: only rank 0 logs (metrics.jsonl, W&B), writes run_info.json, checkpoints and the adapter.
  Checkpoints hold gathered (full) tensors, so a run resumes on any number of processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qlora_lab.config import CheckpointingConfig, DistributedConfig


def launched_world_size() -> int:
    """How many processes the launcher (torchrun / accelerate launch) started; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; a one-process run is `Dist()`."""

    strategy: str = "none"
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.strategy != "none"

    @property
    def fsdp(self) -> bool:
        return self.strategy == "fsdp"

    def _comm_device(self) -> torch.device:
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """All-reduce a few numbers (sum or max) across processes; the values themselves when alone."""
        if not self.active or self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every process."""
        if not self.active or self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active and self.world > 1:
            dist.barrier()


def setup(cfg: DistributedConfig, device: str) -> Dist:
    """Join the process group the launcher describes (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

    `distributed=ddp|fsdp` without a launcher runs as a group of one (useful to try the wrapped path on one GPU).
    """
    if cfg.name == "none":
        return Dist(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device == "cuda" else "gloo")
    if not dist.is_initialized():
        if "RANK" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(strategy=cfg.name, world=dist.get_world_size(), rank=dist.get_rank(), local_rank=local_rank,
                device=device)


def teardown(d: Dist) -> None:
    """Leave the group together: rank 0 still writes the summary and closes W&B after the others are done, and a
    process that tears its connections down while a peer still holds the group can make gloo abort that peer."""
    if d.active and dist.is_initialized():
        try:
            d.barrier()
        finally:
            dist.destroy_process_group()


def shard_batch(batch: dict[str, torch.Tensor], d: Dist) -> dict[str, torch.Tensor]:
    """This process's share of one global micro-batch: a contiguous block of rows, rank 0 first.

    The short last batch of an epoch can leave a process without a row; it then runs the last row with every
    label ignored (row id -1), which adds nothing to loss or gradients but keeps the collectives in step.
    """
    if d.world == 1:
        return batch
    n = batch["input_ids"].shape[0]
    lo, hi = n * d.rank // d.world, n * (d.rank + 1) // d.world
    if hi > lo:
        return {k: v[lo:hi] for k, v in batch.items()}
    from qlora_lab.data import IGNORE_INDEX

    out = {k: v[n - 1:n].clone() for k, v in batch.items()}
    out["labels"].fill_(IGNORE_INDEX)
    out["row"].fill_(-1)
    return out


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers marks as not to be split (LlamaDecoderLayer, Phi3DecoderLayer, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"distributed=fsdp: {type(base).__name__} names no decoder layer class "
                         f"(_no_split_modules={sorted(names)}); use distributed=ddp")
    return layers


def wrap(model: torch.nn.Module, cfg: DistributedConfig, ck: CheckpointingConfig, d: Dist) -> torch.nn.Module:
    """The module to call for forward/backward: DDP around `model`, or `model` itself sharded in place by FSDP2."""
    if not d.active:
        return model
    if d.fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        from qlora_lab.quantize import torch_dtype

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


# --- gathered state: what checkpoints and the saved adapter hold, whatever the number of processes -------------

def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def adapter_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The trainable tensors by parameter name, whole and on the CPU, on rank 0 (the only writer; the others get
    {}). Call it on every process: under FSDP it is a collective."""
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    if not d.main:  # DDP replicas hold the same tensors as rank 0: no copy to make
        return {}
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], d: Dist) -> None:
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist) -> dict[str, Any]:
    """optimizer.state_dict() keyed by parameter name (not position), whole, on rank 0 ({} elsewhere); FSDP: a
    collective."""
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=_full_options())
    if not d.main:
        return {}
    return by_name(optimizer.state_dict(), trainable_names(model))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         d: Dist) -> None:
    names = trainable_names(model)
    if d.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, by_name(state, names),
                                 options=StateDictOptions(full_state_dict=True))
        return
    optimizer.load_state_dict(by_index(state, names))


def _rekey(state: dict[str, Any], key: dict) -> dict[str, Any]:
    return {"state": {key.get(k, k): v for k, v in state["state"].items()},
            "param_groups": [{**g, "params": [key.get(k, k) for k in g["params"]]} for g in state["param_groups"]]}


def by_name(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """Key an optimizer state dict by parameter name (positions follow the trainable parameters' order)."""
    return _rekey(state, dict(enumerate(names)))


def by_index(state: dict[str, Any], names: list[str]) -> dict[str, Any]:
    """The inverse of `by_name`: what `optimizer.load_state_dict` takes."""
    return _rekey(state, {n: i for i, n in enumerate(names)})
