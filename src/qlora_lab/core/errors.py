"""The ways a run ends: exception types, the status a run dir and a sweep table record, and the exit status.

`classify` maps an exception to its status by type, in one place: `train.py` turns it into the process's exit
status and the sweep runner into a job's row, so the two can never disagree.
"""

from __future__ import annotations

from enum import StrEnum

import torch


class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem with its fix."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the config:\n{lines}")


class RunDirInUse(ConfigError):
    """The config's problems include a run dir that already holds a run: nothing may be written into that dir (its
    summary.json is the earlier run's), so a failure record goes to the console and the sweep table only."""


class DataError(ValueError):
    """Rows that cannot be used; the message names each bad row and what it lacks."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing, corrupt, from another run) or cannot be written."""


class BadFile(CheckpointError):
    """A file read back (a checkpoint's, a run's record, a model's) that is not what it should be; the message names
    it and the fix in one line, and never advises a less safe way to load it."""


class OutputError(RuntimeError):
    """The run dir could not be written mid-run (read-only, full, removed); the message says what to do."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the dataset rows of the batch."""


class TrainingInterrupted(KeyboardInterrupt):
    """Stopped by Ctrl-C or SIGTERM; the message says where the checkpoint is, or that none was written."""


class Status(StrEnum):
    finished = "finished"
    skipped = "skipped"  # plan.skip_unfit: predicted not to fit
    planned = "planned"  # mode=plan
    interrupted = "interrupted"
    failed_config = "failed_config"  # bad config, data or checkpoint: the message names the fix
    failed_nan = "failed_nan"
    failed_oom = "failed_oom"
    failed = "failed"  # anything else: a bug or an environment problem, with its traceback

    @property
    def ok(self) -> bool:
        return self in (Status.finished, Status.skipped, Status.planned)


# Exit statuses of `python train.py` (docs/bad_inputs.md): 0 ok, 1 other failure, 2 bad input (config, data,
# checkpoint, a run dir in use or that cannot be written), 3 non-finite loss, 4 out of memory, 130 interrupted.
EXIT_CODES = {Status.finished: 0, Status.skipped: 0, Status.planned: 0, Status.failed: 1, Status.failed_config: 2,
              Status.failed_nan: 3, Status.failed_oom: 4, Status.interrupted: 130}

EXPECTED = (ConfigError, DataError, CheckpointError, OutputError, NonFiniteLossError, torch.OutOfMemoryError,
            KeyboardInterrupt)
"""Failures whose message says what happened and what to do: printed without a traceback."""


def classify(exc: BaseException) -> Status:
    if isinstance(exc, torch.OutOfMemoryError):
        return Status.failed_oom
    if isinstance(exc, NonFiniteLossError):
        return Status.failed_nan
    if isinstance(exc, (ConfigError, DataError, CheckpointError, OutputError)):
        return Status.failed_config
    if isinstance(exc, KeyboardInterrupt):
        return Status.interrupted
    return Status.failed


def exit_code(exc: BaseException) -> int:
    return EXIT_CODES[classify(exc)]
