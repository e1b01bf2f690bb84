"""liger-kernel's Triton kernels (RMSNorm, SwiGLU, RoPE, the fused linear cross-entropy), patched into the model
class before it is instantiated (CUDA only; `model.kernels`)."""

from __future__ import annotations

from qlora_lab.core.schema import ModelConfig


def resolve_kernels(m: ModelConfig, model_type: str, device: str) -> str:
    """model.kernels=auto -> liger where it can run (CUDA, liger-kernel installed, model type supported)."""
    if m.kernels != "auto":
        return str(m.kernels)
    if device != "cuda":
        return "none"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "none"
    return "liger" if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN else "none"


def apply_kernels(config, m: ModelConfig) -> None:
    """Patch the model class of `config` (a transformers config) with liger's kernels."""
    if m.kernels == "none":
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.kernels=liger has no kernels for model type {model_type!r}; use model.kernels=none")
    kwargs = {}
    if m.compile == "layers":  # inside a compiled layer the compiler fuses norms and SwiGLU itself; keep the loss
        kwargs.update(rms_norm=False, swiglu=False)
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        kwargs["rope"] = False  # liger's RoPE rotates the whole head; partial-rotary models (Phi-3/4) need HF's
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](**kwargs)
