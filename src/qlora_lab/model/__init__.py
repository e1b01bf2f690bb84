"""Stages 1-4: load -> quantize -> prepare -> adapt (+ compile, + the DDP/FSDP wrapper).

`build_model` is the one sequence that the runner, the tests and the benchmarks all call, so what is measured and
tested is what users train.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.spec import RunSpec
from qlora_lab.model.adapt import count_parameters, wrap_model
from qlora_lab.model.layers import compile_layers
from qlora_lab.model.load import load_model
from qlora_lab.model.parallel import wrap
from qlora_lab.model.prepare import prepare_model
from qlora_lab.model.quantize import build_bnb_config
from qlora_lab.model.source import load_tokenizer, resolve_model_path


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


def build_model(spec: RunSpec, source: Source | None = None, dist: Dist = Dist(),
                on_phase: Callable[[str], None] = lambda phase: None, *, compile_backend: str = "inductor",
                fullgraph: bool = False) -> BuiltModel:
    """load -> quantize (as the weights stream in) -> prepare -> adapt -> compile -> wrap; `on_phase(name)` is
    called after load, prepare and wrap (the runner reads memory there)."""
    cfg = spec.cfg
    source = source or model_source(spec, dist)
    model = load_model(source.path, cfg.model, build_bnb_config(cfg.quantization), spec.device, cfg.data.packing)
    on_phase("load")
    model = prepare_model(model, cfg.model, cfg.checkpointing, spec.device)
    on_phase("prepare")
    model = wrap_model(model, cfg.lora)
    model = compile_layers(model, cfg.model, compile_backend, fullgraph)
    trainable, total = count_parameters(model)
    engine = wrap(model, cfg.distributed, cfg.checkpointing, dist)
    on_phase("wrap")
    return BuiltModel(model, engine, source.tokenizer, source.path, trainable, total)
