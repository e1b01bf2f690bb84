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

For fused sweeps, whose jobs all train on the same rows, two more seams, set by the environment:
- QLAB_POISON_JOB=<run name> QLAB_POISON_STEP=<n>: `qlora_lab.train.step.job_loss` gives that job's n-th
  micro-batch a NaN loss (the others' losses are untouched);
- QLAB_SLOW_STEP_S=<seconds>: every step sleeps that long first (so a test can kill a sweep at a known point).
"""

import json
import os
import time

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

    job, at = os.environ.get("QLAB_POISON_JOB"), int(os.environ.get("QLAB_POISON_STEP", "0"))
    calls: dict[str, int] = {}
    real_job_loss = step.job_loss

    def job_loss(causal_lm, run_name, *args, **kwargs):
        loss = real_job_loss(causal_lm, run_name, *args, **kwargs)
        calls[run_name] = calls.get(run_name, 0) + 1
        return loss * float("nan") if run_name == job and calls[run_name] == at else loss

    step.job_loss = job_loss
    slow = float(os.environ.get("QLAB_SLOW_STEP_S", "0"))
    if slow:
        for name in ("forward_backward", "group_forward_backward"):
            real = getattr(step, name)

            def slowed(*args, __real=real, **kwargs):
                time.sleep(slow)
                return __real(*args, **kwargs)

            setattr(step, name, slowed)


_install()
