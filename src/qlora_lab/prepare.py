"""Stage 3 (prepare): freeze the base, pick what stays in fp32, and set up activation checkpointing.

Unlike peft's `prepare_model_for_kbit_training`, nothing is upcast by default: that helper casts every
non-quantized parameter (embeddings and the LM head included) to fp32, which costs several GiB on a
large-vocabulary model and slows every matmul that touches them. `model.upcast=all` restores it.
"""

from __future__ import annotations

import torch

from qlora_lab.config import CheckpointingConfig, ModelConfig


def prepare_model(model: torch.nn.Module, m: ModelConfig, ck: CheckpointingConfig, device: str) -> torch.nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    for module in model.modules():
        # bitsandbytes repacks a 4-bit weight for its AVX512-bf16 CPU kernel the first time the layer runs in
        # eval mode, and from then on uses that kernel in training too; it has no backward, so input
        # gradients (and every LoRA gradient below that layer) silently go wrong after the first eval.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    if m.upcast == "all":
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    elif m.upcast == "norms":
        for name, module in model.named_modules():
            if "norm" in type(module).__name__.lower():
                module.float()
    if ck.enabled:
        enable_checkpointing(model, ck, device)
        # The reentrant implementation only backpropagates into a checkpointed block whose input requires
        # grad; with a frozen embedding nothing would, and the LoRA weights inside would get no gradient.
        model.enable_input_require_grads()
    return model


def enable_checkpointing(model: torch.nn.Module, ck: CheckpointingConfig, device: str) -> None:
    kwargs = {"use_reentrant": ck.use_reentrant}
    # transformers renamed the method during 5.x; keep working on releases before and after the rename.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if not ck.offload_to_cpu:
        return
    # Offload only what checkpointing saves (each layer's inputs), not the logits and loss buffers: wrap each
    # checkpointed layer's checkpoint call, so those tensors wait in host memory.
    layers = [m for m in model.modules() if getattr(m, "_gradient_checkpointing_func", None) is not None]
    if not layers:
        raise ValueError(f"checkpointing=offload: {type(model).__name__} has no checkpointed layers to offload")
    offload = HostOffload() if device == "cuda" else None
    for layer in layers:
        layer._gradient_checkpointing_func = _offloaded(layer._gradient_checkpointing_func, offload)


def _offloaded(checkpoint_fn, offload: "HostOffload | None"):
    def run(*args, **kwargs):
        if offload is None:  # on the CPU there is nowhere to offload to
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
