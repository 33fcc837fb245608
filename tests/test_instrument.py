"""The blocking guard (``tunsup._instrument.StepTimer``) tells a step that
blocked the trio thread from one the scheduler stretched.  Its OS readings
(wall clock, the thread's CPU time, the process's involuntary context
switches) are injected; one test runs it on a real trio loop."""

from __future__ import annotations

import logging
import time
from types import SimpleNamespace
from typing import cast

import pytest
import trio

from tunsup._instrument import StepTimer


class Readings:
    """What the OS would report, advanced by hand around one step."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self.preempted = 0

    def step(self, timer: StepTimer, *, wall: float, cpu: float, preempted: int) -> None:
        task = cast(trio.lowlevel.Task, SimpleNamespace(name="t"))  # only its name is read
        timer.before_task_step(task)
        self.wall += wall
        self.cpu += cpu
        self.preempted += preempted
        timer.after_task_step(task)


def _timer(r: Readings) -> StepTimer:
    return StepTimer(0.05, level=logging.ERROR, clock=lambda: r.wall,
                     cpu_clock=lambda: r.cpu, preemptions=lambda: r.preempted)


@pytest.mark.parametrize(("wall", "cpu", "preempted", "slow"), [
    (0.08, 0.001, 0, True),    # slept in the kernel with CPU to spare: blocking
    (0.08, 0.070, 0, True),    # computed for 70 ms: blocking the loop all the same
    (0.08, 0.070, 3, True),    # preempted, but its own CPU time alone is over the limit
    (0.08, 0.002, 2, False),   # a short step the scheduler stretched
    (0.04, 0.001, 0, False),   # under the limit
])
def test_a_long_step_is_slow_unless_the_scheduler_stretched_it(
        caplog: pytest.LogCaptureFixture, wall: float, cpu: float, preempted: int,
        slow: bool) -> None:
    r = Readings()
    timer = _timer(r)
    with caplog.at_level(logging.INFO, logger="tunsup"):
        r.step(timer, wall=wall, cpu=cpu, preempted=preempted)
    flagged = [rec for rec in caplog.records if "slow trio step" in rec.getMessage()]
    assert bool(flagged) is slow
    delayed = not slow and wall > 0.05
    assert timer.worst == pytest.approx(0.0 if delayed else wall)
    assert timer.delayed == int(delayed)


def test_a_blocking_sleep_on_a_real_loop_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """The real readings: a task that sleeps 80 ms in the kernel.  Counted
    preemptions are faked to 0 so that a loaded test machine cannot excuse
    it (the CPU-time reading is the real one)."""
    timer = StepTimer(0.05, level=logging.ERROR, preemptions=lambda: 0)

    async def main() -> None:
        await trio.lowlevel.checkpoint()
        time.sleep(0.08)  # the bug the guard is for: a blocking call in a step
        await trio.lowlevel.checkpoint()

    with caplog.at_level(logging.ERROR, logger="tunsup"):
        trio.run(main, instruments=[timer])
    assert any("slow trio step: task" in rec.getMessage() for rec in caplog.records)
    assert timer.worst >= 0.08
