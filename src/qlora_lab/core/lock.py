"""One writer at a time: a lock file that names its holder, for run dirs, sweep dirs and cache entries.

The lock is a file created with O_CREAT|O_EXCL (atomic on local file systems and on NFSv3 and later, where a
rename-into-place alone does not stop two nodes from doing the same work at once) holding the holder's pid, host,
boot id, process start time and command. A second process is refused (`LockHeld`, naming the holder) or, for a
cache entry, waits. A lock whose holder is gone is taken over with a message:
- on this machine, when its pid is not running, or runs another process (its start time differs), or the machine
  restarted since (another boot id);
- from another machine, whose processes cannot be asked, when its heartbeat stopped: every holder touches its lock
  files every HEARTBEAT_S seconds, and one untouched for STALE_S seconds is stale.
Taking over is itself serialised by a second exclusive file (`<lock>.break`), so two processes that find the same
stale lock do not both take it. A process holds each lock once (re-entrant) and gives them all back at exit;
SIGKILL leaves the file, which the next process takes over.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from qlora_lab.core.scrub import scrub_text

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0
STALE_S = 300.0  # another machine's lock untouched this long is stale (NFS attribute caches lag up to ~60 s)
BREAK_STALE_S = 60.0  # a `.break` file left by a process killed while taking over
UNREADABLE_S = 5.0  # a lock file that names no holder for this long (not being written: damaged) is taken over


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


@dataclass
class Holder:
    """Who holds a lock, as its file says."""

    pid: int
    host: str
    boot: str | None
    started: float  # the holder process's start time (tells a reused pid apart)
    since: float  # when it took the lock
    command: str
    token: str  # this holding's own id: a lock is released or broken only by what took it

    def line(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"pid {self.pid} on {self.host}, holding it since {since} ({self.command[:160]})"

    def gone(self, age_s: float) -> str | None:
        """Why this holder is gone (its lock may be taken over), None while it may still be at work. `age_s`: since
        the lock file's last heartbeat."""
        if self.host != socket.gethostname():
            return (f"its host {self.host} sent no heartbeat for {age_s:.0f} s (stale after {STALE_S:.0f} s)"
                    if age_s > STALE_S else None)
        if self.boot is not None and _boot_id() not in (None, self.boot):
            return "this machine restarted since it took the lock"
        started = _start_time(self.pid)
        if started is None:
            return f"pid {self.pid} is no longer running"
        if abs(started - self.started) > 1.0:
            return f"pid {self.pid} is now another process"
        return None


class LockHeld(RuntimeError):
    """The lock is held by a process that is still at work; the message names it."""

    def __init__(self, path: Path, holder: Holder | None, what: str):
        self.path, self.holder = path, holder
        who = holder.line() if holder else "a process whose lock file is being written"
        super().__init__(f"{what} is in use by another process: {who}; lock file {path}")


def _me() -> Holder:
    command = scrub_text(" ".join(sys.argv) or sys.executable)  # a lock file is a file: no credential in it either
    return Holder(os.getpid(), socket.gethostname(), _boot_id(), _start_time(os.getpid()) or time.time(),
                  time.time(), command, uuid.uuid4().hex)


def _create(path: Path, holder: Holder) -> bool:
    """Create `path` holding `holder`, atomically, only if it does not exist."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(holder.__dict__))
        f.flush()
        os.fsync(f.fileno())
    return True


def read(path: Path) -> tuple[Holder | None, float | None]:
    """The holder a lock file names (None: unreadable or being written) and the file's age in seconds (None: there
    is no file)."""
    try:
        age = time.time() - path.stat().st_mtime
        data: dict[str, Any] = json.loads(path.read_text())
        return Holder(**data), age
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, TypeError):  # being written, or not a lock of ours
        try:
            return None, time.time() - path.stat().st_mtime
        except OSError:
            return None, None


class _Held:
    def __init__(self, path: Path, holder: Holder):
        self.path, self.holder, self.count = path, holder, 1


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()
_beating: threading.Thread | None = None


def beat() -> None:
    """Touch every lock this process holds: its holder is at work (what another machine judges it by)."""
    with _GUARD:
        paths = [h.path for h in _HELD.values()]
    for p in paths:
        with contextlib.suppress(OSError):
            os.utime(p)


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        beat()


def _break(path: Path, stale: Holder | None, why: str) -> None:
    """Remove the stale lock `path` (it still names `stale`), one process at a time."""
    breaker = path.with_name(path.name + ".break")
    if not _create(breaker, _me()):
        _, age = read(breaker)
        if age is not None and age > BREAK_STALE_S:  # a taker-over killed mid-way
            with contextlib.suppress(FileNotFoundError):
                breaker.unlink()
        return
    try:
        current, _ = read(path)
        if (current.token if current else None) == (stale.token if stale else None):
            path.unlink(missing_ok=True)
            log.warning(f"took over the lock {path}: its holder is gone ({why})"
                        + (f"; it was {stale.line()}" if stale else ""))
    finally:
        breaker.unlink(missing_ok=True)


def acquire(path: Path, what: str, wait: bool = False, poll_s: float = 0.2) -> None:
    """Hold the lock file `path` (for `what`, named in messages) until `release` or this process's exit. Held by
    another live process: `LockHeld`, or with `wait` poll until it is given back."""
    global _beating
    path = Path(path).absolute()
    with _GUARD:
        if str(path) in _HELD:
            _HELD[str(path)].count += 1
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    me = _me()
    unreadable_since = None
    while True:
        if _create(path, me):
            break
        holder, age = read(path)
        if age is None:  # given back meanwhile
            continue
        if holder is None:  # being written this very moment, or not a lock file
            unreadable_since = unreadable_since or time.monotonic()
            if time.monotonic() - unreadable_since > UNREADABLE_S:
                _break(path, None, "its lock file names no holder")
                unreadable_since = None
            time.sleep(poll_s)
            continue
        why = holder.gone(age)
        if why is not None:
            _break(path, holder, why)
            continue
        if not wait:
            raise LockHeld(path, holder, what)
        time.sleep(poll_s)
    with _GUARD:
        _HELD[str(path)] = _Held(path, me)
        if _beating is None:
            _beating = threading.Thread(target=_heartbeat, name="qlora-lab-lock-heartbeat", daemon=True)
            _beating.start()


def release(path: Path) -> None:
    """Give back one holding of `path` (the file goes with the last), if this process holds it."""
    path = Path(path).absolute()
    with _GUARD:
        held = _HELD.get(str(path))
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[str(path)]
    current, _ = read(path)
    if current is not None and current.token == held.holder.token:
        path.unlink(missing_ok=True)


def holds(path: Path) -> bool:
    return str(Path(path).absolute()) in _HELD


@contextlib.contextmanager
def hold(path: Path, what: str, wait: bool = False) -> Iterator[None]:
    acquire(path, what, wait=wait)
    try:
        yield
    finally:
        release(path)


@atexit.register
def _release_all() -> None:
    for held in list(_HELD.values()):
        held.count = 1
        release(held.path)


def _after_fork() -> None:
    """A forked child holds nothing: its parent's locks name the parent, and go when the parent goes (the guard is
    new: the parent's heartbeat may have held it at the fork)."""
    global _beating, _GUARD
    _HELD.clear()
    _beating, _GUARD = None, threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
