"""PreUp/PostUp/PreDown/PostDown hooks, run with bash as wg-quick does."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import trio

from .._errors import HostError

#: After bash exits, how long its output is still read: a hook that starts
#: a background job (``cmd &``) leaves the pipe open, and must not hold up
#: the tunnel.
OUTPUT_GRACE = 0.2


async def run_hook(command: str, log: logging.Logger, timeout: float) -> None:
    """Run one hook command (``%i`` already expanded) with ``bash -c``.

    It runs in its own session (a terminal's Ctrl-C does not reach it) and
    its output is logged.  Raises :class:`HostError` on a non-zero exit or
    after ``timeout`` seconds, when its whole process group is killed.  On
    cancellation the process group is killed too and ``trio.Cancelled``
    propagates.
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
    eof = trio.Event()

    async def pump(stream: trio.abc.ReceiveStream) -> None:
        try:
            await _log_output(stream, log)
        finally:
            eof.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, proc.stdout)
            try:
                with trio.fail_after(timeout):
                    returncode = await proc.wait()
            except trio.TooSlowError:
                raise HostError(f"hook {command!r} did not finish within {timeout:g} s") from None
            with trio.move_on_after(OUTPUT_GRACE):
                await eof.wait()
            nursery.cancel_scope.cancel()
    finally:
        if proc.returncode is None:
            _kill_group(proc.pid)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await proc.wait()
        await proc.stdout.aclose()
    if returncode != 0:
        raise HostError(f"hook {command!r} exited with status {returncode}")


async def _log_output(stream: trio.abc.ReceiveStream, log: logging.Logger) -> None:
    buf = b""
    async for chunk in stream:
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            if line.strip():
                log.info("[hook] %s", line.decode("utf-8", "replace").rstrip())
    if buf.strip():
        log.info("[hook] %s", buf.decode("utf-8", "replace").rstrip())


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
