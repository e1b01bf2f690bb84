"""Where a run's wall time goes: consecutive spans from the process's start, as flat `time/<span>_s` metrics.

A sweep job's overhead (wall time minus its steps) is the sum of these spans less the steps' own time; naming them
says which part of a job a change shortened (imports, the weights' load, W&B's start and close, the adapter save).
"""

from __future__ import annotations

import time

import psutil

now = time.time  # the wall clock the spans read (a test sets its own)


class Timeline:
    """Spans that tile the process's life so far: each `mark(name)` closes the span since the previous mark."""

    def __init__(self, start: float | None = None):
        self.last = psutil.Process().create_time() if start is None else start  # the interpreter's own start
        self.spans: dict[str, float] = {}
        self.parts: dict[str, tuple[str, float]] = {}  # name -> (the span it lies within, seconds)

    def mark(self, name: str) -> float:
        """Close the span `name` (added to an earlier span of that name); returns its length in seconds."""
        t = now()
        span, self.last = t - self.last, t
        self.spans[name] = self.spans.get(name, 0.0) + span
        return span

    def part(self, name: str, within: str, seconds: float) -> None:
        """Record that `seconds` of span `within` went to `name` (e.g. evaluations within training)."""
        self.parts[name] = (within, seconds)

    def metrics(self) -> dict[str, float]:
        return {f"time/{name}_s": round(s, 3) for name, s in [*self.spans.items(),
                                                               *((n, s) for n, (_, s) in self.parts.items())]}

    def line(self) -> str:
        """`launch 6.1 s, ..., train 40.2 s (eval 3.1 s), ...`, in the order the spans first closed."""
        def one(name: str, s: float) -> str:
            parts = ", ".join(f"{n} {p:.1f} s" for n, (w, p) in self.parts.items() if w == name)
            return f"{name} {s:.1f} s" + (f" ({parts})" if parts else "")
        return ", ".join(one(name, s) for name, s in self.spans.items())
