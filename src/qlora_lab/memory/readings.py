"""Memory readings, in GiB.

On CUDA the caching allocator's counters; each per-step peak is reset after it is read, so a step's figure is
that step's own. On the CPU there is no allocator to ask: `peak_allocated_gib` is the process's resident set at the
time of the reading and `peak_reserved_gib` its peak resident set so far.
"""

from __future__ import annotations

import resource
import sys

import torch

GIB = 1024**3


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def memory_now(device: str) -> dict[str, float]:
    """Current and peak memory since the last `reset_peak`, in GiB."""
    if device == "cuda":
        stats = torch.cuda.memory_stats()
        return {
            "allocated_gib": torch.cuda.memory_allocated() / GIB,
            "reserved_gib": torch.cuda.memory_reserved() / GIB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            "alloc_retries": float(stats.get("num_alloc_retries", 0)),
        }
    rss = _rss_bytes() / GIB
    return {"allocated_gib": rss, "reserved_gib": rss, "peak_allocated_gib": rss,
            "peak_reserved_gib": _peak_rss_bytes() / GIB}


def peak_scope(device: str) -> str:
    """What `summary/peak_memory_gib` is, said in the summary itself (a sweep table compares like with like)."""
    if device == "cuda":
        return ("max over training steps of torch.cuda.max_memory_allocated, reset after each step; step 1's window "
                "opens once the weights' source is ready: loading and quantizing count, a random-init build does not, "
                "nor the step that proves an auto plan or micro-batch (its peak is phase/prove/peak_allocated_gib)")
    return "max over training steps of the process's resident set at the end of the step (the CPU has no allocator peak)"


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class PhaseReadings:
    """The memory after each phase of a run's start (load, prepare, wrap, the first forward, backward and optimizer
    step), as flat `phase/<name>/<reading>` metrics, logged once with step 1."""

    def __init__(self, device: str):
        self.device = device
        self.metrics: dict[str, float] = {}

    def read(self, name: str, reading: dict[str, float] | None = None) -> None:
        reading = reading if reading is not None else memory_now(self.device)
        self.metrics.update({f"phase/{name}/{k}": v for k, v in reading.items()})

    def measured(self, name: str, key: str = "allocated_gib") -> float | None:
        return self.metrics.get(f"phase/{name}/{key}")
