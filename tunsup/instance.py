"""One running instance per state: an exclusive lock and a pid file.

``run`` holds ``flock`` locks on ``runtime_dir/tunsup.lock`` and
``state_dir/tunsup.lock`` for its whole life and writes
``runtime_dir/tunsup.pid`` as ``PID START_TIME``.  The kernel drops the locks
when the process dies, however it dies, so a stale pid file never blocks a
new start.  Liveness checks never trust a bare pid: pid *and* start time
(``/proc/PID/stat`` field 22) must both match.

Synchronous: used before the event loop starts and by client commands.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

import attrs

from .helpers import process_start_time

LOCK_NAME = "tunsup.lock"
PID_NAME = "tunsup.pid"


class LockHeld(Exception):
    """Another live process holds the instance lock."""

    def __init__(self, path: str, owner: tuple[int, int] | None) -> None:
        self.path = path
        self.owner = owner
        who = f"pid {owner[0]}" if owner else "another process"
        super().__init__(f"{who} already runs with this state (lock {path} is held)")


def is_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` runs and started at ``start_time`` (not a reuse)."""
    return process_start_time(pid) == start_time


def read_pidfile(runtime_dir: str) -> tuple[int, int] | None:
    """(pid, start time) from the pid file, or None if absent or unreadable."""
    try:
        with open(os.path.join(runtime_dir, PID_NAME)) as f:
            pid, start = f.read().split()
        return int(pid), int(start)
    except (OSError, ValueError):
        return None


def running_instance(runtime_dir: str) -> tuple[int, int] | None:
    """The live instance recorded in ``runtime_dir``, if any."""
    owner = read_pidfile(runtime_dir)
    return owner if owner is not None and is_alive(*owner) else None


@attrs.define
class InstanceLock:
    runtime_dir: str
    state_dir: str
    pid: int
    start_time: int
    _fds: list[int] = attrs.field(factory=list)

    def release(self) -> None:
        """Remove the pid file and drop the locks."""
        pidfile = os.path.join(self.runtime_dir, PID_NAME)
        if read_pidfile(self.runtime_dir) == (self.pid, self.start_time):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(pidfile)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _lock(directory: str, mode: int, owner_hint: str | None) -> int:
    os.makedirs(directory, mode=mode, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LockHeld(path, running_instance(owner_hint) if owner_hint else None) from None
    return fd


def acquire(runtime_dir: str, state_dir: str) -> InstanceLock:
    """Take both locks and write the pid file; raises :class:`LockHeld`."""
    pid = os.getpid()
    start = process_start_time(pid)
    assert start is not None
    fds = [_lock(runtime_dir, 0o755, runtime_dir)]
    try:
        fds.append(_lock(state_dir, 0o700, runtime_dir))
        os.chmod(state_dir, 0o700)
        tmp = os.path.join(runtime_dir, f".{PID_NAME}.{pid}")
        with open(tmp, "w") as f:
            f.write(f"{pid} {start}\n")
        os.replace(tmp, os.path.join(runtime_dir, PID_NAME))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return InstanceLock(runtime_dir, state_dir, pid, start, fds)


def lock_state(state_dir: str) -> int:
    """Take only the state lock (``tunsup cleanup``); raises LockHeld.
    Returns the fd to close when done."""
    return _lock(state_dir, 0o700, None)
