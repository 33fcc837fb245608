"""An in-memory host and scriptable fake helpers, for testing code that
drives tunsup's engine (yours or ours) under trio's MockClock.

Public API: :class:`FakeHost` (its ``host`` attribute is a
:class:`tunsup.host.Host` to hand to :class:`tunsup.engine.supervisor.Supervisor` or
:class:`tunsup.engine.tunnel.Tunnel`), :class:`FakeNet` (links, addresses,
routes, rules and sysctls in memory; :meth:`FakeNet.state` is what must be
back to the start when the engine returns), :class:`FakeHelper` and
:class:`Behaviour` (scriptable stand-ins for wireguard-go), :class:`Fault`
(per-operation fault injection), :func:`spec` and :func:`uapi_dir`.

Faults: ``fake.faults.append(Fault(op="add_address", nth=1, kind="errno"))``
makes the first ``add_address`` fail with ``OSError(EIO)``; ``kind="hang"``
blocks it until cancelled, ``kind="delay"`` makes it take ``delay``
(virtual) seconds first.  ``op=None`` matches every operation, so
``Fault(nth=7)`` hits the 7th host operation of any kind.  Operations are
the methods of :class:`FakeNet` plus ``start_helper``, ``run_hook``,
``create_tun`` and ``close_tun`` (``set_link_up`` with ``up=False`` is
named ``set_link_down``); every one is recorded in ``FakeHost.ops``.
Helpers: :class:`Behaviour` (crash, mute UAPI, slow start),
:attr:`FakeHelper.ignore_term`, :meth:`FakeHelper.die`,
:meth:`FakeHelper.wedge`.

The fake helpers speak the real UAPI protocol on real unix sockets (in a
private directory), so the tunnel's own UAPI client, socket wait and probe
code run unchanged.  Nothing here starts a thread: under
``MockClock(autojump_threshold=0)`` a worker thread would let the clock
jump while it runs.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno as errno_mod
import logging
import os
import signal
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar, cast

import attrs
import trio

from tunsup._errors import HostError
from tunsup.config.keys import Key
from tunsup.config.spec import (
    RT_TABLE_MAIN,
    IPAddress,
    IPInterface,
    IPNetwork,
    PeerSpec,
    TunnelSpec,
)
from tunsup.host import Host, PolicyRule, RouteBatchResult, dns, process
from tunsup.host.process import HelperProcess, describe_exit
from tunsup.host.reaper import Reaper
from tunsup.host.tun import TunDevice
from tunsup.host.worker import SerialWorker

T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")

PEER = Key.generate_private().public_key()


@attrs.define
class FakeLink:
    name: str
    index: int
    up: bool = False
    mtu: int = 1500
    addresses: set[IPInterface] = attrs.field(factory=set)
    routes: set[tuple[int, IPNetwork]] = attrs.field(factory=set)
    #: Created by tunsup as a persistent TUN (else by a helper).
    persistent: bool = False


#: The MTU wireguard-go gives the TUN it creates or is handed.
WG_DEFAULT_MTU = 1420

FaultKind = Literal["errno", "hang", "delay", "applied-hang", "applied-errno"]
#: Fault kinds that fire after the operation took effect.
AFTER = ("applied-hang", "applied-errno")
#: Operations whose "delay" takes effect even if the caller stops waiting
#: (:func:`tunsup.host.tun.close_tun`: the close still happens in the
#: abandoned thread).
COMPLETES_ABANDONED = ("close_tun",)


def _failure(name: str, fault: Fault) -> HostError:
    return HostError(f"{name}: injected fault: {os.strerror(fault.errno)}")


async def _fire(fault: Fault | None, name: str) -> None:
    """What ``fault`` does to operation ``name`` (before it, or for the
    AFTER kinds, after it).  Cancellation: a checkpoint; "hang" waits until
    cancelled, "delay" is cancellable during its sleep."""
    if fault is None:
        await trio.lowlevel.checkpoint()
    elif fault.kind in ("errno", "applied-errno"):
        await trio.lowlevel.checkpoint()
        raise _failure(name, fault)
    elif fault.kind in ("hang", "applied-hang"):
        await trio.sleep_forever()
    else:
        await trio.sleep(fault.delay)


def operation(fn: Callable[Concatenate[S, P], Coroutine[Any, Any, T]],
              ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """A host operation named like ``fn``: recorded in ``ops`` and subject
    to ``faults`` (before it runs, or after it took effect)."""
    name = fn.__name__

    async def wrapper(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        net: FakeNet = self if isinstance(self, FakeNet) else cast(Any, self).net
        # Setting a link down (only undo does) is an operation of its own.
        op = "set_link_down" if name == "set_link_up" and args[1:2] == (False,) else name
        fault = net.fault_for(op)
        # An operation the real host runs in a thread it may abandon (the
        # close of a TUN fd) still takes effect when its caller gives up
        # during a delay: it happens first, the caller waits after.
        effect_first = fault is not None and fault.kind == "delay" and op in COMPLETES_ABANDONED
        if fault is not None:
            net.fired_calls.append((op, fault.kind, args))
        if fault is None or (fault.kind not in AFTER and not effect_first):
            await _fire(fault, op)
            # Recorded once it takes effect (a call cancelled or failed at
            # its checkpoint changed nothing).
            net.calls.append((op, args, dict(kwargs)))
            return await fn(self, *args, **kwargs)
        net.calls.append((op, args, dict(kwargs)))
        result = await fn(self, *args, **kwargs)
        if not effect_first:
            net.applied_then_failed.append(op)
            net.applied_calls.append(len(net.calls) - 1)
        await _fire(fault, op)
        return result

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@attrs.define
class Fault:
    """Make a host operation misbehave.

    Matches operations named ``op`` (every operation when None); fires on
    the ``nth`` match (1-based; every match when None), at most ``times``
    times (unlimited when None).  ``kind``: "errno" raises
    :class:`~tunsup.HostError` (what the real netlink worker raises) naming
    ``errno``, "hang" waits until cancelled, "delay" sleeps ``delay``
    seconds (virtual under MockClock) and then proceeds; "applied-hang" and
    "applied-errno" make the change first, then hang until cancelled or
    raise (a netlink request the kernel applied while the worker's answer
    was lost or timed out: what ``abort`` exists for).
    """

    op: str | None = None
    nth: int | None = None
    kind: FaultKind = "errno"
    errno: int = errno_mod.EIO
    delay: float = 1.0
    times: int | None = 1
    #: Only operations on this interface's helper ("start_time",
    #: "signal_helper": the ones that tell), when set.
    ifname: str | None = None
    #: How many operations matched so far, and how often it fired.
    seen: int = 0
    fired: int = 0

    def matches(self, op: str, ifname: str | None = None) -> bool:
        """Count ``op`` (on ``ifname``'s helper, if it tells) if it
        matches; whether the fault fires on it."""
        if self.op is not None and self.op != op:
            return False
        if self.ifname is not None and self.ifname != ifname:
            return False
        self.seen += 1
        if self.nth is not None and self.seen != self.nth:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        self.fired += 1
        return True


class FakeNet:
    """Links, addresses and routes in memory.  Every call checkpoints, and
    goes through :meth:`op` (which applies :attr:`faults`)."""

    def __init__(self) -> None:
        #: Faults to inject (see :class:`Fault`); shared with the FakeHost.
        self.faults: list[Fault] = []
        #: Every operation, in order, by name.
        self.ops: list[str] = []
        self.links: dict[int, FakeLink] = {}
        self._next_index = 10
        self.closed = 0
        #: Names of links deleted through netlink (not by a helper's death).
        self.deleted: list[str] = []
        self.unreachable: set[tuple[int, IPNetwork]] = set()
        #: The metrics of the unreachable routes tunsup added, by (table,
        #: prefix): as in the kernel, one route per metric (a rebuild's
        #: hold and the kill switch share a table and prefixes).  An entry
        #: of ``unreachable`` without one was put there by a test (any
        #: metric matches it).
        self.unreachable_metrics: dict[tuple[int, IPNetwork], set[int | None]] = {}
        self.policy_rules: list[PolicyRule] = []
        self.sysctls: dict[str, str] = {}
        #: (operation, fault kind) of every fault that fired, in order.
        self.fired: list[tuple[str, str]] = []
        #: (operation, fault kind, arguments) of the faults that fired on a
        #: host operation (tells which tunnel it hit).
        self.fired_calls: list[tuple[str, str, tuple[Any, ...]]] = []
        #: Operations that took effect and then failed or hung.
        self.applied_then_failed: list[str] = []
        #: Every operation that took effect, with its arguments, in order;
        #: and the positions in it of those that then failed or hung.
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.applied_calls: list[int] = []

    def fault_for(self, name: str, kinds: Sequence[str] | None = None, *,
                  ifname: str | None = None) -> Fault | None:
        """Record operation ``name`` (on ``ifname``'s helper, if it tells);
        the first matching fault that fires (of ``kinds`` only, when the
        operation can do nothing else: the others never see it, and never
        fire)."""
        self.ops.append(name)
        fault = next((f for f in self.faults
                      if (kinds is None or f.kind in kinds) and f.matches(name, ifname)), None)
        if fault is not None:
            self.fired.append((name, fault.kind))
        return fault

    async def op(self, name: str) -> None:
        """Record operation ``name`` and apply the first matching fault
        (before it).  Cancellation: see :func:`_fire`."""
        await _fire(self.fault_for(name), name)

    def state(self) -> dict[str, Any]:
        """What must be back to the start when the engine returns."""
        links: dict[str, Any] = {name: attrs.asdict(link, recurse=False)
                                 for name, link in ((lk.name, lk) for lk in self.links.values())}
        return {**links, "#unreachable": set(self.unreachable),
                "#rules": list(self.policy_rules), "#sysctls": dict(self.sysctls)}

    def create(self, name: str, *, persistent: bool) -> int:
        if any(link.name == name for link in self.links.values()):
            raise OSError(16, f"device {name} exists")
        self._next_index += 1
        self.links[self._next_index] = FakeLink(name, self._next_index, persistent=persistent)
        return self._next_index

    def _existing(self, index: int) -> FakeLink:
        """Link ``index``; a gone one fails as the kernel answers (ENODEV:
        a helper-made link dies with its helper at any moment)."""
        link = self.links.get(index)
        if link is None:
            raise HostError(f"link index {index}: {os.strerror(errno_mod.ENODEV)}")
        return link

    def by_name(self, name: str) -> FakeLink | None:
        return next((lk for lk in self.links.values() if lk.name == name), None)

    @operation
    async def link_index(self, name: str) -> int | None:
        link = self.by_name(name)
        return link.index if link else None

    @operation
    async def link_name(self, index: int) -> str | None:
        link = self.links.get(index)
        return link.name if link else None

    @operation
    async def set_link_up(self, index: int, up: bool, *, name: str | None = None) -> bool:
        link = self.links.get(index)
        if link is None or (name is not None and link.name != name):
            return False
        link.up = up
        return True

    @operation
    async def set_mtu(self, index: int, mtu: int) -> None:
        self._existing(index).mtu = mtu

    @operation
    async def delete_link(self, index: int, name: str) -> bool:
        link = self.links.get(index)
        if link is None or link.name != name:
            return False
        del self.links[index]
        self.deleted.append(name)
        return True

    @operation
    async def add_address(self, index: int, iface: IPInterface) -> bool:
        link = self._existing(index)
        if iface in link.addresses:
            return False
        link.addresses.add(iface)
        return True

    @operation
    async def delete_address(self, index: int, iface: IPInterface) -> bool:
        link = self.links.get(index)
        if link is None or iface not in link.addresses:
            return False
        link.addresses.discard(iface)
        if iface.version == 4 and not any(a.version == 4 for a in link.addresses):
            # As the kernel: with its last IPv4 address a link loses every
            # IPv4 route through it.
            link.routes = {(t, n) for t, n in link.routes if n.version != 4}
        return True

    @operation
    async def route_mtu(self, dst: IPAddress | None) -> int | None:
        return 1500

    @operation
    async def link_routes(self, index: int, table: int) -> list[IPNetwork]:
        link = self._existing(index)
        return [a.network for a in link.addresses] if table == 254 else []

    @operation
    async def add_routes(self, index: int, prefixes: Sequence[IPNetwork], *,
                         table: int, metric: int | None = None) -> RouteBatchResult:
        if index == 0:  # unreachable routes (kill switch): not on any link
            # As the kernel: one that is already there is not added again.
            def there(key: tuple[int, IPNetwork]) -> bool:
                metrics = self.unreachable_metrics.get(key)
                return key in self.unreachable and (metrics is None or metric in metrics)

            existed = tuple(net for net in prefixes if there((table, net)))
            for net in prefixes:
                if net not in existed:
                    self.unreachable_metrics.setdefault((table, net), set()).add(metric)
                    self.unreachable.add((table, net))
            return RouteBatchResult(added=tuple(n for n in prefixes if n not in existed),
                                    existed=existed)
        link = self._existing(index)
        # As the kernel (NLM_F_EXCL): a route with the same key (table and
        # prefix here) through any link already is someone else's: left
        # alone, reported in ``existed``.
        taken = {r for other in self.links.values() for r in other.routes}
        # The kernel's own route of each address of a link that is up (an
        # IPv4 one has the same metric as ours; IPv6's is 256, not 1024).
        taken |= {(RT_TABLE_MAIN, n) for n, _, _ in self._connected() if n.version == 4}
        existed = tuple(net for net in prefixes if (table, net) in taken)
        added = tuple(net for net in prefixes if (table, net) not in taken)
        link.routes |= {(table, net) for net in added}
        return RouteBatchResult(added=added, existed=existed)

    @operation
    async def delete_routes(self, index: int, prefixes: Sequence[IPNetwork], *,
                            table: int, metric: int | None = None) -> int:
        if index == 0:
            removed = 0
            for net in prefixes:
                key = (table, net)
                if key not in self.unreachable:
                    continue
                metrics = self.unreachable_metrics.get(key)
                if metrics is not None and metric is not None and metric not in metrics:
                    continue  # another route of that prefix (another metric)
                if metrics is not None and metric is not None:
                    metrics.discard(metric)
                else:
                    metrics = set()
                removed += 1
                if not metrics:
                    self.unreachable_metrics.pop(key, None)
                    self.unreachable.discard(key)
            return removed
        link = self.links.get(index)
        if link is None:
            return 0
        before = len(link.routes)
        link.routes -= {(table, net) for net in prefixes}
        return before - len(link.routes)

    @operation
    async def connected_networks(self) -> list[tuple[IPNetwork, str, int]]:
        return self._connected()

    def _connected(self) -> list[tuple[IPNetwork, str, int]]:
        """As the kernel's routes for addresses: the network of each
        address (not link-local) of each link that is up."""
        return [(a.network, link.name, link.index) for link in self.links.values() if link.up
                for a in sorted(link.addresses, key=str) if not a.network.is_link_local]

    @operation
    async def rules(self, family: int) -> list[PolicyRule]:
        return sorted((r for r in self.policy_rules if r.family == family),
                      key=lambda r: r.priority)

    @operation
    async def add_rule(self, rule: PolicyRule) -> bool:
        if rule in self.policy_rules:
            return False
        self.policy_rules.append(rule)
        return True

    @operation
    async def delete_rule(self, rule: PolicyRule) -> bool:
        """As the kernel: the first rule in priority order that matches
        what the request gives.  A fwmark of 0 and a protocol of 0 match
        any (of the rules with a fwmark mask), and the invert flag is not
        compared at all, so a request can take another rule than the one
        it describes."""
        for i, r in sorted(enumerate(self.policy_rules), key=lambda x: (x[1].priority, x[0])):
            if (r.family == rule.family and r.priority == rule.priority
                    and r.table == rule.table
                    and (not rule.fwmark or r.fwmark == rule.fwmark)
                    # (a mask, all ones, goes with any fwmark given)
                    and (rule.fwmark is None or r.fwmark is not None)
                    and (rule.suppress_prefixlength is None
                         or r.suppress_prefixlength == rule.suppress_prefixlength)
                    and (not rule.protocol or r.protocol == rule.protocol)):
                del self.policy_rules[i]
                return True
        return False

    @operation
    async def table_in_use(self, table: int) -> bool:
        return any(t == table for link in self.links.values() for t, _ in link.routes) or any(
            r.table == table for r in self.policy_rules)

    @operation
    async def read_sysctl(self, key: str) -> str:
        return self.sysctls.get(key, "0")

    @operation
    async def write_sysctl(self, key: str, value: str) -> None:
        self.sysctls[key] = value

    async def close(self) -> None:
        self.ops.append("close")
        self.closed += 1


class Behaviour(enum.Enum):
    #: Serves UAPI: answers set with errno=0 and get with one peer.
    OK = "ok"
    #: Exits with status 1 at once, before its UAPI socket exists.
    CRASH = "crash"
    #: Answers set, then accepts get requests and never answers them.
    MUTE = "mute"
    #: Serves UAPI like OK, but only ``FakeHost.slow_start`` seconds after
    #: it was started (its socket and link do not exist meanwhile).
    SLOW = "slow"


class FakePipe(trio.abc.ReceiveStream):
    """A helper's stdout or stderr: lines written by the fake, EOF once it
    exits (as a pipe reaches EOF when the process dies)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._closed = False
        self._changed = trio.Event()

    def write(self, data: bytes) -> None:
        if not self._closed:
            self._data += data
            self._changed.set()

    def close_write(self) -> None:
        self._closed = True
        self._changed.set()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Cancellation: waits (cancellably) for data or EOF."""
        while not self._data and not self._closed:
            self._changed = trio.Event()
            await self._changed.wait()
        await trio.lowlevel.checkpoint()
        n = len(self._data) if max_bytes is None else max_bytes
        chunk = bytes(self._data[:n])
        del self._data[:n]
        return chunk

    async def aclose(self) -> None:
        self.close_write()
        await trio.lowlevel.checkpoint()


class FakeHelper:
    """Stands in for a wireguard-go *process*: the operating system side of
    :class:`tunsup.host.process.HelperProcess`, which runs unchanged on top
    of it (spawn, watcher, log pumps, TERM -> grace -> KILL, reap).  Its pid
    is the test process's own (the tunnel checks the UAPI socket's
    SO_PEERCRED against it), so signals never reach the OS: the fake's
    spawner delivers them here (:meth:`signal`)."""

    #: Start times (clock ticks since boot) no real process can have (10**15
    #: ticks is 300,000 years of uptime): crash recovery, which checks a
    #: helper's pid against /proc before signalling it, always finds the
    #: test process (whose pid fakes carry) to be another process.
    _start_times = iter(range(10**15, 10**15 + 10**9))

    def __init__(self, host: FakeHost, argv: Sequence[str], env: dict[str, str],
                 pass_fds: Sequence[int], behaviour: Behaviour) -> None:
        self.host = host
        self.argv = tuple(argv)
        self.env = env
        self.pass_fds = tuple(pass_fds)
        self.behaviour = behaviour
        self.pid = os.getpid()
        self.started_at = trio.current_time()
        #: Unique per fake: tells the engine's records of helpers apart.
        self.start_time: int | None = next(FakeHelper._start_times)
        self.returncode: int | None = None
        self.exited = trio.Event()
        #: When the process ended, and whether it ended by a signal it was
        #: sent (else it died on its own).
        self.died_at: float | None = None
        self.killed = False
        #: Whether its exit status was collected (``wait`` returned).
        self.reaped = False
        self.signals: list[signal.Signals] = []
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self.stdout = FakePipe()
        self.stderr = FakePipe()
        self.ifname = self.argv[-1]
        self.owned_tun = "WG_TUN_FD" in env
        self._server_scope = trio.CancelScope()
        self._link: int | None = None
        self.mute = behaviour is Behaviour.MUTE
        #: Ignores SIGTERM (only SIGKILL ends it), like a wedged helper.
        self.ignore_term = False
        #: Stuck in the kernel: not even SIGKILL ends it (for now, or for
        #: good).
        self.unkillable = False
        self.stuck_for_good = False
        #: The nursery its starter handed to ``start_helper`` (tells apart
        #: whose helper it is).
        self.nursery: trio.Nursery | None = None

    @property
    def sock_path(self) -> str:
        return os.path.join(self.host.uapi_dir, f"{self.ifname}.sock")

    def describe_exit(self) -> str:
        return describe_exit(self.argv[0], self.pid, self.returncode, self.tail)

    # --- the process interface HelperProcess uses ---------------------------

    async def wait(self) -> int:
        """Wait for the exit and collect the status (the reap).
        Cancellation: cancellable until the exit."""
        await self.exited.wait()
        assert self.returncode is not None
        self.reaped = True
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signal(signal.Signals(sig))

    def signal(self, sig: signal.Signals) -> None:
        """The signal arrives (delivered by the fake spawner)."""
        self.signals.append(sig)
        if self.exited.is_set() or self.unkillable:
            return
        if sig == signal.SIGKILL or (sig == signal.SIGTERM and not self.ignore_term):
            self.killed = True
            self.die(-int(sig))

    def close(self) -> None:
        pass

    def die(self, returncode: int, line: str | None = None, *,
            keep_socket: bool = False) -> None:
        """The helper process ends: its socket goes (unless it never had
        one: ``keep_socket``, the path is another's), and a TUN it created
        itself goes with it (as the kernel does)."""
        if self.exited.is_set():
            return
        if line:
            self.tail.append(line)
            self.stderr.write(line.encode() + b"\n")
        self.stdout.close_write()
        self.stderr.close_write()
        self._server_scope.cancel()
        if not keep_socket:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.sock_path)
        if self._link is not None:
            self.host.net.links.pop(self._link, None)
        self.returncode = returncode
        self.died_at = trio.current_time()
        self.exited.set()
        self.host.alive.discard(self)

    def wedge(self) -> None:
        """The helper hangs: its UAPI stops answering ``get`` and it ignores
        SIGTERM (only SIGKILL ends it)."""
        self.mute = True
        self.ignore_term = True

    async def start(self, nursery: trio.Nursery) -> None:
        """Start serving (at once, or in the background for SLOW).
        Cancellation: a checkpoint at most."""
        if self.behaviour is Behaviour.CRASH:
            self.die(1, "ERROR: boom")
            return
        if self.behaviour is Behaviour.SLOW:
            nursery.start_soon(self._start_late, nursery)
            return
        self._open(nursery)

    async def _start_late(self, nursery: trio.Nursery) -> None:
        with self._server_scope:
            await trio.sleep(self.host.slow_start)
        if not self.exited.is_set():
            # A cancel scope serves one ``with`` block: _serve gets its own.
            self._server_scope = trio.CancelScope()
            self._open(nursery)

    def _open(self, nursery: trio.Nursery) -> None:
        """Create the link (helper mode) and listen on the UAPI socket.  If
        either fails (a link of that name exists, the socket is another
        live helper's) the process exits with status 1, as wireguard-go
        does: it was spawned, so it is not "never started"."""
        std = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            if self.owned_tun:
                link = self.host.net.by_name(self.ifname)
                assert link is not None, "no owned TUN to attach to"
                # wireguard-go sets the MTU of a TUN it is handed to its
                # default (seen: 1300 -> 1420), as of one it creates.
                link.mtu = WG_DEFAULT_MTU
            else:
                self._link = self.host.net.create(self.ifname, persistent=False)
                self.host.net.links[self._link].mtu = WG_DEFAULT_MTU
            std.bind(self.sock_path)
            std.listen(16)
        except OSError as exc:
            std.close()
            self.die(1, f"ERROR: setup failed: {exc}", keep_socket=True)
            return
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(std))
        nursery.start_soon(self._serve, listener)

    async def _serve(self, listener: trio.SocketListener) -> None:
        with self._server_scope:
            async with listener, trio.open_nursery() as nursery:
                while True:
                    nursery.start_soon(self._answer, await listener.accept())

    async def _answer(self, stream: trio.abc.Stream) -> None:
        async with stream:
            buf = b""
            while b"\n\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            self.host.requests.append(buf.split(b"\n", 1)[0].decode())
            self.host.bodies.append(buf.decode())
            if buf.startswith(b"get=1") and self.mute:
                await trio.sleep_forever()
            if buf.startswith(b"get=1"):
                reply = (f"listen_port=51820\npublic_key={PEER.hex()}\nrx_bytes=100\n"
                         f"tx_bytes=200\nlast_handshake_time_sec=1700000000\n"
                         f"last_handshake_time_nsec=0\nerrno=0\n\n")
            else:
                reply = "errno=0\n\n"
            with contextlib.suppress(trio.BrokenResourceError):
                await stream.send_all(reply.encode())


class _Spawner(process.Spawner):
    """The OS boundary for one fake helper process (its signals go to it)."""

    def __init__(self, host: FakeHost, nursery: trio.Nursery) -> None:
        self.host = host
        self.nursery = nursery
        self.helper: FakeHelper | None = None

    async def open_process(self, argv: Sequence[str], **options: Any) -> process.Process:
        """Spawn a fake helper.  Cancellation: never (no checkpoint before
        the process exists: like the real spawn, it is all or nothing)."""
        host = self.host
        own = host.plans.get(argv[-1])
        behaviour = (own.pop(0) if own else host.plan.pop(0) if host.plan
                     else host.default)
        env = dict(options.get("env") or {})
        helper = FakeHelper(host, argv, env, options.get("pass_fds", ()), behaviour)
        helper.nursery = self.nursery
        self.helper = helper
        host.started.append(helper)
        host.alive.add(helper)
        await helper.start(self.nursery)
        return helper

    def signal_group(self, pgid: int, sig: signal.Signals) -> None:
        """Deliver ``sig``.  Faults (operation "signal_helper"): "hang" makes
        the process unkillable (stuck in the kernel), "delay" makes it so
        for ``delay`` seconds (then the signals it got take effect)."""
        helper = self.helper
        assert helper is not None
        if helper.exited.is_set():
            helper.signal(sig)  # no process left to be stuck in the kernel: no fault
            return
        fault = self.host.net.fault_for("signal_helper", ifname=helper.ifname)
        if fault is not None:
            helper.unkillable = True
            if fault.kind == "delay":
                # The OS's doing: no nursery of tunsup's waits for it.
                woken = trio.Event()
                self.host.waking.append(woken)
                trio.lowlevel.spawn_system_task(self._wake, helper, fault.delay, woken)
            else:
                helper.stuck_for_good = True
        helper.signal(sig)

    async def _wake(self, helper: FakeHelper, delay: float, woken: trio.Event) -> None:
        """The process leaves the kernel after ``delay``: a system task,
        which no cancellation of tunsup's tasks interrupts."""
        try:
            await trio.sleep(delay)
        finally:
            woken.set()
        if helper.stuck_for_good:
            return  # a later fault left it stuck for good
        helper.unkillable = False
        if signal.SIGKILL in helper.signals or (
                signal.SIGTERM in helper.signals and not helper.ignore_term):
            helper.killed = True
            helper.die(-int(helper.signals[-1]))

    async def start_time(self, pid: int) -> int | None:
        """Faults: operation "start_time" (e.g. a hang: the start is then
        cancelled after the spawn)."""
        assert self.helper is not None
        fault = self.host.net.fault_for("start_time", ifname=self.helper.ifname)
        await _fire(fault, "start_time")
        return self.helper.start_time


class FakeHost:
    """A :class:`Host` whose helpers follow ``plan`` (one behaviour per
    start, then ``default``)."""

    def __init__(self, uapi_dir: str) -> None:
        self.net = FakeNet()
        self.uapi_dir = uapi_dir
        self.plan: list[Behaviour] = []
        #: Behaviours of the next helpers of one interface (before ``plan``).
        self.plans: dict[str, list[Behaviour]] = {}
        self.default = Behaviour.OK
        self.started: list[FakeHelper] = []
        self.alive: set[FakeHelper] = set()
        #: Set when a helper a "delay" fault on signal_helper holds in the
        #: kernel leaves it (see :meth:`kernel_settled`).
        self.waking: list[trio.Event] = []
        self.hooks: list[str] = []
        self.requests: list[str] = []
        #: The whole text of every UAPI request, in order.
        self.bodies: list[str] = []
        self.tun_fds: set[int] = set()
        #: Start delay of SLOW helpers (seconds).
        self.slow_start = 1.0
        self._next_fd = 100
        self.host = Host(net=self.net, start_helper=self.start_helper, run_hook=self.run_hook,
                         dns_backend=self.no_dns, uapi_dir=uapi_dir,
                         create_tun=self.create_tun, close_tun=self.close_tun)

    @property
    def current(self) -> FakeHelper:
        return self.started[-1]

    @property
    def faults(self) -> list[Fault]:
        """Faults to inject into host operations (see :class:`Fault`)."""
        return self.net.faults

    async def kernel_settled(self) -> None:
        """Wait until every helper held in the kernel for a while has left
        it (they may outlive the engine: the test waits for them)."""
        for woken in list(self.waking):
            await woken.wait()

    @property
    def ops(self) -> list[str]:
        """Every host operation so far, by name."""
        return self.net.ops

    @operation
    async def start_helper(self, nursery: trio.Nursery, argv: Sequence[str], *,
                           log: logging.Logger, env: dict[str, str] | None = None,
                           pass_fds: Sequence[int] = (),
                           on_spawn: Callable[[HelperProcess], None] | None = None,
                           reaper: Reaper | None = None,
                           abort_within: Callable[[], float | None] | None = None,
                           stop_noted: trio.Event | None = None) -> HelperProcess:
        """tunsup's own :func:`~tunsup.host.process.start_helper` over a fake
        process following ``plan`` (then ``default``).  Cancellation: as
        the real one (a fault before the spawn: nothing exists yet)."""
        return await process.start_helper(nursery, argv, log=log, env=env, pass_fds=pass_fds,
                                          spawner=_Spawner(self, nursery), on_spawn=on_spawn,
                                          reaper=reaper, abort_within=abort_within,
                                          stop_noted=stop_noted)

    @operation
    async def run_hook(self, command: str, log: logging.Logger, timeout: float, *,
                       started: Callable[[int, int | None], Awaitable[None]] | None = None,
                       ) -> None:
        """Record ``command`` (no process: ``started`` is not called).
        Cancellation: at the operation's checkpoint."""
        self.hooks.append(command)

    def no_dns(self, kind: str) -> Any:
        raise AssertionError("no DNS in these tests")

    @operation
    async def create_tun(self, name: str, *, packet_info: bool = False) -> TunDevice:
        """A persistent TUN link and a fake fd.  Cancellation: at the
        operation's checkpoint, before anything is created."""
        index = self.net.create(name, persistent=True)
        self._next_fd += 1
        self.tun_fds.add(self._next_fd)
        return TunDevice(name, index, self._next_fd)

    @operation
    async def close_tun(self, fd: int) -> None:
        """Forget the fd.  Cancellation: at the operation's checkpoint,
        before the fd is closed (a delay: after it, see
        ``COMPLETES_ABANDONED``)."""
        self.tun_fds.remove(fd)


#: Worker threads of the file DNS backend, by the start of the name it
#: gives them, and the fault operation each is (hang, delay, applied-hang).
DNS_THREADS = (("tunsup-dns", "dns_apply"), ("tunsup: restoring", "dns_revert"))
#: The file writes of each (an fsync that fails: errno).
DNS_WRITES = {"dns_apply": "dns_write", "dns_revert": "dns_restore"}


@contextlib.contextmanager
def inline_threads(net: FakeNet) -> Iterator[None]:
    """Worker threads run inline on the trio thread, while this is active.

    Under ``MockClock(autojump_threshold=0)`` a real worker thread lets
    virtual time jump while it runs (trio is idle meanwhile), so timeouts
    around it fire or not by chance.  The calls themselves are tunsup's
    own (the file DNS backend and :class:`~tunsup.host.dns.ResolvConfOwner`
    over a real temporary file); only the thread is replaced.  A thread of
    the file DNS backend is an operation subject to ``net``'s faults
    (:data:`DNS_THREADS`: "hang" and "delay" before the call, so a hang is
    ended by the caller's timeout and the call never runs, like a thread
    stuck in the kernel; "applied-hang" after it), and every fsync it
    makes is one too (:data:`DNS_WRITES`, or "dns_sync_dir" for the
    directory's sync after a rename: "errno" fails it with EIO, as a disk
    can).  A thread started with ``start_thread_soon`` (the backend's
    rollback of an abandoned write) runs at once, and so does a job of a
    :class:`~tunsup.host.worker.SerialWorker` (the journal's appends)."""
    phase: list[str] = []

    async def run_sync(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False,
                       thread_name: str | None = None, limiter: Any = None) -> T:
        op = next((o for prefix, o in DNS_THREADS if (thread_name or "").startswith(prefix)),
                  None)
        fault = net.fault_for(op) if op is not None else None
        if fault is None or fault.kind not in AFTER:
            await _fire(fault if fault is None or fault.kind != "errno" else None, op or "")
        phase.append(DNS_WRITES.get(op or "", ""))
        try:
            result = fn(*args)
        finally:
            phase.pop()
        if fault is not None and fault.kind in AFTER:
            await _fire(fault, op or "")
        return result

    def start_thread_soon(fn: Callable[[], T], deliver: Callable[[Any], object],
                          name: str | None = None) -> None:
        import outcome
        deliver(outcome.capture(fn))

    real_fsync = dns._fsync

    def fsync(fd: int) -> None:
        op = phase[-1] if phase else ""
        if op and stat.S_ISDIR(os.fstat(fd).st_mode):
            # The directory's sync after a rename: the change is made.
            op = "dns_sync_dir"
        # An fsync can only fail here (a hang or delay is the thread's).
        fault = net.fault_for(op, kinds=("errno",)) if op else None
        if fault is not None:
            raise OSError(fault.errno, os.strerror(fault.errno))
        real_fsync(fd)

    async def serial_call(self: SerialWorker, fn: Callable[[], T], *, timeout: float,
                          what: str, settled: Callable[[], Awaitable[T]] | None = None) -> T:
        # A queued job is skipped when its caller is cancelled first.  Run
        # inline, the job is done before anything could settle it.
        await trio.lowlevel.checkpoint()
        return fn()

    def serial_post(self: SerialWorker, fn: Callable[[], object], *, what: str) -> None:
        # Inline, "after the jobs queued so far" is now (an error is
        # logged, as on the thread).
        try:
            fn()
        except Exception as exc:
            logging.getLogger("tunsup.worker").warning("%s failed: %s", what, exc)

    saved = (trio.to_thread.run_sync, trio.lowlevel.start_thread_soon, dns._fsync,
             SerialWorker.call, SerialWorker.post)
    trio.to_thread.run_sync = run_sync  # type: ignore[assignment]
    trio.lowlevel.start_thread_soon = start_thread_soon
    dns._fsync = fsync
    SerialWorker.call = serial_call  # type: ignore[method-assign]
    SerialWorker.post = serial_post  # type: ignore[method-assign]
    try:
        yield
    finally:
        (trio.to_thread.run_sync, trio.lowlevel.start_thread_soon, dns._fsync,
         SerialWorker.call, SerialWorker.post) = saved  # type: ignore[method-assign]


def spec(name: str = "wgt0", *, post_up: tuple[str, ...] = ()) -> TunnelSpec:
    """A tunnel whose ListenPort and AllowedIPs are its own (tunnels of one
    service must not conflict): ``wgt0`` gets 51820 and 198.51.100.0/24,
    ``wgtN`` 51820 + N and 10.100.0.0/24 + N (others by a hash of the name)."""
    import ipaddress
    import zlib

    digits = name[len(name.rstrip("0123456789")):]
    n = int(digits) if digits else 1 + zlib.crc32(name.encode()) % 10000
    allowed = (ipaddress.ip_network("198.51.100.0/24") if n == 0
               else ipaddress.ip_network((0x0A640000 + 256 * n, 24)))
    return TunnelSpec(
        name=name, source=f"/fake/{name}.conf",
        private_key=Key.generate_private(),
        addresses=(ipaddress.ip_interface("10.9.0.1/24"),),
        listen_port=51820 + n,
        post_up=post_up,
        pre_down=("echo down",) if post_up else (),
        peers=(PeerSpec(public_key=PEER, allowed_ips=(allowed,)),),
    )


@contextlib.contextmanager
def uapi_dir() -> Iterator[str]:
    """A short private directory (unix socket paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="tsu", dir="/tmp") as path:
        yield path
