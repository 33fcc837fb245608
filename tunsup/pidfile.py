"""The pid file ``runtime_dir/tunsup.pid``: ``PID START_TIME``.

A bare pid is never trusted: a process is "the service" only while both its
pid and its start time (``/proc/PID/stat`` field 22, clock ticks since boot)
match what the file says, so a reused pid is never mistaken for tunsup.

Synchronous and free of trio and pyroute2: client commands (``stop``,
``status``) import it.  The service writes the file in a worker thread or
before its event loop starts (see :mod:`tunsup.engine.lock`, which holds
the instance lock and writes this file).
"""

from __future__ import annotations

import os

from ._input import read_regular_file

PID_NAME = "tunsup.pid"
#: "PID START_TIME\n": two numbers.
PID_FILE_LIMIT = 64


def _stat_fields(pid: int) -> list[bytes] | None:
    """Fields 3.. of ``/proc/PID/stat`` (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    return data[data.rindex(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat``
    field 22), or None if there is no such process.  Together with the pid
    it identifies a process across pid reuse."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields is not None else None


class ProcessId:
    """A process named by pid *and* start time.  (A plain class, not a
    ``typing.NamedTuple``: client commands import this module, and
    ``typing`` alone costs their start several milliseconds.)"""

    __slots__ = ("pid", "start_time")

    def __init__(self, pid: int, start_time: int) -> None:
        self.pid = pid
        self.start_time = start_time

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ProcessId) and self.pid == other.pid
                and self.start_time == other.start_time)

    def __hash__(self) -> int:
        return hash((self.pid, self.start_time))

    def __repr__(self) -> str:
        return f"ProcessId(pid={self.pid}, start_time={self.start_time})"

    def alive(self) -> bool:
        """True while this very process runs.  A zombie (dead, not yet
        reaped by its parent: it keeps its /proc entry) is not alive: it
        holds no locks and will never act again."""
        fields = _stat_fields(self.pid)
        return (fields is not None and int(fields[19]) == self.start_time
                and fields[0] not in (b"Z", b"X"))


def pid_path(runtime_dir: str) -> str:
    return os.path.join(runtime_dir, PID_NAME)


def read(runtime_dir: str) -> ProcessId | None:
    """What the pid file says, or None when it is absent or unreadable."""
    try:
        # Never blocking, bounded: a FIFO or /dev/zero put in its place is
        # "unreadable", not a hang or a memory blow-up of every client.
        pid, start = read_regular_file(pid_path(runtime_dir), PID_FILE_LIMIT).split()
        return ProcessId(int(pid), int(start))
    except (OSError, ValueError):
        return None


def running(runtime_dir: str) -> ProcessId | None:
    """The live service recorded in ``runtime_dir``, if any."""
    owner = read(runtime_dir)
    return owner if owner is not None and owner.alive() else None


def myself() -> ProcessId:
    pid = os.getpid()
    start = process_start_time(pid)
    assert start is not None
    return ProcessId(pid, start)


def write(runtime_dir: str) -> ProcessId:
    """Create ``runtime_dir`` (0755) if needed and write this process's pid
    file atomically (write, rename).  Raises ``FileExistsError`` naming the
    other process when a live service already owns ``runtime_dir``."""
    os.makedirs(runtime_dir, mode=0o755, exist_ok=True)
    other = running(runtime_dir)
    me = myself()
    if other is not None and other != me:
        raise FileExistsError(f"tunsup (pid {other.pid}) already runs with runtime "
                              f"directory {runtime_dir}")
    tmp = os.path.join(runtime_dir, f".{PID_NAME}.{me.pid}")
    with open(tmp, "w") as f:
        f.write(f"{me.pid} {me.start_time}\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, pid_path(runtime_dir))
    return me


def remove(runtime_dir: str, owner: ProcessId) -> None:
    """Remove the pid file if it still names ``owner``."""
    if read(runtime_dir) == owner:
        try:  # noqa: SIM105 (contextlib costs client starts ms)
            os.unlink(pid_path(runtime_dir))
        except FileNotFoundError:
            pass
