"""Reload in place: what differs between a running tunnel and its new
configuration, and whether it can change without a rebuild.

A running tunnel changes in place (helper and interface kept) unless
something only a new helper or a new interface can take changed: the
helper command, the TUN mode or header, the kill switch, the LAN mode, the
DNS backend, the full-tunnel routing (its default routes, table or
fwmark), or DNS removed altogether.  :func:`rebuild_reason` says which;
the in-place path itself is :meth:`tunsup.engine.tunnel.Tunnel.reconfigure`.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from .._errors import TunsupError
from ..config.settings import TunnelOptions
from ..config.spec import IPNetwork, TunnelSpec

#: Options that only a rebuild applies (they shape the helper, the
#: interface or the routing policy).
REBUILD_OPTIONS = ("helper", "tun_mode", "tun_header", "kill_switch", "lan", "dns_backend")


class NeedsRebuild(TunsupError):
    """The change cannot be applied in place; the message says why.
    Raised before anything changed."""


class ReloadFailed(TunsupError):
    """An in-place change failed; what it had applied was rolled back:
    ``rolled_back`` names the steps undone (most recent first),
    ``failures`` the undo steps that failed (then ``restored`` is False:
    the host is not as before, and what is left stays on the tunnel's
    stacks for its stop, or for ``cleanup``)."""

    def __init__(self, message: str, *, rolled_back: tuple[str, ...] = (),
                 failures: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.rolled_back = rolled_back
        self.failures = failures

    @property
    def restored(self) -> bool:
        return not self.failures


def rollback_message(why: str, rolled_back: tuple[str, ...], failures: tuple[str, ...]) -> str:
    """One line: why the change failed and what its rollback did."""
    undone = "; ".join(rolled_back) or "nothing"
    if not failures:
        return f"{why}; rolled back: {undone}"
    return f"{why}; rollback incomplete: {'; '.join(failures)} (rolled back: {undone})"


def is_full_tunnel(spec: TunnelSpec) -> bool:
    return spec.table == "auto" and any(n.prefixlen == 0 for n in spec.allowed_ips)


def rebuild_reason(old: TunnelSpec, old_options: TunnelOptions,
                   new: TunnelSpec, new_options: TunnelOptions) -> str | None:
    """Why ``old`` (running with ``old_options``) cannot become ``new`` in
    place, or None when it can."""
    for name in REBUILD_OPTIONS:
        if getattr(old_options, name) != getattr(new_options, name):
            return f"option {name} changed"
    if old.name != new.name:
        return "interface name changed"
    if is_full_tunnel(old) or is_full_tunnel(new):
        defaults = [{n for n in s.allowed_ips if n.prefixlen == 0} for s in (old, new)]
        if (defaults[0] != defaults[1] or old.fwmark != new.fwmark
                or old.table != new.table):
            return "full-tunnel routing changed (default routes, Table or FwMark)"
    had_dns = bool(old.dns_servers or old.dns_search)
    if had_dns and not (new.dns_servers or new.dns_search):
        return "DNS removed"
    if (_has_v4(a.network for a in old.addresses) and not _has_v4(a.network for a in new.addresses)
            and new.route_table is not None and _has_v4(new.allowed_ips)):
        # Removing it in place would take the tunnel's IPv4 routes away
        # until they were put back: their traffic would leave by the LAN.
        return "its last IPv4 address removed (the kernel takes every IPv4 route of the " \
               "link with it)"
    return None


def _has_v4(networks: Iterable[IPNetwork]) -> bool:
    return any(n.version == 4 for n in networks)


def hooks_changed(old: TunnelSpec, new: TunnelSpec) -> bool:
    return any(getattr(old, h) != getattr(new, h)
               for h in ("pre_up", "post_up", "pre_down", "post_down"))


def same_spec(old: TunnelSpec, new: TunnelSpec) -> bool:
    """Equal but for line numbers (kept for messages only) and source."""
    def norm(spec: TunnelSpec) -> TunnelSpec:
        return attrs.evolve(spec, source="",
                            peers=tuple(attrs.evolve(p, line=0) for p in spec.peers))
    return norm(old) == norm(new)


def peer_counts(old: TunnelSpec, new: TunnelSpec) -> tuple[int, int, int]:
    """(added, removed, changed) peers."""
    before = {p.public_key: attrs.evolve(p, line=0) for p in old.peers}
    after = {p.public_key: attrs.evolve(p, line=0) for p in new.peers}
    added = len(after.keys() - before.keys())
    removed = len(before.keys() - after.keys())
    changed = sum(1 for k in after.keys() & before.keys() if after[k] != before[k])
    return added, removed, changed
