"""Links, addresses and routes through netlink, off the trio thread.

Everything here runs on one dedicated worker thread (:class:`SerialWorker`).
What every bring-up and teardown does — links, addresses, MTU, route
lookups and dumps, routes in bulk — goes through the small struct-packed
netlink code in :mod:`tunsup.host._rtnl` (routes in bulk ~50x faster than
pyroute2's per-route calls, dumps of large tables ~100x faster to decode),
so that ``import pyroute2`` (~0.1 s, the largest part of a cold start) is
paid only by full tunnels, for their policy rules, through a pyroute2
``IPRoute`` socket owned by the worker thread.

Every call has a timeout, capped by the caller's own deadline, and it holds
in the worker thread too: pyroute2's synchronous API waits for the kernel's
answer in its own asyncio loop, which a timer stops at the deadline (the
socket is then replaced), and the bulk encoder's socket has kernel-side
send and receive timeouts.  A call that overruns anyway is abandoned with
its thread (see :mod:`tunsup.host.worker`): the next call gets a fresh thread
with a fresh socket, and the abandoned thread is stopped at its next
netlink request instead of changing the host behind its caller's back.

Return values say what happened, so that callers record ownership exactly:
``add_address`` returns False when the address already existed (tunsup then
does not own it and never removes it), deletions return False when the
object was already gone (undo is idempotent).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import trio

from .._errors import HostError
from ..config.spec import IPAddress, IPInterface, IPNetwork
from . import PolicyRule, _rtnl
from .worker import SerialWorker, raise_if_abandoned

T = TypeVar("T")

log = logging.getLogger("tunsup.netlink")

#: Default bound on one netlink call.
CALL_TIMEOUT = 5.0
#: Bound on a bulk route batch (100k routes take ~1 s here).
BULK_TIMEOUT = 60.0
#: Bound on a routing table dump (a router may hold a full table).
DUMP_TIMEOUT = 30.0

_GONE = {errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL}


def _code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError):
        return exc.errno
    return None


class _Doomed:
    """A link deletion asked for: its outcome once made (deleted, gone, or
    the error of its own request)."""

    __slots__ = ("index", "name", "outcome")

    def __init__(self, index: int, name: str) -> None:
        self.index = index
        self.name = name
        self.outcome: bool | OSError | None = None


def _host_error(what: str, exc: OSError) -> HostError:
    reason = errno.errorcode.get(exc.errno or 0, "")
    detail = f"{reason} ({exc.strerror or exc})" if reason else f"{exc}"
    return HostError(f"{what}: {detail}")


def _delete_links(links: Sequence[tuple[int, str]]) -> list[bool | OSError]:
    """Delete each link ``(index, name)`` that still has that name, in as
    few kernel requests as possible (blocking: on a worker thread).  Per
    link: True deleted, False gone (or its index names another link now),
    or the error of its own deletion.

    Two or more go as one group: they get a link group number no link has,
    a dump checks that exactly they are in it, then one ``RTM_DELLINK`` of
    the group deletes them (all or none: the kernel checks every link
    before it deletes any).  Anything unexpected on that path (a failed
    request, another link in the group) falls back to one request per
    link, so every outcome stays its own link's."""
    outcomes: list[bool | OSError | None] = [
        None if _name_of(index) == name else False for index, name in links]
    alive = [i for i, outcome in enumerate(outcomes) if outcome is None]
    if len(alive) > 1 and _delete_as_group([links[i] for i in alive]):
        for i in alive:
            outcomes[i] = True
    for i, outcome in enumerate(outcomes):
        if outcome is None:
            outcomes[i] = _delete_one(*links[i])
    return [outcome for outcome in outcomes if outcome is not None]


def _delete_one(index: int, name: str) -> bool | OSError:
    if _name_of(index) != name:
        return False
    try:
        _rtnl.delete_link(index, check=raise_if_abandoned)
    except OSError as exc:
        return False if exc.errno in _GONE else exc
    return True


def _random_group() -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF | 1 << 30


def _delete_as_group(links: Sequence[tuple[int, str]]) -> bool:
    """Delete ``links`` in one request; False if that was not done (then
    nothing but their group numbers changed)."""
    try:
        used = {group for _i, _n, group in _rtnl.dump_links(check=raise_if_abandoned)}
        # A random group number in the upper half, clear of those in use
        # (os.urandom, not secrets: that loads hashlib and libcrypto, ~3 ms
        # of every start, for a number that needs no cryptography).
        group = next(g for g in iter(_random_group, 0) if g not in used)
        for index, _name in links:
            _rtnl.set_link(index, group=group, check=raise_if_abandoned)
        members = {(i, n) for i, n, g in _rtnl.dump_links(check=raise_if_abandoned)
                   if g == group}
        if members != set(links):
            return False  # a link renamed or gone meanwhile: one by one
        _rtnl.delete_group(group, check=raise_if_abandoned)
    except OSError as exc:
        log.debug("deleting %d links as one group failed (%s): one by one", len(links), exc)
        return False
    log.debug("%d links deleted in one request", len(links))
    return True


async def _announced_deleted(watch: socket.socket,
                             links: Sequence[tuple[int, str]]) -> list[bool | OSError]:
    """Wait until the kernel has announced on ``watch`` (see
    :func:`._rtnl.open_link_watch`) that every link ``(index, name)`` of
    ``links`` is deleted, then report them deleted.  The kernel announces
    a deletion once the link is unregistered: no longer in the namespace,
    its addresses and routes gone, its name free.  The request that
    deleted it waits ~15-50 ms more (RCU) before it returns; nothing here
    needs that wait.  Never returns when an announcement may have been
    lost (the socket's buffer overflowed) or never comes (a link already
    gone, a request that failed, a link moved to another namespace): the
    request's own answer decides then.  Only the kernel's messages count
    (see :func:`._rtnl.read_link_deletions`), and only for the very index
    and name asked for.  Cancellable."""
    pending = set(links)
    while pending:
        await trio.lowlevel.wait_readable(watch)
        try:
            deleted = _rtnl.read_link_deletions(watch)
        except BlockingIOError:
            continue
        except OSError as exc:  # ENOBUFS: announcements lost; or garbled
            log.debug("watching link deletions: %s; waiting for the request", exc)
            await trio.sleep_forever()
        pending.difference_update(deleted)
    return [True] * len(links)


class NetlinkHost:
    """Real netlink operations for the namespace the process runs in."""

    def __init__(self, *, timeout: float = CALL_TIMEOUT,
                 route_progress: Callable[[int], None] | None = None) -> None:
        #: Each worker thread has its own pyroute2 socket: an abandoned
        #: thread keeps its own, never the one of its replacement.
        self._local = threading.local()
        self._worker = SerialWorker("tunsup-netlink", on_exit=self._close_sync)
        self._timeout = timeout
        #: Called (on the worker thread) as a bulk route batch progresses;
        #: the crash-test fault point hooks in here.
        self._route_progress = route_progress
        #: Link deletions waiting to be made, and the one group at a time
        #: (see :meth:`delete_link`).
        self._doomed: list[_Doomed] = []
        self._deleting = trio.Lock()
        #: Their thread: a kernel deletion waits ~10-20 ms, which must not
        #: hold up the other calls.  One for the service's life (a thread
        #: started per deletion cost every stop a millisecond or more
        #: under load); a wedged one is replaced as on any worker.
        self._delete_worker = SerialWorker("tunsup-netlink-del")

    # --- plumbing -----------------------------------------------------------

    def _ipr_sync(self) -> Any:
        ipr = getattr(self._local, "ipr", None)
        if ipr is None:
            from pyroute2 import IPRoute  # imported lazily: ~0.3 s

            # No multicast groups: unread notifications would only fill the
            # socket's buffer (100k route changes overflow it).
            ipr = self._local.ipr = IPRoute(groups=0)
        return ipr

    def _close_sync(self) -> None:
        """Close this thread's socket (in the worker thread)."""
        ipr = getattr(self._local, "ipr", None)
        self._local.ipr = None
        if ipr is not None:
            ipr.close()

    def _budget(self, timeout: float | None) -> float:
        """The call's timeout, capped by what is left of the caller's."""
        left = trio.current_effective_deadline() - trio.current_time()
        return max(0.0, min(timeout or self._timeout, left))

    async def _call(self, what: str, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        budget = self._budget(timeout)

        def job() -> T:
            ipr = self._ipr_sync()
            # pyroute2 waits for the kernel in an asyncio loop: a timer
            # stopping that loop bounds the wait in this thread.
            loop = ipr.asyncore.event_loop
            timer = loop.call_later(budget, loop.stop)
            try:
                return fn(_Guarded(ipr))
            except RuntimeError as exc:
                if "loop stopped" not in str(exc):
                    raise
                timer.cancel()
                self._close_sync()  # a request may be half-answered: start afresh
                raise HostError(f"{what}: no answer from the kernel within {budget:g} s"
                                ) from None
            finally:
                timer.cancel()

        try:
            return await self._worker.call(job, timeout=budget + _SLACK, what=what)
        except HostError:
            raise
        except Exception as exc:
            code = _code(exc)
            reason = errno.errorcode.get(code, "") if code else ""
            detail = f"{exc}" if not reason else f"{reason} ({exc})"
            raise HostError(f"{what}: {detail}") from exc

    async def close(self) -> None:
        """Close the netlink socket and let the worker thread end.
        Bounded by the call timeout; cancellable (see SerialWorker)."""
        try:
            await self._worker.call(self._close_sync, timeout=self._timeout,
                                    what="close netlink")
        finally:
            self._worker.close()
            self._delete_worker.close()

    async def _sys(self, what: str, fn: Callable[[], T], timeout: float | None = None, *,
                   worker: SerialWorker | None = None,
                   settled: Callable[[], Awaitable[T]] | None = None) -> T:
        """``fn`` on the worker thread without pyroute2: the calls of every
        bring-up and teardown speak netlink through :mod:`._rtnl` (or plain
        ``socket`` ioctls), so that ``import pyroute2`` (~0.1 s) stays off
        their path.  Bounded like :meth:`_call` (the socket's own timeouts
        in the thread, the budget on the trio side).  On ``worker`` if
        given, else on the shared one; ``settled`` as in
        :meth:`SerialWorker.call`."""
        budget = self._budget(timeout)

        def job() -> T:
            raise_if_abandoned()
            return fn()

        try:
            return await (worker or self._worker).call(job, timeout=budget + _SLACK, what=what,
                                                       settled=settled)
        except HostError:
            raise
        except OSError as exc:
            reason = errno.errorcode.get(exc.errno or 0, "")
            detail = f"{reason} ({exc.strerror or exc})" if reason else f"{exc}"
            raise HostError(f"{what}: {detail}") from exc

    # --- links --------------------------------------------------------------

    async def link_index(self, name: str) -> int | None:
        """Index of link ``name``, or None if there is none."""
        return await self._sys(f"look up link {name}", lambda: _index_of(name))

    async def link_name(self, index: int) -> str | None:
        """Name of link ``index``, or None if there is none."""
        return await self._sys(f"look up link #{index}", lambda: _name_of(index))

    async def set_link_up(self, index: int, up: bool, *, name: str | None = None) -> bool:
        """Set link ``index`` up or down.  With ``name``, only if the index
        still belongs to a link of that name (indexes are reused); returns
        False when it does not."""
        state = "up" if up else "down"

        def fn() -> bool:
            if name is not None and _name_of(index) != name:
                return False
            _rtnl.set_link(index, up=up, check=raise_if_abandoned)
            return True

        return await self._sys(f"set link {name or f'#{index}'} {state}", fn)

    async def set_mtu(self, index: int, mtu: int) -> None:
        await self._sys(f"set MTU {mtu} on link #{index}",
                        lambda: _rtnl.set_link(index, mtu=mtu, check=raise_if_abandoned))

    async def delete_link(self, index: int, name: str) -> bool:
        """Delete link ``index`` if it is still called ``name``.

        The name check guards against an index reused by another link.
        Returns False when the link is already gone.

        The deletion is done when the kernel *announces* it (see
        :func:`_announced_deleted`): the link is unregistered within a
        millisecond, but its request returns only after ~15-50 ms more of
        waiting (for RCU), which nobody needs.  That wait then holds the
        deletions' thread alone, once per request.  So deletions are
        *grouped*, as the journal groups its appends: one runs at once, on
        a worker thread of its own (not the one of every other call);
        those asked for meanwhile (many tunnels stopping) go together in
        the next, as one kernel request (see
        :func:`_delete_links`): 40 TUN links in ~30 ms, where 40 requests
        on parallel threads took ~135 ms and one after another ~0.7 s.  A
        single deletion waits for nobody.  Each caller gets its own link's
        outcome (its own error); when a group's request fails, each of its
        links is deleted on its own.  Bounded and cancellable like every
        call (see :meth:`_sys`); a caller whose group was cut short by
        another caller's timeout or cancellation tries again on its own.
        """
        mine = _Doomed(index, name)
        self._doomed.append(mine)
        try:
            async with self._deleting:
                if mine.outcome is None:
                    await self._delete_group_of(mine)
        finally:
            if mine in self._doomed:
                self._doomed.remove(mine)
        outcome = mine.outcome
        if isinstance(outcome, OSError):
            raise _host_error(f"delete link {name}", outcome) from outcome
        assert outcome is not None
        return outcome

    async def _delete_group_of(self, mine: _Doomed) -> None:
        """Delete ``mine`` with every deletion waiting now (under the lock);
        sets each one's outcome, or raises (the others are then left
        without one, to try again)."""
        # ``mine`` is no longer waiting when it comes back from a group cut
        # short: every other waiting one is.
        group = [mine, *(d for d in self._doomed if d is not mine)]
        self._doomed = []
        links = [(d.index, d.name) for d in group]
        what = f"delete link {mine.name}" + (f" and {len(group) - 1} more" if group[1:] else "")
        # Subscribed before the request is made, so no announcement of it
        # is missed.  A few syscalls, none of which waits.
        try:
            watch: socket.socket | None = _rtnl.open_link_watch()
        except OSError as exc:
            log.debug("no watch for link deletions (%s): waiting for the request", exc)
            watch = None
        try:
            settled = None if watch is None else partial(_announced_deleted, watch, links)
            outcomes = await self._sys(what, lambda: _delete_links(links),
                                       worker=self._delete_worker, settled=settled)
        finally:
            if watch is not None:
                watch.close()
        for doomed, outcome in zip(group, outcomes, strict=True):
            doomed.outcome = outcome

    # --- addresses ----------------------------------------------------------

    async def add_address(self, index: int, iface: IPInterface) -> bool:
        """Add ``iface`` to link ``index``; False if it was already there."""

        def fn() -> bool:
            try:
                _rtnl.change_address(index, iface, add=True, check=raise_if_abandoned)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    return False
                raise
            return True

        return await self._sys(f"add address {iface}", fn)

    async def delete_address(self, index: int, iface: IPInterface) -> bool:
        """Remove ``iface`` from link ``index``; False if already gone."""

        def fn() -> bool:
            try:
                _rtnl.change_address(index, iface, add=False, check=raise_if_abandoned)
            except OSError as exc:
                if exc.errno in _GONE:
                    return False
                raise
            return True

        return await self._sys(f"delete address {iface}", fn)

    # --- routes -------------------------------------------------------------

    async def route_mtu(self, dst: IPAddress | None) -> int | None:
        """MTU of the path towards ``dst`` (the route's ``mtu`` metric, else
        its device's MTU); with ``dst=None``, of the first default route.
        None when there is no route."""

        def fn() -> int | None:
            route: _rtnl.RouteEntry | None
            if dst is None:
                defaults = _rtnl.dump_routes(
                    socket.AF_INET, table=254, check=raise_if_abandoned,
                    keep=lambda r: r.dst_len == 0 and r.oif is not None)
                route = defaults[0] if defaults else None
            else:
                try:
                    route = _rtnl.route_to(dst, check=raise_if_abandoned)
                except OSError as exc:
                    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH):
                        return None
                    raise
            if route is None:
                return None
            if route.mtu:
                return route.mtu
            if route.oif is None:
                return None
            return _device_mtu(route.oif)

        what = f"look up route to {dst}" if dst else "look up default route"
        return await self._sys(what, fn, DUMP_TIMEOUT)

    async def _dump(self, what: str, fn: Callable[[], T]) -> T:
        """A route dump through :func:`tunsup.host._rtnl.dump_routes` (struct
        decoding: pyroute2 took seconds for a table of 10,000 routes) on
        the worker thread, bounded like every call."""
        try:
            return await self._worker.call(fn, timeout=self._budget(DUMP_TIMEOUT), what=what)
        except OSError as exc:
            raise HostError(f"{what}: {exc.strerror or exc}") from exc

    async def link_routes(self, index: int, table: int) -> list[IPNetwork]:
        """Prefixes of the unicast routes through link ``index`` in ``table``."""

        def fn() -> list[IPNetwork]:
            return [r.network() for family in (socket.AF_INET, socket.AF_INET6)
                    for r in _rtnl.dump_routes(family, table=table, oif=index,
                                               keep=_is_unicast, check=raise_if_abandoned)]

        return await self._dump(f"list routes of link #{index}", fn)

    async def connected_networks(self) -> list[tuple[IPNetwork, str, int]]:
        """Directly connected networks (main-table routes of protocol kernel,
        scope link): (network, device name, device index)."""

        def fn() -> list[tuple[IPNetwork, str, int]]:
            out: list[tuple[IPNetwork, str, int]] = []
            for family in (socket.AF_INET, socket.AF_INET6):
                # The kernel sends only protocol-kernel routes, not every
                # tunnel's routes to each tunnel that starts.
                for r in _rtnl.dump_routes(family, table=254, protocol=_RTPROT_KERNEL,
                                           keep=_is_connected, check=raise_if_abandoned):
                    assert r.oif is not None  # _is_connected
                    net = r.network()
                    if net.is_link_local or net.is_multicast:
                        continue
                    try:
                        name = socket.if_indextoname(r.oif)
                    except OSError:  # gone since the dump
                        name = str(r.oif)
                    out.append((net, name, r.oif))
            return out

        return await self._dump("list connected networks", fn)

    async def add_routes(
        self, index: int, prefixes: Sequence[IPNetwork], *, table: int, metric: int | None = None
    ) -> _rtnl.RouteBatchResult:
        """Install routes in bulk; see :func:`tunsup.host._rtnl.add_routes`."""
        try:
            return await self._worker.call(
                lambda: _rtnl.add_routes(index, prefixes, table=table, metric=metric,
                                         progress=self._progress),
                timeout=self._budget(BULK_TIMEOUT),
                what=f"add {len(prefixes)} routes",
            )
        except _rtnl.RouteBatchError as exc:
            raise HostError(f"adding routes failed: {exc}") from exc

    async def delete_routes(self, index: int, prefixes: Sequence[IPNetwork], *, table: int,
                            metric: int | None = None) -> int:
        """Remove routes in bulk; already-gone routes are fine."""
        try:
            return await self._worker.call(
                lambda: _rtnl.delete_routes(index, prefixes, table=table, metric=metric,
                                            progress=lambda _n: raise_if_abandoned()),
                timeout=self._budget(BULK_TIMEOUT),
                what=f"delete {len(prefixes)} routes",
            )
        except _rtnl.RouteBatchError as exc:
            raise HostError(f"removing routes failed: {exc}") from exc

    def _progress(self, done: int) -> None:
        """Between chunks of a bulk batch (worker thread): an abandoned
        batch stops here (an add then rolls back what it added)."""
        raise_if_abandoned()
        if self._route_progress is not None:
            self._route_progress(done)

    # --- policy rules -------------------------------------------------------

    async def rules(self, family: int) -> list[PolicyRule]:
        """The policy rules of one family (4 or 6), in priority order.  Only
        the selectors tunsup uses are decoded."""

        def fn(ipr: Any) -> list[PolicyRule]:
            out = []
            for r in ipr.get_rules(family=_AF[family]):
                suppress = r.get_attr("FRA_SUPPRESS_PREFIXLEN")
                mark = r.get_attr("FRA_FWMARK")
                if mark is None and r.get_attr("FRA_FWMASK"):
                    mark = 0  # "fwmark 0/0xffffffff": unmarked packets only
                out.append(PolicyRule(
                    family=family,
                    priority=int(r.get_attr("FRA_PRIORITY") or 0),
                    table=int(r.get_attr("FRA_TABLE") or r["table"]),
                    fwmark=int(mark) if mark is not None else None,
                    invert=bool(r["flags"] & _FIB_RULE_INVERT),
                    suppress_prefixlength=None if suppress in (None, 0xFFFFFFFF)
                    else int(suppress),
                    protocol=int(r.get_attr("FRA_PROTOCOL") or 0),
                ))
            return sorted(out, key=lambda x: x.priority)

        return await self._call(f"list IPv{family} rules", fn, DUMP_TIMEOUT)

    async def add_rule(self, rule: PolicyRule) -> bool:
        """Add ``rule``; False if an identical one already exists (then it
        is not ours)."""

        def fn(ipr: Any) -> bool:
            try:
                ipr.rule("add", **_rule_args(rule))
            except Exception as exc:
                if _code(exc) == errno.EEXIST:
                    return False
                raise
            return True

        return await self._call(f"add {rule}", fn)

    async def delete_rule(self, rule: PolicyRule) -> bool:
        """Delete exactly ``rule``; False if it is already gone."""

        def fn(ipr: Any) -> bool:
            try:
                ipr.rule("del", **_rule_args(rule))
            except Exception as exc:
                if _code(exc) in _GONE:
                    return False
                raise
            return True

        return await self._call(f"delete {rule}", fn)

    async def table_in_use(self, table: int) -> bool:
        """Whether any route (either family) or rule refers to ``table``."""

        def fn(ipr: Any) -> bool:
            for family in (socket.AF_INET, socket.AF_INET6):
                if ipr.get_routes(family=family, table=table):
                    return True
                for r in ipr.get_rules(family=family):
                    if int(r.get_attr("FRA_TABLE") or r["table"]) == table:
                        return True
            return False

        return await self._call(f"check routing table {table}", fn, DUMP_TIMEOUT)

    # --- sysctl -------------------------------------------------------------

    async def read_sysctl(self, key: str) -> str:
        """Value of a ``net.*`` sysctl (``net.ipv4.conf.all.src_valid_mark``)."""
        path = _sysctl_path(key)

        def fn() -> str:
            with open(path) as f:
                return f.read().strip()

        return await self._sys(f"read {key}", fn)

    async def write_sysctl(self, key: str, value: str) -> None:
        path = _sysctl_path(key)

        def fn() -> None:
            with open(path, "w") as f:
                f.write(value)

        await self._sys(f"set {key}={value}", fn)


#: Extra time the trio side gives a call over its in-thread timeout, so that
#: the thread normally reports the timeout itself (and is kept).
_SLACK = 1.0


class _Guarded:
    """A pyroute2 socket whose every call first checks that the job was not
    abandoned: a late thread stops instead of changing the host."""

    def __init__(self, ipr: Any) -> None:
        self._ipr = ipr

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._ipr, name)
        if not callable(attr):
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            raise_if_abandoned()
            return attr(*args, **kwargs)

        return guarded


_AF = {4: socket.AF_INET, 6: socket.AF_INET6}
_RTPROT_KERNEL = 2


def _is_unicast(r: _rtnl.RouteEntry) -> bool:
    return r.type == _rtnl.RTN_UNICAST


def _is_connected(r: _rtnl.RouteEntry) -> bool:
    """A connected route: unicast, protocol kernel, with a destination and a
    device; IPv4 ones are scope link (IPv6 ones scope universe)."""
    return (r.type == _rtnl.RTN_UNICAST and r.protocol == _RTPROT_KERNEL
            and r.oif is not None and bool(r.dst)
            and (r.family != socket.AF_INET or r.scope == _rtnl.RT_SCOPE_LINK))
_FIB_RULE_INVERT = 0x2


def _rule_args(rule: PolicyRule) -> dict[str, Any]:
    args: dict[str, Any] = {"family": _AF[rule.family], "priority": rule.priority,
                            "table": rule.table, "action": "FR_ACT_TO_TBL"}
    if rule.fwmark is not None:
        args.update(fwmark=rule.fwmark, fwmask=0xFFFFFFFF)
    if rule.invert:
        args["flags"] = _FIB_RULE_INVERT
    if rule.suppress_prefixlength is not None:
        args["suppress_prefixlen"] = rule.suppress_prefixlength
    if rule.protocol:
        args["protocol"] = rule.protocol
    return args


def _index_of(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:  # ENODEV: no such link
        return None


def _name_of(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:  # ENXIO: no such link
        return None


_SIOCGIFMTU = 0x8921


def _device_mtu(index: int) -> int | None:
    """The MTU of link ``index`` (an ioctl: no netlink dump of links)."""
    name = _name_of(index)
    if name is None:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            ifreq = fcntl.ioctl(sock, _SIOCGIFMTU, struct.pack("16si12x", name.encode(), 0))
        except OSError:
            return None
    return int(struct.unpack_from("i", ifreq, 16)[0])


def _sysctl_path(key: str) -> str:
    if not key.startswith("net.") or "/" in key or ".." in key:
        raise ValueError(f"not a net sysctl: {key!r}")
    return "/proc/sys/" + key.replace(".", "/")
