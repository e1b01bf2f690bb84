"""Stage 2 (quantize): quantization backends as plug-ins.

A backend is one module in this package that defines `BACKEND`, an object with the methods of `Backend` below, and
`SCHEMA`, the dataclass of its config keys (extending `core.schema.QuantizationConfig`); one YAML under
conf/quantization/ names it (`backend: <name>`, starting from its schema: `/quantization_schema/<name>@_here_`).
The rest of the code asks the backend through this module (what from_pretrained needs, the ledger's bytes per
weight, how the fused LoRA kernel dequantizes a base weight, whether FSDP can shard it, what it cannot run on) and
never names a quantization library. Quantization happens while the weights load (stage 1), layer by layer, so a
model never exists in full precision on the device.

Backends: `bitsandbytes` (nf4, fp4, int8), `torchao` (NF4, as torchtune's QLoRA), `none` (a 16-bit base).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from qlora_lab.core.schema import QuantizationConfig, TrainConfig


@dataclass(frozen=True)
class Dequantizer:
    """How the fused LoRA kernel (model/fused_lora.py) reads a quantized base weight: `weight_of(layer)` is the tensor
    to pass along (made whole where a wrapper such as FSDP gathered it), `dequantize(weight, dtype)` the full matrix.
    Both are module-level functions, the same objects for every layer, so compiled layers share one graph."""

    weight_of: Callable[[torch.nn.Module], torch.Tensor]
    dequantize: Callable[[torch.Tensor, torch.dtype], torch.Tensor]


@dataclass
class WeightBytes:
    """One line of the memory ledger for the base's linear weights."""

    name: str
    inputs: str  # the formula's inputs, printed beside the figure
    bytes: int


class Backend(Protocol):
    name: str  # quantization.backend
    quantized: bool  # False: the base keeps model.dtype (LoRA on a 16-bit base)

    def problems(self, q: Any, cfg: TrainConfig) -> list[str]:
        """Every problem of this backend's keys, alone and with the rest of the config (FSDP among them); pure."""

    def machine_problems(self, q: Any, device: str) -> list[str]:
        """Why it cannot quantize on `device` here (library missing, no kernel for the device); empty if it can."""

    def load_kwargs(self, q: Any, model_config: Any) -> dict[str, Any]:
        """What `from_pretrained` takes to quantize while loading (`quantization_config=...`), for this model."""

    def after_load(self, model: torch.nn.Module) -> None:
        """Anything the quantized model needs before it trains."""

    def unquantized(self, q: Any) -> list[str]:
        """Module names (last parts) this config leaves in model.dtype besides the LM head."""

    def weight_bytes(self, q: Any, shapes: list[tuple[int, int]], dtype_bytes: int) -> list[WeightBytes]:
        """Memory of the base's linear weights ((out, in) of each) and their constants; `dtype_bytes`: model.dtype's."""

    def dequantizer(self, layer: torch.nn.Module) -> Dequantizer | None:
        """For a linear layer this backend quantized: how the fused LoRA kernel dequantizes its weight; None for a
        layer it did not quantize."""

    def logical_numel(self, param: torch.nn.Parameter) -> int:
        """How many weights `param` stands for (a packed 4-bit tensor holds two per byte)."""

    def weight_only(self, q: Any) -> bool:
        """Whether a quantized layer computes with its dequantized weights and nothing else rounded (merging an adapter
        into them reproduces the run as trained: qlora-lab export); LLM.int8 also rounds activations."""


SCHEMA_GROUP = "quantization_schema"  # conf/quantization/*.yaml start from /quantization_schema/<backend>@_here_


def _discover() -> dict[str, tuple[Backend, type]]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "BACKEND"):
            found[module.BACKEND.name] = (module.BACKEND, module.SCHEMA)
    return found


BACKENDS = _discover()


def backend_of(q: QuantizationConfig) -> Backend:
    try:
        return BACKENDS[q.backend][0]
    except KeyError:
        raise ValueError(f"quantization.backend={q.backend!r} is not a backend; the backends are "
                         f"{', '.join(sorted(BACKENDS))} (modules of qlora_lab.model.quantize)") from None


def register_schemas(store) -> None:
    """Each backend's schema in Hydra's ConfigStore, as /quantization_schema/<name>."""
    for name, (_, schema) in BACKENDS.items():
        store.store(group=SCHEMA_GROUP, name=name, node=schema)


def config_problems(cfg: TrainConfig) -> list[str]:
    """The quantization config's problems: the backend's own, and what other groups ask of any backend."""
    q = cfg.quantization
    if q.backend not in BACKENDS:
        return [f"quantization.backend={q.backend!r} is not a backend; use one of {', '.join(sorted(BACKENDS))}"]
    backend, schema = BACKENDS[q.backend]
    p = []
    if not isinstance(q, schema):
        p.append(f"quantization={q.name} names backend {q.backend} but its keys are {type(q).__name__}'s; start the "
                 f"YAML from /{SCHEMA_GROUP}/{q.backend}@_here_")
    lo = cfg.lora
    if lo.init in ("pissa", "loftq") and backend.quantized:
        p.append(f"lora.init={lo.init} initializes from the full-precision weights; use quantization=none "
                 "(and quantize the residual model afterwards), or lora.init=default with a quantized base")
    return p + backend.problems(q, cfg)


def machine_problems(cfg: TrainConfig, device: str) -> list[str]:
    return backend_of(cfg.quantization).machine_problems(cfg.quantization, device)


def load_kwargs(q: QuantizationConfig, model_config: Any) -> dict[str, Any]:
    return backend_of(q).load_kwargs(q, model_config)
