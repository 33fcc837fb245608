"""Supervisor contract that needs no network: single use, stop before run."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
import trio

from tunsup import ExitCode, _signals
from tunsup._errors import HostError
from tunsup.engine.supervisor import Supervisor
from tunsup.host import Host


class _Net:
    closed = 0

    async def close(self) -> None:
        self.closed += 1


def _host() -> Host:
    async def unused(*args: object, **kwargs: object) -> None:
        raise AssertionError("no host change expected")

    return Host(net=_Net(), start_helper=unused, run_hook=unused,  # type: ignore[arg-type]
                dns_backend=lambda kind: None)


def test_a_supervisor_runs_once() -> None:
    async def main() -> None:
        sup = Supervisor([], _host(), handle_signals=False)
        assert await sup.run() == ExitCode.OK
        with pytest.raises(RuntimeError, match="only once"):
            await sup.run()

    trio.run(main)


def test_a_start_after_stop_is_an_error() -> None:
    async def main() -> None:
        host = _host()
        sup = Supervisor([], host, handle_signals=False)
        sup.stop("test")
        with pytest.raises(RuntimeError, match="stopped before it started"):
            await sup.run()
        assert host.net.closed == 0  # type: ignore[attr-defined]

    trio.run(main)


@contextlib.contextmanager
def _absorbing() -> Iterator[None]:
    """``tunsup run``'s signal set-up, undone afterwards (this is pytest's
    process)."""
    saved = {signum: signal.getsignal(signum) for signum in _signals.ABSORBED}
    _signals.absorb()
    try:
        yield
    finally:
        _signals.take_early()
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_stop_signal_that_came_before_the_run_stops_it_at_once() -> None:
    """Issue 10 item 7: ``run`` absorbs stop signals from its start; one
    that arrives before the supervisor's receiver opens is not lost, and
    those after it closed (re-raised or new) are absorbed, never fatal."""
    async def main() -> None:
        sup = Supervisor([], _host(), persistent=True)  # would run until stopped
        signal.raise_signal(signal.SIGHUP)
        signal.raise_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await sup.run() == ExitCode.OK
        assert sup.stop_reason == "received SIGTERM"
        for signum in _signals.ABSORBED:
            signal.raise_signal(signum)  # after the receiver closed
        assert _signals.absorbing()

    with _absorbing():
        trio.run(main)


def _grouped(fail: bool) -> BaseExceptionGroup[BaseException]:
    """What a nursery raises when a stop cancels it from outside while one
    child is waiting and (``fail``) another fails at that moment."""
    caught: list[BaseExceptionGroup[BaseException]] = []

    async def main() -> None:
        with trio.CancelScope() as outer:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trio.sleep_forever)

                    async def child() -> None:
                        await trio.lowlevel.checkpoint()
                        outer.cancel()
                        if fail:
                            raise HostError("the helper's socket vanished")
                        await trio.sleep_forever()

                    nursery.start_soon(child)
            except BaseExceptionGroup as group:
                caught.append(group)

    trio.run(main)
    return caught[0]


def test_a_failure_grouped_with_cancellations_is_a_failure() -> None:
    """A tunnel tells its own failure from a stop by the exception that
    ended it: a group holding a failure beside the cancellations of a
    simultaneous stop is a failure (reported, FAILED), one of only
    cancellations a stop."""
    from tunsup.engine.tunnel import _only_cancelled

    mixed = _grouped(fail=True)
    assert mixed.split(trio.Cancelled)[0] is not None, "the group holds no cancellation"
    assert not _only_cancelled(mixed)
    assert _only_cancelled(_grouped(fail=False))
