"""A guard against blocking the trio thread: it times every task step.

A step is what a task runs between two checkpoints; a long one means
something blocked the event loop (and with it signal handling and
teardown).  ``tunsup run --debug`` logs steps over 100 ms; the integration
tests set ``TUNSUP_STEP_LIMIT_MS`` (diagnostic, not for production) to have
every step over the limit logged as an error, and fail on any.

A long step is not always a blocking call: on a machine with more runnable
threads than CPUs the kernel preempts the trio thread (or the thread that
holds the GIL) in the middle of a short step.  So a step over the limit is
judged by its cause: if the process was preempted during the step
(involuntary context switches, counted for all its threads) and the trio
thread itself used less CPU than the limit, the step was *delayed*, not
blocking: it is logged at INFO as such and does not count as slow.  A step
that sleeps in the kernel (a blocking read, fsync, sleep) uses no CPU and,
on a machine with CPU to spare, sees no preemption: it is always slow.  The
guard is therefore exact on a quiet machine and lenient only on steps that
the scheduler demonstrably stretched.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable

import trio

log = logging.getLogger("tunsup")


def _preemptions() -> int:
    """Involuntary context switches of the whole process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw


class StepTimer(trio.abc.Instrument):
    """Logs task steps longer than ``threshold`` seconds; keeps the worst.

    ``clock``, ``cpu_clock`` (the calling thread's CPU time) and
    ``preemptions`` are the OS readings it judges by; tests pass their own.
    """

    def __init__(self, threshold: float, *, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.perf_counter,
                 cpu_clock: Callable[[], float] = time.thread_time,
                 preemptions: Callable[[], int] = _preemptions) -> None:
        self.threshold = threshold
        self.level = level
        self.worst = 0.0
        self.worst_task = ""
        self.delayed = 0
        self._clock, self._cpu_clock, self._preemptions = clock, cpu_clock, preemptions
        self._started = self._cpu_started = 0.0
        self._preempted_before = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._preempted_before = self._preemptions()
        self._cpu_started = self._cpu_clock()
        self._started = self._clock()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = self._clock() - self._started
        if took <= self.threshold:
            if took > self.worst:
                self.worst, self.worst_task = took, task.name
            return
        cpu = self._cpu_clock() - self._cpu_started
        if cpu < self.threshold and self._preemptions() > self._preempted_before:
            self.delayed += 1
            log.info("trio step of task %s delayed by CPU contention: %.1f ms, of which "
                     "%.1f ms on the CPU (not a blocking call)", task.name, took * 1000,
                     cpu * 1000)
            return
        if took > self.worst:
            self.worst, self.worst_task = took, task.name
        log.log(self.level, "slow trio step: task %s ran %.1f ms without a checkpoint",
                task.name, took * 1000)

    def report(self) -> None:
        log.info("worst trio step: %.1f ms (task %s), %d delayed by CPU contention",
                 self.worst * 1000, self.worst_task, self.delayed)
