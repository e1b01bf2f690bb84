"""Evaluation on the held-out rows: the loss per label token, and task metrics from greedy generations.

Every `eval.every_steps` steps and at the end. The loss runs on every held-out row; generation (the slow part) on
the first `eval.max_rows` of them, split over the processes and gathered on rank 0, which logs `eval/<metric>`
and a table of `eval.samples` (prompt, reference, prediction) per evaluation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from qlora_lab.core.dist import Dist
from qlora_lab.core.schema import EvalConfig
from qlora_lab.data.batching import Collator, batches
from qlora_lab.data.tokenize import Example
from qlora_lab.evaluation.generate import generate, prompts_of, stop_token_ids
from qlora_lab.evaluation.metrics import METRICS, exact_match, score
from qlora_lab.model.attention import unpacked
from qlora_lab.model.layers import eager_layers
from qlora_lab.model.parallel import gathered_root
from qlora_lab.train.step import count_label_tokens, forward_loss


@torch.no_grad()
def evaluate_loss(model, eval_set: list[Example], micro_batch: int, pad_id: int, device: str) -> float:
    """Mean loss per label token over `eval_set` (NaN when it is empty), on padded batches of unpacked rows:
    the same computation whether the run trains packed or not (packing changes no document's loss)."""
    if not eval_set:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with unpacked(model), eager_layers():
        for batch in batches(eval_set, micro_batch, Collator(pad_id)):
            n = count_label_tokens(batch)
            total += float(forward_loss(model, batch, device, 1)) if n else 0.0
            count += n
    model.train(was_training)
    return total / max(count, 1)


class Evaluator:
    """Decides when to evaluate and computes the eval metrics; `names` lists what is measured."""

    def __init__(self, cfg: EvalConfig, task_metrics: list[str], rows: list[dict[str, Any]], eval_set: list[Example],
                 tokenizer, micro_batch: int, device: str, dist: Dist = Dist(), system_prompt: str | None = None):
        self.cfg, self.eval_set, self.tokenizer = cfg, eval_set, tokenizer
        self.micro_batch, self.device, self.dist = micro_batch, device, dist
        self.names = list(dict.fromkeys([*cfg.metrics, *task_metrics]))  # eval's, then the task's, once each
        self.generative = [n for n in self.names if METRICS[n].score is not None]
        chosen = eval_set if cfg.max_rows == 0 else eval_set[:cfg.max_rows]
        self.prompts = prompts_of(rows, [e.row for e in chosen], tokenizer, system_prompt) if self.generative else []
        self.seconds = 0.0  # spent evaluating so far (part of the training span of a run's time)

    def due(self, step: int, steps: int) -> bool:
        every = self.cfg.every_steps
        return bool(self.eval_set) and (step == steps or (every > 0 and step % every == 0))

    def run(self, model, engine) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """({"eval/<metric>": value}, sample rows) of the current weights; `engine` runs the loss (DDP/FSDP),
        `model` (the PEFT model) generates. Samples and metrics are complete on rank 0 only."""
        start = time.perf_counter()
        try:
            return self._run(model, engine)
        finally:
            self.seconds += time.perf_counter() - start

    def _run(self, model, engine) -> tuple[dict[str, float], list[dict[str, Any]]]:
        metrics: dict[str, float] = {}
        if "loss" in self.names:
            metrics["eval/loss"] = evaluate_loss(engine, self.eval_set, self.micro_batch,
                                                 self.tokenizer.pad_token_id, self.device)
        if not self.generative:
            return metrics, []
        d = self.dist
        mine = self.prompts[d.rank::d.world]
        # Every process makes the same number of generate() calls (their steps are synced): a short share is
        # topped up with copies of the first prompt, whose outputs are dropped.
        share = -(-len(self.prompts) // d.world)
        texts = [p.text for p in mine] + [self.prompts[0].text] * (share - len(mine))
        with unpacked(model), gathered_root(model):  # generation pads and caches: SDPA, whatever trains
            texts = generate(model, self.tokenizer, texts, batch_size=self.cfg.batch_size,
                             max_new_tokens=self.cfg.max_new_tokens, device=self.device,
                             stop_ids=stop_token_ids(self.tokenizer, model), synced=d.world > 1)[:len(mine)]
        gathered = d.gather(list(zip((p.row for p in mine), texts)))
        predicted = dict(pair for part in gathered for pair in part)
        preds = [predicted[p.row] for p in self.prompts]
        refs = [p.reference for p in self.prompts]
        metrics.update({f"eval/{k}": v for k, v in score(preds, refs, self.generative).items()})
        samples = [{"row": p.row, "prompt": p.text, "reference": p.reference, "prediction": pred,
                    "exact_match": exact_match(pred, p.reference)}
                   for p, pred in zip(self.prompts[:self.cfg.samples], preds)]
        return metrics, samples
