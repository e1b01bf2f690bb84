"""A fused LoRA-on-a-quantized-linear layer: one autograd function instead of PEFT's chain of modules.

PEFT computes `base(x).clone() + lora_B(lora_A(dropout(x))) * scaling`: a defensive copy of the full output,
a scaling multiply and an add, each a pass over a (tokens x out_features) tensor, and in backward the same again
plus a separate add of the two input gradients. On the Phi-4-mini shape these passes were 1/3 of the GPU time
of a step (bench/results, profile). Here the LoRA term rides on the base GEMM's epilogue instead:

    forward   W = dequant(W4)                          (4-bit -> compute dtype, not kept)
              xa = drop(x) @ A^T                       (tokens x r)
              y  = (x @ W^T).addmm_(xa, B^T, alpha=s)  (the add and the scale happen inside the GEMM, in place)
    backward  g  = dy @ B                              (tokens x r)
              dx = (dy @ dequant(W4)).addmm_(g, A, alpha=s)   (g @ A times the dropout mask, with dropout)
              dA = s * g^T @ drop(x),  dB = s * dy^T @ xa

Saved for backward: x (shared with the sibling layers reading the same input), xa (tokens x r) and, with
dropout, its bool mask (1 byte an element; the scaled mask is made again in backward). The frozen base weight needs no saved input at all. The matmul order costs (tokens * r)(in + out) for the LoRA terms, never in * out * tokens.

It replaces the forward of PEFT's LoRA modules in place, so parameters, state dicts and `save_pretrained` stay
PEFT's, on every layer whose base weight the quantization backend can dequantize (`Backend.dequantizer`:
bitsandbytes' 4-bit weights, torchao's NF4Tensor). It applies where it computes what PEFT does: one active vanilla
LoRA adapter (no DoRA), not merged, inputs in the layer's compute dtype; other modules keep PEFT's forward.

Adapter weights may be fp32 (lora.adapter_dtype=float32): they are then master weights, cast to the compute
dtype for the matmuls (an r x features copy per call) and updated by AdamW in fp32, where bf16 weights would
round away updates smaller than 1/256 of the weight; their gradients come back in fp32.
"""

from __future__ import annotations

import types
from typing import Callable

import torch

from qlora_lab.model.dropout import HashDropout
from qlora_lab.model.quantize import Backend


class LoraLinearQuantized(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, dequantize: Callable[[torch.Tensor, torch.dtype], torch.Tensor], bias, lora_a, lora_b,
                scale: float, keep, p: float):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # `keep`: the adapter's dropout mask (bool, model/dropout.py: the one PEFT's modules apply too) or None, the
        # kept elements scaled by 1/(1-p); the backward needs it for the input gradient of the LoRA branch. Kept
        # for backward as the bool (1 byte an element), its scaled form made again there.
        keep = None if keep is None else keep.reshape(x2.shape)
        mask = _scaled(keep, x.dtype, p)
        xd = x2 if mask is None else x2 * mask
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # fp32 master weights -> compute copies
        w = dequantize(weight, x.dtype)
        xa = xd @ lora_a.t()
        y = (x2 @ w.t()).addmm_(xa, lora_b.t(), alpha=scale)  # in place: no second tokens x out buffer
        if bias is not None:
            y = y + bias
        del w, xd, mask
        ctx.save_for_backward(x2, keep, xa, lora_a, lora_b)  # x2 is the same tensor the sibling q/k/v layers save
        ctx.weight, ctx.dequantize = weight, dequantize
        ctx.scale, ctx.shape, ctx.has_bias, ctx.p = scale, shape, bias is not None, p
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, keep, xa, lora_a, lora_b = ctx.saved_tensors
        mask = _scaled(keep, x2.dtype, ctx.p)
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = dy2 @ lora_b
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ ctx.dequantize(ctx.weight, dy2.dtype)
            if mask is None:
                dx.addmm_(g, lora_a, alpha=ctx.scale)
            else:
                dx.addcmul_(g @ lora_a, mask, value=ctx.scale)
            dx = dx.view(ctx.shape)
        xd = x2 if mask is None else x2 * mask
        d_a = torch.mm(g.t(), xd).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        d_b = torch.mm(dy2.t(), xa).mul_(ctx.scale) if ctx.needs_input_grad[5] else None
        d_bias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return dx, None, None, d_bias, d_a, d_b, None, None, None


def _scaled(keep: torch.Tensor | None, dtype: torch.dtype, p: float) -> torch.Tensor | None:
    """The dropout mask as the LoRA branch multiplies by it: kept elements 1/(1-p), dropped ones 0."""
    return None if keep is None else keep.to(dtype) * (1.0 / (1.0 - p))


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT's LoRA forward, fused where it is equivalent (else PEFT's own forward)."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {})):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    base = self.base_layer
    # e.g. upcast norms handing over fp32 activations: PEFT casts them, this kernel does not (bitsandbytes' layers
    # say their compute dtype; torchao's NF4 weight keeps the dtype it dequantizes to)
    compute = getattr(base, "compute_dtype", None) or base.weight.dtype
    if x.dtype != compute:
        return self._peft_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    if isinstance(drop, torch.nn.Dropout) and drop.p > 0:  # PEFT's own, drawn from the global RNG: not this kernel's
        return self._peft_forward(x, *args, **kwargs)
    keep, p = (drop.mask(x), drop.p) if isinstance(drop, HashDropout) and self.training and drop.p > 0 else (None, 0.0)
    deq = self._dequantizer
    return LoraLinearQuantized.apply(x, deq.weight_of(base), deq.dequantize, base.bias, lora_a, lora_b,
                                     float(self.scaling[name]), keep, p)


def fuse(model: torch.nn.Module, backend: Backend) -> int:
    """Swap in the fused forward on every PEFT LoRA layer of `model` whose base weight `backend` quantized; returns
    how many were swapped."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or hasattr(module, "_peft_forward"):
            continue
        dequantizer = backend.dequantizer(module.base_layer)
        if dequantizer is None:
            continue
        module._dequantizer = dequantizer
        module._peft_forward = module.forward
        module.forward = types.MethodType(_fused_forward, module)
        n += 1
    return n
