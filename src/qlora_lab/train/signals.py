"""Ctrl-C / SIGTERM: while training, note it, let the step finish and stop at the step boundary; before and after
the loop, stop at once with an exception the run records (SIGTERM's default would end the process without a word)."""

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
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}")
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


class SignalsRaise:
    """A context manager under which SIGTERM raises KeyboardInterrupt("SIGTERM") as SIGINT does, so a run stopped
    while loading or saving records how it ended. Outside the main thread it does nothing."""

    def __init__(self) -> None:
        self._previous: Any = None

    @staticmethod
    def _raise(signum, frame) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def __enter__(self) -> "SignalsRaise":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._raise)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
