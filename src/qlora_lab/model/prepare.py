"""Stage 3 (prepare): freeze the base, pick what stays in fp32, and set up activation checkpointing.

Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast by default: that helper casts every
non-quantized parameter (embeddings and the LM head included) to fp32, which costs several GiB on a
large-vocabulary model and slows every matmul that touches them. `model.upcast=all` restores it.
"""

from __future__ import annotations

import torch

from qlora_lab.core.schema import CheckpointingConfig, ModelConfig
from qlora_lab.model.offload import HostOffload, offloaded


def prepare_model(model: torch.nn.Module, m: ModelConfig, ck: CheckpointingConfig, device: str) -> torch.nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes repacks a 4-bit weight for its AVX512-bf16 CPU kernel the first time the layer runs in
        # eval mode, and from then on uses that kernel in training too; it has no backward, so input
        # gradients (and every LoRA gradient below that layer) silently go wrong after the first eval.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if m.upcast == "all":
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    elif m.upcast == "norms":
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                module.float()
    if ck.enabled:
        enable_checkpointing(model, ck, device)
        # The reentrant implementation only backpropagates into a checkpointed block whose input requires
        # grad; with a frozen embedding nothing would, and the LoRA weights inside would get no gradient.
        model.enable_input_require_grads()
    return model


def enable_checkpointing(model: torch.nn.Module, ck: CheckpointingConfig, device: str) -> None:
    kwargs = {"use_reentrant": ck.use_reentrant}
    # transformers renamed the method during 5.x; keep working on releases before and after the rename.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not ck.offload_to_cpu:
        return
    # Offload only what checkpointing saves (each layer's inputs), not the logits and loss buffers: wrap each
    # checkpointed layer's checkpoint call, so those tensors wait in host memory.
    layers = [m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None]
    if not layers:
        raise ValueError(f"checkpointing=offload: {type(model).__name__} has no checkpointed layers to offload")
    offload = HostOffload() if device == "cuda" else None
    for layer in layers:
        layer._gradient_checkpointing_func = offloaded(layer._gradient_checkpointing_func, offload)
