"""A guard against blocking the trio thread: it times every task step.

A step is what a task runs between two checkpoints; a long one means
something blocked the event loop (and with it signal handling and
teardown).  ``tunsup run --debug`` logs steps over 100 ms; the integration
tests set ``TUNSUP_STEP_LIMIT_MS`` (diagnostic, not for production) to have
every step over the limit logged as an error, and fail on any.
"""

from __future__ import annotations

import logging
import time

import trio

log = logging.getLogger("tunsup")


class StepTimer(trio.abc.Instrument):
    """Logs task steps longer than ``threshold`` seconds; keeps the worst."""

    def __init__(self, threshold: float, *, level: int = logging.WARNING) -> None:
        self.threshold = threshold
        self.level = level
        self.worst = 0.0
        self.worst_task = ""
        self._started = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._started
        if took > self.worst:
            self.worst, self.worst_task = took, task.name
        if took > self.threshold:
            log.log(self.level, "slow trio step: task %s ran %.1f ms without a checkpoint",
                    task.name, took * 1000)

    def report(self) -> None:
        log.info("worst trio step: %.1f ms (task %s)", self.worst * 1000, self.worst_task)
