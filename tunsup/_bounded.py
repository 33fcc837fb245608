"""Bounded waits: :func:`bounded` for a blocking call (an abandonable
thread and a deadline), :func:`deadline` for an awaitable one.

``fail_after`` around ``trio.to_thread.run_sync`` bounds nothing unless the
thread may be abandoned: trio then waits for the thread, however long it
blocks (a hung disk, a FIFO where a file was expected).  :func:`bounded` is
the one way tunsup runs such a call.

An abandoned thread still finishes its call later, unobserved.  Only hand
:func:`bounded` a function for which that is harmless: one that only reads
or computes, one that is idempotent (removing a file that is already gone),
or one that checks a flag before a late change (see ``gave_up``).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import trio

from ._errors import HostError

T = TypeVar("T")


async def bounded(seconds: float, what: str, fn: Callable[..., T], *args: Any,
                  error: type[HostError] = HostError,
                  gave_up: threading.Event | None = None) -> T:
    """``fn(*args)`` in a worker thread, within ``seconds``.

    Raises ``error(f"{what} timed out after {seconds:g} s")`` when the
    deadline passes first; exceptions of ``fn`` propagate.  Cancellation:
    propagates at once.  On a timeout or cancellation the thread is
    abandoned (it finishes ``fn``; the result is discarded) and
    ``gave_up``, if given, is set first, so ``fn`` can check it before a
    change that must not happen late.
    """
    call = functools.partial(fn, *args) if args else fn
    done = False
    try:
        with trio.fail_after(seconds):
            result = await trio.to_thread.run_sync(call, abandon_on_cancel=True,
                                                   thread_name=f"tunsup: {what}")
        done = True
        return result
    except trio.TooSlowError:
        raise error(f"{what} timed out after {seconds:g} s") from None
    finally:
        if not done and gave_up is not None:
            gave_up.set()


@contextlib.contextmanager
def deadline(seconds: float, message: str, error: type[Exception] = HostError) -> Iterator[None]:
    """``trio.fail_after(seconds)`` whose expiry raises ``error(message)``
    (say what did not happen in time, and the bound).  Only for awaits that
    trio can cancel (sockets, processes, sleeps); a blocking call in a
    thread needs :func:`bounded`.  Cancellation from outside propagates."""
    try:
        with trio.fail_after(seconds):
            yield
    except trio.TooSlowError:
        raise error(message) from None
