"""Plain, validated value classes describing what a tunnel should be.

These are produced at the edge (``wgquick`` for ``.conf`` files, ``config``
for the supervisor TOML) and consumed by the engine; nothing inside the
engine re-validates them.
"""

from __future__ import annotations

import functools
import ipaddress
from _socket import inet_ntoa  # (the socket wrapper module is not needed)
from typing import Literal, TypeAlias

import attrs

from .keys import Key

IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface: TypeAlias = ipaddress.IPv4Interface | ipaddress.IPv6Interface

#: ``Table =`` of a wg-quick file: ``"auto"`` (main table, the default),
#: ``"off"`` (no routes) or an explicit table number.
RouteTable: TypeAlias = Literal["auto", "off"] | int

RT_TABLE_MAIN = 254


def network_text(net: IPNetwork) -> str:
    """``str(net)``, twice as fast for IPv4 (10,000 AllowedIPs are written
    out as text for the helper and for the journal at every start)."""
    if net.version == 4:
        return f"{inet_ntoa(net.network_address.packed)}/{net.prefixlen}"
    return str(net)


@attrs.frozen
class Endpoint:
    """A peer's ``Endpoint``: a literal IP or a hostname, and a UDP port.

    Hostnames are resolved at bring-up, off the trio thread.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@attrs.frozen
class PeerSpec:
    """One ``[Peer]`` section."""

    public_key: Key
    preshared_key: Key | None = None
    allowed_ips: tuple[IPNetwork, ...] = ()
    endpoint: Endpoint | None = None
    #: Seconds; ``None`` when off.
    persistent_keepalive: int | None = None
    #: Line of the ``[Peer]`` header, for messages.
    line: int = 0
    #: Line of its ``Endpoint``, for messages (0: none, or not from a file);
    #: not compared, so moving a line never counts as a change on reload.
    endpoint_line: int = attrs.field(default=0, eq=False)
    #: Line of each of ``allowed_ips`` (parallel; empty when not from a
    #: file), for messages only.
    allowed_lines: tuple[int, ...] = attrs.field(default=(), eq=False)

    def allowed_line(self, net: IPNetwork) -> int | None:
        """The line ``net`` was given on, if known."""
        for prefix, line in zip(self.allowed_ips, self.allowed_lines, strict=False):
            if prefix == net:
                return line
        return None


@attrs.frozen
class TunnelSpec:
    """A whole wg-quick file: one interface and its peers."""

    #: Interface name (the file's stem, as in wg-quick).
    name: str
    #: The file it came from, for messages.
    source: str
    private_key: Key | None = None
    addresses: tuple[IPInterface, ...] = ()
    listen_port: int | None = None
    mtu: int | None = None
    dns_servers: tuple[IPAddress, ...] = ()
    dns_search: tuple[str, ...] = ()
    table: RouteTable = "auto"
    fwmark: int | None = None
    pre_up: tuple[str, ...] = ()
    post_up: tuple[str, ...] = ()
    pre_down: tuple[str, ...] = ()
    post_down: tuple[str, ...] = ()
    peers: tuple[PeerSpec, ...] = ()
    #: Line of some keys (``"[Interface]"``, ``"ListenPort"``, ``"Table"``,
    #: ``"FwMark"``) in ``source``, for messages only (not compared).
    lines: tuple[tuple[str, int], ...] = attrs.field(default=(), eq=False)

    def line_of(self, key: str) -> int | None:
        """The line of ``key`` (see :attr:`lines`), if known."""
        return dict(self.lines).get(key)

    @property
    def route_table(self) -> int | None:
        """The table routes go into, or ``None`` when ``Table = off``."""
        if self.table == "off":
            return None
        if self.table == "auto":
            return RT_TABLE_MAIN
        return self.table

    @functools.cached_property
    def allowed_ips(self) -> tuple[IPNetwork, ...]:
        """Every peer's AllowedIPs, in file order, duplicates removed.
        Computed once per spec (attrs gives the frozen class a slot for
        it): a start asks several times, and hashing 10,000 networks
        costs ~6 ms each time."""
        return tuple(dict.fromkeys(n for p in self.peers for n in p.allowed_ips))
