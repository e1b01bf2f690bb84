"""What a run says as it goes: the `qlora_lab` logger, printed as `qlora-lab: <message>`.

Everything the package tells the user goes through `logging` (one logger per module, under `qlora_lab`), so a
program that uses the package as a library silences it with `logging.getLogger("qlora_lab").setLevel("WARNING")`
or sends it elsewhere with its own handler. Out of the box (the console handler installed when the package is
imported) INFO goes to stdout and warnings to stderr, each line as train.py has always printed it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from qlora_lab.core.scrub import scrub_text

PREFIX = "qlora-lab: "


class Console(logging.Handler):
    """INFO to stdout, WARNING and above to stderr (`qlora-lab: warning: ...`), each looked up when a line is
    written, so a redirected or captured stream (pytest's capsys, a tqdm bar's writer) gets it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = scrub_text(record.getMessage())  # a message may quote a value: never a credential (core/scrub.py)
            if record.levelno >= logging.WARNING:
                stream, msg = sys.stderr, f"{PREFIX}warning: {msg}" if record.levelno == logging.WARNING else PREFIX + msg
            else:
                stream, msg = sys.stdout, PREFIX + msg
            stream.write(msg + "\n")
            stream.flush()
        except Exception:  # a closed stream at exit must not raise from logging
            self.handleError(record)


def install() -> None:
    """The console handler on the package's logger (once); the logger does not propagate to the root logger, which
    Hydra formats and writes into its own log file."""
    root = logging.getLogger("qlora_lab")
    if not any(isinstance(h, Console) for h in root.handlers):
        root.addHandler(Console())
        root.setLevel(logging.INFO)
        root.propagate = False


class _Scrub(logging.Filter):
    """A line as the console shows it: never a credential (core/scrub.py)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = scrub_text(record.getMessage()), ()
        return True


@contextlib.contextmanager
def to_file(path: Path | str, own: bool = False) -> Iterator[None]:
    """The package's lines also into the run's log file `path` (<run dir>/train.log), which would otherwise hold
    nothing of them (the package's logger does not propagate): through Hydra's own handler when Hydra writes that
    file (train.py's run), else, with `own`, a handler of our own that appends (a sweep job's process)."""
    pkg = logging.getLogger("qlora_lab")
    target = os.path.abspath(path)
    handler = next((h for h in logging.getLogger().handlers
                    if isinstance(h, logging.FileHandler) and h.baseFilename == target), None)
    opened = handler is None and own
    if opened:
        handler = logging.FileHandler(target, mode="a", encoding="utf-8", delay=True)
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    if handler is None:
        yield
        return
    scrub = _Scrub()
    handler.addFilter(scrub)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        handler.removeFilter(scrub)
        if opened:
            handler.close()
