"""The bitsandbytes backend: 4-bit NF4/FP4 (QLoRA's recipe) and LLM.int8, through transformers' BitsAndBytesConfig.

conf/quantization/{nf4,fp4,int8}.yaml; the keys map 1:1 onto BitsAndBytesConfig.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from qlora_lab.core.dtypes import torch_dtype
from qlora_lab.core.effects import Effect, key
from qlora_lab.core.schema import Precision, QuantizationConfig, TrainConfig
from qlora_lab.model.quantize import Dequantizer, WeightBytes

BLOCK = 64  # bitsandbytes' 4-bit block size


class QuantType(StrEnum):
    nf4 = "nf4"
    fp4 = "fp4"


class Storage(StrEnum):
    """How 4-bit weights are packed: uint8, or a float dtype that FSDP can shard as it is stored."""

    uint8 = "uint8"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class BitsAndBytesQuantization(QuantizationConfig):
    bits: int = key(Effect.base)  # 4 or 8
    quant_type: QuantType = key(Effect.base)  # 4-bit data type
    double_quant: bool = key(Effect.base)  # quantize the absmax constants too (~0.37 bit/param saved)
    compute_dtype: Precision = key(Effect.base)  # dtype the dequantized weights are multiplied in
    # packing dtype of 4-bit weights (= distributed.param_dtype for FSDP): the same values, stored otherwise
    quant_storage: Storage = key(Effect.implementation)
    skip_modules: list[str] = key(Effect.base)  # module names left in model.dtype
    int8_threshold: float = key(Effect.base)  # LLM.int8 outlier threshold


SCHEMA = BitsAndBytesQuantization


@functools.lru_cache(maxsize=None)
def _probe(device: str, bits: int, quant_type: str) -> str | None:
    """None if bitsandbytes can quantize to `bits` on `device`, else why not. Probed by quantizing a small tensor for
    real: a version check would miss a build without this device's library."""
    try:
        import bitsandbytes.functional as F  # lazy: the CPU-only path need not pay for it
    except Exception as e:  # ImportError, or a broken native library
        return f"bitsandbytes is not importable ({type(e).__name__}: {e})"
    try:
        x = torch.randn(64, 64, device=device, dtype=torch.bfloat16)
        if bits == 4:
            F.quantize_4bit(x, quant_type=quant_type)
        else:
            F.int8_vectorwise_quant(x.half())
    except Exception as e:
        return f"bitsandbytes has no {bits}-bit backend for device '{device}' ({type(e).__name__}: {str(e)[:120]})"
    return None


class BitsAndBytes:
    name = "bitsandbytes"
    quantized = True

    def problems(self, q: BitsAndBytesQuantization, cfg: TrainConfig) -> list[str]:
        p = []
        if q.bits not in (4, 8):
            p.append(f"quantization.bits={q.bits} must be 4 or 8 with bitsandbytes (quantization=none: no quantization)")
        if cfg.lora.kernel == "fused" and q.bits != 4:
            p.append(f"lora.kernel=fused fuses LoRA into 4-bit layers; use lora.kernel=peft with quantization={q.name}")
        dc = cfg.distributed
        if dc.name == "fsdp":
            if q.bits == 4 and q.quant_storage != dc.param_dtype:
                p.append(f"distributed=fsdp gathers weights as {dc.param_dtype}, but the 4-bit weights are packed as "
                         f"{q.quant_storage}; set quantization.quant_storage={dc.param_dtype} so they travel as stored")
            if q.bits == 8:
                p.append("distributed=fsdp cannot shard LLM.int8 weights (their scales live outside the tensor); use "
                         "quantization=nf4 with quantization.quant_storage=bfloat16, or distributed=ddp")
        return p

    def machine_problems(self, q: BitsAndBytesQuantization, device: str) -> list[str]:
        why = _probe(device, q.bits, str(q.quant_type))
        return [f"quantization={q.name} needs a bitsandbytes backend for '{device}': {why}; install "
                "bitsandbytes>=0.49 (CPU and CUDA backends) or choose quantization=none"] if why else []

    def load_kwargs(self, q: BitsAndBytesQuantization, model_config: Any) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        skip = list(q.skip_modules) or None
        if q.bits == 8:
            return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=q.int8_threshold,
                                                              llm_int8_skip_modules=skip)}
        return {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=str(q.quant_type), bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=torch_dtype(q.compute_dtype), bnb_4bit_quant_storage=torch_dtype(q.quant_storage),
            llm_int8_skip_modules=skip)}

    def after_load(self, model: torch.nn.Module) -> None:
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for its AVX512-bf16 CPU kernel the first time the layer runs in
            # eval mode, and from then on uses that kernel in training too; it has no backward, so input
            # gradients (and every LoRA gradient below that layer) silently go wrong after the first eval.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False

    def unquantized(self, q: BitsAndBytesQuantization) -> list[str]:
        return list(q.skip_modules)

    def weight_bytes(self, q: BitsAndBytesQuantization, shapes: list[tuple[int, int]],
                     dtype_bytes: int) -> list[WeightBytes]:
        numels = [o * i for o, i in shapes]
        n = sum(numels)
        if q.bits == 8:  # int8 values and one fp32 scale per output row
            rows = sum(o for o, _ in shapes)
            return [WeightBytes("base weights, int8", f"{n:,} params x 1 B + fp32 row scales", n + 4 * rows)]
        # per weight: one absmax per 64 values (8-bit with double quant, then one fp32 per 256 of those, a 256-entry
        # fp32 code and an fp32 offset; fp32 without), and the 16-entry fp32 4-bit code
        blocks = [math.ceil(k / BLOCK) for k in numels]
        if q.double_quant:
            consts = sum(b + math.ceil(b / 256) * 4 + 256 * 4 + 4 + 16 * 4 for b in blocks)
        else:
            consts = sum(b * 4 + 16 * 4 for b in blocks)
        return [WeightBytes("base weights, 4-bit", f"{n:,} params x 0.5 B", sum((k + 1) // 2 for k in numels)),
                WeightBytes("quant constants", f"{sum(blocks):,} blocks of {BLOCK}, "
                            + ("8-bit absmax + fp32 per 256" if q.double_quant else "fp32 absmax")
                            + f", codes of {len(blocks)} weights", consts)]

    def dequantizer(self, layer: torch.nn.Module) -> Dequantizer | None:
        if type(getattr(layer, "weight", None)).__name__ != "Params4bit":
            return None
        return DEQUANTIZER

    def weight_only(self, q: BitsAndBytesQuantization) -> bool:
        return q.bits == 4

    def logical_numel(self, param: torch.nn.Parameter) -> int:
        if type(param).__name__ == "Params4bit":  # packed: two 4-bit values per byte of storage
            return param.numel() * param.element_size() * 2
        return param.numel()


def _weight_of(layer: torch.nn.Module) -> torch.Tensor:
    if getattr(layer.weight, "quant_state", None) is None:  # FSDP gathers the weight as a plain tensor
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(layer)
    return layer.weight


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    w = bnbF.dequantize_4bit(weight.data, weight.quant_state)
    return w if w.dtype == dtype else w.to(dtype)


DEQUANTIZER = Dequantizer(_weight_of, _dequantize)
BACKEND = BitsAndBytes()
