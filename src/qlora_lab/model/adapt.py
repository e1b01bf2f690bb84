"""Stage 4 (adapt): wrap the prepared model with LoRA adapters (peft)."""

from __future__ import annotations

import torch

from qlora_lab.core.schema import LoraConfig
from qlora_lab.model.fused_lora import fuse


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


def wrap_model(model: torch.nn.Module, lo: LoraConfig) -> torch.nn.Module:
    import peft

    try:
        model = peft.get_peft_model(model, build_lora_config(lo),
                                    autocast_adapter_dtype=lo.adapter_dtype == "float32")
    except ValueError as e:
        if "not found in the base model" in str(e) or "Target modules" in str(e):
            names = sorted({n.rsplit(".", 1)[-1] for n, mod in model.named_modules()
                            if isinstance(mod, torch.nn.Linear) or "Linear" in type(mod).__name__})
            raise ValueError(f"lora.target_modules={list(lo.target_modules)} matches no module of the model; "
                             f"its linear layers are named: {', '.join(names)}") from e
        raise
    if lo.adapter_dtype == "bfloat16":
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    if lo.kernel == "fused":
        fuse(model)
    return model


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counting each 4-bit weight as one parameter."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # packed: two 4-bit values per byte of storage
            n *= param.element_size() * 2
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total
