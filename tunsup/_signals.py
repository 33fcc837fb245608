"""Stop and reload signals outside the supervisor's receiver.

The supervisor handles SIGTERM, SIGINT and SIGHUP through
``trio.open_signal_receiver``, which on exit puts back the handlers it
found and re-raises the signals it had not yet handed out.  If those are the
default ones, a signal arriving after the receiver closed — while the
service sends its exit event, flushes its log, removes its pid file —
kills the process (status -15) after a clean teardown.

``run`` therefore calls :func:`absorb` first, for the rest of the process's
life: from then on these signals only land in a record.  The receiver
restores this handler when it closes, so late and re-raised signals are
absorbed too; and one that arrived before the receiver opened is not lost:
the supervisor takes it with :func:`take_early` and stops at once.

Trio-free, synchronous; the handler only counts in a dict (signal
handlers run on the main thread between bytecodes).
"""

from __future__ import annotations

import signal
from types import FrameType

#: SIGTERM/SIGINT stop the service, SIGHUP reloads it.
ABSORBED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

#: Signal number -> how many arrived (bounded: one entry per signal).
_early: dict[int, int] = {}


def _record(signum: int, frame: FrameType | None) -> None:
    _early[signum] = _early.get(signum, 0) + 1


def absorb() -> None:
    """From now on SIGTERM, SIGINT and SIGHUP are recorded, never acted on
    by the default handlers (no death by signal, no KeyboardInterrupt).
    For the process's main thread; meant to stay until the process exits."""
    for signum in ABSORBED:
        signal.signal(signum, _record)


def absorbing() -> bool:
    """Whether :func:`absorb` is in force."""
    return signal.getsignal(signal.SIGTERM) is _record


def take_early() -> list[int]:
    """The signals recorded so far, in order of first arrival; forgets
    them."""
    taken = list(_early)
    _early.clear()
    return taken
