"""Quality metrics: each declared here once with its direction (`Metric.goal`), which every reader takes (the best
evaluation a run tracks, the sinks' summaries, the sweep report's ranking): a loss or a perplexity falls, a score
rises. The generation scores compare a generated answer with the reference, each in [0, 1]; the mean over rows is
what is logged.

Text is compared after `normalize` (surrounding whitespace stripped, inner runs of whitespace collapsed): a
trailing newline or a double space is not a different answer. Token scores split on whitespace.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred and not ref:
        return 1.0
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD's token overlap F1 over whitespace tokens (order ignored)."""
    return _f1(normalize(prediction).split(), normalize(reference).split())


def char_f1(prediction: str, reference: str) -> float:
    """Overlap F1 over characters: partial credit for one-word answers (a word with one letter wrong)."""
    return _f1(list(normalize(prediction).replace(" ", "")), list(normalize(reference).replace(" ", "")))


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, start=1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: the longest common subsequence of whitespace tokens (order matters)."""
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    lcs = _lcs(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class Metric:
    goal: str  # "min" | "max": which way is better
    score: Callable[[str, str], float] | None = None  # (prediction, reference) -> [0, 1]; None: not a generation score


METRICS: dict[str, Metric] = {
    "loss": Metric("min"),  # the mean token cross-entropy on the held-out rows (train/evaluate.py)
    "exact_match": Metric("max", exact_match),
    "token_f1": Metric("max", token_f1),
    "rouge_l": Metric("max", rouge_l),
    "char_f1": Metric("max", char_f1),
}
"""Metrics by name (`eval.metrics`, `data.metrics`, logged as `eval/<name>`)."""


def goal(name: str) -> str | None:
    """"min" or "max" for a quality metric under any of its names (`eval/loss`, `summary/eval_exact_match`,
    `summary/best_eval_token_f1`, `final_loss`: the training loss); None for anything else (memory, throughput, a step
    number)."""
    last = name.rsplit("/", 1)[-1].removeprefix("best_").removeprefix("eval_")
    if last in ("final_loss", "first_loss"):
        last = "loss"
    metric = METRICS.get(last)
    return metric.goal if metric is not None else None


def better(name: str, a: float, b: float) -> bool:
    """Whether value `a` of metric `name` beats `b`."""
    return a < b if goal(name) == "min" else a > b


def goals() -> dict[str, str]:
    """`eval/<metric>` -> its direction, for the sinks' summaries."""
    return {f"eval/{name}": m.goal for name, m in METRICS.items()}


def score(predictions: list[str], references: list[str], names: list[str]) -> dict[str, float]:
    """{name: mean score over the rows} for each generation metric in `names`."""
    return {n: sum(METRICS[n].score(p, r) for p, r in zip(predictions, references)) / max(len(references), 1)
            for n in names if n in METRICS and METRICS[n].score is not None}
