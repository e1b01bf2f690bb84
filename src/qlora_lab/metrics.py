"""Memory readings and metric sinks: one flat dict per record, the same dict to every sink.

Names carry their unit (`memory/peak_allocated_gib`, `train/tokens_per_s`). On CUDA the memory keys are the
caching allocator's counters, and each per-step peak is reset after it is read, so a step's figure is that
step's own. On the CPU there is no allocator to ask: `memory/peak_allocated_gib` is the process's resident set
at the end of the step and `memory/peak_reserved_gib` its peak resident set so far.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Any

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


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{'lora': {'r': 8}} -> {'lora.r': 8}: the flat keys W&B's grouping and parallel plots work on."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


class JsonlSink:
    """metrics.jsonl in the run dir: one JSON object per line, each with a `step` key."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.is_file():
            self._roll_back(resume_step)
        self._f = open(path, "a", encoding="utf-8")

    def _roll_back(self, step: int) -> None:
        """Resuming from the checkpoint of `step`: records after it (logged before the crash, about to be
        recomputed) move to metrics.rolled_back.jsonl, so metrics.jsonl never holds a step twice."""
        keep, drop = [], []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True):
            try:
                ok = json.loads(line)["step"] <= step
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by the crash
                ok = False
            (keep if ok else drop).append(line if line.endswith("\n") else line + "\n")
        if drop:
            with open(self.path.with_name("metrics.rolled_back.jsonl"), "a", encoding="utf-8") as f:
                f.writelines(drop)
            tmp = self.path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(keep), encoding="utf-8")
            os.replace(tmp, self.path)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
        self._f.write(json.dumps({"step": step, **clean}) + "\n")
        self._f.flush()  # a crash must not lose the steps before it

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines()]

    def summary(self, values: dict[str, Any]) -> None:
        (self.path.parent / "summary.json").write_text(json.dumps(values, indent=2, default=str))

    def close(self) -> None:
        self._f.close()


class WandbSink:
    """A W&B run whose files live under the run dir (offline by default; `wandb sync` uploads them)."""

    def __init__(self, *, project: str, entity: str | None, mode: str, run_dir: Path, name: str,
                 group: str | None, tags: list[str], config: dict[str, Any],
                 resume: tuple[str, list[dict[str, Any]]] | None = None):
        """`resume=(run id, records)` continues W&B run `run id` and first re-logs `records` (metrics.jsonl up to
        the checkpoint): the W&B copy of a crashed process may lack its last seconds (W&B flushes its run file
        every few seconds; a SIGKILL loses the rest), so the run is rewound to its start and refilled from the
        durable local log. Synced in order (`wandb sync <run dir>/wandb/offline-run-*`), the files make one run.
        """
        import wandb  # lazy: logger=none never pays for it

        self._wandb = wandb
        kw = dict(project=project, entity=entity, mode=mode, dir=str(run_dir), name=name, group=group,
                  tags=[t[:64] for t in tags], config=config, job_type="train",
                  settings=wandb.Settings(silent=True, console="off", x_disable_stats=True))
        if resume is None:
            self.run = wandb.init(**kw)
            return
        run_id, history = resume
        try:
            self.run = wandb.init(resume_from=f"{run_id}?_step=0", **kw)
        except Exception as e:  # online, on a server without run rewind: continue after the steps it holds
            print(f"qlora-lab: warning: W&B cannot rewind run {run_id} ({type(e).__name__}: {e}); continuing it "
                  "after the last step the server holds", file=sys.stderr)
            self.run = wandb.init(id=run_id, resume="allow", **kw)
        for record in history:
            if record["step"] >= self.run.step:
                self.log({k: v for k, v in record.items() if k != "step" and v is not None}, record["step"])

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    @property
    def run_id(self) -> str:
        return self.run.id

    def close(self) -> None:
        self.run.finish()


class MetricLogger:
    """Fans one flat dict out to every sink."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    @property
    def run_id(self) -> str | None:
        """The W&B run id, kept in checkpoints so that a resumed run continues the same W&B run."""
        return next((s.run_id for s in self.sinks if hasattr(s, "run_id")), None)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for s in self.sinks:
            s.log(metrics, step)

    def summary(self, values: dict[str, Any]) -> None:
        for s in self.sinks:
            s.summary(values)

    def close(self) -> None:
        for s in self.sinks:
            try:
                s.close()
            except Exception as e:  # one sink failing to close must not hide the others' data
                print(f"warning: closing {type(s).__name__} failed: {e}", file=sys.stderr)
