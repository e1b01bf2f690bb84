"""Stages 1-4: load -> quantize -> prepare -> adapt (+ compile, + the DDP/FSDP wrapper).

`build_model` is the one sequence that the runner, the tests and the benchmarks all call, so what is measured and
tested is what users train.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.spec import RunSpec
from qlora_lab.model.adapt import build_lora_config, count_parameters, set_adapter_dtype, wrap_model
from qlora_lab.model.dropout import MicroBatch, install as install_dropout
from qlora_lab.model.grouped import Routing, group_adapters, share_dropout_masks
from qlora_lab.model.layers import compile_layers
from qlora_lab.model.load import load_model
from qlora_lab.model.parallel import wrap
from qlora_lab.model.prepare import prepare_model
from qlora_lab.model.quantize import backend_of
from qlora_lab.model.source import load_tokenizer, model_config, resolve_model_path
from qlora_lab.model.tiling import tile_mlps


@dataclass
class Source:
    path: str  # the directory or hub id the weights load from
    tokenizer: Any


@dataclass
class BuiltModel:
    model: torch.nn.Module  # the PEFT model: what is saved and checkpointed
    engine: torch.nn.Module  # what runs forward and backward: the DDP wrapper, or `model` itself
    tokenizer: Any
    path: str
    trainable: int  # parameter counts of the whole model (before FSDP leaves each process a shard)
    total: int
    micro: MicroBatch  # the global micro-batch index the step sets: the key of the LoRA dropout masks


def device_of(model: torch.nn.Module) -> torch.device:
    """Where the model's trainable parameters live."""
    return next(p.device for p in model.parameters() if p.requires_grad)


def model_source(spec: RunSpec, dist: Dist = Dist()) -> Source:
    """Where the weights come from (building a random-init model into the cache first) and the tokenizer.

    Rank 0 builds a random-init model once; the other processes wait, then find it in the cache.
    """
    cfg = spec.cfg
    if not dist.main:
        dist.barrier()
    path = resolve_model_path(cfg.model, cfg.cache_dir, cfg.seed, spec.device)
    if dist.main:
        dist.barrier()
    return Source(path, load_tokenizer(path, cfg.model))


@dataclass
class BuiltGroup:
    """A fused group's model: one base, one adapter per job (model/grouped.py)."""

    built: BuiltModel  # `model` holds every job's adapter; `engine` is the model itself (no DDP/FSDP in a group)
    routing: Routing
    names: list[str]  # the adapter of each job, in the order of `specs`


def build_group(specs: list[RunSpec], names: list[str], source: Source,
                on_phase: Callable[[str], None] = lambda phase: None) -> BuiltGroup:
    """load -> quantize -> prepare once (the first spec's base, which every job shares) -> one adapter per job ->
    compile: what `build_model` does for one run, for a fused group."""
    cfg = specs[0].cfg
    backend = backend_of(cfg.quantization)
    quantize = backend.load_kwargs(cfg.quantization, model_config(cfg.model))
    model = load_model(source.path, cfg.model, quantize, specs[0].device, cfg.data.packing)
    backend.after_load(model)
    on_phase("load")
    model = prepare_model(model, cfg.model, cfg.checkpointing, specs[0].device)
    on_phase("prepare")
    torch.manual_seed(cfg.seed)
    model = wrap_model(model, dataclasses.replace(specs[0].cfg.lora, kernel="peft"), backend, adapter_name=names[0])
    routing = group_adapters(model, names[0], [(n, s.cfg.lora) for n, s in zip(names[1:], specs[1:])], cfg.seed,
                             build_lora_config, set_adapter_dtype)
    micro = MicroBatch().to(device_of(model))
    install_dropout(model, cfg.seed, micro)
    share_dropout_masks(model)
    if cfg.model.mlp_chunk:
        tile_mlps(model, cfg.model.mlp_chunk, micro)
    model = compile_layers(model, cfg.model)
    trainable, total = count_parameters(model, backend)
    on_phase("wrap")
    return BuiltGroup(BuiltModel(model, model, source.tokenizer, source.path, trainable, total, micro), routing, names)


def build_model(spec: RunSpec, source: Source | None = None, dist: Dist = Dist(),
                on_phase: Callable[[str], None] = lambda phase: None, *, compile_backend: str = "inductor",
                fullgraph: bool = False) -> BuiltModel:
    """load -> quantize (as the weights stream in) -> prepare -> adapt -> compile -> wrap; `on_phase(name)` is
    called after load, prepare and wrap (the runner reads memory there)."""
    cfg = spec.cfg
    source = source or model_source(spec, dist)
    backend = backend_of(cfg.quantization)
    quantize = backend.load_kwargs(cfg.quantization, model_config(cfg.model))
    model = load_model(source.path, cfg.model, quantize, spec.device, cfg.data.packing)
    backend.after_load(model)
    on_phase("load")
    model = prepare_model(model, cfg.model, cfg.checkpointing, spec.device)
    on_phase("prepare")
    torch.manual_seed(cfg.seed)  # LoRA's init from the seed alone, whatever ran before (a fused group's adapters too)
    model = wrap_model(model, cfg.lora, backend)
    micro = MicroBatch().to(device_of(model))
    install_dropout(model, cfg.seed, micro)
    if cfg.model.mlp_chunk:
        tile_mlps(model, cfg.model.mlp_chunk, micro)
    model = compile_layers(model, cfg.model, compile_backend, fullgraph)
    trainable, total = count_parameters(model, backend)
    engine = wrap(model, cfg.distributed, cfg.checkpointing, dist)
    on_phase("wrap")
    return BuiltModel(model, engine, source.tokenizer, source.path, trainable, total, micro)
