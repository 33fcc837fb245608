"""PreUp/PostUp/PreDown/PostDown hooks, run with bash as wg-quick does."""

from __future__ import annotations

import logging
import subprocess

import trio

from ._errors import HostError


async def run_hook(command: str, log: logging.Logger, timeout: float) -> None:
    """Run one hook command (``%i`` already expanded) with ``bash -c``.

    Its output is logged.  Raises :class:`HostError` on a non-zero exit or
    after ``timeout`` seconds (the command is killed).  On cancellation the
    command is killed and ``trio.Cancelled`` propagates.
    """
    log.info("running hook: %s", command)
    try:
        with trio.fail_after(timeout):
            result = await trio.run_process(
                ["bash", "-c", command],
                stdin=subprocess.DEVNULL,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    except trio.TooSlowError:
        raise HostError(f"hook {command!r} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise HostError(f"cannot run hook {command!r}: {exc}") from exc
    for stream in (result.stdout, result.stderr):
        for line in stream.decode("utf-8", "replace").splitlines():
            if line.strip():
                log.info("[hook] %s", line)
    if result.returncode != 0:
        raise HostError(f"hook {command!r} exited with status {result.returncode}")
