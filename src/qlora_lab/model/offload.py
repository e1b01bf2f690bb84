"""Offloaded activation checkpointing (`checkpointing=offload`): the inputs each checkpointed layer saves wait in
pinned host memory between forward and backward, copied on a side stream and prefetched one layer ahead."""

from __future__ import annotations

import torch


def offloaded(checkpoint_fn, offload: "HostOffload | None"):
    """Wrap a layer's checkpoint call so that what it saves goes through `offload` (None: the CPU, nowhere to go)."""

    def run(*args, **kwargs):
        if offload is None:
            return checkpoint_fn(*args, **kwargs)
        with torch.autograd.graph.saved_tensors_hooks(offload.pack, offload.unpack):
            return checkpoint_fn(*args, **kwargs)

    return run


class _Saved:
    __slots__ = ("host", "device", "stored", "loaded", "gpu", "prev")


class HostOffload:
    """Saved-tensor hooks that keep checkpointed layer inputs in pinned host memory, with the copies overlapped.

    Forward: the copy to the host runs on a side stream while the next layers compute (the GPU tensor is kept
    alive for the side stream until the copy is done). Backward: layers come back in reverse order, so when one
    layer's input is unpacked the previous layer's input is already being copied back on the side stream
    (double buffering): its recompute then waits on an event, not on a blocking copy. Pinned buffers come from
    torch's caching host allocator, which reuses them by size class (bounded however the sequence lengths vary)
    and only after the copies recorded on them are done. Small tensors (RoPE tables, masks) stay on the GPU.
    """

    MIN_BYTES = 1 << 20

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.last: _Saved | None = None

    def pack(self, t: torch.Tensor):
        if not t.is_cuda or t.numel() * t.element_size() < self.MIN_BYTES:
            return t
        s = _Saved()
        s.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        s.device, s.gpu, s.loaded = t.device, None, None
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            s.host.copy_(t, non_blocking=True)
            s.stored = torch.cuda.Event()
            s.stored.record()
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        s.prev = self.last if self.last is not None and self.last.host is not None else None
        self.last = s
        return s

    def _fetch(self, s: _Saved) -> None:
        if s.loaded is not None:
            return
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(s.stored)
            s.gpu = s.host.to(s.device, non_blocking=True)
            s.loaded = torch.cuda.Event()
            s.loaded.record()

    def unpack(self, s):
        if not isinstance(s, _Saved):
            return s
        first = s.host is not None
        if first:
            self._fetch(s)
            if s.prev is not None and s.prev.host is not None:
                self._fetch(s.prev)  # the layer before runs next in backward: start its copy now
        torch.cuda.current_stream().wait_event(s.loaded)
        if first:
            s.gpu.record_stream(torch.cuda.current_stream())
            s.host, s.prev = None, None  # back to the host allocator once the copy recorded on it is done
        return s.gpu
