"""Stage 3 (prepare): freeze the base, pick what stays in fp32, and set up activation checkpointing.

Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast by default: that helper casts every
non-quantized parameter (embeddings and the LM head included) to fp32, which costs several GiB on a
large-vocabulary model and slows every matmul that touches them. `model.upcast=all` restores it.
"""

from __future__ import annotations

import torch

from qlora_lab.core.modes import layer_modes
from qlora_lab.core.schema import CheckpointingConfig, ModelConfig
from qlora_lab.model.offload import HostOffload, offloaded


def prepare_model(model: torch.nn.Module, m: ModelConfig, ck: CheckpointingConfig, device: str) -> torch.nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    if m.upcast == "all":
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    elif m.upcast == "norms":
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                module.float()
                # Computed in fp32, handed on in the dtype it came in: an fp32 output would reach a 16-bit layer that
                # does not cast its input (the unquantized LM head: "expected m1 and m2 to have the same dtype").
                module.register_forward_hook(_as_input_dtype)
    modes = layer_modes(ck, len(checkpointed_layers(model)))
    if any(mode != "keep" for mode in modes):
        set_modes(model, ck, modes, device)
    return model


def _as_input_dtype(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    x = args[0] if args else None
    return output.to(x.dtype) if isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) else output


def checkpointed_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers transformers can checkpoint (the decoder layers), in order."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_checkpointing(model: torch.nn.Module, ck: CheckpointingConfig) -> None:
    """transformers' activation checkpointing on every layer (set_modes then says which layers use it, and how)."""
    kwargs = {"use_reentrant": ck.use_reentrant}
    # transformers renamed the method during 5.x; keep working on releases before and after the rename.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for layer in checkpointed_layers(model):
        layer._qlab_checkpoint = layer._gradient_checkpointing_func  # what set_modes wraps (again)
    # The reentrant implementation only backpropagates into a checkpointed block whose input requires
    # grad; with a frozen embedding nothing would, and the LoRA weights inside would get no gradient.
    model.enable_input_require_grads()


def set_modes(model: torch.nn.Module, ck: CheckpointingConfig, modes: list[str], device: str) -> None:
    """Checkpointing per layer: `modes[i]` says whether decoder layer i keeps its activations, is recomputed, or is
    recomputed with its input offloaded to host memory; again on a built model (a plan that ran out of memory falls
    back to a lighter one). Offload only what checkpointing saves (each layer's inputs), not the logits and loss
    buffers: the offloaded layers' checkpoint call is wrapped, so those tensors wait in host memory."""
    layers = checkpointed_layers(model)
    if any(m != "keep" for m in modes) and layers and not hasattr(layers[0], "_qlab_checkpoint"):
        enable_checkpointing(model, ck)
    if not layers or not hasattr(layers[0], "_qlab_checkpoint"):
        return  # every layer keeps its activations and checkpointing was never on
    offload = HostOffload() if device == "cuda" and "offload" in modes else None
    for layer, mode in zip(layers, modes, strict=True):
        layer.gradient_checkpointing = mode != "keep"
        layer._gradient_checkpointing_func = offloaded(layer._qlab_checkpoint, offload) if mode == "offload" \
            else layer._qlab_checkpoint
