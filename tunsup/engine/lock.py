"""One running instance per state: exclusive locks, then the pid file.

``run`` holds ``flock`` locks on ``runtime_dir/tunsup.lock`` and
``state_dir/tunsup.lock`` for its whole life and writes the pid file
(:mod:`tunsup.pidfile`: pid *and* start time).  The kernel drops the locks
when the process dies, however it dies, so a stale pid file never blocks a
new start, and liveness never trusts a bare pid.

Synchronous: used before the event loop starts and by ``cleanup``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Sequence

import attrs

from .. import pidfile

LOCK_NAME = "tunsup.lock"


class LockHeld(Exception):
    """Another live process holds the instance lock."""

    def __init__(self, path: str, owner: pidfile.ProcessId | None,
                 holder: int | None = None) -> None:
        self.path = path
        self.owner = owner
        pid = owner.pid if owner else holder
        who = f"pid {pid}" if pid is not None else "another process"
        super().__init__(f"{who} already runs with this state (lock {path} is held)")


#: Bound on the read of /proc/locks (one line per lock on the machine).
_PROC_LOCKS_LIMIT = 4 << 20


def lock_holder(fd: int) -> int | None:
    """The pid holding a ``flock`` on the file open as ``fd``, as the kernel
    lists it in /proc/locks (the process that took it); None when not found
    or not readable.  For a message only: a state directory's lock has no
    pid file beside it to name its owner."""
    st = os.fstat(fd)
    wanted = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks", "rb") as f:
            text = f.read(_PROC_LOCKS_LIMIT).decode("ascii", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:01:5678 0 EOF"
        fields = line.split()
        if "FLOCK" in fields and wanted in fields:
            at = fields.index(wanted)
            if fields[at - 1].isdigit():
                return int(fields[at - 1])
    return None


def is_alive(pid: int, start_time: int) -> bool:
    """True when ``pid`` runs and started at ``start_time`` (not a reuse)."""
    return pidfile.ProcessId(pid, start_time).alive()


@attrs.define
class InstanceLock:
    runtime_dir: str
    state_dir: str
    me: pidfile.ProcessId
    _fds: list[int] = attrs.field(factory=list)

    @property
    def pid(self) -> int:
        return self.me.pid

    @property
    def start_time(self) -> int:
        return self.me.start_time

    def release(self) -> None:
        """Remove the pid file and drop the locks."""
        pidfile.remove(self.runtime_dir, self.me)
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


def _lock(directory: str, mode: int, runtime_dir: str | None) -> int:
    os.makedirs(directory, mode=mode, exist_ok=True)
    path = os.path.join(directory, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        try:
            owner = pidfile.running(runtime_dir) if runtime_dir else None
            holder = None if owner else lock_holder(fd)
        finally:
            os.close(fd)
        raise LockHeld(path, owner, holder) from None
    return fd


def acquire(runtime_dir: str, state_dir: str) -> InstanceLock:
    """Take both locks and write the pid file; raises :class:`LockHeld`."""
    fds = [_lock(runtime_dir, 0o755, runtime_dir)]
    try:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        # One directory for both is fine: one lock then (a second flock of
        # the same file from this process would conflict with the first).
        if os.path.realpath(state_dir) != os.path.realpath(runtime_dir):
            fds.append(_lock(state_dir, 0o700, runtime_dir))
        os.chmod(state_dir, 0o700)
        me = pidfile.write(runtime_dir)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return InstanceLock(runtime_dir, state_dir, me, fds)


def lock_state(state_dir: str) -> int:
    """Take only the state lock (``tunsup cleanup``); raises LockHeld.
    Returns the fd to close when done."""
    return _lock(state_dir, 0o700, None)


def stale_runtime_files(runtime_dir: str, sockets: Sequence[str] = ()) -> list[str]:
    """The pid file, and those of ``sockets`` that exist as sockets, in
    ``runtime_dir`` when they were left by a service that is dead (its pid
    *and* start time no longer run): what
    :func:`remove_stale_runtime_files` removes.  Empty when there is no pid
    file, or when its owner is alive."""
    owner = pidfile.read(runtime_dir)
    if owner is None or owner.alive():
        return []
    found = []
    for sock in sockets:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(sock).st_mode):
                found.append(sock)
    return [*found, pidfile.pid_path(runtime_dir)]


def remove_stale_runtime_files(runtime_dir: str, sockets: Sequence[str] = ()) -> list[str]:
    """Remove what :func:`stale_runtime_files` finds, holding the runtime
    directory's instance lock meanwhile, so that a service starting at the
    same moment never loses its fresh files; return what was removed.
    Nothing is removed while a live process holds that lock or while the
    pid file names a live process.  A missing directory is left alone."""
    if not os.path.isdir(runtime_dir):
        return []
    try:
        fd = _lock(runtime_dir, 0o755, runtime_dir)
    except LockHeld:
        return []
    try:
        owner = pidfile.read(runtime_dir)
        removed = []
        for path in stale_runtime_files(runtime_dir, sockets):
            # The pid file goes last, and only if it still names the dead owner.
            if path == pidfile.pid_path(runtime_dir):
                if owner is not None and pidfile.read(runtime_dir) == owner:
                    pidfile.remove(runtime_dir, owner)
                    removed.append(path)
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed.append(path)
        return removed
    finally:
        os.close(fd)
