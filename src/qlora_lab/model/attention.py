"""Attention over packed rows (`data.packing=true`): no token attends across a document boundary.

The collator (data/packing.py) hands the boundaries in as `cu_seq_lens_q/k` (cumulative document lengths over the
flattened rows, int32, a fixed length) and `max_length_q/k`; they reach this function through the model's forward
kwargs. It is registered with transformers' AttentionInterface under PACKED, and deliberately not with its
AttentionMaskInterface: transformers then builds no mask and never scans position_ids for boundaries (a device
sync per forward), because nothing is inferred here that the collator already knows.

- CUDA, torch >= 2.10: torch.nn.attention.varlen.varlen_attn (flash/cuDNN varlen: no mask, no sync).
- Elsewhere (the CPU the tests run on): SDPA with the block-diagonal causal mask built from the boundaries, once
  per forward (cached on the boundary tensor, shared by every layer).

Anything that would quietly switch isolation off is an error: a padding mask, a KV cache (keys longer than the
queries), or a call without boundaries. Generation, which pads and caches, switches the model to SDPA for its
duration (`unpacked`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.nn.functional as F

PACKED = "qlab_packed"

try:  # torch >= 2.10
    from torch.nn.attention.varlen import varlen_attn

    _VARLEN_ARGS = set(inspect.signature(varlen_attn).parameters)
except ImportError:
    varlen_attn, _VARLEN_ARGS = None, set()
_VARLEN_GQA = "enable_gqa" in _VARLEN_ARGS  # torch >= 2.12
# Causal masking is `window_size=(-1, 0)` in newer releases and `is_causal=True` in the first (2.10).
_VARLEN_CAUSAL = {"window_size": (-1, 0)} if "window_size" in _VARLEN_ARGS else {"is_causal": True}


def _varlen_serves(is_cuda: bool, dtype: torch.dtype) -> bool:
    """varlen_attn (flash) runs on CUDA in half precision, where torch has it."""
    return is_cuda and varlen_attn is not None and dtype in (torch.float16, torch.bfloat16)


def packed_path(device: str, dtype: torch.dtype) -> str:
    """Which kernel packed rows attend with on `device` in `dtype` (printed when a packed run starts)."""
    if _varlen_serves(device == "cuda", dtype):
        return "varlen_attn (flash, per-document cu_seqlens)"
    return "SDPA with a block-diagonal causal mask"


def block_causal_mask(cu: torch.Tensor, rows: int, length: int) -> torch.Tensor:
    """[rows, 1, length, length] bool: token i sees token j iff same document and j <= i."""
    compiling = torch.compiler.is_compiling()  # inside a compiled layer the compiler keeps what it needs
    cached = None if compiling else getattr(cu, "_qlab_mask", None)
    if cached is not None and cached.shape[0] == rows:
        return cached
    t = torch.arange(rows * length, device=cu.device, dtype=cu.dtype)
    doc = (torch.searchsorted(cu, t, right=True) - 1).view(rows, length)
    i = torch.arange(length, device=cu.device)
    mask = ((doc[:, :, None] == doc[:, None, :]) & (i[:, None] >= i[None, :]))[:, None]
    if not compiling:
        cu._qlab_mask = mask
    return mask


def packed_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, Hq, L, D], key/value [B, Hkv, L, D] -> ([B, L, Hq, D], None)."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise ValueError(f"attn_implementation={PACKED} needs the packed batch's document boundaries "
                         "(cu_seq_lens_q/k from the packing collator); an unpacked batch must run with sdpa")
    if attention_mask is not None:
        raise ValueError("a packed batch got an attention_mask: padding masks would replace document isolation; "
                         "packed batches carry no attention_mask")
    length, dim = query.shape[2], query.shape[3]
    if key.shape[2] != length:
        raise ValueError(f"packed attention got {key.shape[2]} keys for {length} queries (a KV cache?): packed rows "
                         "are trained without a cache (model.config.use_cache=false)")
    p = dropout if module.training else 0.0
    # The first varlen_attn (torch 2.10) takes no scale and scales by 1/sqrt(dim): another scale takes the mask path.
    scale_ok = "scale" in _VARLEN_ARGS or scaling is None or abs(scaling - dim ** -0.5) <= 1e-6 * dim ** -0.5
    if p == 0.0 and scale_ok and _varlen_serves(query.is_cuda, query.dtype):
        return _varlen(query, key, value, cu, kwargs, scaling), None
    return _masked(query, key, value, cu, scaling, p)


def _varlen(query, key, value, cu, kwargs, scaling) -> torch.Tensor:
    rows, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * length, heads, dim)
    k = key.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    v = value.transpose(1, 2).reshape(rows * length, kv_heads, dim)
    extra = {"scale": scaling} if "scale" in _VARLEN_ARGS else {}
    if kv_heads != heads:
        if _VARLEN_GQA:
            extra["enable_gqa"] = True
        else:  # torch 2.10/2.11 have no enable_gqa
            k, v = (x.repeat_interleave(heads // kv_heads, dim=1) for x in (k, v))
    max_len = int(kwargs.get("max_length_q") or length)
    out = varlen_attn(q, k, v, cu, kwargs.get("cu_seq_lens_k", cu), max_len, max_len, **_VARLEN_CAUSAL, **extra)
    return out.view(rows, length, heads, dim)


def _masked(query, key, value, cu, scaling, p) -> tuple[torch.Tensor, None]:
    rows, heads, length, _ = query.shape
    mask = block_causal_mask(cu, rows, length)
    if key.shape[1] != heads:
        key, value = (x.repeat_interleave(heads // key.shape[1], dim=1) for x in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling, dropout_p=p)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED, packed_attention)


@contextlib.contextmanager
def unpacked(model) -> Iterator[None]:
    """Run `model` with SDPA (padding masks, KV cache) for the duration, e.g. to generate; packed again after."""
    inner = getattr(model, "module", model)  # under DDP, the wrapped model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    packed = getattr(base.config, "_attn_implementation", None) == PACKED
    if packed:
        base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if packed:
            base.set_attn_implementation(PACKED)
