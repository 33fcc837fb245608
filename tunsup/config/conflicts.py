"""Claims of several tunnels on what one host has once: refused up front.

A pure function over specs (:func:`find_conflicts`), run on the whole
configuration when it is loaded (``check``, ``run``, a reload) and by the
service for each tunnel it starts against those already running (``up``,
reload).  Each conflict is one :class:`~tunsup._errors.ConfigError` at the
later tunnel's line, naming the earlier tunnel's file and line too:

* one interface name twice;
* one ``ListenPort`` twice (0 and unset pick a free port: never a conflict);
* one explicit ``FwMark`` twice (a full tunnel's table and fwmark are
  51820 or the first free one, and only one full tunnel runs at a time,
  so the ones tunsup picks are unique);
* two *full* tunnels: ``0.0.0.0/0`` or ``::/0`` in AllowedIPs under
  ``Table = auto`` (each would take the default route through policy rules
  of its own; only one can);
* overlapping AllowedIPs (one prefix inside or equal to the other) of two
  tunnels whose routes go to the same table (``Table = off`` routes
  nothing; a full tunnel's default routes live in its own policy table),
  unless *both* tunnels set ``allow_overlap = true`` in their
  ``[[tunnel]]`` entry: then the more specific route wins, and of equal
  prefixes the tunnel that came up first keeps the route.

Overlaps are found by one sorted sweep per table and address family, so
tens of thousands of prefixes cost milliseconds, not a pairwise product.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import attrs

from .._errors import ConfigError
from .spec import IPNetwork, TunnelSpec

__all__ = ["Tenant", "find_conflicts"]


@attrs.frozen
class Tenant:
    """A tunnel as far as conflicts go: its spec and whether it allows
    overlapping AllowedIPs."""

    spec: TunnelSpec
    allow_overlap: bool = False


def _where(spec: TunnelSpec, line: int | None) -> str:
    return f"{spec.source}:{line}" if line is not None else spec.source


def _is_full(spec: TunnelSpec) -> bool:
    return spec.table == "auto" and any(n.prefixlen == 0 for p in spec.peers
                                        for n in p.allowed_ips)


def _routed(spec: TunnelSpec) -> Iterator[tuple[int, IPNetwork, int | None]]:
    """(table, prefix, line) of every route the tunnel would add (its full
    tunnel defaults are left out: they go to a policy table of its own)."""
    table = spec.route_table
    if table is None:
        return
    full = spec.table == "auto" and _default_line(spec, 0) != 0
    for peer in spec.peers:
        for net, line in zip(peer.allowed_ips,
                             peer.allowed_lines or (peer.line,) * len(peer.allowed_ips),
                             strict=False):
            if not (full and net.prefixlen == 0):
                yield table, net, line or None


@attrs.frozen
class _Unique:
    """A setting no two tunnels may share: where it stands in a file
    (``field``, as :meth:`TunnelSpec.line_of` knows it), its value (falsy:
    unset, never a conflict) and the error text for a tunnel that repeats
    the one of ``other`` (at ``where``)."""

    field: str
    value: Callable[[TunnelSpec], object]
    message: Callable[[TunnelSpec, TunnelSpec, str], str]


_UNIQUE = (
    _Unique("[Interface]", lambda s: s.name,
            lambda s, o, where: f"interface {s.name} is also the interface of {where}; "
                                "names must be unique"),
    _Unique("ListenPort", lambda s: s.listen_port,
            lambda s, o, where: f"ListenPort {s.listen_port} is also the port of {o.name} "
                                f"({where}); one UDP port serves one tunnel"),
    _Unique("FwMark", lambda s: s.fwmark,
            lambda s, o, where: f"FwMark {s.fwmark:#x} is also the fwmark of {o.name} "
                                f"({where}); a full tunnel's policy rules tell tunnels "
                                "apart by it"),
)


def find_conflicts(tunnels: Sequence[Tenant],
                   running: Sequence[Tenant] = ()) -> list[ConfigError]:
    """Conflicts of ``tunnels`` among themselves and with ``running``
    (those already up; not checked against each other), in the order of
    ``tunnels``, at most one per kind and pair.  Pure: reads nothing."""
    errors: list[ConfigError] = []
    everyone = [*running, *tunnels]
    first = len(running)
    holders: dict[tuple[str, object], TunnelSpec] = {}
    full: TunnelSpec | None = None
    for i, tenant in enumerate(everyone):
        spec, new = tenant.spec, i >= first
        for unique in _UNIQUE:
            value = unique.value(spec)
            if not value:
                continue
            other = holders.get((unique.field, value))
            if other is None:
                holders[unique.field, value] = spec
            elif new:
                errors.append(ConfigError(
                    spec.source, spec.line_of(unique.field),
                    unique.message(spec, other, _where(other, other.line_of(unique.field)))))
        if _is_full(spec):
            if full is not None and new:
                errors.append(ConfigError(
                    spec.source, _default_line(spec),
                    f"{spec.name} is a full tunnel (a default route under Table = auto), "
                    f"and so is {full.name} ({_where(full, _default_line(full))}); only one "
                    "tunnel can take the default route (give one an explicit Table)"))
            full = full or spec
    errors += _overlaps(everyone, first)
    return sorted(errors, key=lambda e: (e.path, e.line or 0))


def _default_line(spec: TunnelSpec, missing: int | None = None) -> int | None:
    """The line of the tunnel's first default route, None if unknown;
    ``missing`` when it has none."""
    for peer in spec.peers:
        for net in peer.allowed_ips:
            if net.prefixlen == 0:
                return peer.allowed_line(net) or peer.line or None
    return missing


def _overlaps(everyone: Sequence[Tenant], first: int) -> list[ConfigError]:
    """Overlapping prefixes of different tunnels in one table: per (table,
    family), prefixes sorted by (start, -length); a stack holds the open
    prefixes containing the current one (at most 129 deep, as prefixes
    nest or are disjoint)."""
    if len(everyone) < 2:
        return []
    spans: dict[tuple[int, int], list[tuple[int, int, int, IPNetwork, int | None]]] = {}
    for owner, tenant in enumerate(everyone):
        for table, net, line in _routed(tenant.spec):
            # Integers, not ipaddress objects: 10,000 prefixes in milliseconds.
            start = int(net.network_address)
            end = start | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)
            spans.setdefault((table, net.version), []).append((start, -end, owner, net, line))
    errors: list[ConfigError] = []
    reported: set[tuple[int, int]] = set()
    for (table, _), items in spans.items():
        items.sort(key=lambda item: (item[0], item[1], item[2]))
        stack: list[tuple[int, int, IPNetwork, int | None]] = []
        for start, neg_end, owner, net, line in items:
            while stack and stack[-1][0] < start:
                stack.pop()
            for _, other, other_net, other_line in reversed(stack):
                if other == owner:
                    continue
                a, b = min(owner, other), max(owner, other)
                if b < first or (a, b) in reported:
                    continue
                ta, tb = everyone[a], everyone[b]
                if ta.allow_overlap and tb.allow_overlap:
                    continue
                reported.add((a, b))
                later_net, later_line = (net, line) if owner == b else (other_net, other_line)
                early_net, early_line = (other_net, other_line) if owner == b else (net, line)
                errors.append(ConfigError(
                    tb.spec.source, later_line,
                    f"AllowedIPs {later_net} of {tb.spec.name} overlaps {early_net} of "
                    f"{ta.spec.name} ({_where(ta.spec, early_line)}), both routed in table "
                    f"{table}; set allow_overlap = true in both [[tunnel]] entries to allow it"))
            stack.append((-neg_end, owner, net, line))
    return errors
