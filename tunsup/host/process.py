"""Helper processes: spawn, log capture, TERM -> grace -> KILL, reap.

A helper (wireguard-go) runs in the foreground in its own session and
process group, with stdout/stderr captured line by line into tunsup's log.
A watcher task reaps it the moment it exits (trio waits on a pidfd), so
there is never a zombie and the engine learns of an exit at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import trio

from .._bounded import bounded
from .._errors import HostError
from ..pidfile import process_start_time as process_start_time
from ._pump import pump_lines, truncation_note
from .reaper import Reaper

#: How many of a helper's last output lines are kept for error messages.
TAIL_LINES = 20
#: SIGTERM -> SIGKILL grace for a helper whose start was cancelled right
#: after the spawn (it has not done anything worth waiting for).
SPAWN_ABORT_GRACE = 0.5
#: How long a failed spawn waits for its helper's reap after SIGKILL.
SPAWN_KILL_WAIT = 5.0


def describe_exit(program: str, pid: int, returncode: int | None,
                  tail: Iterable[str]) -> str:
    """One line on how a helper ended, with its last output lines."""
    if returncode is None:
        status = "is still running"
    elif returncode < 0:
        status = f"was killed by {signal.Signals(-returncode).name}"
    else:
        status = f"exited with status {returncode}"
    last = " | ".join(list(tail)[-3:])
    return f"helper {program} (pid {pid}) {status}" + (f"; last output: {last}" if last else "")


class Process(Protocol):
    """What :class:`HelperProcess` needs of a child process (a
    ``trio.Process``, or a test's fake one)."""

    pid: int

    @property
    def stdout(self) -> trio.abc.ReceiveStream | None: ...
    @property
    def stderr(self) -> trio.abc.ReceiveStream | None: ...

    async def wait(self) -> int: ...
    def send_signal(self, sig: int) -> None: ...


class Spawner:
    """The operating system boundary of helper processes: spawning one,
    signalling its process group, reading its start time.  The default is
    the real thing; tests substitute a fake process (see
    :mod:`tunsup.testing.fakehost`) so that everything above this line,
    :class:`HelperProcess` and :func:`start_helper`, runs unchanged."""

    async def open_process(self, argv: Sequence[str], **options: Any) -> Process:
        """Spawn ``argv`` (``options`` as for ``trio.lowlevel.open_process``)."""
        proc: trio.Process = await trio.lowlevel.open_process(list(argv), **options)
        return proc

    def signal_group(self, pgid: int, sig: signal.Signals) -> None:
        """``killpg``; raises ProcessLookupError / PermissionError like it."""
        os.killpg(pgid, sig)

    async def start_time(self, pid: int) -> int | None:
        """The start time of ``pid`` (clock ticks since boot), off the trio
        thread (it reads /proc).  Cancellable: the thread is short."""
        return await trio.to_thread.run_sync(process_start_time, pid)


#: The real operating system.
OS = Spawner()


class HelperProcess:
    """A running helper; created by :func:`start_helper`."""

    def __init__(self, proc: Process, argv: Sequence[str], log: logging.Logger,
                 spawner: Spawner = OS, reaper: Reaper | None = None) -> None:
        self._proc = proc
        self._spawner = spawner
        self._reaper = reaper
        self.argv = tuple(argv)
        self.pid: int = proc.pid
        #: Set by start_helper (read from /proc off the trio thread).
        self.start_time: int | None = None
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.exited = trio.Event()
        self._pumps_done = trio.Event()
        self._open_pumps = 0
        self.returncode: int | None = None
        self._scopes: list[trio.CancelScope] = []

    async def _shielded(self, fn: Callable[..., Awaitable[None]], *args: object) -> None:
        # The watcher and pumps must outlive a cancellation of the tunnel
        # they belong to: teardown needs them to see the helper exit.  They
        # end when the helper exits (EOF) or when close() cancels them.
        scope = trio.CancelScope(shield=True)
        self._scopes.append(scope)
        with scope:
            await fn(*args)

    def close(self) -> None:
        """Stop the watcher and log pumps (after :meth:`stop`, or when
        giving up on the helper: one that has not exited is then handed to
        the reaper, which collects its exit status when it comes)."""
        for scope in self._scopes:
            scope.cancel()
        if not self.exited.is_set() and self._reaper is not None:
            self._reaper.adopt(self, self.log)

    async def wait_reaped(self) -> None:
        """Wait for the exit and collect its status (the reaper's wait,
        once the watcher is closed).  Cancellable."""
        await self._watch()

    async def _watch(self) -> None:
        try:
            self.returncode = await self._proc.wait()
        finally:
            if self.returncode is not None:
                self.exited.set()

    async def _pump(self, stream: trio.abc.ReceiveStream, label: str) -> None:
        try:
            await pump_lines(stream, lambda raw, cut: self._emit(raw, label, cut))
        finally:
            self._open_pumps -= 1
            if self._open_pumps == 0:
                self._pumps_done.set()

    def _emit(self, raw: bytes, label: str, truncated: bool = False) -> None:
        text = raw.decode("utf-8", "replace").rstrip()
        if not text:
            return
        prog = os.path.basename(self.argv[0])
        if text[0] in "│┌└":
            # wireguard-go's boxed banner about the kernel module: noise.
            self.log.debug("[%s %s] %s", prog, label, text)
            return
        if truncated:
            text += truncation_note()
        self.tail.append(text)
        level = logging.WARNING if text.startswith("ERROR") or truncated else logging.INFO
        self.log.log(level, "[%s %s] %s", prog, label, text)

    def describe_exit(self) -> str:
        return describe_exit(self.argv[0], self.pid, self.returncode, self.tail)

    # --- stopping -----------------------------------------------------------

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the helper's process group (it leads its own)."""
        if self.exited.is_set():
            return
        try:
            self._spawner.signal_group(self.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            self._proc.send_signal(sig)

    async def stop(self, grace: float, *, kill_wait: float = 5.0) -> bool:
        """SIGTERM, wait up to ``grace`` seconds, SIGKILL, wait for the reap.

        Returns True once the helper is reaped, False if it could not be
        reaped within ``kill_wait`` after SIGKILL (which only happens for a
        process stuck in the kernel).  Not cancellable by design: callers
        run it from a shielded teardown with its own deadline; an outer
        deadline that fires anyway raises ``trio.Cancelled`` as usual.
        """
        if not self.exited.is_set():
            self.signal(signal.SIGTERM)
            with trio.move_on_after(grace):
                await self.exited.wait()
        if not self.exited.is_set():
            self.log.warning(
                "helper pid %d still running %gs after SIGTERM; sending SIGKILL", self.pid, grace
            )
            self.signal(signal.SIGKILL)
            with trio.move_on_after(kill_wait):
                await self.exited.wait()
        if self.exited.is_set():
            # Output left in the pipes is short; give the pumps a moment to
            # log it, then close them (a grandchild could hold the pipes open).
            with trio.move_on_after(0.5):
                await self._pumps_done.wait()
            self.close()
            return True
        return False


async def start_helper(
    nursery: trio.Nursery,
    argv: Sequence[str],
    *,
    log: logging.Logger,
    env: Mapping[str, str] | None = None,
    pass_fds: Sequence[int] = (),
    spawner: Spawner = OS,
    on_spawn: Callable[[HelperProcess], None] | None = None,
    reaper: Reaper | None = None,
    abort_within: Callable[[], float | None] | None = None,
    stop_noted: trio.Event | None = None,
) -> HelperProcess:
    """Spawn ``argv`` in its own session with captured output.

    The watcher and log-pump tasks run in ``nursery``.  Raises
    :class:`HostError` when the program cannot be started.  Does not wait
    for anything besides the spawn itself.  All or nothing: cancelled (or
    failing) once the process exists, it stops the process before the
    exception propagates (SIGTERM, up to :data:`SPAWN_ABORT_GRACE` s,
    SIGKILL, reap; shielded, and bounded by :data:`SPAWN_KILL_WAIT` s more
    or by a waiting stop's budget, ``abort_within()``; a stop noted
    meanwhile, ``stop_noted``, cuts it short: see :func:`_stop_spawned`).
    ``spawner``: the OS (tests pass a fake one).  ``on_spawn`` hears of the process the moment it
    exists: if it cannot be stopped (stuck in the kernel), the exception
    propagates all the same and only the caller that kept it can tell
    that a helper was left running (its ``exited`` is not set).
    ``reaper``: where a helper given up on (:meth:`HelperProcess.close`
    before it exited) is still reaped.
    """
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = await spawner.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            env=full_env,
            pass_fds=tuple(pass_fds),
        )
    except OSError as exc:
        raise HostError(f"cannot start {argv[0]}: {exc.strerror or exc}") from exc
    # No checkpoint between the spawn and here: the helper is watched (so
    # reaped) and its output pumped before anything can be cancelled.
    helper = HelperProcess(proc, argv, log, spawner, reaper)
    if on_spawn is not None:
        on_spawn(helper)
    nursery.start_soon(helper._shielded, helper._watch)
    for stream, label in ((proc.stdout, "out"), (proc.stderr, "err")):
        if stream is not None:
            helper._open_pumps += 1
            nursery.start_soon(helper._shielded, helper._pump, stream, label)
    try:
        helper.start_time = await spawner.start_time(proc.pid)
    except BaseException:
        # Cancelled (a stop, a reload) or failed after the spawn: the caller
        # never gets the handle, so the helper must not outlive this call.
        with trio.CancelScope(shield=True):
            if not await _stop_spawned(helper, abort_within, stop_noted):
                log.error("helper %s (pid %d) did not exit after SIGKILL", argv[0], helper.pid)
                helper.close()
        raise
    return helper


#: The least a waiting stop's budget leaves a spawn's stop of its helper.
SPAWN_ABORT_MIN = 0.2


async def _stop_spawned(helper: HelperProcess, abort_within: Callable[[], float | None] | None,
                        stop_noted: trio.Event | None) -> bool:
    """Stop a helper whose spawn failed: SIGTERM, up to
    :data:`SPAWN_ABORT_GRACE` s, SIGKILL, the reap; within
    :data:`SPAWN_ABORT_GRACE` + :data:`SPAWN_KILL_WAIT` s, or what
    ``abort_within()`` returns if less (a stop waiting for this: its
    budget; None: no stop waits).  A stop noted once this has begun
    (``stop_noted`` set) cuts it short: SIGKILL at once, and the reap
    waited for no longer than what ``abort_within()`` returns then.
    Returns whether the helper was reaped.  Not cancellable (callers run
    it shielded)."""

    def budget() -> float | None:
        left = abort_within() if abort_within is not None else None
        return None if left is None else max(left, SPAWN_ABORT_MIN)

    limit = SPAWN_ABORT_GRACE + SPAWN_KILL_WAIT
    first = budget()
    if first is not None:
        limit = min(limit, first)
    grace = min(SPAWN_ABORT_GRACE, limit / 2)
    waiting = trio.CancelScope()

    async def cut_short(noted: trio.Event) -> None:
        await noted.wait()
        left = budget()
        if left is None:
            return
        if not helper.exited.is_set():
            helper.signal(signal.SIGKILL)
        waiting.deadline = min(waiting.deadline, trio.current_time() + left)

    reaped = False
    async with trio.open_nursery() as nursery:
        if stop_noted is not None and not stop_noted.is_set():
            nursery.start_soon(cut_short, stop_noted)
        with waiting:
            reaped = await helper.stop(grace, kill_wait=limit - grace)
        nursery.cancel_scope.cancel()
    return reaped


# --- helpers that are not our children (crash recovery) ----------------------


def find_processes(argv: Sequence[str], started_after: int) -> list[tuple[int, int]]:
    """(pid, start time) of live processes running exactly ``argv`` that
    started at or after ``started_after`` (clock ticks since boot).
    Blocking (reads /proc): call it from a worker thread."""
    want = b"\0".join(a.encode() for a in argv) + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read() != want:
                    continue
        except OSError:
            continue
        start = process_start_time(pid)
        if start is not None and start >= started_after and not _is_zombie(pid):
            found.append((pid, start))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return True
    return data[data.rindex(b")") + 2 : data.rindex(b")") + 3] in (b"Z", b"X")


async def terminate_foreign(pid: int, start_time: int, *, grace: float,
                            kill_wait: float = 5.0, group: bool = False) -> bool:
    """SIGTERM, grace, SIGKILL a process that is not our child — only if
    ``pid`` still has ``start_time`` (a reused pid is never signalled).
    With ``group`` every signal also goes to its process group (a hook:
    the leader of its own session, so the group id is its pid; the kernel
    does not reuse a pid while it names a live group).

    Signals go through a pidfd opened *before* the start time is checked, so
    the check and the signals refer to the same process.  Waits (without
    polling) for the pidfd to report the exit.  Returns True when the
    process is gone (or was never there).  Cancellable at every wait; the
    pidfd is always closed.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        if await bounded(5, f"reading the start time of pid {pid}", process_start_time,
                         pid) != start_time:
            return True  # exited, and the pid now names another process
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
            try:
                signal.pidfd_send_signal(pidfd, sig)
            except ProcessLookupError:
                return True
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, sig)
            with trio.move_on_after(wait):
                await trio.lowlevel.wait_readable(pidfd)
                return True
        return False
    finally:
        os.close(pidfd)
