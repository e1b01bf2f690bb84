"""No quantization: LoRA on a base kept in model.dtype (conf/quantization/none.yaml), the 16-bit baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qlora_lab.core.schema import QuantizationConfig, TrainConfig
from qlora_lab.model.quantize import Dequantizer, WeightBytes


@dataclass
class NoQuantization(QuantizationConfig):
    pass


SCHEMA = NoQuantization


class NoBackend:
    name = "none"
    quantized = False

    def problems(self, q: NoQuantization, cfg: TrainConfig) -> list[str]:
        if cfg.lora.kernel == "fused":
            return ["lora.kernel=fused fuses LoRA into quantized layers; use lora.kernel=peft with quantization=none"]
        return []

    def machine_problems(self, q: NoQuantization, device: str) -> list[str]:
        return []

    def load_kwargs(self, q: NoQuantization, model_config: Any) -> dict[str, Any]:
        return {}

    def after_load(self, model: torch.nn.Module) -> None:
        pass

    def unquantized(self, q: NoQuantization) -> list[str]:
        return []

    def weight_bytes(self, q: NoQuantization, shapes: list[tuple[int, int]], dtype_bytes: int) -> list[WeightBytes]:
        n = sum(o * i for o, i in shapes)
        return [WeightBytes(f"base weights, {dtype_bytes * 8}-bit", f"{n:,} params x {dtype_bytes} B", n * dtype_bytes)]

    def dequantizer(self, layer: torch.nn.Module) -> Dequantizer | None:
        return None

    def weight_only(self, q: NoQuantization) -> bool:
        return True

    def logical_numel(self, param: torch.nn.Parameter) -> int:
        return param.numel()


BACKEND = NoBackend()
