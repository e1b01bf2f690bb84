"""Gathered training state: what checkpoints and the saved adapter hold, whatever the number of processes.

Tensors are whole (FSDP shards gathered) and the optimizer state is keyed by parameter name, not position, so a
checkpoint written by N processes loads into M processes, or into another strategy.
"""

from __future__ import annotations

from typing import Any

import torch

from qlora_lab.core.dist import Dist

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
