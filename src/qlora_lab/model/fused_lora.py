"""A fused LoRA-on-4-bit linear layer: one autograd function instead of PEFT's chain of modules.

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
dropout, its mask. The frozen base weight needs no saved input at all. The matmul order costs (tokens * r)(in + out) for the LoRA terms, never in * out * tokens.

It replaces the forward of PEFT's `lora.Linear4bit` modules in place, so parameters, state dicts and
`save_pretrained` stay PEFT's. It applies where it computes what PEFT does: one active vanilla LoRA adapter (no
DoRA), not merged, inputs in the layer's compute dtype; other modules keep PEFT's forward.

Adapter weights may be fp32 (lora.adapter_dtype=float32): they are then master weights, cast to the compute
dtype for the matmuls (an r x features copy per call) and updated by AdamW in fp32, where bf16 weights would
round away updates smaller than 1/256 of the weight; their gradients come back in fp32.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _dequantize(weight) -> torch.Tensor:
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(weight.data, weight.quant_state)


class LoraLinear4bit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, p: float, training: bool):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        # Dropout as a scaled mask drawn like F.dropout draws it (same RNG use, same bf16 rounding of 1/(1-p)), so
        # masks match PEFT's; the backward needs it for the input gradient of the LoRA branch.
        mask = F.dropout(torch.ones_like(x2), p, True) if p > 0 and training else None
        xd = x2 if mask is None else x2 * mask
        lora_a, lora_b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # fp32 master weights -> compute copies
        w = _dequantize(weight)
        xa = xd @ lora_a.t()
        y = (x2 @ w.t()).addmm_(xa, lora_b.t(), alpha=scale)  # in place: no second tokens x out buffer
        if bias is not None:
            y = y + bias
        del w, xd
        ctx.save_for_backward(x2, mask, xa, lora_a, lora_b)  # x2 is the same tensor the sibling q/k/v layers save
        ctx.weight, ctx.scale, ctx.shape, ctx.has_bias = weight, scale, shape, bias is not None
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, mask, xa, lora_a, lora_b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        g = dy2 @ lora_b
        dx = None
        if ctx.needs_input_grad[0]:
            dx = dy2 @ _dequantize(ctx.weight)
            if mask is None:
                dx.addmm_(g, lora_a, alpha=ctx.scale)
            else:
                dx.addcmul_(g @ lora_a, mask, value=ctx.scale)
            dx = dx.view(ctx.shape)
        xd = x2 if mask is None else x2 * mask
        d_a = torch.mm(g.t(), xd).mul_(ctx.scale) if ctx.needs_input_grad[3] else None
        d_b = torch.mm(dy2.t(), xa).mul_(ctx.scale) if ctx.needs_input_grad[4] else None
        d_bias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, None, d_bias, d_a, d_b, None, None, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """PEFT Linear4bit.forward, fused where it is equivalent (else PEFT's own forward)."""
    adapters = [a for a in self.active_adapters if a in self.lora_A]
    if (self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1
            or adapters[0] in getattr(self, "lora_variant", {})):
        return self._peft_forward(x, *args, **kwargs)
    name = adapters[0]
    lora_a, lora_b = self.lora_A[name].weight, self.lora_B[name].weight
    base = self.base_layer
    # e.g. upcast norms handing over fp32 activations: PEFT casts them, this kernel does not
    if base.compute_dtype is not None and x.dtype != base.compute_dtype:
        return self._peft_forward(x, *args, **kwargs)
    drop = self.lora_dropout[name]
    p = drop.p if isinstance(drop, torch.nn.Dropout) else 0.0
    if getattr(base.weight, "quant_state", None) is None:  # FSDP gathers the weight as a plain tensor
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
    return LoraLinear4bit.apply(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[name]), p,
                                self.training)


def fuse(model: torch.nn.Module) -> int:
    """Swap in the fused forward on every PEFT 4-bit LoRA layer of `model`; returns how many were swapped."""
    from peft.tuners.lora.bnb import Linear4bit

    n = 0
    for module in model.modules():
        if isinstance(module, Linear4bit) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
