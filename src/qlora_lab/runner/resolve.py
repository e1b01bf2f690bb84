"""Resolve every `auto` of a composed config into the frozen run spec that runs (core.spec.RunSpec)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging

from qlora_lab.core.dist import launched_world_size
from qlora_lab.core.schema import TrainConfig, freeze
from qlora_lab.core.spec import RunSpec, get
from qlora_lab.memory.ledger import Ledger
from qlora_lab.memory.plan import plan_run
from qlora_lab.model.kernels import resolve_kernels
from qlora_lab.model.source import model_config

log = logging.getLogger(__name__)


def resolve_spec(cfg: TrainConfig, device: str, overrides: list[str] = ()) -> tuple[RunSpec, Ledger, float | None]:
    """The run spec, the memory ledger of what it will run and the GPU budget that ledger was judged against.

    `device`, `model.dtype` and the quantization backend's dtypes (`quantization.compute_dtype`), `model.kernels`,
    `model.compile`, `data.micro_batch_size` (the largest the ledger predicts to fit), `checkpointing.layers` (with
    the micro-batch, the fastest plan that fits: memory/frontier.py) and `plan.max_seq_len=search` (the longest
    length that trains), where `auto`, are resolved here, from the config and the machine alone: nothing is loaded. On
    CUDA an auto micro-batch is then proven with one real step once the model is built (`runner.run`), which may
    halve it; that is the spec's last change, made before anything is recorded or trained.
    """
    spec = RunSpec(cfg=freeze(cfg), device=device, processes=launched_world_size(), overrides=tuple(overrides))
    # A plan describes a CUDA step wherever it is printed, so it resolves as a GPU run would.
    target = "cuda" if cfg.mode == "plan" else device
    if cfg.device == "auto":
        spec = spec.evolve("device", device)
    dtypes = ["model.dtype"] + [f"quantization.{f.name}" for f in dataclasses.fields(cfg.quantization)
                                if getattr(cfg.quantization, f.name) == "auto"]  # only a dtype key takes auto there
    for key in dtypes:
        if get(cfg, key) == "auto":  # bf16 where it is native (CUDA); fp32 where bf16 is emulated (the CPU)
            spec = spec.evolve(key, "bfloat16" if target == "cuda" else "float32")
    if cfg.model.kernels == "auto":
        spec = spec.evolve("model.kernels", resolve_kernels(cfg.model, model_config(cfg.model).model_type, target))
        if cfg.mode == "plan" and spec.cfg.model.kernels == "none" and importlib.util.find_spec("liger_kernel") is None:
            log.warning("model.kernels=auto planned as none: liger-kernel is not installed here, so this plan holds "
                        "the full logits (no fused loss); on a GPU machine with the gpu extra (uv sync --extra gpu) "
                        "auto is liger where the model type has kernels: plan that with model.kernels=liger")
    if cfg.checkpointing.offload_to_cpu and target == "cpu":
        log.warning("checkpointing=offload on the CPU: it moves the layer inputs to host memory, where a CPU run "
                    "keeps them already, so it saves nothing here (the memory of checkpointing=non_reentrant)")
    if cfg.model.compile == "auto":  # Triton codegen where it pays (CUDA); the CPU would pay minutes of compile
        spec = spec.evolve("model.compile", "layers" if target == "cuda" else "none")
    planned = plan_run(spec.cfg, device)
    if planned.max_seq_len is not None:  # plan.max_seq_len=search: train at the longest length that fits
        spec = spec.evolve("model.max_seq_len", planned.max_seq_len)
    if planned.layers is not None:  # checkpointing=auto: the plan's layer modes (and micro-batch)
        spec = spec.evolve("checkpointing.layers", planned.layers.chosen.layers)
    if cfg.data.micro_batch_size == "auto":
        spec = spec.evolve("data.micro_batch_size", planned.ledger.micro_batch)
    planned.ledger.extra["run_plan"] = planned
    return spec, planned.ledger, planned.budget
