"""What the loop knows about its own progress; saved in every checkpoint, so a resumed run continues it."""

from __future__ import annotations

import dataclasses
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from qlora_lab.evaluation.metrics import better, goal


def sink_ids_of(trainer: dict[str, Any]) -> dict[str, str]:
    """Each sink's run id from a checkpoint's trainer state (checkpoints before sinks were plug-ins kept W&B's alone,
    as `wandb_id`)."""
    if "sink_ids" in trainer:
        return dict(trainer["sink_ids"])
    return {"wandb": trainer["wandb_id"]} if trainer.get("wandb_id") else {}


def finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    tokens_seen: int = 0
    losses: list[float | None] = field(default_factory=list)  # per step; None for a non-finite one
    throughputs: list[float] = field(default_factory=list)  # tokens/s per step
    step_times: list[float] = field(default_factory=list)  # seconds per step
    eval: dict[str, float] = field(default_factory=dict)  # the latest evaluation: {"eval/<metric>": value}
    best_eval: dict[str, list] = field(default_factory=dict)  # {"eval/<metric>": [best value, its step]}
    peak_gib: float = 0.0  # the largest per-step peak so far
    skipped: int = 0  # steps whose update the NaN guard dropped
    last_finite_loss: float | None = None
    sink_ids: dict[str, str] = field(default_factory=dict)  # each sink's run id: a resume continues each run

    def to_checkpoint(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "step"}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        trainer = {k: v for k, v in saved["trainer"].items() if k in known}
        trainer["sink_ids"] = sink_ids_of(saved["trainer"])
        return cls(step=saved["step"], **trainer)

    def record(self, loss: float, tokens: int, seconds: float, peak_gib: float) -> None:
        self.step += 1
        self.tokens_seen += tokens
        self.losses.append(finite_or_none(loss))
        self.throughputs.append(tokens / seconds)
        self.step_times.append(seconds)
        self.peak_gib = max(self.peak_gib, peak_gib)

    def record_eval(self, step: int, metrics: dict[str, float]) -> None:
        """The latest evaluation, and the best value of each quality metric so far with the step it came at."""
        self.eval = metrics
        for k, v in metrics.items():
            if goal(k) and math.isfinite(v) and (k not in self.best_eval or better(k, v, self.best_eval[k][0])):
                self.best_eval[k] = [v, step]

    def summary(self, steps: int, resumed_from: int, processes: int) -> dict[str, Any]:
        finite = [x for x in self.losses if x is not None]
        # Skip the first steps in the throughput figure: they include allocator warm-up and lazy init.
        steady = slice(min(3, len(self.throughputs) - 1), None)
        tokens_per_s = statistics.median(self.throughputs[steady]) if self.throughputs else float("nan")
        step_time = statistics.median(self.step_times[steady]) if self.step_times else float("nan")
        best = {}
        for k, (v, at) in self.best_eval.items():
            name = k.split("/", 1)[1]
            best.update({f"summary/best_eval_{name}": v, f"summary/best_eval_{name}_step": at})
        return {
            "summary/first_loss": finite[0] if finite else float("nan"),
            "summary/final_loss": finite[-1] if finite else float("nan"),
            "summary/eval_loss": self.eval.get("eval/loss", float("nan")),
            **{f"summary/eval_{k.split('/', 1)[1]}": v for k, v in self.eval.items() if k != "eval/loss"},
            **best,
            "summary/tokens_per_s": tokens_per_s,
            "summary/peak_memory_gib": self.peak_gib,
            "summary/steps": steps,
            "summary/tokens": self.tokens_seen,
            "summary/skipped_steps": self.skipped,
            "summary/resumed_from_step": resumed_from,
            "summary/processes": processes,
            "summary/tokens_per_s_per_process": tokens_per_s / processes,
            "summary/step_time_s": step_time,  # the median, past the first steps (as tokens/s)
            # The steps this process ran at that median: step 1's compile and warm-up count as start-up, not training.
            "summary/train_time_s": step_time * (steps - resumed_from),
            "summary/first_step_s": self.step_times[0] if self.step_times else float("nan"),
        }
