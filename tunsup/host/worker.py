"""A dedicated thread for synchronous calls that must stay off the trio thread.

pyroute2's synchronous API and the bulk route encoder are blocking; the
engine runs them here.  One thread per worker serializes the calls, so a
non-thread-safe resource (a netlink socket) is only ever touched from one
thread.

Cancellation and timeouts: a job that has not started yet when its caller
gives up is skipped, so nothing happens on the host behind the caller's
back.  A job that is already running cannot be interrupted.  When its
caller is cancelled, it waits for it (shielded) at most
:data:`CANCEL_GRACE` seconds, and never past the caller's own deadline or
the job's timeout, so that it learns what happened on the host; the
cancellation is then delivered at its next checkpoint.  A running job that
outlives that wait (or its timeout) is *abandoned*: its result is
discarded, the thread is written off and a fresh thread serves the next
job, so one wedged call never holds up the jobs behind it.  The abandoned
thread exits as soon as its call returns, without touching the queue
again; a job can ask :func:`raise_if_abandoned` between steps, so that it
stops instead of changing the host behind its caller's back.  State a job
keeps per thread (a netlink socket, see ``on_exit``) is therefore never
shared between the old thread and its replacement.

A caller may also learn that its job's work is done before the job
returns (``settled``, see :meth:`SerialWorker.call`): the kernel announces
a deleted link at once, but the request deleting it returns only after
~20 ms of waiting for RCU.  The running job is then *detached*: the
caller goes on, the thread finishes the call and serves the jobs behind
it, and the job's result is dropped (an exception is logged).
"""

from __future__ import annotations

import contextlib
import logging
import math
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from .._errors import HostError, leaves

T = TypeVar("T")

log = logging.getLogger("tunsup.worker")

_QUEUED, _RUNNING, _DONE, _SKIPPED, _ABANDONED, _DETACHED = range(6)

#: Longest a cancelled caller waits for its running job to finish (within
#: its own deadline and the job's timeout) before abandoning it.
CANCEL_GRACE = 1.0

_local = threading.local()


class Abandoned(HostError):
    """Raised in a worker thread by :func:`raise_if_abandoned`."""


def raise_if_abandoned() -> None:
    """In a job: raise :class:`Abandoned` if the caller gave up on it (the
    thread has been replaced).  A no-op outside worker threads."""
    job = getattr(_local, "job", None)
    if job is not None and job.abandoned:
        raise Abandoned("abandoned by its caller")


class _Job(Generic[T]):
    def __init__(self, fn: Callable[[], T], token: trio.lowlevel.TrioToken) -> None:
        self.fn = fn
        self.token = token
        self.done = trio.Event()
        self.result: outcome.Outcome[T] | None = None
        self._state = _QUEUED
        self._lock = threading.Lock()

    @property
    def abandoned(self) -> bool:
        return self._state == _ABANDONED

    def try_skip(self) -> bool:
        """Mark a queued job as skipped; False if it already started."""
        with self._lock:
            if self._state == _QUEUED:
                self._state = _SKIPPED
                return True
            return False

    def try_detach(self) -> bool:
        """Stop waiting for a running job whose work is known to be done;
        False if it is done (its result is there) or has not started."""
        with self._lock:
            if self._state == _RUNNING:
                self._state = _DETACHED
                return True
            return False

    def try_abandon(self) -> bool:
        """Give up on a running (or detached) job; False if it is done (its
        result is there) or was never started."""
        with self._lock:
            if self._state in (_RUNNING, _DETACHED):
                self._state = _ABANDONED
                return True
            return False

    def run(self) -> bool:
        """Run the job in the calling thread.  Returns False when it was
        abandoned meanwhile: the thread must then stop serving."""
        with self._lock:
            if self._state == _SKIPPED:
                return True
            self._state = _RUNNING
        result = outcome.capture(self.fn)
        with self._lock:
            if self._state == _ABANDONED:
                return False  # the caller is gone; so is the result
            if self._state == _DETACHED:
                # The caller went on without the result: the thread is
                # sound and serves on (``done`` tells its watch).
                if isinstance(result, outcome.Error):
                    log.warning("a job finished after its caller went on, and failed: %s",
                                result.error)
            else:
                self.result = result
            self._state = _DONE
        with contextlib.suppress(trio.RunFinishedError):
            self.token.run_sync_soon(self.done.set)
        return True


class _Posted:
    """A job nobody waits for (see :meth:`SerialWorker.post`)."""

    __slots__ = ("fn", "what")
    abandoned = False

    def __init__(self, fn: Callable[[], object], what: str) -> None:
        self.fn = fn
        self.what = what

    def run(self) -> bool:
        try:
            self.fn()
        except Exception as exc:
            log.warning("%s failed: %s", self.what, exc)
        return True


async def _first_of(done: Callable[[], Awaitable[object]],
                    settled: Callable[[], Awaitable[T]],
                    early: list[outcome.Value[T]]) -> None:
    """Wait for ``done()`` or ``settled()``, whichever returns first, and
    cancel the other; ``settled``'s result goes into ``early`` (there even
    when a cancellation ends the wait in the same tick).  An exception
    ``settled`` raises is logged, and ``done`` waited for.  Cancellation:
    both are cancelled, and ``Cancelled`` (or KeyboardInterrupt) comes out
    bare, as from a plain wait, not in an exception group."""
    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                try:
                    early.append(outcome.Value(await settled()))
                except Exception as exc:
                    log.warning("watching for a job's work to be done failed: %s", exc)
                    return
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            await done()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The caller's handling of cancellation (wait, skip or abandon the
        # job) must apply; a group would pass it by.  Only Cancelled (from
        # either task) and what trio raises in a task (KeyboardInterrupt)
        # can get out: watch() keeps every other exception in.
        _cancelled, rest = group.split(trio.Cancelled)
        others = leaves(rest) if rest is not None else []
        if len(others) > 1:
            raise
        raise (others[0] if others else leaves(group)[0]) from None


class SerialWorker:
    """Runs blocking callables one at a time on a dedicated daemon thread.

    ``on_exit`` runs in a worker thread when it stops serving (after
    :meth:`close`, or once its abandoned job returns): it releases what that
    thread kept in thread-local state.
    """

    def __init__(self, name: str, *, on_exit: Callable[[], None] | None = None) -> None:
        self._name = name
        self._on_exit = on_exit
        self._queue: queue.SimpleQueue[_Job[Any] | _Posted | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        #: Threads written off so far (a wedged job each).
        self.replaced = 0

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            while True:
                job = self._queue.get()
                if job is None:
                    return
                _local.job = job
                try:
                    if not job.run():
                        return
                finally:
                    _local.job = None
        finally:
            if self._on_exit is not None:
                with contextlib.suppress(Exception):
                    self._on_exit()

    def _abandon(self, job: _Job[Any], what: str) -> bool:
        """Write off the thread running ``job`` and start a fresh one for
        the jobs behind it; False when the job has just finished."""
        if not job.try_abandon():
            return False
        self.replaced += 1
        log.warning("%s: worker thread %s abandoned; a fresh one takes over", what, self._name)
        self._thread = None
        self._ensure_thread()
        return True

    async def call(self, fn: Callable[[], T], *, timeout: float, what: str,
                   settled: Callable[[], Awaitable[T]] | None = None) -> T:
        """Run ``fn()`` on the worker thread and return its result.

        With ``settled``: it runs in the caller's task alongside the job,
        and should return (a result standing for the job's) once the job's
        work is known to be done on the host, or never.  If it returns
        while the job runs, that is the call's result and the job is
        detached (see the module docstring; still written off at its
        deadline); while the job is queued (the work was done, but not by
        this job), the job is waited for as usual.  It is cancelled when
        the job finishes first; if it raises, the job is waited for.

        Raises :class:`HostError` if it does not finish within ``timeout``
        seconds (a queued job is skipped, a running one abandoned).
        Cancellation: see the module docstring — a queued job is skipped and
        ``trio.Cancelled`` raised; a running one is waited for at most
        :data:`CANCEL_GRACE` seconds (never past the caller's deadline or
        ``timeout``) and its outcome returned or raised, else abandoned and
        ``trio.Cancelled`` raised.
        """
        job: _Job[T] = _Job(fn, trio.lowlevel.current_trio_token())
        caller_deadline = trio.current_effective_deadline()
        job_deadline = trio.current_time() + timeout
        self._ensure_thread()
        self._queue.put(job)
        try:
            early: list[outcome.Value[T]] = []
            with trio.move_on_at(job_deadline) as scope:
                if settled is None:
                    await job.done.wait()
                else:
                    await _first_of(job.done.wait, settled, early)
            if early and job.try_detach():
                # Watched until its own deadline: a job wedged in the
                # kernel must not hold the thread for the jobs behind it.
                trio.lowlevel.spawn_system_task(self._watch_detached, job, job_deadline, what)
                return early[0].unwrap()
            # Settled while still queued (another's work, not ours: the job
            # finds that out itself) or just finished: the job decides.
            if early and not scope.cancelled_caught:
                with trio.move_on_at(job_deadline) as scope:
                    await job.done.wait()
            if scope.cancelled_caught and (job.try_skip() or self._abandon(job, what)):
                raise HostError(f"{what}: no answer within {timeout:g} s") from None
        except trio.Cancelled:
            if job.try_skip():
                raise
            grace_end = min(trio.current_time() + CANCEL_GRACE, job_deadline, caller_deadline)
            if math.isfinite(grace_end) and grace_end > trio.current_time():
                with trio.CancelScope(shield=True, deadline=grace_end):
                    await job.done.wait()
            if self._abandon(job, what):
                raise
            # Fall through: the host change happened; the caller must know.
            # Its scope is still cancelled, so the next checkpoint raises.
        assert job.result is not None
        return job.result.unwrap()

    async def _watch_detached(self, job: _Job[Any], deadline: float, what: str) -> None:
        """Write off the thread of a detached job still running at its
        deadline (a fresh one serves the jobs behind it), as for a job
        waited for.  Cancelled when the run ends."""
        with trio.move_on_at(deadline):
            await job.done.wait()
            return
        try:
            self._abandon(job, what)
        except Exception as exc:  # a system task must not raise
            log.warning("%s: writing off a wedged worker thread failed: %s", what, exc)

    def post(self, fn: Callable[[], object], *, what: str) -> None:
        """Queue ``fn()`` to run after the jobs queued so far, with nobody
        waiting for it (callable from any thread, a job included): for
        housekeeping that must not hold up the caller whose job made it
        due.  An exception it raises is logged.  A job queued after it
        waits for it, within that job's own timeout."""
        self._ensure_thread()
        self._queue.put(_Posted(fn, what))

    def close(self) -> None:
        """Let the thread exit once queued jobs are done."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread = None
