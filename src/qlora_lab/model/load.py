"""Stage 1 (load): the (quantized) weights, onto this process's device."""

from __future__ import annotations

import pickle
from typing import Any

import torch

from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.errors import BadFile
from qlora_lab.core.schema import ModelConfig
from qlora_lab.model.attention import PACKED, register
from qlora_lab.model.kernels import apply_kernels


def load_model(path: str, m: ModelConfig, quantize: dict[str, Any], device: str, packed: bool = False
               ) -> torch.nn.Module:
    """`quantize`: what the quantization backend gives from_pretrained (its quantization_config), so the weights are
    quantized as they stream in; `packed`: attention over packed rows, documents isolated (model/attention.py)
    instead of model.attn_implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    apply_kernels(AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code), m)
    if packed:
        register()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            **quantize,
            dtype=torch_dtype(m.dtype),
            attn_implementation=PACKED if packed else str(m.attn_implementation),
            # one device (this process's GPU under torchrun); the weights are quantized as they stream in
            device_map={"": torch.cuda.current_device() if device == "cuda" else device},
            trust_remote_code=m.trust_remote_code,
        )
    except pickle.UnpicklingError:  # transformers reads *.bin with weights_only=True; its error advises otherwise
        raise BadFile(f"the weights in {path} (a *.bin file) hold something other than tensors (Python objects, or "
                      "another format), refused unread (loading objects could run code); give the checkpoint's "
                      "safetensors weights") from None
    model.config.use_cache = False  # the KV cache is for generation; in training it only costs memory
    return model
