"""Stage 4 (adapt): wrap the prepared model with LoRA adapters (peft)."""

from __future__ import annotations

import torch

from qlora_lab.core.schema import LoraConfig
from qlora_lab.model.fused_lora import fuse
from qlora_lab.model.quantize import Backend


def build_lora_config(lo: LoraConfig):
    import peft

    targets = list(lo.target_modules)
    init: bool | str = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}[lo.init]
    extra = {}
    if lo.init == "loftq":
        extra["loftq_config"] = peft.LoftQConfig(loftq_bits=4)
    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lo.r,
        lora_alpha=lo.alpha,
        lora_dropout=lo.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        bias=str(lo.bias),
        use_dora=lo.use_dora,
        use_rslora=lo.use_rslora,
        init_lora_weights=init,
        **extra,
    )


def wrap_model(model: torch.nn.Module, lo: LoraConfig, backend: Backend, adapter_name: str = "default"
               ) -> torch.nn.Module:
    """The PEFT model with one adapter, `adapter_name` (PEFT's `default`; a fused group's first job its own name)."""
    import peft

    try:
        model = peft.get_peft_model(model, build_lora_config(lo), adapter_name=adapter_name,
                                    autocast_adapter_dtype=lo.adapter_dtype == "float32")
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                            if isinstance(mod, torch.nn.Linear) or "Linear" in type(mod).__name__})
            raise ValueError(f"lora.target_modules={list(lo.target_modules)} matches no module of the model; "
                             f"its linear layers are named: {', '.join(names)}") from e
        raise
    set_adapter_dtype(model, lo, adapter_name)
    if lo.kernel == "fused":
        fuse(model, backend)
    return model


def set_adapter_dtype(model: torch.nn.Module, lo: LoraConfig, adapter_name: str) -> None:
    """lora.adapter_dtype=bfloat16: the adapter's weights (hence its gradients and AdamW states) in bf16."""
    if lo.adapter_dtype == "bfloat16":
        tag = f".{adapter_name}."
        for name, param in model.named_parameters():
            if param.requires_grad and tag in name:
                param.data = param.data.to(torch.bfloat16)


def count_parameters(model: torch.nn.Module, backend: Backend) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting each quantized weight as one parameter."""
    trainable = total = 0
    for param in model.parameters():
        n = backend.logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
