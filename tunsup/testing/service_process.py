"""Drive a ``tunsup run`` process from outside, as an operator would.

Used by the demo, the integration tests and the benchmarks.  Synchronous;
readiness is learned the way systemd learns it: ``READY=1`` on a private
``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from . import netns as _netns


class ServiceFailed(Exception):
    """The service exited or did not become ready in time."""


#: How long a SIGKILLed process is waited for.
KILL_REAP_TIMEOUT = 10.0


def reap(proc: subprocess.Popen[Any], timeout: float) -> int | None:
    """Wait up to ``timeout`` seconds (0: just look) for ``proc`` to exit,
    reap it and return its exit code as ``Popen`` gives it (negative: a
    signal); None while it runs.

    Not through ``Popen.wait``/``poll``: a signal handler that raises (the
    demo turns SIGTERM into KeyboardInterrupt) can land between ``Popen``
    taking its internal lock and the ``try`` that gives it back, and every
    later ``wait()`` then blocks on that lock for ever (seen: an interrupted
    demo hung with its second service still running).  A pidfd needs no
    lock.  A child someone else reaped (``delete_namespace`` reaps its own
    children) counts as exited with 0, as ``Popen`` counts it, also when
    its pid already belongs to another process."""
    if proc.returncode is not None:
        return int(proc.returncode)
    try:
        fd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        return _set_code(proc, 0)
    try:
        try:
            # Still our child?  Reaped elsewhere, its pid may now be another
            # process's: never wait for (nor signal) that one.
            os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return _set_code(proc, 0)
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        readable = poller.poll(max(timeout, 0.0) * 1000)
    finally:
        os.close(fd)
    if not readable:
        return None
    try:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
    except ChildProcessError:
        return _set_code(proc, 0)
    if pid == 0:  # not yet waitable (cannot be: the pidfd said it exited)
        return None
    return _set_code(proc, os.waitstatus_to_exitcode(status))


def _set_code(proc: subprocess.Popen[Any], code: int) -> int:
    if proc.returncode is None:  # Popen may have reaped it meanwhile
        proc.returncode = code
    return int(proc.returncode)


class ServiceProcess:
    """One ``python -m tunsup run ...`` inside namespace ``ns``."""

    def __init__(
        self,
        ns: str | None,
        run_args: Sequence[str],
        workdir: str,
        label: str,
        *,
        env: Mapping[str, str] | None = None,
        program: Sequence[str] | None = None,
    ) -> None:
        """``program``: what runs ``tunsup`` (default ``python -m tunsup``)."""
        self.label = label
        # A second run with the same label (a restart) gets its own files.
        stem, n = label, 1
        while os.path.exists(os.path.join(workdir, f"{stem}.notify")):
            n += 1
            stem = f"{label}.{n}"
        self.notify_path = os.path.join(workdir, f"{stem}.notify")
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(self.notify_path)
        self.log_path = os.path.join(workdir, f"{stem}.log")
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        full_env = dict(os.environ, NOTIFY_SOCKET=self.notify_path, **(env or {}))
        argv = [*(program or (sys.executable, "-m", "tunsup")), "run", *run_args]
        if ns is not None:
            argv = _netns.ns_exec_argv(ns, argv)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=full_env)
        self.ready_after: float | None = None
        self.notifications: list[str] = []

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Wait for ``READY=1``; return seconds since the process started."""
        deadline = time.monotonic() + timeout
        while True:
            if reap(self.proc, 0) is not None:
                raise ServiceFailed(
                    f"tunsup ({self.label}) exited with {self.proc.returncode} before it "
                    f"was ready:\n{self.output_tail()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServiceFailed(f"tunsup ({self.label}) not ready within {timeout:g} s:\n"
                                    f"{self.output_tail()}")
            self.notify.settimeout(min(remaining, 0.2))
            try:
                msg = self.notify.recv(65536).decode()
            except TimeoutError:
                continue
            self.notifications.append(msg)
            if "READY=1" in msg.split("\n"):
                self.ready_after = time.monotonic() - self.started
                return self.ready_after

    def stop(self, sig: signal.Signals = signal.SIGTERM,
             timeout: float = 30.0) -> tuple[int | None, float]:
        """Send ``sig`` and wait for the exit: (exit code or None, seconds)."""
        started = time.monotonic()
        if reap(self.proc, 0) is None:
            # Not reaped: the pid is still this process's, never a reused one.
            os.kill(self.proc.pid, sig)
        code = self.wait_exit(timeout)
        return code, time.monotonic() - started

    def wait_exit(self, timeout: float = 30.0) -> int | None:
        """Exit code, or None if it had to be killed after ``timeout``
        (then waited for up to :data:`KILL_REAP_TIMEOUT` more).  Bounded
        whatever state an interrupted ``Popen`` call left (see :func:`reap`)."""
        code = reap(self.proc, timeout)
        if code is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            reap(self.proc, KILL_REAP_TIMEOUT)
        return code

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def output_tail(self, n: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-n:])

    def close(self) -> None:
        """Stop the service if still running (SIGTERM, then SIGKILL)."""
        if reap(self.proc, 0) is None:
            self.stop(signal.SIGTERM, timeout=15)
        self._log.close()
        self.notify.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)

    def __enter__(self) -> ServiceProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ready_then_stopped(svc: ServiceProcess, timeout: float = 60.0) -> str:
    """Wait until ``svc`` is ready, stop it and close it (even when it never
    got ready); returns its output.  AssertionError when it did not exit 0."""
    try:
        svc.wait_ready(timeout)
    finally:
        code, _ = svc.stop()
        svc.close()
    assert code == 0, svc.output()
    return svc.output()
