"""model.mlp_chunk: each decoder layer's MLP run over the tokens in pieces, each piece recomputed in backward.

At long contexts what binds is not attention (varlen/flash keeps no L^2 buffer) nor the loss (liger keeps no
logits) but the MLP: its gate, up and activation outputs are 3 x intermediate_size values per token (Llama-3-8B:
~86 KB a token in bf16, 11 GiB at 128k tokens) in a layer's recompute and backward. The MLP works token by token,
so running it `chunk` tokens at a time, each piece under (non-reentrant) activation checkpointing, computes the same
values while holding one piece's intermediates: one more MLP forward per piece in backward. LoRA dropout masks are
the whole tensor's (the piece tells the masks where its rows start: model/dropout.py).
"""

from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint

from qlora_lab.model.dropout import MicroBatch


def _tiled_forward(self, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    n, chunk = rows.shape[0], self._qlab_chunk
    if n <= chunk or not torch.is_grad_enabled():
        return self._qlab_forward(x)
    micro: MicroBatch = self._qlab_micro

    def piece(part: torch.Tensor, start: int) -> torch.Tensor:
        micro.row_offset.fill_(start)  # set again when backward recomputes it
        try:
            return self._qlab_forward(part)
        finally:
            micro.row_offset.fill_(0)

    outs = [checkpoint(piece, rows[s:s + chunk], s, use_reentrant=False) for s in range(0, n, chunk)]
    return torch.cat(outs).view(*x.shape[:-1], outs[0].shape[-1])


def tile_mlps(model: torch.nn.Module, chunk: int, micro: MicroBatch) -> int:
    """Run every decoder layer's `mlp` `chunk` tokens at a time; returns how many MLPs were tiled."""
    n = 0
    for module in model.modules():
        mlp = getattr(module, "mlp", None)
        if isinstance(mlp, torch.nn.Module) and not hasattr(mlp, "_qlab_forward"):
            mlp._qlab_forward, mlp._qlab_chunk, mlp._qlab_micro = mlp.forward, chunk, micro
            mlp.forward = types.MethodType(_tiled_forward, mlp)
            n += 1
    return n
