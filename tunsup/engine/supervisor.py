"""The supervisor: root nursery, signals, the set of running tunnels.

:class:`Supervisor` is single-use.  ``run()`` installs signal handling
(SIGTERM/SIGINT stop, SIGHUP reloads), starts each initial tunnel with
``nursery.start`` (which returns once the tunnel is up), tells systemd it is
ready, and then waits.  A signal cancels the root scope; a failing tunnel
cancels it too.  Either way every tunnel unwinds its effects (shielded,
bounded by its stop timeout) before ``run`` returns an :class:`ExitCode`.

A tunnel that fails once it was up (its helper keeps dying) is torn down on
its own; the others keep running.  Once no tunnel is left, ``run`` returns
(exit code 1) unless ``on_failure`` is ``"keep-running"``.  With a journal,
``run`` first recovers what dead instances left (see :mod:`tunsup.engine.recovery`).

Starts run concurrently, at most ``max_parallel`` at once (the initial
set, a reload's, and ``up`` requests alike); so do teardowns (each tunnel
waits for one of ``max_parallel`` teardown slots, within its stop
timeout).  Most of a start is waiting (for the helper to come up, for the
journal's fsyncs, which concurrent starts share), so overlapping them is
what makes 50 tunnels come up in about the time of a few.  The initial
tunnels start their helpers only once all of them have their links in
place (:class:`HelperGate`): every wireguard-go wakes up for each link,
address and route change in the namespace.  A tunnel that
fails to start at the initial start still stops the service (exit 1);
during a reload the others go on.

While it runs, tunnels can be added (:meth:`Supervisor.add`), removed
(:meth:`Supervisor.remove`) and the whole configured set replaced
(:meth:`Supervisor.converge`, what a reload does).  Requests for one tunnel
are serialized by a per-name lock, and the names of the configured tunnels
are claimed from load time (a reload's from its start) until their start
has run: an ``add`` or ``remove`` of such a name waits for it, so that a
client's request never races the configuration.  Starts always run inside
the root nursery, so a stop wins over everything in flight: it cancels
first (starts in progress, reloads), then waits for every teardown.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs
import outcome
import trio

from .. import _signals
from .._errors import ConfigError, ExitCode, HostError, TunsupError, config_errors, leaves
from .._log import tag_tunnel
from ..config.conflicts import Tenant, find_conflicts
from ..config.settings import DEFAULT_MAX_PARALLEL, OnFailure
from ..config.spec import TunnelSpec
from ..host import Host, sdnotify
from .effects import EffectContext, HeldRoutes, HeldRule
from .journal import Journal, JournalObserver
from .recovery import Adoption
from .reload import NeedsRebuild, ReloadFailed
from .tunnel import Tunnel, TunnelOptions, cpu_bound
from .undo import EffectStack

log = logging.getLogger("tunsup")

T = TypeVar("T")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
#: Reloads the configuration (see :meth:`Supervisor.converge`).
RELOAD_SIGNAL = signal.SIGHUP

#: Where a running tunnel came from: the configuration (TOML file or the
#: command line; a reload manages these) or an ``up`` request (left alone
#: by reloads).
CONFIG = "config"
CONTROL = "control"

#: Tunnels kept in :attr:`Supervisor.history` (the latest ones): a service
#: that runs for months must not keep every tunnel it ever ran.
HISTORY_SIZE = 32
#: Teardown failure lines kept for the exit report (the first ones).
MAX_TEARDOWN_FAILURES = 100


class Stopping(TunsupError):
    """The supervisor is stopping (or not running): no new work."""


class NoSuchTunnel(TunsupError):
    pass


class AlreadyRunning(TunsupError):
    """A tunnel of that name runs with a different configuration."""


class ChangeFailed(TunsupError):
    """An in-place change of a running tunnel failed; it was rolled back
    to the running configuration (``restored`` says whether completely,
    ``rolled_back`` which steps were undone, ``failures`` which undo steps
    failed)."""

    def __init__(self, message: str, *, rolled_back: tuple[str, ...] = (),
                 failures: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.failures = failures

    @property
    def restored(self) -> bool:
        return not self.failures


@attrs.frozen
class Change:
    """How a running tunnel took a new configuration: changed in place
    (``in_place`` says what) or rebuilt (``rebuilt`` says why)."""

    in_place: str | None = None
    rebuilt: str | None = None


class StartFailed(TunsupError):
    """A tunnel failed to start; its ``report`` says whether the host was
    restored."""

    def __init__(self, tunnel: Tunnel, message: str) -> None:
        super().__init__(message)
        self.tunnel = tunnel


@attrs.define(eq=False)
class Slot:
    """A tunnel the supervisor runs (starting, up or stopping)."""

    tunnel: Tunnel
    origin: str
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Wall-clock time it came up.
    up_since: float | None = None


@attrs.frozen
class ConvergeResult:
    started: tuple[str, ...] = ()
    stopped: tuple[str, ...] = ()
    restarted: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: name -> why it could not be started (its host changes were undone).
    failed: tuple[tuple[str, str], ...] = ()
    #: name -> what was changed in place (helper and interface kept).
    changed: tuple[tuple[str, str], ...] = ()
    #: name -> why it was rebuilt (its names are also in ``restarted``).
    rebuilt: tuple[tuple[str, str], ...] = ()
    #: Names in ``failed`` whose undo was incomplete (an in-place change's
    #: rollback, a failed start's teardown): the host is not as before.
    incomplete: tuple[str, ...] = ()


#: Bound on writing a shared resolv.conf again in a reload's new order.
DNS_ORDER_TIMEOUT = 10.0

Plan = tuple[TunnelSpec, TunnelOptions]
#: The fields of a :class:`ConvergeResult`.
_OUTCOMES = ("started", "stopped", "restarted", "unchanged", "failed", "changed", "rebuilt",
             "incomplete")
#: Names claimed by one configured start, each released once settled.
Claims = dict[str, trio.Event]


def same_plan(tunnel: Tunnel, spec: TunnelSpec, options: TunnelOptions) -> bool:
    """Whether ``tunnel`` runs exactly ``spec`` with ``options`` (line
    numbers, kept for messages only, do not count)."""
    return _normalized(tunnel.spec) == _normalized(spec) and tunnel.options == options


def _normalized(spec: TunnelSpec) -> TunnelSpec:
    return attrs.evolve(spec, peers=tuple(attrs.evolve(p, line=0) for p in spec.peers))


class HelperGate:
    """The initial tunnels (two or more) start their helpers only once every one of them
    has its link in place (or its start ended): each wireguard-go wakes up
    for every link, address and route change in the namespace, so links
    configured while helpers run cost every running helper CPU (50 tunnels
    configured one after another while their helpers ran: ~1.4 s of the
    helpers' CPU; links first, then helpers: none).

    A tunnel waiting here gives its start slot back, so that the others
    can reach the gate (the slots still bound the starts in flight), and
    takes one again before its helper starts: in configuration order, as
    the first slots were taken (each takes its turn after the one before
    it took a slot or ended).  :meth:`ended` releases the slot if the
    tunnel holds one."""

    def __init__(self, tunnels: Sequence[Tunnel], slots: trio.CapacityLimiter) -> None:
        self._slots = slots
        #: Tunnels neither at the gate nor ended.
        self._pending = {id(t) for t in tunnels}
        #: Tunnels holding a start slot (each was given one before its start).
        self._holding = {id(t) for t in tunnels}
        self._open = trio.Event()
        if not self._pending:
            self._open.set()
        #: Configuration order; the first one not yet through its turn
        #: (a slot taken again, or its start ended) is the one whose turn it is.
        self._order = [id(t) for t in tunnels]
        self._through: set[int] = set()
        self._turn = 0
        self._turn_moved = trio.Event()

    def _arrived(self, tunnel: Tunnel) -> None:
        self._pending.discard(id(tunnel))
        if not self._pending:
            self._open.set()

    def _through_turn(self, tunnel: Tunnel) -> None:
        self._through.add(id(tunnel))
        while self._turn < len(self._order) and self._order[self._turn] in self._through:
            self._turn += 1
        self._turn_moved.set()
        self._turn_moved = trio.Event()

    async def wait(self, tunnel: Tunnel) -> None:
        """At the gate: give the slot back, wait until every initial tunnel
        is at the gate or ended, then for this tunnel's turn, take a slot
        again.  Cancellable (then the tunnel holds no slot; its start ends,
        and :meth:`ended` passes its turn on)."""
        self._holding.discard(id(tunnel))
        self._slots.release_on_behalf_of(tunnel)
        self._arrived(tunnel)
        await self._open.wait()
        while self._order[self._turn] != id(tunnel):
            await self._turn_moved.wait()
        try:
            await self._slots.acquire_on_behalf_of(tunnel)
            self._holding.add(id(tunnel))
        finally:
            self._through_turn(tunnel)

    def ended(self, tunnel: Tunnel) -> None:
        """The tunnel's start ended (up, failed or cancelled): its slot goes
        back, and the gate no longer waits for it."""
        if id(tunnel) in self._holding:
            self._holding.discard(id(tunnel))
            self._slots.release_on_behalf_of(tunnel)
        self._arrived(tunnel)
        self._through_turn(tunnel)


class Supervisor:
    """Runs a set of tunnels until a stop signal or a failure."""

    def __init__(
        self,
        tunnels: Sequence[Tunnel],
        host: Host,
        *,
        handle_signals: bool = True,
        persistent: bool = False,
        reload: Callable[[], Awaitable[object]] | None = None,
        make_tunnel: Callable[[TunnelSpec, TunnelOptions], Tunnel] | None = None,
        journal: Journal | None = None,
        on_failure: OnFailure = "exit",
        recovery_timeout: float = 30.0,
        max_parallel: int = DEFAULT_MAX_PARALLEL,
    ):
        #: The tunnels to start first.
        self.tunnels = list(tunnels)
        self.host = host
        # They start concurrently: shared DNS merges in configuration order.
        host.dns_owners.set_order(t.name for t in self.tunnels)
        #: Crash-safe record of applied effects; also means: recover what
        #: dead instances left in its state directory before starting.
        self.journal = journal
        self.on_failure = on_failure
        #: Bound on undoing one dead instance's journal (``stop_timeout``).
        self.recovery_timeout = recovery_timeout
        #: The latest tunnels started, in start order (at most
        #: HISTORY_SIZE; the exit code does not depend on it).
        self.history: collections.deque[Tunnel] = collections.deque(maxlen=HISTORY_SIZE)
        #: Whether some tunnel's teardown was incomplete, and the first
        #: MAX_TEARDOWN_FAILURES lines saying what was left.
        self._incomplete = False
        self._teardown_failures: list[str] = []
        self._more_failures = 0
        #: Starts in flight at once, and teardowns (see :attr:`max_parallel`).
        self._start_gate = trio.CapacityLimiter(max_parallel)
        self._teardown_gate = trio.CapacityLimiter(max_parallel)
        self._handle_signals = handle_signals
        #: Keep running when no tunnel is left (a service: ``up`` may add one).
        self._persistent = persistent
        self._reload = reload
        self._make_tunnel = make_tunnel or (lambda spec, options: Tunnel(spec, host, options))
        self._used = False
        self._failed = False
        self._cancel_scope: trio.CancelScope | None = None
        self._root: trio.Nursery | None = None
        self._slots: dict[str, Slot] = {}
        #: Tunnels that failed while up, until replaced or taken down.
        self._failed_slots: dict[str, Slot] = {}
        self._locks: dict[str, trio.Lock] = {}
        #: Names the configuration claims whose start has not run yet (the
        #: initial set from load time, a reload's from its start): requests
        #: from clients for them wait (see :meth:`_wait_claims`).
        self._claims: dict[str, list[trio.Event]] = {}
        self._converge_lock = trio.Lock()
        #: Held from a start's conflict check until its slot is in place.
        self._conflict_lock = trio.Lock()
        #: Stop signals received while already stopping.
        self._repeated: set[int] = set()
        self.ready = trio.Event()
        self.stop_reason: str | None = None
        #: STOPPING=1 told to systemd (once: by the signal, or at the end).
        self._stopping_notified = False
        #: "new", "starting", "running", "stopping", "stopped".
        self.phase = "new"
        #: Wall-clock time ``run`` started.
        self.started_at: float | None = None
        #: Kill switches of dead instances kept for the tunnels starting now.
        self._adoption: Adoption | None = None

    # ------------------------------------------------------------ public API

    @property
    def max_parallel(self) -> int:
        """How many tunnels start at once (and, separately, tear down at
        once).  Settable while running (a reload): starts in flight keep
        their slots."""
        return int(self._start_gate.total_tokens)

    @max_parallel.setter
    def max_parallel(self, value: int) -> None:
        self._start_gate.total_tokens = value
        self._teardown_gate.total_tokens = value

    @property
    def teardown_failures(self) -> list[str]:
        """What teardowns left on the host, one line each (the first
        MAX_TEARDOWN_FAILURES, then how many more)."""
        more = [f"and {self._more_failures} more"] if self._more_failures else []
        return [*self._teardown_failures, *more]

    def stop(self, reason: str = "stop requested") -> None:
        """Ask a running supervisor to stop: it cancels first (interrupting a
        start in progress), then ``run`` waits for the teardown.  Stopping a
        supervisor that has not run makes its ``run`` an error."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self._used and self.phase != "stopped":
            self.phase = "stopping"
        if self._cancel_scope is not None:
            if not self._cancel_scope.cancel_called:
                for slot in self._slots.values():
                    slot.tunnel.stop_asked()
            self._cancel_scope.cancel()

    def slots(self) -> list[Slot]:
        """The tunnels running now (starting, up or stopping), in start order."""
        return list(self._slots.values())

    def failed(self) -> list[Slot]:
        """The tunnels that failed while up (their teardown has run; the
        tunnel's ``failure`` and ``report`` say why and how it ended), until
        a tunnel of the same name starts or a ``remove`` clears them."""
        return list(self._failed_slots.values())

    async def add(self, spec: TunnelSpec, options: TunnelOptions, *,
                  origin: str = CONTROL) -> tuple[Tunnel, bool | Change]:
        """Start a tunnel; return it once it is up, and whether it was
        started (False: it already ran with this very configuration; a
        :class:`Change`: it ran with another one, which was changed in
        place or rebuilt, see :meth:`change`).

        Raises :class:`ChangeFailed` when an in-place change failed (rolled
        back), :class:`StartFailed` when it fails to start (what it applied
        is undone first), :class:`Stopping` when the supervisor stops
        meanwhile.  The start runs in the root nursery: a
        stop cancels it; cancelling the caller abandons the wait, never the
        start."""
        return await self._in_root(lambda: self._add(spec, options, origin))

    async def remove(self, name: str) -> Tunnel:
        """Stop tunnel ``name`` (cancel, then wait for its teardown) and
        return it; its ``report`` says whether the host was restored.

        Waits for requests in flight for the same tunnel first.  Raises
        :class:`NoSuchTunnel`, or :class:`Stopping` when a stop already took
        it down (or once run() returned).  Cancelling the caller abandons the wait,
        never the teardown (which is shielded).  A configured tunnel that
        has not started yet is waited for, then stopped.  A tunnel that
        failed while up (already torn down) is cleared from :meth:`failed`
        and returned."""
        await self._wait_claims(name, "down")
        async with self._lock(name):
            slot = self._slots.get(name)
            if slot is None:
                # Once stopping (or stopped), no request is taken, not even
                # clearing a failed tunnel: after run() returns, all raise.
                if self.stop_reason is not None or self.phase in ("stopping", "stopped"):
                    raise Stopping(f"the service is stopping; tunnel {name} is already down")
                if name in self._failed_slots:
                    return self._failed_slots.pop(name).tunnel
                raise NoSuchTunnel(f"no tunnel named {name!r} is running")
            await self._stop_slot(slot)
            return slot.tunnel

    async def converge(self, wanted: Sequence[Plan]) -> ConvergeResult:
        """Make the configured tunnels be exactly ``wanted`` (a reload): new
        ones come up, configured ones no longer wanted go down, changed ones
        are changed in place or rebuilt (see :meth:`_change`), unchanged
        ones are untouched.  Tunnels added with
        :meth:`add` are left alone unless ``wanted`` names them.  A tunnel
        that fails to start is reported in the result; the others go on.
        Runs in the root nursery (a stop cancels it); raises
        :class:`Stopping`."""
        return await self._in_root(lambda: self._converge(wanted))

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
        self.phase = "starting"
        self.started_at = time.time()
        initial = self._claim([t.name for t in self.tunnels])
        signals = (*STOP_SIGNALS, RELOAD_SIGNAL) if self._handle_signals else ()
        try:
            receiver_cm = (trio.open_signal_receiver(*signals) if signals
                           else contextlib.nullcontext(None))
            # The receiver, and the task draining it, outlive the tunnels'
            # teardown: a second SIGINT/SIGTERM meanwhile is logged, never
            # redelivered to interrupt the teardown.  After it closes, the
            # process is safe from these signals only if it absorbs them
            # (``run`` does: tunsup._signals).
            with receiver_cm as receiver:
                async with trio.open_nursery() as outer:
                    # Helpers a teardown gave up on are reaped while the
                    # service runs (cancelled with ``outer``, at the end).
                    await outer.start(self.host.reaper.serve)
                    if receiver is not None:
                        outer.start_soon(self._watch_signals, receiver)
                    try:
                        async with trio.open_nursery() as root:
                            self._root = root
                            self._cancel_scope = root.cancel_scope
                            if self.stop_reason is not None:
                                # Asked to stop while the reaper started.
                                root.cancel_scope.cancel()
                            if receiver is not None:
                                # Signals that came before the receiver
                                # opened (see tunsup._signals).
                                for signum in _signals.take_early():
                                    self._on_signal(signum, early=True)
                            await self._recover()
                            await self._start_all(initial)
                            if self._persistent or self.on_failure == "keep-running":
                                await trio.sleep_forever()
                    finally:
                        self._root = None
                        self.phase = "stopping"
                        outer.cancel_scope.cancel()
        except* Exception as group:
            # Tunnels have already unwound; record why we ended.
            self._failed = True
            for exc in leaves(group):
                if not isinstance(exc, TunsupError):
                    log.error("unexpected error: %s", exc, exc_info=exc)
        finally:
            self._release(initial)
            self._release_all()
            self.phase = "stopped"
            if not self._stopping_notified:
                self._stopping_notified = True
                sdnotify.notify("STOPPING=1")
            with trio.CancelScope(shield=True):
                await self._end_adoption()
                await self._close_journal()
                try:
                    await self.host.net.close()
                except Exception as exc:
                    log.warning("closing the netlink worker: %s", exc)
        return self._exit_code()

    # ------------------------------------------------------------ internals

    async def _recover(self) -> None:
        """Undo what dead instances left, before anything else."""
        if self.journal is None:
            return
        from .recovery import recover

        # Make-before-break: the kill switches of tunnels starting now stay
        # until each one's own routing stands (see _start).
        starting = {t.name for t in self.tunnels}
        report = await recover(self.journal.state_dir, self.host,
                               me=(self.journal.pid, self.journal.start_time),
                               timeout=self.recovery_timeout, keep=starting.__contains__)
        self._adoption = report.adoption
        for line in report.undone:
            log.info("recovery: undone %s", line)
        if report.recovered:
            log.info("recovered %d journal(s) of dead instance(s): %d object(s) undone",
                     len(report.recovered), len(report.undone))
        for failure in report.failures:
            log.error("recovery: %s (left for 'tunsup cleanup')", failure)

    async def _end_adoption(self) -> None:
        """At exit: after a requested stop, what no tunnel replaced goes
        (a stop restores everything); after a failure it stays, closed, in
        the dead instance's journal (for the next start or a cleanup)."""
        adoption, self._adoption = self._adoption, None
        if adoption is None or not adoption.tunnels:
            return
        if self.stop_reason is None:
            log.warning("keeping the kill switch of %s (not started again): 'tunsup cleanup "
                        "--all' removes it", ", ".join(sorted(adoption.tunnels)))
            return
        await adoption.drop()

    async def _close_journal(self) -> None:
        if self.journal is None:
            return
        clean = not self._incomplete
        try:
            await self.journal.close(remove=clean)
        except Exception as exc:
            log.warning("closing the journal: %s", exc)
        if not clean:
            log.error("leftovers are recorded in %s: run 'tunsup cleanup' to retry",
                      self.journal.path)

    @contextlib.asynccontextmanager
    async def _lock(self, name: str) -> AsyncIterator[None]:
        """Hold the per-name lock that serializes requests for one tunnel.
        The lock is forgotten once free, so that names that come and go do
        not pile up.  Cancellable while waiting."""
        lock = self._locks.setdefault(name, trio.Lock())
        try:
            async with lock:
                yield
        finally:
            if (not lock.locked() and lock.statistics().tasks_waiting == 0
                    and self._locks.get(name) is lock):
                del self._locks[name]

    def _claim(self, names: Sequence[str]) -> Claims:
        """Claim ``names`` for the configuration until :meth:`_release`."""
        claims = {name: trio.Event() for name in names}
        for name, event in claims.items():
            self._claims.setdefault(name, []).append(event)
        return claims

    def _release(self, claims: Claims, *names: str) -> None:
        """Release ``names`` of ``claims`` (all of them when none given):
        whoever waits for them goes on.  Releasing twice is harmless."""
        for name in names or list(claims):
            event = claims.pop(name, None)
            if event is None:
                continue
            event.set()
            waiting = self._claims.get(name, [])
            if event in waiting:
                waiting.remove(event)
            if not waiting:
                self._claims.pop(name, None)

    async def _wait_claims(self, name: str, what: str) -> None:
        """Wait until no configured start (initial or a reload's) claims
        ``name``, so that a client's request never races it.  Cancellable;
        a stop releases every claim."""
        if name in self._claims:
            log.info("%s %s: waiting for the configured tunnel of that name to start",
                     what, name)
        while waiting := self._claims.get(name):
            await waiting[0].wait()

    def _release_all(self) -> None:
        """Release every claim (``run`` is ending): nobody waits for good."""
        for waiting in self._claims.values():
            for event in waiting:
                event.set()
        self._claims.clear()

    async def _in_root(self, fn: Callable[[], Awaitable[T]]) -> T:
        """Run ``fn`` as a task of the root nursery (so that a stop cancels
        it) and wait for its result.  Raises :class:`Stopping` when the
        supervisor stops first.  Cancelling the caller abandons the wait;
        the task goes on."""
        root = self._root
        if root is None or self.stop_reason is not None:
            raise Stopping("the service is stopping" if self._used else "not running")
        box: list[outcome.Outcome[T]] = []
        done = trio.Event()

        async def runner() -> None:
            try:
                box.append(outcome.Value(await fn()))
            except Exception as exc:
                box.append(outcome.Error(exc))
            finally:
                done.set()

        try:
            root.start_soon(runner)
        except RuntimeError:  # the nursery is closing
            raise Stopping("the service is stopping") from None
        await done.wait()
        if not box:
            raise Stopping("interrupted: the service is stopping")
        return box[0].unwrap()

    async def _start_all(self, claims: Claims) -> None:
        """Start the initial tunnels, concurrently (at most
        :attr:`max_parallel` at once; a failure propagates, cancels the
        other starts and stops the supervisor), releasing each one's claim
        once its start ended, then report ready.  Cancelled by a stop."""
        sdnotify.notify("STATUS=bringing up tunnels")
        began = trio.current_time()
        gate = HelperGate(self.tunnels, self._start_gate)
        # A reload waits for the initial start.
        async with self._converge_lock, trio.open_nursery() as nursery:
            for tunnel in self.tunnels:
                # Start slots are taken in configuration order (with
                # max_parallel = 1 the tunnels start one after another).
                await self._start_gate.acquire_on_behalf_of(tunnel)
                if len(self.tunnels) > 1:
                    tunnel.before_helper = functools.partial(gate.wait, tunnel)
                # else: no other initial tunnel for its helper to wake up:
                # it starts while the link is configured, as an `up` does.
                nursery.start_soon(self._start_configured, tunnel, claims, gate)
        took = trio.current_time() - began
        names = ", ".join(t.name for t in self.tunnels)
        log.info("ready: %d tunnel(s) up in %.0f ms (%s)", len(self.tunnels), took * 1000,
                 names)
        self.phase = "running"
        self.ready.set()
        sdnotify.notify("READY=1", self._status_line())

    async def _start_configured(self, tunnel: Tunnel, claims: Claims, gate: HelperGate) -> None:
        """Start one initial tunnel (a start slot was taken on its behalf);
        release the slot (if it holds one: see :class:`HelperGate`) and its
        claim once the start ended.  Raises what ended it; cancelled by a
        stop."""
        try:
            async with self._lock(tunnel.name):
                await self._start(tunnel, CONFIG)
        finally:
            tunnel.before_helper = None
            gate.ended(tunnel)
            self._release(claims, tunnel.name)

    def _status_line(self) -> str:
        up = [s.tunnel.name for s in self._slots.values() if s.up_since is not None]
        return f"STATUS={len(up)} tunnel(s) up" + (f": {', '.join(up)}" if up else "")

    def _announce(self) -> None:
        if self.phase == "running":
            sdnotify.notify(self._status_line())

    async def _start(self, tunnel: Tunnel, origin: str) -> None:
        """Start ``tunnel`` in the root nursery; return once it is up.  The
        caller is a task of the root nursery holding the tunnel's lock and
        one of the :attr:`max_parallel` start slots (taken in the order the
        starts were asked for: lock, then slot only for names nobody claims
        first, so that no cycle can form).  Raises what ended the tunnel if
        it fails to start (after undo).  Cancelled by a stop (the tunnel
        unwinds before this returns)."""
        assert self._root is not None
        async with self._conflict_lock:  # held until the slot takes its place
            await self._refuse_conflicts(tunnel)
            slot = Slot(tunnel, origin)
            self._slots[tunnel.name] = slot
        self._failed_slots.pop(tunnel.name, None)
        self.history.append(tunnel)
        tag_tunnel(tunnel.log, tunnel.name)
        tunnel.teardown_slots = self._teardown_gate
        tunnel.adopted = self._adoption
        log.info("starting tunnel %s from %s", tunnel.name, tunnel.spec.source)
        try:
            await self._root.start(self._run_slot, slot)
        except BaseException:
            if self._slots.get(tunnel.name) is slot:
                del self._slots[tunnel.name]
            raise
        slot.up_since = time.time()
        if self._adoption is not None:
            # The new tunnel's routing stands: the old protection may go.
            await self._adoption.drop(tunnel.name)

    async def _refuse_conflicts(self, tunnel: Tunnel) -> None:
        """Raise :class:`ConfigError` if ``tunnel`` claims what a running
        tunnel holds (see :mod:`tunsup.config.conflicts`).  The caller
        holds ``_conflict_lock`` until the slot takes its place, so two
        starts at once cannot both pass.  Many prefixes are checked in a
        worker thread (pure computation); cancellation abandons it."""
        running = [Tenant(s.tunnel.spec, s.tunnel.options.allow_overlap)
                   for name, s in self._slots.items() if name != tunnel.name]
        size = sum(len(p.allowed_ips) for t in [tunnel.spec, *(r.spec for r in running)]
                   for p in t.peers)
        errors = await cpu_bound(size, find_conflicts,
                                 [Tenant(tunnel.spec, tunnel.options.allow_overlap)], running)
        error = config_errors(errors)
        if error is not None:
            raise error

    async def _run_slot(self, slot: Slot, *,
                        task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a slot's tunnel until it ends; ``down`` cancels ``slot.scope``
        (which ends it quietly), a stop cancels the root.  A failure at
        start propagates to the starter; a failure once up (the tunnel has
        already been torn down and logged) ends only this tunnel, and when
        no tunnel is left the supervisor stops, unless ``on_failure`` is
        ``"keep-running"``."""
        tunnel = slot.tunnel
        try:
            with slot.scope:
                await tunnel.run(task_status=task_status)
        except* TunsupError:
            if not tunnel.was_up:
                raise
            self._failed_slots[tunnel.name] = slot
            self._tunnel_failed(tunnel)
        finally:
            self._ended(tunnel)
            slot.done.set()
            if self._slots.get(tunnel.name) is slot:
                del self._slots[tunnel.name]
            self._announce()

    def _ended(self, tunnel: Tunnel) -> None:
        """Keep what the exit code and report need of a tunnel that ended
        (not the tunnel itself)."""
        report = tunnel.report
        if report is None or report.complete:
            return
        self._left_behind(report.failures)

    def _left_behind(self, failures: tuple[str, ...]) -> None:
        """Undo steps failed: the exit code says so (3), and the report
        keeps the first MAX_TEARDOWN_FAILURES lines."""
        self._incomplete = True
        room = MAX_TEARDOWN_FAILURES - len(self._teardown_failures)
        self._teardown_failures += failures[:max(room, 0)]
        self._more_failures += max(len(failures) - max(room, 0), 0)

    def _tunnel_failed(self, tunnel: Tunnel) -> None:
        self._failed = True
        left = [s.tunnel.name for s in self._slots.values() if s.tunnel is not tunnel]
        sdnotify.notify(f"STATUS=tunnel {tunnel.name} failed; {len(left)} tunnel(s) left"
                        + (f": {', '.join(left)}" if left else ""))
        if left:
            log.error("tunnel %s failed; %d tunnel(s) still running", tunnel.name, len(left))
        elif self.on_failure == "exit":
            log.error("tunnel %s failed and no tunnel is left: exiting", tunnel.name)
            self.stop(f"tunnel {tunnel.name} failed")
        else:
            log.error("tunnel %s failed and no tunnel is left; staying up "
                      "(on_failure = keep-running)", tunnel.name)

    async def _stop_slot(self, slot: Slot) -> None:
        """Cancel a tunnel and wait for its (shielded) teardown.  Cancelling
        the caller abandons the wait, never the teardown."""
        log.info("stopping tunnel %s", slot.tunnel.name)
        slot.tunnel.stop_asked()
        slot.scope.cancel()
        await slot.done.wait()

    async def _add(self, spec: TunnelSpec, options: TunnelOptions,
                   origin: str) -> tuple[Tunnel, bool | Change]:
        """See :meth:`add`; runs in the root nursery (a stop cancels it).
        A name the configuration claims is left to it: this waits for the
        configured start, then finds that tunnel (the same plan: not
        started; another one: changed, see :meth:`_change`)."""
        await self._wait_claims(spec.name, "up")
        async with self._lock(spec.name):
            slot = self._slots.get(spec.name)
            if slot is not None:
                if same_plan(slot.tunnel, spec, options):
                    return slot.tunnel, False
                return await self._change(slot, spec, options)
            tunnel = self._make_tunnel(spec, options)
            try:
                async with self._start_gate:
                    await self._start(tunnel, origin)
            except ConfigError:
                raise  # refused before anything was applied
            except Exception as exc:
                raise StartFailed(tunnel, describe_error(exc)) from exc
            self._announce()
            return tunnel, True

    async def _converge(self, wanted: Sequence[Plan]) -> ConvergeResult:
        """See :meth:`converge`; runs in the root nursery (a stop cancels
        it between and during starts; teardowns it began still complete)."""
        want = {spec.name: (spec, options) for spec, options in wanted}
        self.host.dns_owners.set_order(want)
        # Claimed before anything awaits (a reload waits for the initial
        # start), so that an `up` or `down` of these names waits for it.
        claims = self._claim(list(want))
        try:
            return await self._converge_claimed(want, claims)
        finally:
            self._release(claims)

    async def _converge_claimed(self, want: dict[str, Plan], claims: Claims) -> ConvergeResult:
        """:meth:`_converge` once ``want``'s names are claimed; releases
        each claim once that name is settled.  Tunnels no longer wanted go
        down first (concurrently), then every wanted name is settled
        concurrently (starts bounded by :attr:`max_parallel`)."""
        out: dict[str, list[Any]] = {key: [] for key in _OUTCOMES}
        async with self._converge_lock:
            for name in [n for n, s in self._failed_slots.items()
                         if s.origin == CONFIG and n not in want]:
                del self._failed_slots[name]  # gone from the configuration
            removed = [n for n, s in self._slots.items() if s.origin == CONFIG and n not in want]
            async with trio.open_nursery() as nursery:
                for name in removed:
                    nursery.start_soon(self._converge_remove, name, out)
            async with trio.open_nursery() as nursery:
                for name, plan in want.items():
                    token = object()  # a start slot, taken in configuration order
                    await self._start_gate.acquire_on_behalf_of(token)
                    nursery.start_soon(self._converge_one, name, plan, claims, out, token)
            # A reload that reordered the configuration changed no claim:
            # the shared resolv.conf is written again in the new order.
            try:
                await self.host.dns_owners.write_order(timeout=DNS_ORDER_TIMEOUT)
            except HostError as exc:
                log.warning("%s", exc)
        self._announce()
        # In configuration order, whatever order the tasks ended in.
        order = {name: i for i, name in enumerate([*removed, *want])}
        for items in out.values():
            items.sort(key=lambda item: order[item if isinstance(item, str) else item[0]])
        return ConvergeResult(**{key: tuple(items) for key, items in out.items()})

    async def _converge_remove(self, name: str, out: dict[str, list[Any]]) -> None:
        """Stop configured tunnel ``name`` (no longer wanted).  Cancellable
        wait; the teardown is not."""
        async with self._lock(name):
            slot = self._slots.get(name)
            if slot is not None and slot.origin == CONFIG:
                await self._stop_slot(slot)
                out["stopped"].append(name)

    async def _converge_one(self, name: str, plan: Plan, claims: Claims,
                            out: dict[str, list[Any]], token: object) -> None:
        """Settle one wanted tunnel: unchanged, changed in place, rebuilt,
        or started; a failure is recorded in ``out``, never raised.
        Releases its start slot (held on behalf of ``token``) and its
        claim.  Cancelled by a stop."""
        spec, options = plan
        try:
            async with self._lock(name):
                slot = self._slots.get(name)
                if slot is not None and same_plan(slot.tunnel, spec, options):
                    slot.origin = CONFIG
                    out["unchanged"].append(name)
                    return
                if slot is not None:
                    slot.origin = CONFIG
                    try:
                        _, change = await self._change(slot, spec, options)
                    except Exception as exc:
                        out["failed"].append((name, describe_error(exc)))
                        if not _undo_complete(exc):
                            out["incomplete"].append(name)
                        return
                    if change.in_place is not None:
                        out["changed"].append((name, change.in_place))
                    else:
                        out["restarted"].append(name)
                        out["rebuilt"].append((name, change.rebuilt or ""))
                    return
                tunnel = self._make_tunnel(spec, options)
                try:
                    await self._start(tunnel, CONFIG)
                except Exception as exc:
                    out["failed"].append((name, describe_error(exc)))
                    if tunnel.report is not None and not tunnel.report.complete:
                        out["incomplete"].append(name)
                    return
                out["started"].append(name)
        finally:
            self._start_gate.release_on_behalf_of(token)
            self._release(claims, name)

    async def _change(self, slot: Slot, spec: TunnelSpec,
                      options: TunnelOptions) -> tuple[Tunnel, Change]:
        """Give the running tunnel of ``slot`` a new configuration: in place
        when it can (see :meth:`Tunnel.reconfigure`), else rebuilt
        make-before-break (:meth:`_rebuild`).  The caller holds the
        tunnel's lock in the root nursery.  Raises :class:`ChangeFailed`
        (rolled back), or :class:`StartFailed` when a rebuild's start
        failed."""
        tunnel = slot.tunnel
        try:
            summary = await tunnel.reconfigure(spec, options)
        except NeedsRebuild as exc:
            reason = str(exc)
        except ReloadFailed as exc:
            raise ChangeFailed(f"tunnel {spec.name}: in-place change failed: {exc}",
                               rolled_back=exc.rolled_back, failures=exc.failures) from exc
        else:
            log.info("tunnel %s changed in place: %s", spec.name, summary)
            return tunnel, Change(in_place=summary)
        log.info("tunnel %s changed: rebuilding it (%s)", spec.name, reason)
        return await self._rebuild(slot, spec, options), Change(rebuilt=reason)

    async def _rebuild(self, slot: Slot, spec: TunnelSpec, options: TunnelOptions) -> Tunnel:
        """Replace the tunnel of ``slot`` by a new one for ``spec``,
        make-before-break: its routes are held by unreachable routes
        (journaled like any effect) from before the old tunnel goes down
        until the new one's routes stand (or its start failed), so that
        nothing meant for the tunnel leaves another way meanwhile.  A full
        tunnel's default route is held in its own table, which
        :class:`HeldRule` copies of its rules keep leading to; the new
        tunnel reuses that table and those priorities (``Tunnel.held``),
        so its route takes over the held traffic as soon as it exists.
        Raises :class:`StartFailed` (the new tunnel's) when its start
        failed, :class:`ChangeFailed` when the hold could not be put in
        place (then the old tunnel still runs)."""
        old = slot.tunnel
        assert self._root is not None
        ctx = EffectContext(host=self.host, log=old.log, nursery=self._root)
        observer = JournalObserver(self.journal, spec.name) if self.journal else None
        hold = EffectStack(ctx, log=old.log, observer=observer)
        policy = old.held_policy()
        # A crash meanwhile: for a tunnel with the kill switch, the hold
        # is what protects it (its own goes first), kept for a restart.
        switch = old.options.kill_switch
        try:
            try:
                for table, prefixes in old.held_routes():
                    await hold.apply(HeldRoutes(spec.name, table, prefixes, kill_switch=switch))
                if policy is not None:
                    # A full tunnel: its default route lives in its table, which
                    # only its rules lead to.  The hold keeps both (for unmarked
                    # packets: the new helper's own still reach its endpoint).
                    await hold.apply(HeldRoutes(spec.name, policy.table, policy.defaults,
                                                kill_switch=switch))
                    for rule in policy.rules:
                        await hold.apply(HeldRule(spec.name, rule, kill_switch=switch))
                await hold.flush()
            except Exception as exc:
                # Nothing was stopped yet: the running tunnel is left as it
                # is, and the hold so far is taken back like a failed change.
                report = await hold.unwind(options.stop_timeout)
                raise ChangeFailed(
                    f"tunnel {spec.name}: not rebuilt, holding its routes failed: "
                    f"{describe_error(exc)}; it keeps running unchanged",
                    rolled_back=report.undone, failures=report.failures) from exc
            await self._stop_slot(slot)
            tunnel = self._make_tunnel(spec, options)
            tunnel.held = policy
            try:
                await self._start(tunnel, slot.origin)
            except Exception as exc:
                # The old tunnel is gone: listed as failed (status) until a
                # reload, an `up` or a `down` of its name, not silently lost.
                self._failed_slots[tunnel.name] = Slot(tunnel, slot.origin)
                raise StartFailed(tunnel, describe_error(exc)) from exc
            return tunnel
        finally:
            report = await hold.unwind(options.stop_timeout)
            if not report.complete:
                # Not a tunnel's teardown, but the host is not restored
                # either (and the journal keeps the hold's records).
                self._left_behind(report.failures)
                log.error("tunnel %s: removing the hold routes failed: %s", spec.name,
                          "; ".join(report.failures))

    async def _watch_signals(self, receiver: AsyncIterator[int]) -> None:
        """Acts on each signal (:meth:`_on_signal`).  Runs until cancelled,
        after the teardown."""
        async for signum in receiver:
            self._on_signal(signum)

    def _on_signal(self, signum: int, *, early: bool = False) -> None:
        """SIGTERM/SIGINT stop (once; later ones are logged, the first of
        each kind at INFO: a stream of them must not flood the log), SIGHUP
        reloads (``early``: it came before the start, while the
        configuration was being read: ignored)."""
        name = signal.Signals(signum).name
        if signum == RELOAD_SIGNAL:
            if early:
                log.info("received %s before the start: ignored", name)
            else:
                self._hangup()
        elif self.stop_reason is None:
            log.info("received %s%s: stopping", name, " before the start" if early else "")
            self._stopping_notified = True
            sdnotify.notify("STOPPING=1", f"STATUS=stopping ({name})")
            self.stop(f"received {name}")
        else:
            level = logging.DEBUG if signum in self._repeated else logging.INFO
            self._repeated.add(signum)
            log.log(level, "received %s: already stopping, teardown continues", name)

    def _hangup(self) -> None:
        root = self._root
        if self.stop_reason is not None or root is None:
            log.info("received SIGHUP while stopping: ignored")
        elif self._reload is None:
            log.info("received SIGHUP: no configuration to reload")
        else:
            try:
                root.start_soon(self._reload_task)
            except RuntimeError:  # the root nursery is closing: run is ending
                log.info("received SIGHUP while stopping: ignored")
                return
            log.info("received SIGHUP: reloading the configuration")

    async def _reload_task(self) -> None:
        """A reload started by SIGHUP, in the root nursery: a stop cancels it.
        Errors are logged, never raised."""
        assert self._reload is not None
        try:
            await self._reload()
        except Stopping:
            pass
        except Exception as exc:
            log.error("reload failed: %s", describe_error(exc))

    def _exit_code(self) -> ExitCode:
        if self._incomplete:
            return ExitCode.TEARDOWN_INCOMPLETE
        if self._failed:
            return ExitCode.FAILURE
        return ExitCode.OK


def _undo_complete(exc: Exception) -> bool:
    """Whether what a failed change had applied was fully undone: its
    rollback (:class:`ChangeFailed`), or a failed rebuild's teardown."""
    if isinstance(exc, ChangeFailed):
        return exc.restored
    if isinstance(exc, StartFailed):
        return exc.tunnel.report is None or exc.tunnel.report.complete
    return True


def describe_error(exc: BaseException) -> str:
    """One line for an error that may be an exception group."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe_error(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__
