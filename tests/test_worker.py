"""The serial worker thread: results, errors, timeouts, cancellation."""

from __future__ import annotations

import threading

import pytest
import trio

from tunsup._errors import HostError
from tunsup.host.worker import SerialWorker


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
