"""LoRA dropout whose masks are a function of (seed, micro-batch, layer), not of a random number stream.

PEFT draws each adapter's dropout mask from the global RNG, so a mask depends on everything drawn before it: two
adapters training side by side in one process (a fused sweep, runner/fuse.py) would each see other masks than alone,
and activation checkpointing must save and restore RNG state to recompute a layer. Here the mask of element i of
LoRA layer `l` (its module path) at global micro-batch `m` of a run seeded `s` is `hash(i, key(s, m, l)) >= p`: a few integer
multiply-xorshift rounds over 31 bits (no overflow in int64), the same on every device and kernel (PEFT's modules or
the fused one), at recompute, and whether a job trains alone or beside others. Its keep probability is 1 - p to
within 2^-24 and neighbouring elements are uncorrelated (tests/test_dropout.py measures both).

The micro-batch index and the layer index live in tensors (`MicroBatch.index`, a buffer per layer), so a compiled
layer reads them as inputs instead of specializing on them: one graph for every layer and every step.
"""

from __future__ import annotations

import zlib

import torch

M31 = (1 << 31) - 1
CHUNK = 1 << 24  # elements hashed at once outside a compiled graph: bounds the int64 temporaries (128 MiB each)


class MicroBatch:
    """The global micro-batch a model is computing, set by the training step before each forward (every process
    and every fused job sees the same index for the same rows)."""

    def __init__(self) -> None:
        self.index = torch.zeros((), dtype=torch.int64)
        # Rows of the flattened tokens before the piece being computed (model.mlp_chunk runs an MLP in pieces): a
        # piece's masks are the whole tensor's rows at that offset
        self.row_offset = torch.zeros((), dtype=torch.int64)

    def set(self, micro: int) -> None:
        self.index.fill_(micro)

    def to(self, device) -> "MicroBatch":
        self.index = self.index.to(device)
        self.row_offset = self.row_offset.to(device)
        return self


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Three multiply-xorshift rounds on 31-bit values held in int64 (every product stays below 2^62)."""
    for mul, shift in ((0x2C1B3C6D, 12), (0x297A2D39, 15), (0x1B873593, 13)):
        x = (x * mul) & M31
        x = x ^ (x >> shift)
    return x


def layer_key(seed: int, layer: str) -> int:
    """A 31-bit key for the LoRA layer named `layer` (its module path) of a run seeded `seed`: by name, so a layer
    keeps its key whichever other layers an adapter targets (mixed in Python once, at install)."""
    x = torch.tensor([(seed * 0x9E3779B1 + zlib.crc32(layer.encode()) * 0x85EBCA77 + 0x165667B1) & M31],
                     dtype=torch.int64)
    return int(_mix(x)[0])


def keep_mask(shape: torch.Size, p: float, key: torch.Tensor, micro: torch.Tensor, device: torch.device,
              row_offset: torch.Tensor | int = 0) -> torch.Tensor:
    """Which elements of `shape` dropout keeps (bool; the kept ones are scaled by 1/(1-p) by the caller), for a
    layer's `key` at micro-batch `micro`; `row_offset`: where these rows start among the whole input's (flattened
    over all but the last dimension). A bool mask is what backward keeps: 1 byte an element."""
    numel = shape.numel()
    base = _mix((key + micro * 0x5BD1E995) & M31)  # 0-dim: this layer at this micro-batch
    first = row_offset * shape[-1]  # this piece's first element among the whole input's
    threshold = int(p * (1 << 24))
    parts = []
    for start in range(0, numel, CHUNK if not torch.compiler.is_compiling() else numel):
        i = torch.arange(start, min(start + CHUNK, numel) if not torch.compiler.is_compiling() else numel,
                         device=device, dtype=torch.int64) + first
        u = _mix((i * 0x2545F491 + base) & M31) >> 7  # 24 uniform bits
        parts.append(u >= threshold)
    mask = parts[0] if len(parts) == 1 else torch.cat(parts)
    return mask.view(shape)


class HashDropout(torch.nn.Module):
    """Dropout with a counter-based mask (see the module docstring); identity in eval mode or at p == 0."""

    def __init__(self, p: float, seed: int, layer: str, micro: MicroBatch):
        super().__init__()
        self.p, self.micro = float(p), micro
        self.key_value = layer_key(seed, layer)  # what decides the masks with p: equal for equally seeded adapters
        self.register_buffer("key", torch.tensor(self.key_value, dtype=torch.int64), persistent=False)

    @property
    def active(self) -> bool:
        return self.training and self.p > 0

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The kept elements of `x` (bool)."""
        index, offset = self.micro.index, self.micro.row_offset
        if index.device != x.device:
            index, offset = index.to(x.device), offset.to(x.device)
        return keep_mask(x.shape, self.p, self.key, index, x.device, offset)

    def dropped(self, x: torch.Tensor) -> torch.Tensor:
        """The elements of `x` dropout zeroes (bool): a function of the shape, key, p and micro-batch only, so
        adapters with the same key and p at the same layer (a fused group's equally seeded jobs) can share one."""
        return ~self.mask(x)

    def apply(self, x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        # the scale by a number keeps nothing for backward, masked_fill its bool mask: 1 byte an element
        return (x * (1.0 / (1.0 - self.p))).masked_fill(dropped, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return self.apply(x, self.dropped(x))

    def extra_repr(self) -> str:
        return f"p={self.p}, counter-based"


def install(model: torch.nn.Module, seed: int, micro: MicroBatch) -> int:
    """Replace every PEFT LoRA layer's dropout (each adapter's, p > 0) with a HashDropout keyed by the layer's module
    path below the PEFT wrapper; returns how many were replaced."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for path, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, drop in list(layer.lora_dropout.items()):
            if isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                device = layer.lora_A[name].weight.device
                layer.lora_dropout[name] = HashDropout(drop.p, seed, path, micro).to(device)
                n += 1
    return n
