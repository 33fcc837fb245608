"""The serial worker thread: results, errors, timeouts, cancellation."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

from tunsup._errors import HostError
from tunsup.host import PolicyRule
from tunsup.host.worker import SerialWorker
from tunsup.testing import netns as _netns

from .conftest import needs_netns
from .conftest import unique as _unique


def test_runs_jobs_in_order_on_one_thread_off_the_trio_thread() -> None:
    worker = SerialWorker("t")
    threads: list[int] = []

    def job(i: int) -> int:
        threads.append(threading.get_ident())
        return i * 2

    async def main() -> list[int]:
        return [await worker.call(lambda i=i: job(i), timeout=5, what="job") for i in range(5)]

    assert trio.run(main) == [0, 2, 4, 6, 8]
    assert len(set(threads)) == 1 and threads[0] != threading.get_ident()
    worker.close()


def test_exceptions_propagate() -> None:
    worker = SerialWorker("t")

    def boom() -> None:
        raise OSError(19, "No such device")

    async def main() -> None:
        with pytest.raises(OSError, match="No such device"):
            await worker.call(boom, timeout=5, what="boom")

    trio.run(main)
    worker.close()


def test_timeout_raises_host_error_and_skips_queued_job() -> None:
    worker = SerialWorker("t")
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            # Occupy the thread until released.
            nursery.start_soon(lambda: worker.call(release.wait, timeout=10, what="block"))
            await trio.sleep(0.05)
            with pytest.raises(HostError, match=r"queued: no answer within 0\.1 s"):
                await worker.call(lambda: ran.append("queued"), timeout=0.1, what="queued")
            release.set()
        # The timed-out job never ran, even after the thread freed up.
        await worker.call(lambda: None, timeout=5, what="flush")

    trio.run(main)
    assert ran == []
    worker.close()


def test_cancelled_caller_gets_the_outcome_of_a_running_job() -> None:
    """A job already running when its caller is cancelled completes, and the
    caller gets its result (so it can record the host change); the
    cancellation then arrives at the caller's next checkpoint."""
    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def job() -> str:
        started.set()
        release.wait()
        return "created"

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def caller() -> None:
                    seen.append(await worker.call(job, timeout=10, what="job"))
                    try:
                        await trio.lowlevel.checkpoint()
                    except trio.Cancelled:
                        seen.append("cancelled")
                        raise

                nursery.start_soon(caller)
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()
                threading.Timer(0.2, release.set).start()
        assert seen == ["created", "cancelled"]

    trio.run(main)
    worker.close()


def test_cancelled_caller_skips_a_queued_job() -> None:
    worker = SerialWorker("t")
    release = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: worker.call(release.wait, timeout=10, what="block"))
            await trio.sleep(0.05)
            with trio.move_on_after(0.05) as scope:
                await worker.call(lambda: ran.append("queued"), timeout=10, what="queued")
            assert scope.cancelled_caught
            release.set()
        await worker.call(lambda: None, timeout=5, what="flush")

    trio.run(main)
    assert ran == []
    worker.close()


# --- settled: the work is known done before the job returns ----------------


def test_settled_first_detaches_the_running_job_and_the_thread_serves_on() -> None:
    """When ``settled`` returns while the job still runs (a link deletion
    the kernel has announced, its request still waiting), the call returns
    ``settled``'s result at once.  The job is not written off: it finishes
    on its thread, which then serves the next job; its failure is logged."""
    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()
    threads: list[int] = []

    def job() -> str:
        threads.append(threading.get_ident())
        started.set()
        release.wait(10)
        raise OSError(16, "failed late")

    async def settled() -> str:
        await trio.to_thread.run_sync(started.wait)
        return "settled"

    async def main() -> list[str]:
        got = [await worker.call(job, timeout=10, what="job", settled=settled)]
        assert not release.is_set()  # the job still runs
        release.set()
        def next_job() -> str:
            threads.append(threading.get_ident())
            return "next"

        got.append(await worker.call(next_job, timeout=10, what="next"))
        return got

    with _caught("tunsup.worker") as records:
        assert trio.run(main) == ["settled", "next"]
    assert len(threads) == 2 and threads[0] == threads[1]
    assert worker.replaced == 0
    assert any("failed late" in r for r in records), records
    worker.close()


def test_settled_while_queued_still_runs_the_job_and_takes_its_answer() -> None:
    """Known done before the job even started: someone else did the work
    (another process deleted the link).  The job still runs and its own
    answer counts (the link "already gone", not "deleted"; a link made
    again under the same index and name in between is still deleted)."""
    worker = SerialWorker("t")
    release = threading.Event()
    ran: list[str] = []

    async def main() -> str:
        said = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: worker.call(release.wait, timeout=10, what="block"))
            await trio.testing.wait_all_tasks_blocked()

            async def at_once() -> str:
                said.set()
                return "settled"

            async def release_once_said() -> None:
                await said.wait()
                release.set()

            def queued() -> str:
                ran.append("queued")
                return "the job's"

            nursery.start_soon(release_once_said)
            got = await worker.call(queued, timeout=10, what="queued", settled=at_once)
        return got

    assert trio.run(main) == "the job's"
    assert ran == ["queued"]
    worker.close()


def test_a_detached_job_wedged_past_its_deadline_is_written_off() -> None:
    """A detached job still running at its deadline (a request wedged in
    the kernel after the work was announced done) has its thread written
    off as any wedged job: the job behind it runs on a fresh thread
    instead of timing out behind it for the rest of the service's life."""
    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()
    threads: list[int] = []

    def wedged() -> str:
        threads.append(threading.get_ident())
        started.set()
        release.wait(30)
        return "late"

    async def settled() -> str:
        await trio.to_thread.run_sync(started.wait)
        return "settled"

    def after() -> str:
        threads.append(threading.get_ident())
        return "after"

    async def main() -> list[str]:
        got = [await worker.call(wedged, timeout=0.3, what="wedged", settled=settled)]
        # Queued behind the wedged job; runs once its thread is written off.
        got.append(await worker.call(after, timeout=5, what="after"))
        return got

    try:
        assert trio.run(main) == ["settled", "after"]
    finally:
        release.set()
    assert worker.replaced == 1
    assert len(threads) == 2 and threads[0] != threads[1]
    worker.close()


def test_job_first_wins_over_settled_and_a_failed_settled_waits_for_the_job() -> None:
    worker = SerialWorker("t")

    async def never() -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def broken() -> str:
        raise OSError(9, "watch broke")

    async def main() -> list[str]:
        return [await worker.call(lambda: "job", timeout=10, what="a", settled=never),
                await worker.call(lambda: "job too", timeout=10, what="b", settled=broken)]

    with _caught("tunsup.worker") as records:
        assert trio.run(main) == ["job", "job too"]
    assert any("watch broke" in r for r in records), records
    worker.close()


def test_cancelled_caller_with_settled_still_waits_for_its_running_job() -> None:
    """Cancelled while both wait, the caller is handled as any other: it
    waits (shielded, a short grace) for its running job and gets its
    outcome.  (Through a nursery the cancellation came in an exception
    group that passed this handling by: the caller left at once, its job
    running on unwatched.)"""
    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def job() -> str:
        started.set()
        release.wait(10)
        return "created"

    async def never() -> str:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def main() -> None:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:

                async def caller() -> None:
                    seen.append(await worker.call(job, timeout=10, what="job", settled=never))

                nursery.start_soon(caller)
                await trio.to_thread.run_sync(started.wait)
                scope.cancel()  # the caller is rescheduled with Cancelled
                release.set()  # and only then can its job finish

    trio.run(main)
    assert seen == ["created"]
    assert worker.replaced == 0
    worker.close()


def test_keyboard_interrupt_while_settling_comes_out_bare() -> None:
    """Ctrl-C delivered in the watch comes out as KeyboardInterrupt, as
    from a plain wait, not inside an exception group that an ``except
    KeyboardInterrupt`` would miss."""
    worker = SerialWorker("t")
    release = threading.Event()

    async def interrupted() -> str:
        raise KeyboardInterrupt

    async def main() -> None:
        await worker.call(lambda: release.wait(10), timeout=10, what="job", settled=interrupted)

    try:
        with pytest.raises(KeyboardInterrupt):
            trio.run(main)
    finally:
        release.set()
    worker.close()


@contextlib.contextmanager
def _caught(name: str) -> Iterator[list[str]]:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger(name)
    handler = Keep()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# --- wedged jobs: abandoned, the worker replaced (issue 10, item 4) ----------


def test_wedged_job_is_abandoned_and_the_next_job_runs_on_a_fresh_thread() -> None:
    """A job that never returns costs its caller the timeout, not the worker:
    the next job runs at once on a fresh thread; the wedged thread's result
    is discarded and it exits (its on_exit runs) once the call returns."""
    exited: list[int] = []
    worker = SerialWorker("t", on_exit=lambda: exited.append(threading.get_ident()))
    release = threading.Event()
    threads: list[int] = []

    def wedged() -> str:
        threads.append(threading.get_ident())
        release.wait()
        return "late"

    async def main() -> None:
        with trio.fail_after(5):  # with the bug, the second call queues for good
            with pytest.raises(HostError, match=r"wedge: no answer within 0\.2 s"):
                await worker.call(wedged, timeout=0.2, what="wedge")
            threads.append(await worker.call(threading.get_ident, timeout=1, what="next"))
        assert threads[0] != threads[1]
        assert worker.replaced == 1
        release.set()
        # The old thread ends by itself; the fresh one keeps serving.
        await trio.to_thread.run_sync(lambda: _wait_until(lambda: threads[0] in exited))
        assert await worker.call(threading.get_ident, timeout=1, what="again") == threads[1]

    trio.run(main)
    worker.close()


def _wait_until(cond: Callable[[], bool]) -> None:
    """Block (in a test's worker thread) until ``cond()``; gives up after 5 s."""
    done = threading.Event()
    for _ in range(500):
        if cond():
            return
        done.wait(0.01)
    raise AssertionError("condition not met within 5 s")


def test_cancelled_caller_of_a_wedged_job_is_not_held_past_its_deadline() -> None:
    """The caller's deadline bounds the wait, not the job's own timeout (60 s):
    the job is abandoned and the cancellation delivered at once."""
    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()

    def wedged() -> None:
        started.set()
        release.wait()

    async def main() -> None:
        with trio.fail_after(5):  # with the bug: a shielded wait of 60 s
            with trio.move_on_after(0.2) as scope:
                await worker.call(wedged, timeout=60, what="wedge")
            assert scope.cancelled_caught
            assert started.is_set()
            assert await worker.call(lambda: "ok", timeout=1, what="next") == "ok"

    try:
        trio.run(main)
    finally:
        release.set()
        worker.close()


def test_explicit_cancel_waits_only_a_short_grace_for_a_wedged_job() -> None:
    """A stop (an explicit cancel, no deadline) lets the running job finish
    for at most CANCEL_GRACE seconds, then abandons it."""
    from tunsup.host.worker import CANCEL_GRACE

    worker = SerialWorker("t")
    started, release = threading.Event(), threading.Event()

    def wedged() -> None:
        started.set()
        release.wait()

    async def main() -> None:
        with trio.fail_after(CANCEL_GRACE + 4):  # with the bug: 60 s
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(lambda: worker.call(wedged, timeout=60, what="wedge"))
                    await trio.to_thread.run_sync(started.wait)
                    scope.cancel()
            assert worker.replaced == 1

    try:
        trio.run(main)
    finally:
        release.set()
        worker.close()


def test_an_abandoned_job_stops_at_its_next_step() -> None:
    """After its caller gave up, a job that checks raise_if_abandoned() does
    not go on to change anything."""
    from tunsup.host.worker import Abandoned, raise_if_abandoned

    exited = threading.Event()
    worker = SerialWorker("t", on_exit=exited.set)
    started, release = threading.Event(), threading.Event()
    steps: list[str] = []
    errors: list[BaseException] = []

    def two_steps() -> None:
        steps.append("first")
        started.set()
        release.wait()
        try:
            raise_if_abandoned()
        except Abandoned as exc:
            errors.append(exc)
            raise
        steps.append("second")

    async def main() -> None:
        with pytest.raises(HostError, match="no answer"):
            await worker.call(two_steps, timeout=0.2, what="job")
        release.set()
        await trio.to_thread.run_sync(exited.wait)

    trio.run(main)
    assert steps == ["first"] and len(errors) == 1
    worker.close()


# --- the netlink worker (real pyroute2, scratch namespace) --------------------


def _in_namespace(ns: str, main: Callable[[], Awaitable[None]]) -> None:
    """trio.run(main) in a thread that joined ``ns``: the netlink worker's
    threads (replacements included) are started from it and share it."""
    _netns.run_in_netns(ns, lambda: trio.run(main))


#: Deleting it is a pyroute2 call (only policy rules still use pyroute2).
NO_SUCH_RULE = PolicyRule(4, 12345, 4321)


@needs_netns
def test_netlink_call_wedged_in_pyroute2_is_replaced_and_the_next_call_succeeds(
    netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pyroute2 call that blocks its thread for good (a fake netlink
    socket that never lets go) fails after its timeout; the next call gets a
    fresh thread and socket and succeeds.  (Only policy rules still go
    through pyroute2.)"""
    from pyroute2.iproute.linux import AsyncIPRoute

    from tunsup.host.netlink import NetlinkHost

    release = threading.Event()
    real = AsyncIPRoute.rule
    calls: list[int] = []

    async def first_call_wedges(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(threading.get_ident())
        if len(calls) == 1:
            release.wait()  # blocks the thread, timers and all
            # Released at the end: its caller is long gone, and a real
            # request from its abandoned loop would only die noisily.
            return []
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncIPRoute, "rule", first_call_wedges)
    host = NetlinkHost(timeout=0.2)

    async def main() -> None:
        try:
            with trio.fail_after(10):  # with the bug, the second call queues for good
                with pytest.raises(HostError, match="no answer"):
                    await host.delete_rule(NO_SUCH_RULE)
                assert await host.delete_rule(NO_SUCH_RULE) is False
                assert await host.link_name(1) == "lo"
            assert calls[0] != calls[1]
        finally:
            release.set()
            await host.close()

    _in_namespace(netns("nlw"), main)


@needs_netns
def test_netlink_call_the_kernel_never_answers_times_out_in_its_thread(
    netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request whose answer never comes ends in the worker thread at the
    timeout (the thread is kept, its socket replaced)."""
    import asyncio

    from pyroute2.iproute.linux import AsyncIPRoute

    from tunsup.host.netlink import NetlinkHost

    real = AsyncIPRoute.rule
    calls: list[int] = []

    async def never_answered(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1:
            await asyncio.sleep(3600)
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(AsyncIPRoute, "rule", never_answered)
    host = NetlinkHost(timeout=0.2)

    async def main() -> None:
        try:
            with trio.fail_after(10):
                with pytest.raises(HostError, match=r"no answer from the kernel within 0\.2 s"):
                    await host.delete_rule(NO_SUCH_RULE)
                assert await host.delete_rule(NO_SUCH_RULE) is False
            assert host._worker.replaced == 0
        finally:
            await host.close()

    _in_namespace(netns("nlw"), main)


@needs_netns
def test_netlink_call_is_bounded_by_the_callers_deadline(
    netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An undo step with 0.3 s left is not held for the call's own timeout."""
    from pyroute2.iproute.linux import AsyncIPRoute

    from tunsup.host.netlink import DUMP_TIMEOUT, NetlinkHost

    release = threading.Event()

    async def wedged(self: Any, *args: Any, **kwargs: Any) -> Any:
        release.wait()
        return []

    monkeypatch.setattr(AsyncIPRoute, "get_rules", wedged)
    host = NetlinkHost()

    async def main() -> None:
        try:
            with trio.fail_after(DUMP_TIMEOUT / 3):  # with the bug: 30 s, then more
                with trio.move_on_after(0.3) as scope:
                    await host.rules(4)
                assert scope.cancelled_caught
        finally:
            release.set()
            await host.close()

    _in_namespace(netns("nlw"), main)


@needs_netns
def test_netlink_call_without_pyroute2_is_bounded_by_the_callers_deadline(
    netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The calls that speak netlink without pyroute2 (links, addresses,
    routes) are bounded the same way: a lookup wedged in the kernel does
    not hold a caller that has 0.3 s left; the next call gets a fresh thread."""
    import socket

    from tunsup.host.netlink import NetlinkHost

    release, wedged = threading.Event(), threading.Event()
    real = socket.if_indextoname
    calls: list[int] = []

    def second_call_wedges(index: int) -> str:
        calls.append(index)
        if len(calls) == 2:
            wedged.set()
            release.wait()
        return real(index)

    monkeypatch.setattr(socket, "if_indextoname", second_call_wedges)
    host = NetlinkHost()

    async def main() -> None:
        try:
            with trio.fail_after(10):
                # The worker thread runs before the lookup that wedges: on a
                # loaded machine a thread still starting when the caller's
                # 0.3 s are over would skip the job instead (and the next
                # call would wedge).
                assert await host.link_name(1) == "lo"
                with trio.move_on_after(0.3) as scope:
                    await host.link_name(1)
                assert scope.cancelled_caught
                assert wedged.is_set()
                assert await host.link_name(1) == "lo"
        finally:
            release.set()
            await host.close()

    _in_namespace(netns("nlw"), main)


@needs_netns
def test_a_link_deletion_does_not_queue_behind_other_netlink_work(
    netns: Callable[[str], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 item 4: a stop of many tunnels deleted their links one
    after another on the shared netlink thread (~20 ms of kernel waiting
    each: 1.1 s for 50).  Each deletion now runs on a thread of its own
    (in the same namespace): it goes through while the shared thread is
    busy with something else (here a rule dump held in pyroute2)."""
    import socket

    from pyroute2.iproute.linux import AsyncIPRoute

    from tunsup.host.netlink import NetlinkHost

    ns = netns("nlw")
    name = _unique("nld")
    _netns.ip("tuntap", "add", "dev", name, "mode", "tun", ns=ns)
    release, busy = threading.Event(), threading.Event()

    async def wedged(self: Any, *args: Any, **kwargs: Any) -> Any:
        busy.set()
        release.wait()
        return []

    monkeypatch.setattr(AsyncIPRoute, "get_rules", wedged)
    host = NetlinkHost()

    async def dump() -> None:
        with contextlib.suppress(HostError):  # what the stand-in returns is not a dump
            await host.rules(4)

    async def main() -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dump)
                await trio.to_thread.run_sync(busy.wait, abandon_on_cancel=True)
                with trio.fail_after(5):  # with the bug: the dump's 30 s first
                    assert await host.delete_link(socket.if_nametoindex(name), name) is True
                release.set()
        finally:
            release.set()
            await host.close()

    _in_namespace(ns, main)
    links = _netns.ip("-o", "link", "show", ns=ns)
    assert name not in links
