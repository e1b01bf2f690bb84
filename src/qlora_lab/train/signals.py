"""Ctrl-C / SIGTERM while training: note it, let the step finish, stop at the step boundary."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any


class StopRequest:
    """A context manager that turns the first SIGINT/SIGTERM into a request (`signum`); a second stops at once.

    Outside the main thread (where handlers cannot be set) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nqlora-lab: {signal.Signals(signum).name}: finishing this step and writing a checkpoint "
              "(signal again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopRequest":
        if self.enabled:
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
