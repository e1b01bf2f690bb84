"""Stage 2 (quantize): turn the quantization config into transformers' BitsAndBytesConfig.

Quantization itself happens while the weights load (stage 1), layer by layer, so a model never exists in
full precision on the device; this module only decides how.
"""

from __future__ import annotations

from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.schema import QuantizationConfig


def build_bnb_config(q: QuantizationConfig):
    """BitsAndBytesConfig for 4/8-bit, None for bits=16 (plain LoRA on a model.dtype base)."""
    if q.bits == 16:
        return None
    from transformers import BitsAndBytesConfig

    skip = list(q.skip_modules) or None
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold,
                                  llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=str(q.quant_type),
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype),
        bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
        llm_int8_skip_modules=skip,
    )
