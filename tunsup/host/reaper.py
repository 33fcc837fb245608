"""Exit statuses that nobody waits for any more.

A teardown waits for its helper within a bound.  A helper stuck in the
kernel past that bound (SIGKILL sent, no exit yet) is given up on: its
tunnel ends, its watcher with it.  When the process finally dies it
becomes a zombie, and a service that runs for months would collect them.
The :class:`Reaper` adopts such a helper for the rest of the service's
life and collects its exit status whenever it comes; when the service
ends, init collects whatever is left.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

log = logging.getLogger("tunsup.reaper")


class Orphan(Protocol):
    """A helper process its tunnel gave up on (see
    :class:`tunsup.host.process.HelperProcess`)."""

    pid: int
    exited: trio.Event

    async def wait_reaped(self) -> None:
        """Return once the process has exited and its status is collected."""
        ...


class Reaper:
    """Collects the exit status of the helpers handed to :meth:`adopt`
    while :meth:`serve` runs (the service's whole life)."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None
        #: Adopted and not reaped yet.
        self.orphans: set[Orphan] = set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Adopt orphans until cancelled (at the service's end: no wait for
        them, init reaps what is left once this process exits, and says so
        in the log).  A second ``serve`` while one runs returns at once."""
        if self._nursery is not None:
            task_status.started()
            return
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for orphan in self.orphans:
                log.error("helper pid %d was still stuck in the kernel when tunsup ended; "
                          "init collects it once it exits", orphan.pid)
            self.orphans.clear()

    def adopt(self, orphan: Orphan, why: logging.Logger) -> bool:
        """Wait for ``orphan``'s exit from now on; False when nothing serves
        (the caller's own wait was the last).  ``why``: the log of the
        tunnel that gave up on it (the late exit is reported there)."""
        if self._nursery is None or orphan.exited.is_set() or orphan in self.orphans:
            return False
        self.orphans.add(orphan)
        self._nursery.start_soon(self._reap, orphan, why)
        return True

    async def _reap(self, orphan: Orphan, why: logging.Logger) -> None:
        await orphan.wait_reaped()
        self.orphans.discard(orphan)
        why.warning("helper pid %d, given up on at teardown, has exited and was reaped",
                    orphan.pid)
