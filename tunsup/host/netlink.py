"""Links, addresses and routes through netlink, off the trio thread.

Everything here runs on one dedicated worker thread (:class:`SerialWorker`)
that owns a pyroute2 ``IPRoute`` socket; routes in bulk go through the small
encoder in :mod:`tunsup.host._rtnl`, which is ~50x faster than pyroute2's
per-route calls for large AllowedIPs lists.  Every call has a timeout.

Return values say what happened, so that callers record ownership exactly:
``add_address`` returns False when the address already existed (tunsup then
does not own it and never removes it), deletions return False when the
object was already gone (undo is idempotent).
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .._errors import HostError
from .._worker import SerialWorker
from ..model import IPAddress, IPInterface, IPNetwork
from . import _rtnl

T = TypeVar("T")

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


class NetlinkHost:
    """Real netlink operations for the namespace the process runs in."""

    def __init__(self, *, timeout: float = CALL_TIMEOUT,
                 route_progress: Callable[[int], None] | None = None) -> None:
        self._worker = SerialWorker("tunsup-netlink")
        self._timeout = timeout
        self._ipr: Any = None
        #: Called (on the worker thread) as a bulk route batch progresses;
        #: the crash-test fault point hooks in here.
        self._route_progress = route_progress

    # --- plumbing -----------------------------------------------------------

    def _ipr_sync(self) -> Any:
        if self._ipr is None:
            from pyroute2 import IPRoute  # imported lazily: ~0.3 s

            self._ipr = IPRoute()
        return self._ipr

    async def _call(self, what: str, fn: Callable[[Any], T], timeout: float | None = None) -> T:
        def job() -> T:
            return fn(self._ipr_sync())

        try:
            return await self._worker.call(job, timeout=timeout or self._timeout, what=what)
        except HostError:
            raise
        except Exception as exc:
            code = _code(exc)
            reason = errno.errorcode.get(code, "") if code else ""
            detail = f"{exc}" if not reason else f"{reason} ({exc})"
            raise HostError(f"{what}: {detail}") from exc

    async def close(self) -> None:
        """Close the netlink socket and let the worker thread end."""

        def job() -> None:
            if self._ipr is not None:
                self._ipr.close()
                self._ipr = None

        try:
            await self._worker.call(job, timeout=self._timeout, what="close netlink")
        finally:
            self._worker.close()

    # --- links --------------------------------------------------------------

    async def link_index(self, name: str) -> int | None:
        """Index of link ``name``, or None if there is none."""

        def fn(ipr: Any) -> int | None:
            found = ipr.link_lookup(ifname=name)
            return int(found[0]) if found else None

        return await self._call(f"look up link {name}", fn)

    async def link_name(self, index: int) -> str | None:
        """Name of link ``index``, or None if there is none."""

        def fn(ipr: Any) -> str | None:
            try:
                links = ipr.get_links(index)
            except Exception as exc:
                if _code(exc) in _GONE:
                    return None
                raise
            return str(links[0].get_attr("IFLA_IFNAME")) if links else None

        return await self._call(f"look up link #{index}", fn)

    async def link_mtu(self, index: int) -> int | None:
        def fn(ipr: Any) -> int | None:
            links = ipr.get_links(index)
            return int(links[0].get_attr("IFLA_MTU")) if links else None

        return await self._call(f"read MTU of link #{index}", fn)

    async def set_link_up(self, index: int, up: bool, *, name: str | None = None) -> bool:
        """Set link ``index`` up or down.  With ``name``, only if the index
        still belongs to a link of that name (indexes are reused); returns
        False when it does not."""
        state = "up" if up else "down"

        def fn(ipr: Any) -> bool:
            if name is not None:
                links = ipr.get_links(index)
                if not links or links[0].get_attr("IFLA_IFNAME") != name:
                    return False
            ipr.link("set", index=index, state=state)
            return True

        return await self._call(f"set link {name or f'#{index}'} {state}", fn)

    async def set_mtu(self, index: int, mtu: int) -> None:
        await self._call(
            f"set MTU {mtu} on link #{index}", lambda ipr: ipr.link("set", index=index, mtu=mtu)
        )

    async def delete_link(self, index: int, name: str) -> bool:
        """Delete link ``index`` if it is still called ``name``.

        The name check guards against an index reused by another link.
        Returns False when the link is already gone.
        """

        def fn(ipr: Any) -> bool:
            try:
                links = ipr.get_links(index)
                if not links or links[0].get_attr("IFLA_IFNAME") != name:
                    return False
                ipr.link("del", index=index)
            except Exception as exc:
                if _code(exc) in _GONE:
                    return False
                raise
            return True

        return await self._call(f"delete link {name}", fn)

    # --- addresses ----------------------------------------------------------

    async def add_address(self, index: int, iface: IPInterface) -> bool:
        """Add ``iface`` to link ``index``; False if it was already there."""

        def fn(ipr: Any) -> bool:
            try:
                ipr.addr(
                    "add", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except Exception as exc:
                if _code(exc) == errno.EEXIST:
                    return False
                raise
            return True

        return await self._call(f"add address {iface}", fn)

    async def delete_address(self, index: int, iface: IPInterface) -> bool:
        """Remove ``iface`` from link ``index``; False if already gone."""

        def fn(ipr: Any) -> bool:
            try:
                ipr.addr(
                    "del", index=index, address=str(iface.ip), prefixlen=iface.network.prefixlen
                )
            except Exception as exc:
                if _code(exc) in _GONE:
                    return False
                raise
            return True

        return await self._call(f"delete address {iface}", fn)

    # --- routes -------------------------------------------------------------

    async def route_mtu(self, dst: IPAddress | None) -> int | None:
        """MTU of the path towards ``dst`` (the route's ``mtu`` metric, else
        its device's MTU); with ``dst=None``, of the first default route.
        None when there is no route."""

        def fn(ipr: Any) -> int | None:
            oif: int | None = None
            try:
                if dst is None:
                    defaults = [r for r in ipr.get_routes(family=2, table=254) if
                                r["dst_len"] == 0 and r.get_attr("RTA_OIF")]
                    if not defaults:
                        return None
                    route = defaults[0]
                else:
                    route = ipr.route("get", dst=str(dst))[0]
            except Exception as exc:
                if _code(exc) in (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ESRCH):
                    return None
                raise
            metrics = route.get_attr("RTA_METRICS")
            if metrics is not None:
                mtu = metrics.get_attr("RTAX_MTU")
                if mtu:
                    return int(mtu)
            oif = route.get_attr("RTA_OIF")
            if oif is None:
                return None
            links = ipr.get_links(oif)
            return int(links[0].get_attr("IFLA_MTU")) if links else None

        what = f"look up route to {dst}" if dst else "look up default route"
        return await self._call(what, fn, DUMP_TIMEOUT)

    async def link_routes(self, index: int, table: int) -> list[IPNetwork]:
        """Prefixes of the routes through link ``index`` in ``table``."""

        def fn(ipr: Any) -> list[IPNetwork]:
            nets: list[IPNetwork] = []
            for family in (2, 10):
                for r in ipr.get_routes(family=family, table=table, oif=index):
                    if r["type"] != 1:  # unicast only
                        continue
                    dst = r.get_attr("RTA_DST") or ("0.0.0.0" if family == 2 else "::")
                    nets.append(ipaddress.ip_network(f"{dst}/{r['dst_len']}", strict=False))
            return nets

        return await self._call(f"list routes of link #{index}", fn, DUMP_TIMEOUT)

    async def add_routes(
        self, index: int, prefixes: Sequence[IPNetwork], *, table: int
    ) -> _rtnl.RouteBatchResult:
        """Install routes in bulk; see :func:`tunsup.host._rtnl.add_routes`."""
        try:
            return await self._worker.call(
                lambda: _rtnl.add_routes(index, prefixes, table=table,
                                         progress=self._route_progress),
                timeout=BULK_TIMEOUT,
                what=f"add {len(prefixes)} routes",
            )
        except _rtnl.RouteBatchError as exc:
            raise HostError(f"adding routes failed: {exc}") from exc

    async def delete_routes(self, index: int, prefixes: Sequence[IPNetwork], *, table: int) -> int:
        """Remove routes in bulk; already-gone routes are fine."""
        try:
            return await self._worker.call(
                lambda: _rtnl.delete_routes(index, prefixes, table=table),
                timeout=BULK_TIMEOUT,
                what=f"delete {len(prefixes)} routes",
            )
        except _rtnl.RouteBatchError as exc:
            raise HostError(f"removing routes failed: {exc}") from exc
