"""The export's check: the run's own held-out rows, greedy, through the export and through base + adapter.

What is compared (every model computed in fp32 on the CPU, prompts rendered and tokenized as the run's eval did):
- generations: the greedy continuation of each eval prompt (`evaluation.generate`, as the run's eval generated),
  exact match of one model's tokens against the other's;
- logits: both models teacher-forced along the reference's greedy path (prompt + the reference's generated tokens,
  up to its stop token), max |difference| over every position and vocabulary entry. Two greedy generations can only
  part where the reference's top token beat the other's by at most twice that maximum, so a logit tolerance also
  says which differing generations are ties within rounding and which are not.

The gate ("merge" check) compares the export with the unmerged model it was merged from (the same base weights +
the adapter, PEFT). Its tolerance is the rounding of the export dtype, measured on SmolLM2-135M (an nf4 run, 64 of
its eval rows, fp32 on the CPU: bench/results/2026-12-06_cpu_export_tolerance.md): the merged weights stored in
float32 moved the logits by at most 1.2e-4, in float16 by 0.039, in bfloat16 by 1.19 (bf16 keeps 8 bits of mantissa,
so a LoRA delta smaller than half a bf16 step of its weight is rounded away; 1 of 64 generations parted at a tie).
A broken merge is far off: the adapter left out moved them by 22.5, the merged weights re-quantized to nf4 by 15.
TOLERANCE sits between, several times above the rounding measured.

"As trained" compares the export with what the run trained and evaluated: the base as it was quantized + the adapter.
Merged into the original 16-bit weights of a 4-bit run, the export is not that model (it differs by the 4-bit
rounding of the base: on that run 34 of 64 generations agreed, max |logit difference| 12.4): reported, not gated.
Merged into the dequantized 4-bit base (1.1e-4 in float32), or for a run that trained on an unquantized base, it is
that model, and the same tolerance gates it. Not for 8-bit: LLM.int8 rounds the activations to int8 too, which no
merged weights reproduce (the tiny model's int8 run: 0.375 between the dequantized merge and the run as trained), so
there the merge reference is the dequantized base + adapter, and the run as trained is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from qlora_lab.data import store
from qlora_lab.data.rows import fingerprint, read_rows, split_eval
from qlora_lab.evaluation.generate import Prompt, greedy_ids, prompts_of, stop_token_ids
from qlora_lab.evaluation.metrics import METRICS, score
from qlora_lab.export.inputs import ExportError, RunRecord

TOLERANCE = {"float32": 1e-3, "float16": 0.25, "bfloat16": 4.0}  # max |logit difference|, see the module doc
LOGIT_BATCH = 8  # teacher-forced rows per forward: [8, tokens, vocabulary] fp32 logits at once


def eval_prompts(rec: RunRecord, tokenizer) -> list[Prompt]:
    """The prompts the run generated on at each evaluation: its held-out split (data.eval_fraction, seeded), the
    first eval.max_rows of it, rendered by the run's chat template and system prompt. Read from the tokenized store
    when the run's is still in its cache (the split is over the rows tokenization kept)."""
    cfg = rec.cfg
    try:
        rows = read_rows(cfg.data)
    except (OSError, ValueError) as e:
        raise ExportError([f"the run's data ({cfg.data.path}) cannot be read ({e}); the check runs the run's own "
                           "eval rows: restore the data the run trained on"]) from None
    recorded = rec.info.get("dataset_fingerprint")
    if recorded and fingerprint(rows) != recorded:
        raise ExportError([f"the run's data ({cfg.data.path}) changed since the run (fingerprint "
                           f"{fingerprint(rows)}, the run recorded {recorded}), so its eval rows are not the run's; "
                           "restore the data the run trained on"])
    settings = store.Settings(cfg.model.max_seq_len, cfg.data.mask_prompt, cfg.data.system_prompt, cfg.data.num_rows)
    outcome = store.load_or_build(rows, recorded or fingerprint(rows), tokenizer, settings,
                                  cfg.cache_dir if cfg.data.tokenize_cache else None, cfg.data.num_proc)
    data = store.tokenized_from(outcome.dataset, len(rows), cfg.model.max_seq_len)
    _, held = split_eval(data.examples, cfg.data, cfg.seed)
    chosen = held if cfg.eval.max_rows == 0 else held[:cfg.eval.max_rows]
    if len(chosen) == 0:
        raise ExportError(["the run held out no eval rows (data.eval_fraction=0), so there is nothing to check the "
                           "export on; retrain with data.eval_fraction>0"])
    return prompts_of(rows, [e.row for e in chosen], tokenizer, cfg.data.system_prompt)


@dataclass
class Probe:
    """What one model did on the check's prompts."""

    name: str
    ids: list[list[int]]  # greedy tokens per prompt, cut before the stop token (as the run's eval cuts them)
    texts: list[str]
    logits: dict[str, list[torch.Tensor]] = field(default_factory=dict)  # path name -> per prompt [tokens, vocab]

    def paths(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """This model's greedy path per prompt: the prompt and the generated tokens. The logits at its last position
        are the ones that chose to stop (or, at max_new_tokens, what would come next), so they are compared too."""
        return [p + g for p, g in zip(prompt_ids, self.ids)]


def prompt_ids(tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    return [tokenizer(p.text, add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def logits_along(model, paths: list[list[int]], pad_id: int) -> list[torch.Tensor]:
    """Teacher-forced fp32 logits at every position of each path (right-padded batches: positions are 0..n-1)."""
    out = []
    for start in range(0, len(paths), LOGIT_BATCH):
        chunk = paths[start:start + LOGIT_BATCH]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = torch.tensor(p)
            mask[i, :len(p)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        out += [logits[i, :len(p)].clone() for i, p in enumerate(chunk)]
    return out


@torch.no_grad()
def probe(name: str, model, tokenizer, prompts: list[Prompt], rec: RunRecord,
          along: dict[str, list[list[int]]]) -> Probe:
    """`model`'s greedy generations on the prompts (as the run's eval makes them), and its logits along its own path
    ("own") and along each path in `along` (another model's)."""
    model.eval()
    ev = rec.cfg.eval
    ids = greedy_ids(model, tokenizer, [p.text for p in prompts], batch_size=ev.batch_size,
                     max_new_tokens=ev.max_new_tokens, device="cpu", stop_ids=stop_token_ids(tokenizer, model))
    result = Probe(name, ids, [tokenizer.decode(r, skip_special_tokens=True) for r in ids])
    result.logits["own"] = logits_along(model, result.paths(prompt_ids(tokenizer, prompts)), tokenizer.pad_token_id)
    for key, paths in along.items():
        result.logits[key] = logits_along(model, paths, tokenizer.pad_token_id)
    return result


@dataclass
class Agreement:
    """One model's generations and logits against a reference's, on the same prompts."""

    against: str  # what the reference is
    equal: int  # generations token for token the same
    rows: int
    max_dlogit: float  # max |logit difference| along the reference's greedy paths
    tolerance: float | None  # None: reported, not gated
    note: str = ""  # why it is not gated

    @property
    def ok(self) -> bool:
        return self.tolerance is None or self.max_dlogit <= self.tolerance

    def line(self) -> str:
        verdict = (self.note or "not gated") if self.tolerance is None else \
            f"tolerance {self.tolerance:g}: {'pass' if self.ok else 'FAIL'}"
        ties = ""
        if self.ok and self.tolerance is not None and self.equal < self.rows:
            ties = f"; the {self.rows - self.equal} differing generation(s) part at ties within the tolerance"
        return (f"generations {self.equal}/{self.rows} equal, max |logit difference| {self.max_dlogit:.3g} "
                f"({verdict}{ties})")

    def as_dict(self) -> dict[str, Any]:
        return {"against": self.against, "equal_generations": self.equal, "rows": self.rows,
                "max_logit_difference": self.max_dlogit, "tolerance": self.tolerance, "pass": self.ok}


def agreement(export: Probe, reference: Probe, key: str, against: str, tolerance: float | None,
              note: str = "") -> Agreement:
    """`export`'s logits along `reference`'s paths (stored under `key`) against `reference`'s own."""
    equal = sum(a == b for a, b in zip(export.ids, reference.ids))
    diffs = [(a - b).abs().max().item() for a, b in zip(export.logits[key], reference.logits["own"])]
    return Agreement(against, equal, len(reference.ids), max(diffs), tolerance, note)


def task_scores(probe_: Probe, prompts: list[Prompt], rec: RunRecord) -> dict[str, float]:
    """The run's generation metrics of one model's texts against the references (eval_exact_match etc.)."""
    names = [n for n in dict.fromkeys([*rec.cfg.eval.metrics, *rec.cfg.data.metrics]) if n in METRICS]
    return score(probe_.texts, [p.reference for p in prompts], names)


def tokenizer_problems(exported, run_tokenizer, prompts: list[Prompt]) -> list[str]:
    """The export's own tokenizer must encode every prompt as the run's did and carry the same chat template."""
    problems = []
    if (exported.chat_template or None) != (run_tokenizer.chat_template or None):
        problems.append("its chat template differs from the run's")
    bad = [i for i, p in enumerate(prompts) if exported(p.text, add_special_tokens=False)["input_ids"]
           != run_tokenizer(p.text, add_special_tokens=False)["input_ids"]]
    if bad:
        problems.append(f"it tokenizes {len(bad)} of {len(prompts)} prompts differently (first: row "
                        f"{prompts[bad[0]].row})")
    return problems
