"""The repeated decoder layers of a model, and compiling them (`model.compile=layers`)."""

from __future__ import annotations

import contextlib

import torch

from qlora_lab.core.schema import ModelConfig


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks transformers marks as not to be split (LlamaDecoderLayer, Phi3DecoderLayer, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(base).__name__} names no decoder layer class (_no_split_modules={sorted(names)}); "
                         "use distributed=ddp and model.compile=none")
    return layers


def eager_layers():
    """Compiled layers run eagerly for the duration: evaluation and generation, whose batches come in shapes
    (padded eval rows, each new generated length) that would each cost a recompile, several seconds apiece, for a
    handful of forwards."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance is not None else contextlib.nullcontext()


def compile_layers(model: torch.nn.Module, m: ModelConfig, backend: str = "inductor",
                   fullgraph: bool = False) -> torch.nn.Module:
    """model.compile=layers: torch.compile every decoder layer in place (after LoRA and the fused kernel are in).

    Identical layers share one compiled graph (parameters are graph inputs), so the compile happens once per
    layer class and input shape, not once per layer. Activation checkpointing wraps the compiled call.
    """
    if m.compile == "none":
        return model
    for layer in decoder_layers(model):
        layer.compile(backend=backend, fullgraph=fullgraph)
    return model
