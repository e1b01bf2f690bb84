"""Kill injection for tests that run train.py in a child process: SIGKILL itself at one point of the pipeline, so
that what a real kill leaves on disk (no `finally`, no atexit, no flush) is what the next start finds.

Put this directory on the child's PYTHONPATH and set QLAB_KILL_AT to one of
- `store`: while the tokenized store is being written (its rows mapped into the temporary dir, not yet renamed);
- `checkpoint:<step>`: while the checkpoint of that step is being written (its adapter file written, the rest not);
- `eval:<n>`: in the run's n-th evaluation, as it computes the eval loss.
"""

import os
import signal


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _install(at: str) -> None:
    what, _, arg = at.partition(":")
    if what == "store":
        from qlora_lab.data import store

        real_build = store.build

        def build(rows, tokenizer, s, num_proc, work_dir=None):
            out = real_build(rows, tokenizer, s, num_proc, work_dir)
            if work_dir is not None:  # the store's own build, into its temporary dir
                _kill()
            return out

        store.build = build
    elif what == "checkpoint":
        from qlora_lab.train import checkpoint

        real_write, step = checkpoint._write, int(arg)

        def write(path, obj):
            real_write(path, obj)
            if path.name == "adapter.pt" and path.parent.name.startswith(f".tmp-step_{step:07d}"):
                _kill()

        checkpoint._write = write
    elif what == "eval":
        from qlora_lab.train import evaluate

        calls, n = [0], int(arg)
        real_loss = evaluate.evaluate_loss

        def evaluate_loss(*args, **kwargs):  # inside Evaluator.run: the evaluation has begun
            calls[0] += 1
            if calls[0] == n:
                _kill()
            return real_loss(*args, **kwargs)

        evaluate.evaluate_loss = evaluate_loss


if os.environ.get("QLAB_KILL_AT"):
    _install(os.environ["QLAB_KILL_AT"])
