"""A dedicated thread for synchronous calls that must stay off the trio thread.

pyroute2's synchronous API and the bulk route encoder are blocking; the
engine runs them here.  One thread per worker serializes the calls, so a
non-thread-safe resource (a netlink socket) is only ever touched from one
thread.

Cancellation: a job that has not started yet when its caller is cancelled is
skipped, so nothing happens on the host behind the caller's back, and
``trio.Cancelled`` propagates.  A job that is already running cannot be
interrupted; the caller waits for it (shielded, bounded by the job's
timeout) and gets its result, exactly as ``trio.to_thread.run_sync`` does
without ``abandon_on_cancel``: the caller learns what happened on the host
(and records it) and the cancellation is delivered at its next checkpoint.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from .._errors import HostError

T = TypeVar("T")

_QUEUED, _RUNNING, _DONE, _SKIPPED = range(4)


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[], T], token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.token = token
        self.done = trio.Event()
        self.result: outcome.Outcome[T] | None = None
        self._state = _QUEUED
        self._lock = threading.Lock()

    def try_skip(self) -> bool:
        """Mark a queued job as skipped; False if it already started."""
        with self._lock:
            if self._state == _QUEUED:
                self._state = _SKIPPED
                return True
            return False

    def run(self) -> None:
        with self._lock:
            if self._state == _SKIPPED:
                return
            self._state = _RUNNING
        self.result = outcome.capture(self.fn)
        with self._lock:
            self._state = _DONE
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.done.set)


class SerialWorker:
    """Runs blocking callables one at a time on a dedicated daemon thread."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._queue: queue.SimpleQueue[_Job[Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            job.run()

    async def call(self, fn: Callable[[], T], *, timeout: float, what: str) -> T:
        """Run ``fn()`` on the worker thread and return its result.

        Raises :class:`HostError` if it does not finish within ``timeout``
        seconds (the job is skipped if it had not started).  On cancellation:
        see the module docstring — a queued job is skipped and
        ``trio.Cancelled`` raised; a running one is waited for (at most
        ``timeout``) and its outcome returned or raised.
        """
        job: _Job[T] = _Job(fn, trio.lowlevel.current_trio_token())
        self._ensure_thread()
        self._queue.put(job)
        try:
            with trio.fail_after(timeout):
                await job.done.wait()
        except trio.TooSlowError:
            job.try_skip()
            raise HostError(f"{what}: no answer within {timeout:g} s") from None
        except trio.Cancelled:
            if job.try_skip():
                raise
            with trio.CancelScope(shield=True), trio.move_on_after(timeout):
                await job.done.wait()
            if job.result is None:
                raise
            # Fall through: the host change happened; the caller must know.
            # Its scope is still cancelled, so the next checkpoint raises.
        assert job.result is not None
        return job.result.unwrap()

    def close(self) -> None:
        """Let the thread exit once queued jobs are done."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
