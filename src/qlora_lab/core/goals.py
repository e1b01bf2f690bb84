"""Which way is better for a quality metric: losses fall, scores (exact match, F1, ROUGE) rise.

Shared by what tracks the best evaluation (train/state.py), W&B's summaries (sinks/wandb.py) and the sweep report
(runner/compare.py), so the three never disagree on what "best" means.
"""

from __future__ import annotations

from qlora_lab.core.schema import Metric

SCORES = frozenset(m.value for m in Metric if m != Metric.loss)


def goal(name: str) -> str | None:
    """"min" or "max" for a quality metric under any of its names (`eval/loss`, `summary/eval_exact_match`,
    `eval_token_f1`, `final_loss`); None for anything else (memory, throughput, a step number)."""
    last = name.rsplit("/", 1)[-1].removeprefix("best_")
    bare = last.removeprefix("eval_")
    if bare == "loss" or last.endswith("_loss"):
        return "min"
    return "max" if bare in SCORES else None


def better(name: str, a: float, b: float) -> bool:
    """Whether value `a` of metric `name` beats `b`."""
    return a < b if goal(name) == "min" else a > b
