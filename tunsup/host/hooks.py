"""PreUp/PostUp/PreDown/PostDown hooks, run with bash as wg-quick does."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Awaitable, Callable

import trio

from .._errors import HostError
from ..pidfile import process_start_time
from ._pump import pump_lines, truncation_note

#: After bash exits, how long its output is still read: a hook that starts
#: a background job (``cmd &``) leaves the pipe open, and must not hold up
#: the tunnel.
OUTPUT_GRACE = 0.2


#: Called once a hook's process exists: ``(pid, start time)`` (the start
#: time is None if it already ended).  The journal records it there, so
#: that crash recovery can end a hook that outlived its instance.
HookStarted = Callable[[int, int | None], Awaitable[None]]


async def run_hook(command: str, log: logging.Logger, timeout: float, *,
                   started: HookStarted | None = None) -> None:
    """Run one hook command (``%i`` already expanded) with ``bash -c``.

    It runs in its own session (a terminal's Ctrl-C does not reach it) and
    its output is logged.  Raises :class:`HostError` on a non-zero exit or
    after ``timeout`` seconds (counted from the spawn, ``started``
    included), when its whole process group is killed.  On cancellation
    the process group is killed too (and a warning says so) and
    ``trio.Cancelled`` propagates.
    """
    log.info("running hook: %s", command)
    try:
        proc = await trio.lowlevel.open_process(
            ["bash", "-c", command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        raise HostError(f"cannot run hook {command!r}: {exc}") from exc
    assert proc.stdout is not None
    deadline = trio.current_time() + timeout
    eof = trio.Event()
    timed_out = False

    async def pump(stream: trio.abc.ReceiveStream) -> None:
        try:
            await pump_lines(stream, lambda raw, cut: _log_line(log, raw, cut))
        finally:
            eof.set()

    # No checkpoint between the spawn and this try: whatever happens next,
    # the finally ends the hook's process group.
    try:
        # The verdict is raised only after the nursery has closed: raised
        # inside, it would reach the caller wrapped in an ExceptionGroup.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout)
            if started is not None:
                await started(proc.pid,
                              await trio.to_thread.run_sync(process_start_time, proc.pid))
            with trio.move_on_at(deadline) as waiting:
                await proc.wait()
            timed_out = waiting.cancelled_caught
            if not timed_out:
                with trio.move_on_after(OUTPUT_GRACE):
                    await eof.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            if not timed_out:  # (a timeout is the HostError below)
                # Cancelled: a stop, or a start given up, while it ran.
                log.warning("hook %r interrupted: its process group was killed", command)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await proc.wait()
        await proc.stdout.aclose()
    if timed_out:
        raise HostError(f"hook {command!r} did not finish within {timeout:g} s")
    if proc.returncode != 0:
        raise HostError(f"hook {command!r} exited with status {proc.returncode}")


def _log_line(log: logging.Logger, raw: bytes, truncated: bool) -> None:
    text = raw.decode("utf-8", "replace").rstrip()
    if not text:
        return
    if truncated:
        log.warning("[hook] %s%s", text, truncation_note())
    else:
        log.info("[hook] %s", text)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
