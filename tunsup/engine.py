"""The supervisor: root nursery, signals, start and stop of every tunnel.

:class:`Supervisor` is single-use.  ``run()`` installs SIGTERM/SIGINT
handling, starts each tunnel with ``nursery.start`` (which returns once the
tunnel is up), tells systemd it is ready, and then waits.  A signal cancels
the root scope; a tunnel that fails to start cancels it too.  Either way
every tunnel unwinds its effects (shielded, bounded by its stop timeout)
before ``run`` returns an :class:`ExitCode`.

A tunnel that fails while running (its helper keeps dying) is torn down on
its own; the others keep running.  Once no tunnel is left, ``run`` returns
(exit code 1) unless ``on_failure`` is ``"keep-running"``, in which case it
waits for a stop.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Sequence

import trio

from . import sdnotify
from ._errors import ExitCode, TunsupError
from .config import OnFailure
from .host import Host
from .journal import Journal
from .tunnel import Tunnel, TunnelState

log = logging.getLogger("tunsup")

#: SIGHUP stops too: a foreground ``run`` whose terminal or ssh session goes
#: away must still tear down.  (Reload on SIGHUP comes with the control plane.)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Supervisor:
    """Runs a set of tunnels until a stop signal or a failure."""

    def __init__(self, tunnels: Sequence[Tunnel], host: Host, *, handle_signals: bool = True,
                 journal: Journal | None = None, on_failure: OnFailure = "exit"):
        self.tunnels = list(tunnels)
        self.host = host
        #: Crash-safe record of applied effects; also means: recover what
        #: dead instances left in its state directory before starting.
        self.journal = journal
        self.on_failure = on_failure
        self._handle_signals = handle_signals
        self._used = False
        self._failed = False
        self._cancel_scope: trio.CancelScope | None = None
        self.ready = trio.Event()
        self.stop_reason: str | None = None

    def stop(self, reason: str = "stop requested") -> None:
        """Ask a running supervisor to stop: it cancels first (interrupting a
        start in progress), then ``run`` waits for the teardown.  Stopping a
        supervisor that has not run makes its ``run`` an error."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._cancel_scope is not None:
            self._cancel_scope.cancel()

    async def run(self) -> ExitCode:
        """Bring every tunnel up, then supervise until stopped.

        Returns OK after a clean stop, FAILURE when a tunnel failed but the
        host was restored, TEARDOWN_INCOMPLETE when some undo step failed.
        Cancelling the caller's scope acts like a stop.  Single use: a
        second call, or a call after :meth:`stop`, raises ``RuntimeError``.
        """
        if self._used:
            raise RuntimeError("a Supervisor can run only once")
        if self.stop_reason is not None:
            raise RuntimeError(f"supervisor was stopped before it started ({self.stop_reason})")
        self._used = True
        signals = STOP_SIGNALS if self._handle_signals else ()
        try:
            receiver_cm = (trio.open_signal_receiver(*signals) if signals
                           else contextlib.nullcontext(None))
            # The receiver, and the task draining it, outlive the tunnels'
            # teardown: a second SIGINT/SIGTERM meanwhile is logged, never
            # redelivered to interrupt the teardown or kill the process.
            with receiver_cm as receiver:
                async with trio.open_nursery() as outer:
                    if receiver is not None:
                        outer.start_soon(self._watch_signals, receiver)
                    try:
                        async with trio.open_nursery() as root:
                            self._cancel_scope = root.cancel_scope
                            await self._recover()
                            await self._start_all(root)
                    finally:
                        outer.cancel_scope.cancel()
        except* Exception as group:
            # Tunnels have already unwound; record why we ended.
            self._failed = True
            for exc in _leaves(group):
                if not isinstance(exc, TunsupError):
                    log.error("unexpected error: %s", exc, exc_info=exc)
        finally:
            sdnotify.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                await self._close_journal()
                try:
                    await self.host.net.close()
                except Exception as exc:
                    log.warning("closing the netlink worker: %s", exc)
        return self._exit_code()

    async def _recover(self) -> None:
        """Undo what dead instances left, before anything else."""
        if self.journal is None:
            return
        from .recovery import recover

        report = await recover(self.journal.state_dir, self.host,
                               me=(self.journal.pid, self.journal.start_time))
        for line in report.undone:
            log.info("recovery: undone %s", line)
        if report.recovered:
            log.info("recovered %d journal(s) of dead instance(s): %d object(s) undone",
                     len(report.recovered), len(report.undone))
        for failure in report.failures:
            log.error("recovery: %s (left for 'tunsup cleanup')", failure)

    async def _close_journal(self) -> None:
        if self.journal is None:
            return
        clean = all(t.report is None or t.report.complete for t in self.tunnels)
        try:
            await self.journal.close(remove=clean)
        except Exception as exc:
            log.warning("closing the journal: %s", exc)
        if not clean:
            log.error("leftovers are recorded in %s: run 'tunsup cleanup' to retry",
                      self.journal.path)

    async def _start_all(self, root: trio.Nursery) -> None:
        sdnotify.notify("STATUS=bringing up tunnels")
        for tunnel in self.tunnels:
            log.info("starting tunnel %s from %s", tunnel.name, tunnel.spec.source)
            await root.start(self._run_tunnel, tunnel)
        names = ", ".join(t.name for t in self.tunnels)
        log.info("ready: %d tunnel(s) up (%s)", len(self.tunnels), names)
        self.ready.set()
        sdnotify.notify("READY=1", f"STATUS={len(self.tunnels)} tunnel(s) up: {names}")
        if self.on_failure == "keep-running":
            # The root nursery would otherwise end with its last tunnel.
            await trio.sleep_forever()

    async def _run_tunnel(self, tunnel: Tunnel, *,
                          task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED) -> None:
        """Run one tunnel.  A failure at start propagates (and stops every
        tunnel); a failure once up has already been torn down and logged by
        the tunnel, so it ends only this task.  Cancellable: cancellation
        tears the tunnel down (see :meth:`Tunnel.run`)."""
        try:
            await tunnel.run(task_status=task_status)
        except* TunsupError:
            if not tunnel.was_up:
                raise
        running = [t for t in self.tunnels
                   if t.state not in (TunnelState.STOPPED, TunnelState.FAILED)]
        names = ", ".join(t.name for t in running)
        sdnotify.notify(f"STATUS=tunnel {tunnel.name} failed; {len(running)} tunnel(s) left"
                        + (f": {names}" if names else ""))
        if running:
            log.error("tunnel %s failed; %d tunnel(s) still running", tunnel.name, len(running))
        elif self.on_failure == "exit":
            log.error("tunnel %s failed and no tunnel is left: exiting", tunnel.name)
        else:
            log.error("tunnel %s failed and no tunnel is left; staying up "
                      "(on_failure = keep-running)", tunnel.name)

    async def _watch_signals(self, receiver: AsyncIterator[int]) -> None:
        async for signum in receiver:
            name = signal.Signals(signum).name
            if self.stop_reason is None:
                log.info("received %s: stopping", name)
                sdnotify.notify("STOPPING=1", f"STATUS=stopping ({name})")
                self.stop(f"received {name}")
            else:
                log.info("received %s: already stopping, teardown continues", name)

    def _exit_code(self) -> ExitCode:
        if any(t.report is not None and not t.report.complete for t in self.tunnels):
            return ExitCode.TEARDOWN_INCOMPLETE
        if self._failed or any(t.failure is not None for t in self.tunnels):
            return ExitCode.FAILURE
        return ExitCode.OK


def _leaves(group: BaseExceptionGroup[Exception]) -> list[Exception]:
    out: list[Exception] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(_leaves(exc))
        else:
            out.append(exc)
    return out


