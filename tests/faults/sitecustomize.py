"""Fault injection for tests that run train.py in child processes (sweeps, launchers).

A test puts this directory on the child's PYTHONPATH; Python then imports this file at start-up, before any
project code. It wraps two seams of the pipeline:

- `qlora_lab.data.tokenize.tokenize_row`: the source rows whose text contains POISON are remembered (a replaced
  tokenize_row makes the tokenized store tokenize in this process on every run, never from or into the cache:
  data/store.py, so this side effect is never skipped);
- `qlora_lab.train.step.forward_loss`: a micro-batch holding one of those rows gets a NaN loss, exactly as a
  numerically broken batch would, so the NaN guard, the job's status and the sweep's bookkeeping see a real
  non-finite step.

So which jobs fail is decided by the data a job trains on (a poisoned file), never by a hyper-parameter that
happens to diverge with today's numerics.
"""

import json

POISON = "POISON"


def _install() -> None:
    from qlora_lab.data import tokenize
    from qlora_lab.train import step

    poisoned: set[int] = set()
    real_tokenize, real_loss = tokenize.tokenize_row, step.forward_loss

    def tokenize_row(row, index, *args, **kwargs):
        if POISON in json.dumps(row):
            poisoned.add(index)
        return real_tokenize(row, index, *args, **kwargs)

    def forward_loss(model, batch, *args, **kwargs):
        loss = real_loss(model, batch, *args, **kwargs)
        return loss * float("nan") if poisoned & {int(r) for r in batch["row"]} else loss

    tokenize.tokenize_row, step.forward_loss = tokenize_row, forward_loss


_install()
