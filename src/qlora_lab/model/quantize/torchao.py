"""The torchao backend: NF4 as torchtune's QLoRA stores it (`NF4Tensor`), through transformers' TorchAoConfig.

conf/quantization/torchao_nf4.yaml. Each linear weight becomes an NF4Tensor: 4-bit NormalFloat codes in blocks of
`block_size` values, each block's absmax quantized to int8 in groups of `scaler_block_size` blocks (double
quantization, always on), the weight's dtype (model.dtype) kept for dequantizing. A plain nn.Linear with such a
weight dequantizes in its forward and backward (torchao's `linear_nf4`), so PEFT wraps it as any linear layer.

torchao needs a weight's block count to be a multiple of the scaler block; a model whose shapes are not (SmolLM2's
k/v projections have 1,728 blocks) gets the largest power-of-two scaler block that divides every weight's, printed
at load; a weight whose element count is not a multiple of `block_size` stays in model.dtype.
"""

from __future__ import annotations

import logging
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch

from qlora_lab.core.effects import Effect, key
from qlora_lab.core.schema import QuantizationConfig, TrainConfig
from qlora_lab.model.quantize import Dequantizer, WeightBytes

log = logging.getLogger(__name__)


@dataclass
class TorchaoQuantization(QuantizationConfig):
    block_size: int = key(Effect.base)  # values per NF4 block (one absmax each); QLoRA's 64
    scaler_block_size: int = key(Effect.base)  # blocks per int8-quantized absmax group; QLoRA's 256, or the largest
    #                                            power of two that divides every weight's block count
    skip_modules: list[str] = key(Effect.base)  # module names left in model.dtype


SCHEMA = TorchaoQuantization


def scaler_block(q: TorchaoQuantization, shapes: list[tuple[int, int]]) -> int:
    """The scaler block all the model's quantized weights can take: q.scaler_block_size, or the largest power of two
    below it that divides every weight's block count."""
    blocks = [o * i // q.block_size for o, i in shapes if (o * i) % q.block_size == 0]
    size = q.scaler_block_size
    while size > 1 and any(b % size for b in blocks):
        size //= 2
    return size


def linear_shapes(model_config: Any, skip: list[str]) -> dict[str, tuple[int, int]]:
    """Full name -> (out, in) of every nn.Linear of the model but the LM head and `skip` (on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    return {n: (m.out_features, m.in_features) for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not head and n.rsplit(".", 1)[-1] not in skip}


class Torchao:
    name = "torchao"
    quantized = True

    def problems(self, q: TorchaoQuantization, cfg: TrainConfig) -> list[str]:
        p = []
        if q.block_size < 2 or q.block_size & (q.block_size - 1):
            p.append(f"quantization.block_size={q.block_size} must be a power of two >= 2 (QLoRA: 64)")
        if q.scaler_block_size < 1 or q.scaler_block_size & (q.scaler_block_size - 1):
            p.append(f"quantization.scaler_block_size={q.scaler_block_size} must be a power of two (QLoRA: 256)")
        if cfg.distributed.name == "fsdp":
            p.append("quantization=torchao_nf4 with distributed=fsdp is not tested here; use distributed=ddp, or "
                     "quantization=nf4 with quantization.quant_storage=bfloat16 for FSDP")
        return p

    def machine_problems(self, q: TorchaoQuantization, device: str) -> list[str]:
        if importlib.util.find_spec("torchao") is None:
            return [f"quantization={q.name} needs torchao (pip install torchao) or choose quantization=nf4 "
                    "(bitsandbytes)"]
        return []

    def load_kwargs(self, q: TorchaoQuantization, model_config: Any) -> dict[str, Any]:
        from torchao.prototype._nf4tensor_api import NF4WeightOnlyConfig
        from transformers import TorchAoConfig

        shapes = linear_shapes(model_config, list(q.skip_modules))
        nf4 = NF4WeightOnlyConfig()
        nf4.block_size, nf4.scaler_block_size = q.block_size, scaler_block(q, list(shapes.values()))
        if nf4.scaler_block_size != q.scaler_block_size:
            log.info(f"quantization={q.name}: scaler blocks of {nf4.scaler_block_size} (the model's weights "
                  f"do not divide into blocks of {q.scaler_block_size})")
        keep = list(q.skip_modules) + [n for n, (o, i) in shapes.items() if (o * i) % q.block_size]
        return {"quantization_config": TorchAoConfig(quant_type=nf4, modules_to_not_convert=keep or None)}

    def after_load(self, model: torch.nn.Module) -> None:
        pass

    def unquantized(self, q: TorchaoQuantization) -> list[str]:
        return list(q.skip_modules)

    def weight_bytes(self, q: TorchaoQuantization, shapes: list[tuple[int, int]],
                     dtype_bytes: int) -> list[WeightBytes]:
        """NF4Tensor's buffers: the 4-bit codes, one int8 scaler per block, one factor (model.dtype) per scaler
        block, the scalers' mean and the 16-entry code (model.dtype) per weight; a weight that does not divide into
        blocks stays in model.dtype. A weight of a single scaler block keeps its factor as a view of a whole
        per-block tensor (torchao's `double_quantize_scalers`: the copy that would shrink it only happens for a
        non-contiguous view): a factor per block, measured."""
        size = scaler_block(q, shapes)
        kept = [o * i for o, i in shapes if (o * i) % q.block_size == 0]
        plain = sum(o * i for o, i in shapes if (o * i) % q.block_size)
        blocks = [k // q.block_size for k in kept]
        consts = sum(b + (b if b == size else b // size) * dtype_bytes + 17 * dtype_bytes for b in blocks)
        items = [WeightBytes("base weights, NF4 (torchao)", f"{sum(kept):,} params x 0.5 B", sum(kept) // 2),
                 WeightBytes("quant constants", f"{sum(blocks):,} blocks of {q.block_size}: int8 scaler + a factor per "
                             f"{size} blocks, codes of {len(kept)} weights", consts)]
        if plain:
            items.append(WeightBytes("base weights not divisible into blocks", f"{plain:,} x {dtype_bytes} B",
                                     plain * dtype_bytes))
        return items

    def dequantizer(self, layer: torch.nn.Module) -> Dequantizer | None:
        if type(getattr(layer, "weight", None)).__name__ != "NF4Tensor":
            return None
        return DEQUANTIZER

    def weight_only(self, q: TorchaoQuantization) -> bool:
        return True

    def logical_numel(self, param: torch.nn.Parameter) -> int:
        return param.numel()  # an NF4Tensor has its original shape


def _weight_of(layer: torch.nn.Module) -> torch.Tensor:
    return layer.weight


def _dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return weight.to(dtype)  # NF4Tensor.to(dtype) dequantizes


DEQUANTIZER = Dequantizer(_weight_of, _dequantize)
BACKEND = Torchao()
