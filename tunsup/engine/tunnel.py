"""One tunnel: its bring-up as a sequence of effects, supervision, teardown.

:meth:`Tunnel.run` is meant for ``nursery.start``: it returns control (via
``task_status.started``) once the tunnel is up, then supervises the helper
until cancelled.  Whatever ends it — cancellation, a failed step, a helper
that keeps dying — the effect stack unwinds in exact reverse order, shielded
and bounded by ``stop_timeout``; :attr:`Tunnel.report` then says whether the
host was fully restored.

Supervision: while up, the helper is probed over UAPI every
``probe_interval`` seconds, each probe under its own deadline; a probe that
fails marks the tunnel *degraded* (with the reason) and a good one makes it
*up* again.  A helper that exits is restarted after a backoff, through the
same effect stack mechanism: the helper and what depends on it form a
*generation* (a nested :class:`~tunsup.engine.undo.EffectStack`, see
:class:`~tunsup.engine.effects.HelperGeneration`) that is unwound and applied anew.
In owned-TUN mode the interface, its addresses and routes stay in place
meanwhile, so nothing meant for the tunnel leaves another way.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import ipaddress
import logging
import math
import os
import random
import signal
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Generic, TypeVar

import attrs
import trio
from trio_util import AsyncValue

from .._errors import HelperExited, HostError
from ..config.keys import Key
from ..config.settings import TunnelOptions as TunnelOptions
from ..config.spec import RT_TABLE_MAIN, IPAddress, IPInterface, IPNetwork, TunnelSpec
from ..host import HOLD_RULE_PROTOCOL, UNREACHABLE, HelperHandle, Host, uapi
from ..host import tun as tun_adapter
from .effects import (
    KILL_SWITCH_METRIC,
    Address,
    AddressRemoved,
    ConfigureWireguard,
    CreateTun,
    Dns,
    Effect,
    EffectContext,
    Handover,
    HeldRoutes,
    HelperGeneration,
    HookRecorder,
    Hooks,
    KillSwitch,
    Link,
    LinkUp,
    Mtu,
    MtuChanged,
    OwnedTun,
    Routes,
    RoutesRemoved,
    Rule,
    StartHelper,
    WireguardChanged,
    select_routes,
)
from .reload import (
    NeedsRebuild,
    ReloadFailed,
    hooks_changed,
    peer_counts,
    rebuild_reason,
    rollback_message,
)
from .restart import RestartTracker
from .routing import HeldPolicy, RoutingPlan, apply_link_routes, apply_policy, plan_routing
from .undo import EffectStack, StackObserver, TeardownReport

T = TypeVar("T")

#: Above this many AllowedIPs, per-prefix work (rendering the UAPI request,
#: choosing routes: ~2 us per prefix) runs in a worker thread.
CPU_BOUND_PREFIXES = 1000

#: wg-quick's MTU rule: path MTU towards the endpoints minus this overhead.
WIREGUARD_OVERHEAD = 80
DEFAULT_LINK_MTU = 1500


class TunnelState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    UP = "up"
    #: Up, but the last probe of the helper failed (see ``degraded_reason``).
    DEGRADED = "degraded"
    #: The helper died; waiting out the backoff or starting a new one.
    RESTARTING = "restarting"
    STOPPING = "stopping"
    #: Stopped on request, host fully restored.
    STOPPED = "stopped"
    #: Ended by a failure (at start, or restarts exhausted) or with an
    #: incomplete teardown; ``failure`` / ``report`` say which.
    FAILED = "failed"


#: The only state changes a tunnel makes.
TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    TunnelState.NEW: frozenset({TunnelState.STARTING}),
    TunnelState.STARTING: frozenset({TunnelState.UP, TunnelState.STOPPING}),
    TunnelState.UP: frozenset(
        {TunnelState.DEGRADED, TunnelState.RESTARTING, TunnelState.STOPPING}),
    TunnelState.DEGRADED: frozenset(
        {TunnelState.UP, TunnelState.RESTARTING, TunnelState.STOPPING}),
    TunnelState.RESTARTING: frozenset({TunnelState.UP, TunnelState.STOPPING}),
    TunnelState.STOPPING: frozenset({TunnelState.STOPPED, TunnelState.FAILED}),
    TunnelState.STOPPED: frozenset(),
    TunnelState.FAILED: frozenset(),
}


@attrs.frozen
class PeerProbe:
    """One peer as the last probe saw it."""

    public_key: str
    endpoint: str | None
    rx_bytes: int
    tx_bytes: int
    #: Unix time of the last handshake, None if never.
    last_handshake: float | None


@attrs.frozen
class ProbeResult:
    """Outcome of one UAPI probe."""

    #: Unix time at which the probe ended.
    at: float
    #: Seconds it took.
    took: float
    #: Why it failed; None when the helper answered.
    error: str | None = None
    peers: tuple[PeerProbe, ...] = ()

    @property
    def ok(self) -> bool:
        return self.error is None


@attrs.frozen
class TunnelStatus:
    """A snapshot of a tunnel for status reports: plain values only."""

    name: str
    state: str
    tun_mode: str
    helper_pid: int | None
    #: Helper restarts since the tunnel came up.
    restarts: int
    degraded_reason: str | None
    #: Why the tunnel ended, if it ended by a failure.
    failure: str | None
    last_probe: ProbeResult | None
    #: Routes through the tunnel that tunsup installed and holds now (not
    #: those it found already there, nor the kill switch's).
    routes: int = 0


class Tunnel:
    """A tunnel described by a :class:`TunnelSpec`.  Single use."""

    def __init__(
        self,
        spec: TunnelSpec,
        host: Host,
        options: TunnelOptions | None = None,
        *,
        observer: StackObserver | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """``rng``: the source of the restart backoff's jitter (tests pass a
        seeded one so that a schedule replays exactly)."""
        self.spec = spec
        self.host = host
        self.options = options or TunnelOptions()
        self.log = logging.getLogger(f"tunsup.{spec.name}")
        self._state = AsyncValue(TunnelState.NEW)
        self.report: TeardownReport | None = None
        #: Why the tunnel ended, if it did not end by a stop.
        self.failure: BaseException | None = None
        self.timings: dict[str, float] = {}
        #: Pid of the running helper, None while there is none.
        self.helper_pid: int | None = None
        self.restarts = 0
        self.degraded_reason: str | None = None
        self.last_probe: ProbeResult | None = None
        self._probed = trio.Event()
        self._observer = observer
        self._endpoints: dict[Key, tuple[str, int]] = {}
        #: Background work of an up tunnel (endpoint re-resolution); cancelled
        #: before teardown starts.
        self._background = trio.CancelScope()
        #: Kept for a tracker that replaces this one (a reload that
        #: changes the restart policy): the jitter stays seeded.
        self._rng = rng
        self._tracker = RestartTracker(self.options.restart, rng)
        #: Failed undo steps of helper generations unwound by a restart:
        #: part of the tunnel's teardown report (the host is not restored).
        self._generation_failures: list[str] = []
        # Fixed at bring-up, reused by every helper generation.
        self._request = b""
        #: The bring-up's render of ``_request``, running until the first
        #: generation's configuration needs it.
        self._rendering: _Soon[bytes] | None = None
        self._mtu = 0
        self._tun_index = 0
        self._plan: RoutingPlan | None = None
        #: Protections a dead instance left, to hand over (set by the
        #: supervisor before the start; see tunsup.engine.recovery.Adoption).
        self.adopted: Handover | None = None
        #: What a rebuild holds of the full tunnel this one replaces (set
        #: by the supervisor before the start; see :meth:`held_policy`).
        self.held: HeldPolicy | None = None
        #: While it runs: its effect stack and context (for status).
        self._stack: EffectStack | None = None
        self._ctx: EffectContext | None = None
        #: See :meth:`stop_asked`.
        self._stop_asked_at: float | None = None
        #: Set by a supervisor: its teardown waits for a slot of this
        #: limiter (teardowns of many tunnels at once are bounded).  The
        #: wait counts against ``stop_timeout``.
        self.teardown_slots: trio.CapacityLimiter | None = None
        #: Set by a supervisor starting many tunnels at once: awaited in
        #: the bring-up once the tunnel's own link is in place, right
        #: before its helper starts (see :meth:`_bring_up`).  Cancellable.
        self.before_helper: Callable[[], Awaitable[None]] | None = None
        #: Held by an in-place change and by a helper restart's new
        #: generation: a restarted helper gets the configuration of a
        #: change made before it, never half of one.
        self._changing = trio.Lock()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> TunnelState:
        state: TunnelState = self._state.value
        return state

    @property
    def was_up(self) -> bool:
        """Whether the tunnel came up (its start succeeded)."""
        return "up" in self.timings

    @property
    def status(self) -> TunnelStatus:
        return TunnelStatus(
            name=self.name,
            state=self.state.value,
            tun_mode=self.options.tun_mode,
            helper_pid=self.helper_pid,
            restarts=self.restarts,
            degraded_reason=self.degraded_reason,
            failure=_one_line(self.failure) if self.failure is not None else None,
            last_probe=self.last_probe,
            routes=self.routes_installed,
        )

    @property
    def routes_installed(self) -> int:
        """How many routes through the tunnel tunsup added and has not yet
        removed: the records on its effect stacks (a route that already
        existed is not in them; a helper generation's go with it)."""
        return len(self.owned_routes())

    def _records(self) -> list[Effect]:
        """The records of the tunnel's stack, then of its helper generation."""
        stacks = [self._stack, self._ctx.generations.get(self.name) if self._ctx else None]
        return [r for stack in stacks if stack is not None for r in stack.records]

    def owned_routes(self, *, kill_switch: bool = False,
                     extra: tuple[Effect, ...] = ()) -> set[tuple[int, IPNetwork]]:
        """(table, prefix) of the routes through the tunnel that tunsup
        added and has not removed (with ``kill_switch``: of the kill
        switch's unreachable routes instead), after the records ``extra``."""
        owned: set[tuple[int, IPNetwork]] = set()
        for r in [*self._records(), *extra]:
            if ((isinstance(r, Routes) and not kill_switch)
                    or (type(r) is KillSwitch and kill_switch)):
                owned |= {(r.table, p) for p in r.prefixes}
            elif isinstance(r, RoutesRemoved) and (
                    (r.index == UNREACHABLE and r.metric == KILL_SWITCH_METRIC) if kill_switch
                    else r.index != UNREACHABLE):
                owned -= {(r.table, p) for p in r.prefixes}
        return owned

    def held_routes(self) -> list[tuple[int, tuple[IPNetwork, ...]]]:
        """What a rebuild holds while this tunnel is replaced: its routes,
        by table, except a full tunnel's default routes (they live in its
        policy table, which no rule consults once its rules are gone)."""
        policy = self._plan.policy_table if self._plan is not None else None
        return _by_table({r for r in self.owned_routes() if r[0] != policy})

    def held_policy(self) -> HeldPolicy | None:
        """What a rebuild holds of this tunnel's full-tunnel routing (None
        when it is not a full tunnel): its policy table, where the hold
        puts an unreachable default, and the ``fwmark 0`` copy of each
        policy rule it owns (see :class:`~tunsup.engine.effects.HeldRule`)."""
        plan = self._plan
        if plan is None or plan.policy_table is None:
            return None
        rules = tuple(attrs.evolve(r.rule, fwmark=0, invert=False, protocol=HOLD_RULE_PROTOCOL)
                      for r in self._records() if type(r) is Rule and r.owned)
        return HeldPolicy(plan.policy_table, rules, plan.defaults)

    def _owned_addresses(self, extra: tuple[Effect, ...] = ()) -> list[IPInterface]:
        owned: list[IPInterface] = []
        for r in [*self._records(), *extra]:
            if isinstance(r, Address) and r.owned:
                owned.append(r.address)
            elif isinstance(r, AddressRemoved) and r.address in owned:
                owned.remove(r.address)
        return owned

    def _set_state(self, new: TunnelState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"{self.name}: illegal transition {self.state} -> {new}")
        self._state.value = new

    async def wait_state(self, state: TunnelState) -> None:
        """Wait until the tunnel is in ``state``.  Cancellable."""
        await self._state.wait_value(state)

    async def next_probe(self) -> ProbeResult:
        """Wait for the next probe to end and return its result.  Cancellable."""
        await self._probed.wait()
        assert self.last_probe is not None
        return self.last_probe

    def _probe_ended(self, result: ProbeResult) -> None:
        self.last_probe = result
        self._probed.set()
        self._probed = trio.Event()

    def stop_asked(self) -> None:
        """Note that this tunnel is being told to stop, now (its owner calls
        this as it cancels the tunnel: a stop, a ``down``).  Its teardown
        then gets what is left of ``stop_timeout`` from this moment, even if
        clean-up already under way makes it wait (see
        :attr:`EffectContext.stop_asked_at`).  Synchronous: noted before
        any of the tunnel's tasks sees the cancellation."""
        if self._stop_asked_at is None:
            self._stop_asked_at = trio.current_time()
        if self._ctx is not None:
            self._ctx.note_stop(self._stop_asked_at)

    async def run(self, *, task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring the tunnel up, report started, supervise until cancelled.

        Cancellation at any point (even half-way through the bring-up or
        during a restart backoff) unwinds every applied effect before this
        returns; the unwinding itself is shielded and bounded.  Raises the
        error that ended the tunnel (a :class:`HostError` at start,
        :class:`HelperExited` once restarts are exhausted ...) after
        unwinding.
        """
        if self.state is not TunnelState.NEW:
            raise RuntimeError(f"tunnel {self.name} was already run")
        self._set_state(TunnelState.STARTING)
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            ctx = EffectContext(
                host=self.host,
                log=self.log,
                nursery=nursery,
                stop_grace=self.options.stop_grace,
                hook_timeout=self.options.hook_timeout,
                stop_timeout=self.options.stop_timeout,
                on_hook=self._observer.hook_started
                if isinstance(self._observer, HookRecorder) else None,
                adopted=self.adopted,
            )
            if self._stop_asked_at is not None:
                ctx.note_stop(self._stop_asked_at)
            stack = EffectStack(ctx, log=self.log, observer=self._observer)
            self._stack, self._ctx = stack, ctx
            nursery.start_soon(_note_stop, ctx)
            try:
                await self._bring_up(stack, ctx)
                self.timings["up"] = trio.current_time() - started
                ctx.cleanup_seconds = 0.0
                self._set_state(TunnelState.UP)
                self.log.info("tunnel up in %.0f ms", self.timings["up"] * 1000)
                task_status.started(self)
                nursery.start_soon(self._run_background)
                await self._supervise(ctx)
            except BaseException as exc:
                if not _only_cancelled(exc):
                    self.failure = exc
                    self.log.error("%s failed: %s", "tunnel" if self.was_up else "start", exc)
                raise
            finally:
                self._background.cancel()
                self._set_state(TunnelState.STOPPING)
                stop_started = trio.current_time()
                async with _gate(self.teardown_slots):
                    waited = trio.current_time() - stop_started
                    # Aborts and in-place unwinds since the tunnel was
                    # last up were the teardown's first steps, and so was
                    # whatever a stop had to wait for since it was asked
                    # for: they are paid from the same budget.
                    report = await stack.unwind(ctx.budget_left(waited=waited))
                self.report = attrs.evolve(
                    report, failures=(*self._generation_failures, *report.failures))
                self.helper_pid = None
                # Its tables and rule priorities are gone from the host (or
                # left there, where the next start sees them).
                self.host.claims.release(self)
                for handle in ctx.helpers.values():
                    # Only when its undo failed: never leave it running.
                    await _last_resort_kill(handle, self.log)
                for fd in ctx.tun_fds.values():
                    # Only when the TUN's undo failed before closing it.
                    with trio.CancelScope(shield=True), trio.move_on_after(2):
                        await self.host.close_tun(fd)
                self.timings["down"] = trio.current_time() - stop_started
                if self.report.complete:
                    self.log.info("tunnel down in %.0f ms; host restored",
                                  self.timings["down"] * 1000)
                else:
                    self.log.error("teardown incomplete: %s", "; ".join(self.report.failures))
                self._set_state(TunnelState.STOPPED if self.report.complete
                                and self.failure is None else TunnelState.FAILED)
                nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ bring-up

    async def _bring_up(self, stack: EffectStack, ctx: EffectContext) -> None:
        """Checks, then every effect of the bring-up onto ``stack`` (the
        helper's generation onto a nested one).  Cancellable at every step;
        what was applied stays on the stacks for the caller's unwind.

        In owned-TUN mode, with a :attr:`before_helper` (the initial
        tunnels of a supervisor that starts two or more), the link, its addresses, its state and
        its routes are in place *before* the helper starts, and
        :attr:`before_helper` is awaited between the two: every link,
        address and route change in the namespace wakes every wireguard-go
        running there (two netlink listeners each), so a supervisor
        starting many tunnels lets all of them configure their links
        first, then starts their helpers (50 tunnels: the helpers' CPU up
        to READY went from ~1.8 s to ~0.35 s).  Without one (a tunnel
        started alone) the helper starts while the link is configured
        (:meth:`_configure_link_while_helper_starts`), and is configured
        as soon as it answers.  Once both are done: the helper's MTU
        (wireguard-go resets the MTU of a TUN it is handed), the link's own
        record (so that a stop deletes the link first, as before), then DNS
        and PostUp."""
        spec, net, opts = self.spec, self.host.net, self.options
        owned = opts.tun_mode == "owned"
        # The TUN's framing (wireguard-go --version, a process: milliseconds,
        # once per binary) is asked for now and needed only at the TUN:
        # it runs while the checks and lookups below wait for the kernel.
        header: _Soon[str] | None = None
        if owned and opts.tun_header == "auto":
            header = _Soon(ctx.nursery, tun_adapter.detect_header, opts.helper[0])
        if await net.link_index(spec.name) is not None:
            raise HostError(
                f"interface {spec.name} already exists; another tunnel or an earlier run "
                f"may own it (check with 'ip link show {spec.name}')"
            )
        sock = uapi.socket_path(spec.name, self.host.uapi_dir)
        other = await uapi.listener_pid(sock)
        if other is not None:
            # wireguard-go's socket directory is shared by every namespace.
            raise HostError(
                f"a WireGuard device named {spec.name} already runs (pid {other}, maybe in "
                f"another network namespace): its UAPI socket {sock} is in use"
            )
        endpoints = self._endpoints = await self._resolve_endpoints()
        self._plan = await plan_routing(spec, net, self.log, opts.lan, self.held,
                                        claims=self.host.claims, owner=self)
        # Rendered while the policy, the TUN and the link are put in place
        # (10,000 allowed IPs: ~14 ms, in a worker thread), needed only
        # once the helper answers.
        self._rendering = _Soon(ctx.nursery, self._render_request)
        self._mtu = spec.mtu or await self._auto_mtu([ip for ip, _ in endpoints.values()])

        if spec.pre_up or spec.post_down:
            await stack.apply(Hooks(spec.name, "PreUp", spec.pre_up, "PostDown", spec.post_down))
        await apply_policy(stack, self._plan, spec, net, self.log, kill_switch=opts.kill_switch,
                           lan=opts.lan, held=self.held, claims=self.host.claims, owner=self)
        if owned:
            framing = opts.tun_header if header is None else await header.result()
            tun = await stack.apply(CreateTun(spec.name, packet_info=framing == "pi"))
            assert isinstance(tun, OwnedTun)
            self._tun_index = tun.index
        # The link's configuration (owned TUN): the MTU too, although the
        # helper resets it (its generation sets it again): when it already
        # is what the helper sets (1420, wg-quick's usual value too)
        # neither change is one, and no running helper wakes up for it.
        # These records sit right above the TUN's: they go with it at a stop.
        if owned and self.before_helper is None:
            # No other tunnel to wait for (an `up`, a rebuild, tunnels a
            # reload adds): the helper starts while the link is configured.
            await self._configure_link_while_helper_starts(stack, ctx)
        else:
            if owned:
                await self._configure_link(stack, self._tun_index, set_mtu=True)
            if self.before_helper is not None:
                await self.before_helper()
            await stack.apply(HelperGeneration(spec.name))
            await self._start_generation(self._new_generation(ctx), ctx)
        if owned:
            # Above the helper's generation: a stop deletes the link before
            # it stops the helper, which then exits by itself (one that
            # ignores SIGTERM costs no grace), as when the link came last.
            await stack.apply(Link(spec.name, self._tun_index))
            await self._configure_services(stack)
        # Every record journaled before the tunnel is reported up (the
        # generation's too: both stacks have this tunnel's observer).
        await stack.flush()

    def _new_generation(self, ctx: EffectContext) -> EffectStack:
        gen = EffectStack(ctx, log=self.log, observer=self._observer)
        ctx.generations[self.name] = gen
        return gen

    async def _configure_link_while_helper_starts(self, stack: EffectStack,
                                                  ctx: EffectContext) -> None:
        """Owned TUN, no other tunnel to wait for: the helper's start (a
        process, then its UAPI socket: 13-16 ms on a 2-vCPU machine) and
        its WireGuard configuration (10,000 allowed IPs: ~15 ms in
        wireguard-go) run while the link is configured (addresses, MTU,
        up, routes: a journal write and a netlink round trip each, ~14 ms;
        10,000 routes ~100 ms), instead of after it.  The stacks keep their
        order: the link's records right above the TUN's (they go with it
        at a stop), the generation's record above them, pushed once both
        are done; the generation's MTU comes after that, as always (after
        wireguard-go has reset it).  In the journal the generation's
        records sit among the link's: they are link-neutral.  Until its
        record is on the tunnel's stack a failure unwinds the generation
        here (shielded, bounded by ``stop_timeout``).  Cancellable; what
        was applied to ``stack`` stays there for the caller's unwind."""
        gen = self._new_generation(ctx)
        spawned: list[tuple[HelperHandle, int]] = []
        #: The first failure of either side (the other is then cancelled);
        #: raised once the nursery is closed, so that it is not wrapped in
        #: an exception group.
        failed: list[Exception] = []

        async def side(work: Callable[[], Awaitable[None]], nursery: trio.Nursery) -> None:
            try:
                await work()
            except Exception as exc:
                failed.append(exc)
                nursery.cancel_scope.cancel()

        async def spawn() -> None:
            spawned.append(await self._spawn_generation(gen, ctx))
            await self._configure_wireguard(gen)

        async def configure() -> None:
            await self._configure_link(stack, self._tun_index, set_mtu=True)

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, spawn, nursery)
                await side(configure, nursery)
            if failed:
                raise failed[0]
            await stack.apply(HelperGeneration(self.spec.name))
        except BaseException:
            if not any(isinstance(r, HelperGeneration) for r in stack.records):
                ctx.generations.pop(self.name, None)
                with ctx.cleaning_up():
                    report = await gen.unwind(ctx.budget_left())
                self._generation_failures.extend(report.failures)
            raise
        handle, index = spawned[0]
        await self._finish_generation(gen, handle, index)

    async def _start_generation(self, gen: EffectStack, ctx: EffectContext) -> HelperHandle:
        """Apply one helper generation to ``gen``: the helper, the wait for
        its UAPI socket, its WireGuard configuration, then in owned mode the
        MTU (wireguard-go resets the MTU of a TUN it is handed), in helper
        mode the link and everything on it (they die with that helper).
        Cancellable; what was applied stays on ``gen`` for its unwind."""
        handle, index = await self._spawn_generation(gen, ctx)
        await self._configure_wireguard(gen)
        await self._finish_generation(gen, handle, index)
        return handle

    async def _spawn_generation(self, gen: EffectStack, ctx: EffectContext
                                ) -> tuple[HelperHandle, int]:
        """The first part of :meth:`_start_generation`: the helper, the wait
        for its UAPI socket, the checks of its link (in helper mode its
        record); returns the helper and the link's index."""
        spec, net, opts = self.spec, self.host.net, self.options
        owned = opts.tun_mode == "owned"
        record = await gen.apply(StartHelper(spec.name, (*opts.helper, spec.name),
                                             pass_tun=owned))
        pid = int(record.pid)  # type: ignore[attr-defined]
        handle = ctx.helpers[pid]
        sock = uapi.socket_path(spec.name, self.host.uapi_dir)
        listener = await uapi.wait_for_socket(
            sock,
            timeout=opts.start_timeout,
            give_up=lambda: handle.describe_exit() if handle.exited.is_set() else None,
        )
        if not await _in_process_group(listener, pid):
            raise HostError(f"UAPI socket {sock} belongs to pid {listener}, not to our helper")
        index = await net.link_index(spec.name)
        if index is None:
            raise HostError(f"helper did not create interface {spec.name}")
        if owned and index != self._tun_index:
            raise HostError(f"interface {spec.name} is no longer the TUN device tunsup created")
        if not owned:
            await gen.apply(Link(spec.name, index))
        return handle, index

    async def _configure_wireguard(self, gen: EffectStack) -> None:
        """The second part of :meth:`_start_generation`, once the helper
        answers: its WireGuard configuration (at the first generation,
        once the bring-up's render of it is done).  Cancellable."""
        if self._rendering is not None:
            self._request = await self._rendering.result()
            self._rendering = None
        await gen.apply(ConfigureWireguard(self.spec.name, self._request))

    async def _finish_generation(self, gen: EffectStack, handle: HelperHandle,
                                 index: int) -> None:
        """The rest of :meth:`_start_generation`: in owned mode the MTU
        again (wireguard-go resets it), in helper mode the link and
        everything on it.  Cancellable."""
        spec = self.spec
        if self.options.tun_mode == "owned":
            await gen.apply(Mtu(spec.name, index, self._mtu))
        else:
            await self._configure_link(gen, index, set_mtu=True)
            await self._configure_services(gen)
        self.helper_pid = handle.pid

    async def _configure_link(self, stack: EffectStack, index: int, *, set_mtu: bool) -> None:
        """Addresses, MTU, link up, routes.  Cancellable."""
        spec, net = self.spec, self.host.net
        for address in spec.addresses:
            await stack.apply(Address(spec.name, index, address))
        if set_mtu:
            await stack.apply(Mtu(spec.name, index, self._mtu))
        await stack.apply(LinkUp(spec.name, index))
        assert self._plan is not None
        await apply_link_routes(stack, self._plan, spec, index, net, self.log)

    async def _configure_services(self, stack: EffectStack) -> None:
        """DNS, PostUp hooks (once the tunnel carries traffic).  Cancellable."""
        spec, opts = self.spec, self.options
        if (spec.dns_servers or spec.dns_search) and opts.dns_backend != "none":
            await stack.apply(Dns(spec.name, opts.dns_backend, spec.dns_servers, spec.dns_search))
        if spec.post_up or spec.pre_down:
            await stack.apply(Hooks(spec.name, "PostUp", spec.post_up, "PreDown", spec.pre_down))

    # --------------------------------------------------------------- supervision

    async def _supervise(self, ctx: EffectContext) -> None:
        """Probe the helper and restart it when it dies, until cancelled or
        until restarts are exhausted (raises :class:`HelperExited`).
        Cancellation: immediate from every wait (probe, backoff, restart)."""
        while True:
            assert self.helper_pid is not None
            handle = ctx.helpers[self.helper_pid]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._probe_loop)
                nursery.start_soon(self._reset_backoff_when_healthy)
                await handle.exited.wait()
                nursery.cancel_scope.cancel()
            await self._restart(ctx, handle)

    async def _restart(self, ctx: EffectContext, dead: HelperHandle) -> None:
        """Replace the dead helper's generation with a new one after a
        backoff; raises :class:`HelperExited` when the policy gives up.
        Cancellable at every wait; the unwinding of a generation is
        shielded and bounded."""
        died = trio.current_time()
        self._set_state(TunnelState.RESTARTING)
        self.helper_pid = None
        # Reap it (its last output is logged meanwhile) and undo what
        # depended on it; then say how it ended.
        await self._end_generation(ctx)
        self.log.warning("helper died while the tunnel was up: %s", dead.describe_exit())
        policy = self.options.restart
        while True:
            delay = self._tracker.failure(trio.current_time())
            failures = self._tracker.failures_in_window(trio.current_time())
            if delay is None:
                raise HelperExited(
                    f"helper failed {failures} times within {policy.window:g} s "
                    f"(restart_max = {policy.max_restarts}); giving up")
            self.log.warning("restarting the helper in %.2f s (failure %d of at most %d "
                             "within %g s)", delay, failures, policy.max_restarts, policy.window)
            # What a failed attempt cleaned up is done with: a stop during
            # the backoff does not pay it (one that waited for it did, see
            # EffectContext.stop_asked_at).
            ctx.cleanup_seconds = 0.0
            await trio.sleep(delay)
            if (self.options.tun_mode == "owned"
                    and await self.host.net.link_name(self._tun_index) != self.name):
                # Deleted from outside: no helper can bring it back.
                raise HelperExited(f"TUN device {self.name} was deleted; giving up")
            try:
                async with self._changing:
                    # A stop during this attempt pays only its cleanup.
                    ctx.cleanup_seconds = 0.0
                    gen = self._new_generation(ctx)
                    handle = await self._start_generation(gen, ctx)
                    await gen.flush()
            except HostError as exc:
                self.helper_pid = None
                await self._end_generation(ctx)
                self.log.warning("restart failed: %s", exc)
                continue
            break
        self.restarts += 1
        self.degraded_reason = None
        self._set_state(TunnelState.UP)
        self.log.info("helper restarted (pid %d, restart #%d): tunnel up again %.0f ms after "
                      "the helper died", handle.pid, self.restarts,
                      (trio.current_time() - died) * 1000)

    async def _end_generation(self, ctx: EffectContext) -> None:
        """Unwind the current helper generation (shielded, bounded by
        ``stop_timeout``).  Raises :class:`HostError` if that was
        incomplete: then the tunnel cannot be trusted to restart.

        A stop that comes meanwhile waits for this unwind, and the
        teardown after it gets what is left of ``stop_timeout`` since the
        stop was asked for (:attr:`EffectContext.stop_asked_at`)."""
        gen = ctx.generations.get(self.name)
        if gen is None:
            return
        report = await gen.unwind(self.options.stop_timeout)
        self._generation_failures.extend(report.failures)
        if not report.complete:
            raise HostError("cleaning up after the helper failed: " + "; ".join(report.failures))

    async def _reset_backoff_when_healthy(self) -> None:
        """Start the restart backoff over once the tunnel has been up for
        ``reset_after`` seconds in a row.  Cancellable (ends with the
        helper's generation)."""
        if self._tracker.attempt == 0:
            return
        await self._state.wait_value(TunnelState.UP, held_for=self.options.restart.reset_after)
        self._tracker.reset()
        self.log.info("helper healthy for %g s: restart backoff reset",
                      self.options.restart.reset_after)

    async def _probe_loop(self) -> None:
        """Probe every ``probe_interval`` seconds at this tunnel's own
        phase (:func:`probe_phase`), the first time too, so that many
        tunnels started together do not all probe at the same moment (nor
        while the others are still starting: the helper has just answered
        the configuration request; 50 tunnels used to make 50 probes during
        their own bring-up).  A wedged helper is still noticed within
        ``probe_interval`` + ``probe_timeout``.  Sleeps in between (no
        polling).  Cancellable at once, also mid-probe."""
        sock = uapi.socket_path(self.name, self.host.uapi_dir)
        interval = self.options.probe_interval
        offset = probe_phase(self.name) * interval
        while True:
            # The next instant offset + k * interval after now.
            now = trio.current_time()
            await trio.sleep_until(offset + (math.floor((now - offset) / interval) + 1) * interval)
            await self._probe(sock)

    async def _probe(self, sock: str) -> None:
        """One ``get=1`` under ``probe_timeout``; updates ``last_probe`` and
        moves the tunnel between up and degraded.  Cancellable."""
        started = trio.current_time()
        self.log.debug("probe: get=1 on %s", sock)
        try:
            device = await uapi.uapi_get(sock, timeout=self.options.probe_timeout,
                                         prefixes=False)
        except uapi.UapiError as exc:
            reason = str(exc)
            self._probe_ended(ProbeResult(at=time.time(), took=trio.current_time() - started,
                                          error=reason))
            if self.state is TunnelState.UP:
                self.degraded_reason = reason
                self._set_state(TunnelState.DEGRADED)
                self.log.warning("tunnel degraded: probe failed: %s", reason)
            elif self.degraded_reason != reason:
                self.degraded_reason = reason
                self.log.warning("still degraded: probe failed: %s", reason)
            return
        peers = tuple(
            PeerProbe(p.public_key.to_base64(), p.endpoint, p.rx_bytes, p.tx_bytes,
                      p.last_handshake)
            for p in device.peers
        )
        took = trio.current_time() - started
        self._probe_ended(ProbeResult(at=time.time(), took=took, peers=peers))
        self.log.debug("probe answered in %.1f ms", took * 1000)
        if self.state is TunnelState.DEGRADED:
            self.degraded_reason = None
            self._set_state(TunnelState.UP)
            self.log.info("probe answered again: tunnel up")

    async def _render_request(self) -> bytes:
        """The UAPI configuration for the current endpoints, with the plan's
        fwmark (rendering 10,000 allowed IPs is kept off the trio thread)."""
        assert self._plan is not None
        configured = attrs.evolve(self.spec, fwmark=self._plan.fwmark)
        return await cpu_bound(len(self.spec.allowed_ips), uapi.render_set, configured,
                                self._endpoints)

    # ------------------------------------------------------------ reload in place

    async def reconfigure(self, spec: TunnelSpec, options: TunnelOptions) -> str:
        """Change the running tunnel to ``spec`` with ``options`` in place
        (helper and interface kept) and return what changed, as one line.

        Every change is an effect on a stack of its own, journaled before it
        is made; once all are made they join the tunnel's stacks (their undo
        restores the value each replaced, so a stop or a crash recovery
        still gives the host back exactly).  Routes are added before the
        ones they replace are removed; addresses are added first and
        removed last.  PreUp/PostUp do not run; changed hooks apply at the
        next rebuild.

        Raises :class:`NeedsRebuild` (nothing changed) when only a rebuild
        can apply it, :class:`ReloadFailed` when a change failed (what was
        applied is rolled back first).  Cancellation rolls back the same
        way (shielded, bounded by ``stop_timeout``), then propagates.
        """
        async with self._changing:
            try:
                return await self._reconfigure(spec, options)
            finally:
                if self._ctx is not None and self.state in (TunnelState.UP,
                                                             TunnelState.DEGRADED):
                    # Still up: a rolled-back change's clean-up is not a
                    # later stop's to pay (one that waited for it did).
                    self._ctx.cleanup_seconds = 0.0

    async def _reconfigure(self, spec: TunnelSpec, options: TunnelOptions) -> str:
        """:meth:`reconfigure` under ``_changing``."""
        reason = rebuild_reason(self.spec, self.options, spec, options)
        if reason is None and self.state not in (TunnelState.UP, TunnelState.DEGRADED):
            reason = f"the tunnel is {self.state.value}"
        ctx, stack = self._ctx, self._stack
        owned = self.options.tun_mode == "owned"
        link_stack = stack if owned else (ctx.generations.get(self.name) if ctx else None)
        if reason is None and (ctx is None or stack is None or link_stack is None):
            reason = "the tunnel has no helper generation"
        if reason is not None:
            raise NeedsRebuild(reason)
        assert ctx is not None and stack is not None and link_stack is not None
        work = EffectStack(ctx, log=self.log, observer=self._observer)
        try:
            summary, state = await self._apply_change(work, spec, options)
            await work.flush()
        except BaseException as exc:
            report = await work.unwind(self.options.stop_timeout)
            if report.remaining:
                # Their undo failed: the host is not as before.  They stay
                # on the tunnel's stacks (in apply order), so that its stop
                # tries again and reports what is left (their journal
                # entries stay for `cleanup` meanwhile).
                self._keep(list(reversed(report.remaining)), stack, link_stack)
            if not isinstance(exc, Exception):
                raise
            message = rollback_message(_one_line(exc), report.undone, report.failures)
            self.log.error("in-place change failed: %s", message)
            raise ReloadFailed(message, rolled_back=report.undone,
                               failures=report.failures) from exc
        # Made.  From here to the settle no checkpoint: a stop must find
        # every record on the tunnel's stacks and the new state in place.
        # What is not tied to the link (the kill switch) joins the tunnel's
        # stack, the rest the stack the link's records are on.
        records = work.take()
        self._keep(records, stack, link_stack)
        self.spec, self._endpoints, self._plan, self._mtu, self._request = spec, *state
        if options.restart != self.options.restart:
            self._tracker = RestartTracker(options.restart, self._rng)
        self.options = options
        ctx.stop_grace, ctx.hook_timeout = options.stop_grace, options.hook_timeout
        self.log.info("changed in place: %s", summary)
        # The WireGuard change now lives in the helper: nothing to undo at a
        # stop (the helper ends; a restarted one gets the new request).
        for record in records:
            if isinstance(record, WireguardChanged):
                await link_stack.settle(record)
        return summary

    @staticmethod
    def _keep(records: list[Effect], stack: EffectStack, link_stack: EffectStack) -> None:
        """Put the records of an in-place change on the tunnel's stacks, in
        apply order: what is not tied to the link (the kill switch's
        routes) on the tunnel's, the rest on the one the link's records
        are on.  No checkpoint."""
        policy: list[Effect] = [r for r in records if isinstance(r, KillSwitch)
                                or (isinstance(r, RoutesRemoved) and r.index == UNREACHABLE)]
        stack.adopt(policy, live=True)
        link_stack.adopt([r for r in records if not any(r is p for p in policy)], live=True)

    async def _apply_change(self, work: EffectStack, spec: TunnelSpec, options: TunnelOptions
                            ) -> tuple[str, tuple[dict[Key, tuple[str, int]], RoutingPlan,
                                                  int, bytes]]:
        """The in-place changes, in make-before-break order, onto ``work``;
        returns the summary and the new (endpoints, plan, MTU, full UAPI
        request for a restarted helper).
        Cancellable; what was applied stays on ``work``."""
        old, net, name = self.spec, self.host.net, self.name
        assert self._plan is not None
        index = self._tun_index if self.options.tun_mode == "owned" else \
            await net.link_index(name)
        if index is None:
            raise HostError(f"interface {name} is gone")
        endpoints = await self._resolve_endpoints(spec)
        # A full tunnel keeps its policy table (rebuild_reason made sure its
        # routing did not change); planning anew would find it in use.
        planned = attrs.evolve(spec, fwmark=self._plan.fwmark) \
            if self._plan.full_tunnel and spec.fwmark is None else spec
        plan = await plan_routing(planned, net, self.log, options.lan, link=index)
        if spec.mtu:
            mtu = spec.mtu
        elif not old.mtu and _ips(endpoints) == _ips(self._endpoints):
            # Automatic before and after, from the same endpoints: as the
            # start found it.  Asked again, the route to an endpoint may
            # now go through another tunnel (a full one started meanwhile),
            # and a change of DNS alone would change the MTU.
            mtu = self._mtu
        else:
            mtu = await self._auto_mtu([ip for ip, _ in endpoints.values()])
        full_request = await cpu_bound(len(spec.allowed_ips), uapi.render_set,
                                        attrs.evolve(spec, fwmark=plan.fwmark), endpoints)
        parts: list[str] = []

        added = [a for a in spec.addresses if a not in old.addresses]
        mine = self._owned_addresses()
        removed = [a for a in old.addresses if a not in spec.addresses and a in mine]
        for address in added:
            await work.apply(Address(name, index, address))
        if mtu != self._mtu:
            await work.apply(MtuChanged(name, index, self._mtu, mtu))
            parts.append(f"MTU {self._mtu}->{mtu}")

        request = await cpu_bound(
            len(spec.allowed_ips) + len(old.allowed_ips), uapi.render_change,
            attrs.evolve(old, fwmark=self._plan.fwmark), attrs.evolve(spec, fwmark=plan.fwmark),
            self._endpoints, endpoints)
        if request is not None:
            inverse = await cpu_bound(
                len(spec.allowed_ips) + len(old.allowed_ips), uapi.render_change,
                attrs.evolve(spec, fwmark=plan.fwmark), attrs.evolve(old, fwmark=self._plan.fwmark),
                endpoints, self._endpoints)
            plus, minus, changed = peer_counts(old, spec)
            what = f"peers +{plus}/-{minus}/~{changed}"
            for key, label in (("private_key", "private key"), ("listen_port", "listen port"),
                               ("fwmark", "fwmark")):
                if getattr(old, key) != getattr(spec, key):
                    what += f", {label}"
            recreated = uapi.endpoint_removed(old, spec, self._endpoints, endpoints)
            if recreated:
                # No "unset endpoint" in UAPI: the peer is removed and added
                # again in the same request (it handshakes anew).
                what += (f", {len(recreated)} peer(s) re-created "
                         "(Endpoint removed: a device cannot forget one)")
            await work.apply(WireguardChanged(name, what, request, inverse or b""))
            parts.append(what)

        # Routes: the new ones first (make-before-break), then the old ones go.
        current = self.owned_routes()
        gone_nets = {a.network for a in removed}
        wanted: set[tuple[int, IPNetwork]] = set()
        if plan.table is not None and plan.ordinary:
            existing = [n for n in await net.link_routes(index, plan.table)
                        if (plan.table, n) not in current and n not in gone_nets]
            wanted |= {(plan.table, p) for p in await cpu_bound(
                len(plan.ordinary), select_routes, plan.ordinary, existing)}
        if plan.policy_table is not None:
            wanted |= {(plan.policy_table, d) for d in plan.defaults}
        ks_now = self.owned_routes(kill_switch=True)
        ks_wanted = ({(plan.table, p) for p in plan.ordinary}
                     if options.kill_switch and plan.table is not None else set())
        if options.kill_switch and plan.policy_table is not None:
            ks_wanted |= {(plan.policy_table, d) for d in plan.defaults}
        for table, prefixes in _by_table(ks_wanted - ks_now):
            await work.apply(KillSwitch(name, table, prefixes))
        n_added = n_removed = 0
        # A prefix that a removed address's own route (main table) serves
        # now: the kernel refuses ours beside it (same metric) and deletes
        # its own with the address, so ours goes in right after that, the
        # prefix held (unreachable) in between: it must not fall through
        # to another route (the LAN's default) for that instant.
        after_addresses = {(t, n) for t, n in wanted - current
                           if t == RT_TABLE_MAIN and n in gone_nets}
        for table, prefixes in _by_table(wanted - current - after_addresses):
            record = await work.apply(Routes(name, index, table, prefixes))
            assert isinstance(record, Routes)
            n_added += len(record.prefixes)
        for table, prefixes in _by_table(current - wanted):
            await work.apply(RoutesRemoved(name, index, table, prefixes))
            n_removed += len(prefixes)
        for table, prefixes in _by_table(ks_now - ks_wanted):
            await work.apply(RoutesRemoved(name, UNREACHABLE, table, prefixes,
                                           metric=KILL_SWITCH_METRIC))
        routes_at = len(parts)  # the routes' part, once all are in

        if ((old.dns_servers, old.dns_search) != (spec.dns_servers, spec.dns_search)
                and options.dns_backend != "none"):
            # Layered on the running one: its undo gives back what that one
            # had set (a rollback, or a stop walking back), and the
            # bring-up's record then the original.
            await work.apply(Dns(name, options.dns_backend, spec.dns_servers, spec.dns_search,
                                 layered=bool(old.dns_servers or old.dns_search),
                                 previous_servers=old.dns_servers,
                                 previous_search=old.dns_search))
        # Last: an address in use until the new routes and DNS stand.
        holds = [await work.apply(HeldRoutes(name, table, prefixes))
                 for table, prefixes in _by_table(after_addresses)]
        for address in removed:
            await work.apply(AddressRemoved(name, index, address))
        for hold in holds:
            assert isinstance(hold, HeldRoutes)
            record = await work.apply(Routes(name, index, hold.table,
                                             _prefixes_of(after_addresses, hold.table)))
            assert isinstance(record, Routes)
            n_added += len(record.prefixes)
            # Its job is done: undone now and journaled so (no record of
            # it stays with the tunnel, nothing for a recovery to redo).
            await work.retire(hold)
        if n_added or n_removed:
            parts.insert(routes_at, f"routes +{n_added}/-{n_removed}")
        if added or removed:
            parts.append(f"addresses +{len(added)}/-{len(removed)}")
        if any(isinstance(r, Dns) for r in work.records):
            parts.append("DNS")
        if hooks_changed(old, spec):
            parts.append("hooks (apply at the next rebuild)")
        return ", ".join(parts) or "no change on the host", (endpoints, plan, mtu, full_request)

    async def _run_background(self) -> None:
        with self._background:
            await self._watch_endpoints()

    async def _watch_endpoints(self) -> None:
        """Re-resolve hostname endpoints every ``resolve_interval`` seconds
        and update a changed peer over UAPI.  Failures are logged, never
        fatal.  Runs until cancelled (before teardown)."""
        interval = self.options.resolve_interval
        named = [p for p in self.spec.peers if p.endpoint is not None
                 and not _is_ip(p.endpoint.host)]
        if not named or interval <= 0:
            return
        sock = uapi.socket_path(self.spec.name, self.host.uapi_dir)
        while True:
            await trio.sleep(interval)
            for peer in named:
                assert peer.endpoint is not None
                try:
                    address = await self._resolve(peer.endpoint.host, peer.endpoint.port)
                except (OSError, trio.TooSlowError) as exc:
                    self.log.warning("re-resolving %s failed: %s", peer.endpoint.host,
                                     exc or "timed out")
                    continue
                old = self._endpoints.get(peer.public_key)
                if old is not None and old[0] == address:
                    continue
                self.log.info("endpoint %s changed: %s -> %s", peer.endpoint.host,
                              old[0] if old else "none", address)
                try:
                    await uapi.uapi_set(sock, uapi.render_endpoint_update(
                        peer.public_key, address, peer.endpoint.port), timeout=5)
                except HostError as exc:
                    self.log.warning("updating the endpoint of %s failed: %s",
                                     peer.endpoint.host, exc)
                    continue
                self._endpoints[peer.public_key] = (address, peer.endpoint.port)
                # A restarted helper must get the new address too.
                self._request = await self._render_request()

    async def _resolve(self, host: str, port: int) -> str:
        """One address for ``host`` (getaddrinfo in a worker thread) under
        ``resolve_timeout``.  Cancellable."""
        with trio.fail_after(self.options.resolve_timeout):
            infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        if not infos:
            raise OSError(f"no address for {host}")
        return str(infos[0][4][0])

    async def _resolve_endpoints(self, spec: TunnelSpec | None = None
                                 ) -> dict[Key, tuple[str, int]]:
        """Peer endpoints of ``spec`` (default: the running one) as (IP,
        port); hostnames are resolved in a worker thread (trio's
        getaddrinfo) under ``resolve_timeout``.  Cancellable."""
        spec = spec or self.spec
        resolved: dict[Key, tuple[str, int]] = {}
        for peer in spec.peers:
            ep = peer.endpoint
            if ep is None:
                continue
            try:
                ip = ipaddress.ip_address(ep.host)
            except ValueError:
                pass
            else:
                zone = getattr(ip, "scope_id", None)
                if zone and not zone.isdigit() and await self.host.net.link_index(zone) is None:
                    # wireguard-go would answer EINVAL, naming nothing.
                    raise HostError(f"{spec.source}:{peer.endpoint_line or peer.line}: "
                                    f"endpoint {ep}: no network interface {zone!r} here")
                resolved[peer.public_key] = (str(ip), ep.port)
                continue
            try:
                addr = await self._resolve(ep.host, ep.port)
            except (OSError, trio.TooSlowError) as exc:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                raise HostError(
                    f"{spec.source}:{peer.endpoint_line or peer.line}: "
                    f"cannot resolve endpoint {ep}: {reason}"
                ) from None
            self.log.info("endpoint %s resolved to %s", ep.host, addr)
            resolved[peer.public_key] = (addr, ep.port)
        return resolved

    async def _auto_mtu(self, endpoint_ips: list[str]) -> int:
        """wg-quick's rule: the largest path MTU towards the endpoints (else
        of the default route, else 1500), minus the WireGuard overhead."""
        best = 0
        for ip in endpoint_ips:
            addr: IPAddress = ipaddress.ip_address(ip)
            best = max(best, await self.host.net.route_mtu(addr) or 0)
        if best == 0:
            best = await self.host.net.route_mtu(None) or 0
        return (best or DEFAULT_LINK_MTU) - WIREGUARD_OVERHEAD


class _Soon(Generic[T]):
    """``fn(*args)``, started at once in ``nursery``; :meth:`result` waits
    for what it returns or raises.  Cancelled with the nursery (the
    tunnel's, which its end cancels) if nobody asks for it."""

    def __init__(self, nursery: trio.Nursery, fn: Callable[..., Awaitable[T]],
                 *args: Any) -> None:
        self._done = trio.Event()
        self._value: T | None = None
        self._error: Exception | None = None
        nursery.start_soon(self._run, fn, args)

    async def _run(self, fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> None:
        try:
            self._value = await fn(*args)
        except Exception as exc:
            self._error = exc
        finally:
            self._done.set()

    async def result(self) -> T:
        """Its value, or its exception raised here.  Cancellation: only
        this wait is cancelled, not the call."""
        await self._done.wait()
        if self._error is not None:
            raise self._error
        if self._value is None:  # the call was cancelled
            raise HostError("cancelled before it finished")
        return self._value


def probe_phase(name: str) -> float:
    """Where in each probe interval tunnel ``name`` probes, as a fraction
    in [0, 1): spread evenly over the interval by a hash of the name, the
    same in every run (no thundering herd of probes, and reproducible
    schedules under a mock clock)."""
    return zlib.crc32(name.encode()) / 2**32


@contextlib.asynccontextmanager
async def _gate(limiter: trio.CapacityLimiter | None) -> AsyncIterator[None]:
    """Hold a slot of ``limiter`` (if any).  The wait is shielded: it runs
    in a teardown, and ends as the teardowns before it end (each bounded)."""
    if limiter is None:
        yield
        return
    with trio.CancelScope(shield=True):
        await limiter.acquire()
    try:
        yield
    finally:
        limiter.release()


async def cpu_bound(size: int, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, in a worker thread when ``size`` (a prefix count) is
    above :data:`CPU_BOUND_PREFIXES`, so that a long computation does not
    hold the trio thread.  Cancellation: propagates at once; the thread,
    which only computes, is abandoned and its result discarded."""
    if size <= CPU_BOUND_PREFIXES:
        return fn(*args)
    return await trio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True)


def _ips(endpoints: dict[Key, tuple[str, int]]) -> set[str]:
    return {ip for ip, _ in endpoints.values()}


def _prefixes_of(routes: set[tuple[int, IPNetwork]], table: int) -> tuple[IPNetwork, ...]:
    return next(prefixes for t, prefixes in _by_table(routes) if t == table)


def _by_table(routes: set[tuple[int, IPNetwork]]) -> list[tuple[int, tuple[IPNetwork, ...]]]:
    """(table, prefixes) groups, in a stable order."""
    tables: dict[int, list[IPNetwork]] = {}
    for table, prefix in sorted(routes, key=lambda r: (r[0], r[1].version, r[1])):
        tables.setdefault(table, []).append(prefix)
    return [(t, tuple(p)) for t, p in tables.items()]


def _one_line(exc: BaseException) -> str:
    """An error as one line, exception groups flattened."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_one_line(e) for e in exc.exceptions)
    return str(exc) or type(exc).__name__


def _only_cancelled(exc: BaseException) -> bool:
    """Whether ``exc`` is a cancellation (possibly several, grouped by a
    nursery) rather than a failure."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


async def _in_process_group(pid: int, leader: int) -> bool:
    """Whether ``pid`` is ``leader`` or in its process group (a helper may be
    a wrapper that runs wireguard-go as a child)."""
    if pid == leader:
        return True

    def pgid() -> int | None:
        try:
            return os.getpgid(pid)
        except ProcessLookupError:
            return None

    # getpgid() reads the kernel's process table: it never blocks, so no
    # thread (under MockClock one would let the clock jump meanwhile).
    await trio.lowlevel.checkpoint()
    return pgid() == leader


async def _note_stop(ctx: EffectContext) -> None:
    """Note in ``ctx`` when the tunnel's tasks are cancelled from outside
    (a stop, a ``down``), if its owner did not say so first
    (:meth:`Tunnel.stop_asked`): its main task may be in shielded clean-up
    then, which the stop waits for (see :attr:`EffectContext.stop_asked_at`).
    Runs until cancelled; the tunnel's own nursery cancels it once the
    teardown is done."""
    try:
        await trio.sleep_forever()
    finally:
        ctx.note_stop(trio.current_time())


async def _last_resort_kill(handle: HelperHandle, log: logging.Logger) -> None:
    """SIGKILL a helper whose undo did not stop it, wait briefly, and stop
    watching it.  Shielded: it runs at the end of teardown."""
    with trio.CancelScope(shield=True):
        if not handle.exited.is_set():
            log.error("helper pid %d still running after teardown: SIGKILL", handle.pid)
            handle.signal(signal.SIGKILL)
            with trio.move_on_after(1.0):
                await handle.exited.wait()
        handle.close()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
