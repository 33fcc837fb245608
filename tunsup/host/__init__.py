"""Adapters between the engine and the machine: netlink, DNS, processes.

The engine talks to the host only through a :class:`Host`, so that tests
(and users testing their own integrations) can substitute an in-memory
host.  Adapters know nothing about tunnels.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Protocol

import attrs
import trio

from ..config.spec import IPAddress, IPInterface, IPNetwork
from . import tun
from ._rtnl import UNREACHABLE as UNREACHABLE
from ._rtnl import RouteBatchResult as RouteBatchResult
from .claims import Claims
from .dns import DnsBackend, ResolvConfOwners
from .reaper import Reaper


class RouteBatch(Protocol):
    @property
    def added(self) -> tuple[IPNetwork, ...]: ...
    @property
    def existed(self) -> tuple[IPNetwork, ...]: ...


#: Protocol (``FRA_PROTOCOL``) of the policy rules tunsup adds for a full
#: tunnel, and of the copies that hold its traffic while it is rebuilt.
#: Values from 4 up are not interpreted by the kernel; these two are in no
#: iproute2 ``rt_protos`` list.
RULE_PROTOCOL = 0xF5
HOLD_RULE_PROTOCOL = 0xF6


@attrs.frozen
class PolicyRule:
    """An ``ip rule``: ``[not] fwmark M`` (mask all ones: ``fwmark 0``
    matches unmarked packets only) or ``suppress_prefixlength N``, looking
    up ``table``, at ``priority``."""

    family: int  # 4 or 6
    priority: int
    table: int
    fwmark: int | None = None
    invert: bool = False
    suppress_prefixlength: int | None = None
    #: The rule's protocol (0: none given).  On a delete the kernel takes
    #: the first rule that matches what the request gives, and it compares
    #: neither a fwmark of 0 nor the invert flag: a rebuild's hold
    #: (``fwmark 0``) and a full tunnel's own rule (``not fwmark T``), at
    #: one priority and table, differ only in those.  tunsup's rules carry
    #: a protocol of their own (:data:`RULE_PROTOCOL`, holds
    #: :data:`HOLD_RULE_PROTOCOL`), which the kernel does compare.
    protocol: int = 0

    def __str__(self) -> str:
        parts = [f"ip -{self.family} rule {self.priority}:"]
        if self.fwmark is not None:
            parts.append(("not " if self.invert else "") + f"fwmark {self.fwmark:#x}")
        parts.append(f"lookup {self.table}")
        if self.suppress_prefixlength is not None:
            parts.append(f"suppress_prefixlength {self.suppress_prefixlength}")
        return " ".join(parts)


class NetOps(Protocol):
    """Link, address and route operations (see :mod:`tunsup.host.netlink`)."""

    async def link_index(self, name: str) -> int | None: ...
    async def link_name(self, index: int) -> str | None: ...
    async def set_link_up(self, index: int, up: bool, *, name: str | None = None) -> bool: ...
    async def set_mtu(self, index: int, mtu: int) -> None: ...
    async def delete_link(self, index: int, name: str) -> bool: ...
    async def add_address(self, index: int, iface: IPInterface) -> bool: ...
    async def delete_address(self, index: int, iface: IPInterface) -> bool: ...
    async def route_mtu(self, dst: IPAddress | None) -> int | None: ...
    async def link_routes(self, index: int, table: int) -> list[IPNetwork]: ...
    async def connected_networks(self) -> list[tuple[IPNetwork, str, int]]: ...
    async def add_routes(
        self, index: int, prefixes: Sequence[IPNetwork], *, table: int, metric: int | None = None
    ) -> RouteBatch: ...
    async def delete_routes(
        self, index: int, prefixes: Sequence[IPNetwork], *, table: int, metric: int | None = None
    ) -> int: ...
    async def rules(self, family: int) -> list[PolicyRule]: ...
    async def add_rule(self, rule: PolicyRule) -> bool: ...
    async def delete_rule(self, rule: PolicyRule) -> bool: ...
    async def table_in_use(self, table: int) -> bool: ...
    async def read_sysctl(self, key: str) -> str: ...
    async def write_sysctl(self, key: str, value: str) -> None: ...
    async def close(self) -> None: ...


class HelperHandle(Protocol):
    """A running helper process (see :class:`tunsup.host.process.HelperProcess`)."""

    pid: int
    start_time: int | None
    returncode: int | None
    exited: trio.Event

    def describe_exit(self) -> str: ...
    def signal(self, sig: signal.Signals) -> None: ...
    async def stop(self, grace: float) -> bool: ...
    def close(self) -> None: ...


StartHelper = Callable[..., Awaitable[HelperHandle]]


class RunHook(Protocol):
    """Run one hook command (see :func:`tunsup.hooks.run_hook`)."""

    def __call__(self, command: str, log: logging.Logger, timeout: float, *,
                 started: Callable[[int, int | None], Awaitable[None]] | None = None,
                 ) -> Awaitable[None]: ...


#: Create a persistent TUN device: ``(name, *, packet_info)`` (see
#: :func:`tunsup.host.tun.create_tun`).
CreateTun = Callable[..., Awaitable[tun.TunDevice]]
#: Close a TUN fd (see :func:`tunsup.host.tun.close_tun`).
CloseTun = Callable[[int], Awaitable[None]]


@attrs.define
class Host:
    """Everything the engine may touch on the machine."""

    net: NetOps
    start_helper: StartHelper
    run_hook: RunHook
    #: Returns the DNS backend for a configured kind (not "none").
    dns_backend: Callable[[str], DnsBackend]
    uapi_dir: str = "/var/run/wireguard"
    env: Mapping[str, str] = attrs.field(factory=dict)
    create_tun: CreateTun = tun.create_tun
    close_tun: CloseTun = tun.close_tun
    #: Routing tables and rule priorities the tunnels on this host took
    #: (so that concurrent starts never pick the same one).
    claims: Claims = attrs.field(factory=Claims)
    #: The one owner of each resolv.conf the file DNS backend writes: every
    #: tunnel on this host claims DNS through it (see ResolvConfOwner).
    dns_owners: ResolvConfOwners = attrs.field(factory=ResolvConfOwners)
    #: Collects the exit status of helpers a teardown gave up on (stuck in
    #: the kernel past its bound), while the service runs.
    reaper: Reaper = attrs.field(factory=Reaper)


def real_host(*, resolv_conf: str = "/etc/resolv.conf",
              route_progress: Callable[[int], None] | None = None) -> Host:
    """The host this process runs on (its network namespace)."""
    from .dns import select_backend
    from .hooks import run_hook
    from .netlink import NetlinkHost
    from .process import start_helper

    return Host(
        net=NetlinkHost(route_progress=route_progress),
        start_helper=start_helper,
        run_hook=run_hook,
        dns_backend=lambda kind: select_backend(kind, resolv_conf=resolv_conf),
    )
