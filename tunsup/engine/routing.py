"""Which routes and policy rules a tunnel needs, pushed as effects.

Plain tunnels get one route per AllowedIPs prefix in the main table (or the
``Table =`` one).  A *full tunnel* — AllowedIPs containing ``0.0.0.0/0`` or
``::/0`` with ``Table = auto`` — is routed as wg-quick does it: the default
route goes into its own table T (51820 or the next free one, or the
``FwMark``), the helper marks its own UDP packets with fwmark T, and per
family two rules send everything else to T::

    not fwmark T lookup T               (WireGuard's own packets skip the tunnel)
    lookup main suppress_prefixlength 0 (main-table routes but its default win)

The second rule keeps directly connected networks (the LAN) reachable;
``lan = "tunnel"`` leaves it out, so the LAN goes through the tunnel too.
``net.ipv4.conf.all.src_valid_mark`` is set to 1 (restored at stop if
tunsup changed it).

The kill switch adds ``unreachable`` routes at the worst metric for all of
it: they are not tied to the tunnel's link, so when the link disappears
(helper killed, tunsup killed) traffic fails instead of leaking.
"""

from __future__ import annotations

import functools
import logging

import attrs
import trio

from .._errors import HostError
from ..config.spec import RT_TABLE_MAIN, IPNetwork, TunnelSpec
from ..host import RULE_PROTOCOL, NetOps, PolicyRule
from ..host.claims import Claims
from .effects import KillSwitch, Routes, Rule, Sysctl, select_routes, span
from .undo import EffectStack

#: wg-quick's first choice of table and fwmark for a full tunnel.
FIRST_POLICY_TABLE = 51820
SRC_VALID_MARK = "net.ipv4.conf.all.src_valid_mark"

#: Up to this many AllowedIPs, LAN reconciliation runs on the trio thread.
INLINE_PREFIXES = 1000


@attrs.frozen
class RoutingPlan:
    #: Table of the ordinary (non-default) routes; None: ``Table = off``.
    table: int | None
    #: The ordinary prefixes to route, after LAN reconciliation.
    ordinary: tuple[IPNetwork, ...] = ()
    #: Full tunnel: the table holding the default route(s).
    policy_table: int | None = None
    #: The helper's fwmark (full tunnel: the policy table unless FwMark is set).
    fwmark: int | None = None
    #: The default prefixes (0.0.0.0/0, ::/0) of a full tunnel.
    defaults: tuple[IPNetwork, ...] = ()

    @property
    def full_tunnel(self) -> bool:
        return self.policy_table is not None


@attrs.frozen
class HeldPolicy:
    """What a rebuild holds of a full tunnel (see
    :meth:`~tunsup.engine.supervisor.Supervisor._rebuild`): its policy
    ``table`` (an ``unreachable`` default at the hold's metric) and the
    ``fwmark 0`` copies of its rules.  The new tunnel takes the same table
    (when it picks its own) and the same rule priorities, so that it
    routes through the hold at once: no loss, and no drift of priorities
    from one rebuild to the next."""

    table: int
    rules: tuple[PolicyRule, ...] = ()
    #: The default prefixes held in ``table``.
    defaults: tuple[IPNetwork, ...] = ()


async def plan_routing(spec: TunnelSpec, net: NetOps, log: logging.Logger,
                       lan: str = "direct", held: HeldPolicy | None = None, *,
                       claims: Claims | None = None, owner: object = None,
                       link: int | None = None) -> RoutingPlan:
    """Decide tables, fwmark and which prefixes to route (before anything
    is applied).  ``held``: a rebuild holds this table for the tunnel.
    ``link``: the tunnel's own link, when it exists already (an in-place
    change): the networks of its own addresses are not a LAN.
    Reads the host only; a full tunnel's table is claimed in ``claims``
    for ``owner`` (free on the host and unclaimed: concurrent starts never
    share one).  Cancellable."""
    defaults = tuple(n for n in spec.allowed_ips if n.prefixlen == 0)
    full = spec.table == "auto" and bool(defaults)
    ordinary: tuple[IPNetwork, ...] = ()
    if spec.route_table is not None:
        wanted = tuple(n for n in spec.allowed_ips if n.prefixlen != 0 or not full)
        # The tunnel's own subnets are not a LAN to keep out of it: taken
        # for one, an in-place change would stop routing an AllowedIPs
        # prefix its old address covered (that address's route goes with
        # it) and take the prefix out of the kill switch.
        connected = [(n, dev) for n, dev, index in await net.connected_networks()
                     if link is None or index != link]
        # Pure computation, but O(AllowedIPs): kept off the trio thread when
        # large.  Small plans stay inline: a worker thread would also let a
        # MockClock (tunsup.testing.fakehost) jump past every deadline meanwhile.
        if len(wanted) > INLINE_PREFIXES:
            # Abandonable: it only computes, so a stop need not wait for it.
            ordinary = await trio.to_thread.run_sync(
                functools.partial(_reconcile_lan, wanted, connected, log, lan),
                abandon_on_cancel=True)
        else:
            ordinary = _reconcile_lan(wanted, connected, log, lan)
    if not full:
        return RoutingPlan(spec.route_table, ordinary, fwmark=spec.fwmark)
    table = spec.fwmark
    claims = claims if claims is not None else Claims()
    if table is None and held is not None:
        table = held.table  # in use by the hold only, which goes once this is up
        claims.claim_table(table, owner)
    if table is None:
        table = FIRST_POLICY_TABLE
        # Claimed right after the host's answer, with no wait in between.
        while not (claims.table_free(table, owner) and not await net.table_in_use(table)
                   and claims.claim_table(table, owner)):
            table += 1
    log.info("full tunnel: default route(s) in table %d, fwmark %#x", table, table)
    return RoutingPlan(RT_TABLE_MAIN, ordinary, table, table, defaults)


async def apply_policy(
    stack: EffectStack,
    plan: RoutingPlan,
    spec: TunnelSpec,
    net: NetOps,
    log: logging.Logger,
    *,
    kill_switch: bool = False,
    lan: str = "direct",
    held: HeldPolicy | None = None,
    claims: Claims | None = None,
    owner: object = None,
) -> None:
    """What is not tied to the tunnel's link and must outlive it (helper
    restarts, a killed tunsup): the kill switch's unreachable routes, the
    full tunnel's rules and sysctl.  The rules go below the lowest
    priority in use (on the host, not counting ``held``'s: they go away
    once the tunnel is up; and claimed in ``claims``), and their
    priorities are claimed for ``owner``.  Cancellable between effects."""
    claims = claims if claims is not None else Claims()
    name = spec.name
    if kill_switch and plan.table is not None and plan.ordinary:
        await stack.apply(KillSwitch(name, plan.table, plan.ordinary))
    if plan.policy_table is None:
        return
    table = plan.policy_table
    if kill_switch:
        await stack.apply(KillSwitch(name, table, plan.defaults))
    for family in sorted({n.version for n in plan.defaults}):
        ignored = held.rules if held is not None else ()
        on_host = [r.priority for r in await net.rules(family)
                   if r.priority > 0 and r not in ignored]
        # No wait from here to the claim: concurrent starts see each other.
        lowest = min([*on_host, *claims.priorities(family)], default=32766)
        if lowest < 3:
            raise HostError(f"no free IPv{family} rule priority below {lowest}")
        claims.claim_priorities(family, (lowest - 1, lowest - 2), owner)
        await stack.apply(Rule(name, PolicyRule(family, lowest - 1, table, fwmark=table,
                                                invert=True, protocol=RULE_PROTOCOL)))
        if lan == "direct":
            await stack.apply(Rule(name, PolicyRule(family, lowest - 2, RT_TABLE_MAIN,
                                                    suppress_prefixlength=0,
                                                    protocol=RULE_PROTOCOL)))
        else:
            log.info("lan = tunnel: directly connected IPv%d networks go through the tunnel",
                     family)
    if any(n.version == 4 for n in plan.defaults):
        await stack.apply(Sysctl(name, SRC_VALID_MARK, "1"))


async def apply_link_routes(
    stack: EffectStack,
    plan: RoutingPlan,
    spec: TunnelSpec,
    index: int,
    net: NetOps,
    log: logging.Logger,
) -> None:
    """The routes through the tunnel's link (they die with it).
    Cancellable between effects."""
    if plan.table is not None and plan.ordinary:
        existing = await net.link_routes(index, plan.table)
        if len(plan.ordinary) > INLINE_PREFIXES:
            prefixes = await trio.to_thread.run_sync(
                functools.partial(select_routes, plan.ordinary, existing), abandon_on_cancel=True)
        else:
            prefixes = select_routes(plan.ordinary, existing)
        if prefixes:
            await stack.apply(Routes(spec.name, index, plan.table, prefixes))
    if plan.policy_table is not None:
        await stack.apply(Routes(spec.name, index, plan.policy_table, plan.defaults))


def _reconcile_lan(prefixes: tuple[IPNetwork, ...], connected: list[tuple[IPNetwork, str]],
                   log: logging.Logger, lan: str) -> tuple[IPNetwork, ...]:
    """AllowedIPs that fall inside a directly connected network would cut
    part of the LAN off: by default they are not routed (logged)."""
    kept = []
    # subnet_of in integers (see effects.span): 10,000 prefixes in a tenth
    # of the time.  Equal spans of one version are equal networks.  Most
    # prefixes touch no LAN: one test of overlap each (both tests below
    # imply it), against the LANs of their own version only.
    lans: dict[int, list[tuple[int, int, IPNetwork, str]]] = {4: [], 6: []}
    for n, dev in connected:
        version, lo, hi = span(n)
        lans[version].append((lo, hi, n, dev))
    for prefix in prefixes:
        candidates = lans[prefix.version]
        if not candidates:
            kept.append(prefix)
            continue
        _, first, last = span(prefix)
        near = [lan for lan in candidates if lan[0] <= last and first <= lan[1]]
        if not near:
            kept.append(prefix)
            continue
        inside = [(n, dev) for lo, hi, n, dev in near if lo <= first and last <= hi]
        covers = [(n, dev) for lo, hi, n, dev in near
                  if first <= lo and hi <= last and (lo, hi) != (first, last)]
        for lan_net, dev in covers:
            log.info("LAN %s on %s stays directly reachable (more specific than AllowedIPs %s)",
                     lan_net, dev, prefix)
        if inside:
            lan_net, dev = inside[0]
            if lan == "direct":
                log.warning("AllowedIPs %s lies inside the directly connected network %s on "
                            "%s: not routed through the tunnel, so the LAN stays reachable "
                            "(lan = \"tunnel\" routes it anyway)", prefix, lan_net, dev)
                continue
            log.info("AllowedIPs %s lies inside the LAN %s on %s: routed through the tunnel "
                     "(lan = \"tunnel\")", prefix, lan_net, dev)
        kept.append(prefix)
    return tuple(kept)
