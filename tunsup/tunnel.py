"""One tunnel: its bring-up as a sequence of effects, supervision, teardown.

:meth:`Tunnel.run` is meant for ``nursery.start``: it returns control (via
``task_status.started``) once the tunnel is up, then supervises the helper
until cancelled.  Whatever ends it — cancellation, a failed step, the helper
exiting — the effect stack unwinds in exact reverse order, shielded and
bounded by ``stop_timeout``; :attr:`Tunnel.report` then says whether the
host was fully restored.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import os
import signal
import socket

import attrs
import trio

from . import uapi
from ._errors import HelperExited, HostError
from .config import DEFAULT_HELPER
from .effects import (
    Address,
    ConfigureWireguard,
    Dns,
    EffectContext,
    Hooks,
    Link,
    LinkUp,
    Mtu,
    Routes,
    StartHelper,
    select_routes,
)
from .host import HelperHandle, Host
from .keys import Key
from .model import IPAddress, TunnelSpec
from .undo import EffectStack, StackObserver, TeardownReport

#: wg-quick's MTU rule: path MTU towards the endpoints minus this overhead.
WIREGUARD_OVERHEAD = 80
DEFAULT_LINK_MTU = 1500


class TunnelState(enum.Enum):
    NEW = "new"
    STARTING = "starting"
    UP = "up"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


#: The only state changes a tunnel makes.
TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    TunnelState.NEW: frozenset({TunnelState.STARTING}),
    TunnelState.STARTING: frozenset({TunnelState.UP, TunnelState.STOPPING}),
    TunnelState.UP: frozenset({TunnelState.STOPPING}),
    TunnelState.STOPPING: frozenset({TunnelState.STOPPED, TunnelState.FAILED}),
    TunnelState.STOPPED: frozenset(),
    TunnelState.FAILED: frozenset(),
}


@attrs.frozen
class TunnelOptions:
    """Per-tunnel run-time settings (defaults are the documented ones)."""

    helper: tuple[str, ...] = DEFAULT_HELPER
    stop_grace: float = 2.0
    start_timeout: float = 10.0
    stop_timeout: float = 30.0
    dns_backend: str = "auto"
    resolve_timeout: float = 10.0
    hook_timeout: float = 60.0


class Tunnel:
    """A tunnel described by a :class:`TunnelSpec`.  Single use."""

    def __init__(
        self,
        spec: TunnelSpec,
        host: Host,
        options: TunnelOptions | None = None,
        *,
        observer: StackObserver | None = None,
    ) -> None:
        self.spec = spec
        self.host = host
        self.options = options or TunnelOptions()
        self.log = logging.getLogger(f"tunsup.{spec.name}")
        self.state = TunnelState.NEW
        self.report: TeardownReport | None = None
        #: Why the tunnel ended, if it did not end by a stop.
        self.failure: BaseException | None = None
        self.timings: dict[str, float] = {}
        #: The data-plane helper's pid, once the tunnel is up.
        self.helper_pid: int | None = None
        self._observer = observer

    @property
    def name(self) -> str:
        return self.spec.name

    def _set_state(self, new: TunnelState) -> None:
        if new not in TRANSITIONS[self.state]:
            raise AssertionError(f"{self.name}: illegal transition {self.state} -> {new}")
        self.state = new

    async def run(self, *, task_status: trio.TaskStatus[Tunnel] = trio.TASK_STATUS_IGNORED) -> None:
        """Bring the tunnel up, report started, supervise until cancelled.

        Cancellation at any point (even half-way through the bring-up)
        unwinds every applied effect before this returns.  Raises the error
        that ended the tunnel (a :class:`HostError`, :class:`HelperExited`
        ...) after unwinding.
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
            )
            stack = EffectStack(ctx, log=self.log, observer=self._observer)
            try:
                helper_pid = self.helper_pid = await self._bring_up(stack, ctx)
                self.timings["up"] = trio.current_time() - started
                self._set_state(TunnelState.UP)
                self.log.info("tunnel up in %.0f ms", self.timings["up"] * 1000)
                task_status.started(self)
                await self._supervise(ctx, helper_pid)
            except BaseException as exc:
                if not isinstance(exc, trio.Cancelled):
                    self.failure = exc
                    self.log.error("%s failed: %s", "tunnel" if "up" in self.timings
                                   else "start", exc)
                raise
            finally:
                self._set_state(TunnelState.STOPPING)
                stop_started = trio.current_time()
                self.report = await stack.unwind(self.options.stop_timeout)
                for handle in ctx.helpers.values():
                    # Only when its undo failed: never leave it running.
                    await _last_resort_kill(handle, self.log)
                self.timings["down"] = trio.current_time() - stop_started
                if self.report.complete:
                    self.log.info("tunnel down in %.0f ms; host restored",
                                  self.timings["down"] * 1000)
                    self._set_state(TunnelState.STOPPED)
                else:
                    self.log.error("teardown incomplete: %s", "; ".join(self.report.failures))
                    self._set_state(TunnelState.FAILED)
                nursery.cancel_scope.cancel()

    async def _bring_up(self, stack: EffectStack, ctx: EffectContext) -> int:
        spec, net, opts = self.spec, self.host.net, self.options
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
        endpoints = await self._resolve_endpoints()

        if spec.pre_up or spec.post_down:
            await stack.apply(Hooks(spec.name, "PreUp", spec.pre_up, "PostDown", spec.post_down))
        record = await stack.apply(StartHelper(spec.name, (*opts.helper, spec.name)))
        pid = record.pid  # type: ignore[attr-defined]
        handle = ctx.helpers[pid]
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
        await stack.apply(Link(spec.name, index))
        await stack.apply(ConfigureWireguard(spec.name, uapi.render_set(spec, endpoints)))
        for address in spec.addresses:
            await stack.apply(Address(spec.name, index, address))
        mtu = spec.mtu or await self._auto_mtu([ip for ip, _ in endpoints.values()])
        await stack.apply(Mtu(spec.name, index, mtu))
        await stack.apply(LinkUp(spec.name, index))
        table = spec.route_table
        if table is not None:
            existing = await net.link_routes(index, table)
            prefixes = select_routes(spec.allowed_ips, existing)
            if prefixes:
                await stack.apply(Routes(spec.name, index, table, prefixes))
        if (spec.dns_servers or spec.dns_search) and opts.dns_backend != "none":
            await stack.apply(Dns(spec.name, opts.dns_backend, spec.dns_servers, spec.dns_search))
        if spec.post_up or spec.pre_down:
            await stack.apply(Hooks(spec.name, "PostUp", spec.post_up, "PreDown", spec.pre_down))
        return int(pid)

    async def _supervise(self, ctx: EffectContext, helper_pid: int) -> None:
        handle = ctx.helpers[helper_pid]
        await handle.exited.wait()
        raise HelperExited(f"{self.name}: {handle.describe_exit()}")

    async def _resolve_endpoints(self) -> dict[Key, tuple[str, int]]:
        """Peer endpoints as (IP, port); hostnames are resolved in a worker
        thread (trio's getaddrinfo) under ``resolve_timeout``.  Cancellable."""
        resolved: dict[Key, tuple[str, int]] = {}
        for peer in self.spec.peers:
            ep = peer.endpoint
            if ep is None:
                continue
            try:
                resolved[peer.public_key] = (str(ipaddress.ip_address(ep.host)), ep.port)
                continue
            except ValueError:
                pass
            try:
                with trio.fail_after(self.options.resolve_timeout):
                    infos = await trio.socket.getaddrinfo(ep.host, ep.port, type=socket.SOCK_DGRAM)
            except (OSError, trio.TooSlowError) as exc:
                reason = "timed out" if isinstance(exc, trio.TooSlowError) else str(exc)
                raise HostError(
                    f"{self.spec.source}:{peer.line}: cannot resolve endpoint {ep}: {reason}"
                ) from None
            if not infos:
                raise HostError(f"{self.spec.source}:{peer.line}: no address for endpoint {ep}")
            addr = str(infos[0][4][0])
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

    return await trio.to_thread.run_sync(pgid) == leader


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
