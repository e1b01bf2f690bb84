"""Stage 1 (load): resolve where the model lives, then load tokenizer and (quantized) weights.

`model=tiny` and the random-init benchmark shapes are built once into the cache and then take the very same
`from_pretrained` path as a hub id or a local checkpoint, so the code the tests run is the code users run.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qlora_lab.config import ModelConfig
from qlora_lab.quantize import torch_dtype


def resolve_model_path(m: ModelConfig, cache_dir: str, seed: int, device: str = "cpu") -> str:
    """The directory or hub id to load from; builds the random-init model first if the config asks for one."""
    if m.build:
        from qlora_lab.tiny import ensure_built

        return str(ensure_built(dict(m.build), Path(cache_dir).resolve(), m.name, seed=seed, device=device))
    return str(Path(m.path).expanduser()) if Path(m.path).expanduser().exists() else m.path


def load_tokenizer(path: str, m: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(m.tokenizer or path, trust_remote_code=m.trust_remote_code)
    if tok.pad_token is None:  # many base models ship none; padding positions are masked from the loss anyway
        tok.pad_token = tok.eos_token
    return tok


def resolve_kernels(m: ModelConfig, model_type: str, device: str) -> str:
    """model.kernels=auto -> liger where it can run (CUDA, liger-kernel installed, model type supported)."""
    if m.kernels != "auto":
        return m.kernels
    if device != "cuda":
        return "none"
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return "none"
    return "liger" if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN else "none"


def apply_kernels(path: str, m: ModelConfig) -> None:
    """Patch the model class with liger-kernel's Triton kernels before it is instantiated."""
    if m.kernels == "none":
        return
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    model_type = config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ValueError(f"model.kernels=liger has no kernels for model type {model_type!r}; use model.kernels=none")
    kwargs = {}
    if m.compile == "layers":  # inside a compiled layer the compiler fuses norms and SwiGLU itself; keep the loss
        kwargs.update(rms_norm=False, swiglu=False)
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        kwargs["rope"] = False  # liger's RoPE rotates the whole head; partial-rotary models (Phi-3/4) need HF's
    MODEL_TYPE_TO_APPLY_LIGER_FN[model_type](**kwargs)


def load_model(path: str, m: ModelConfig, bnb_config, device: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    apply_kernels(path, m)

    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config,
        dtype=torch_dtype(m.dtype),
        attn_implementation=m.attn_implementation,
        # one device (this process's GPU under torchrun); the weights are quantized as they stream in
        device_map={"": torch.cuda.current_device() if device == "cuda" else device},
        trust_remote_code=m.trust_remote_code,
    )
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return model
