"""Reload in place (issue 14), against the in-memory host of ``fakehost``
under ``MockClock``: the diff, the in-place effects and their order, the
rollback of a failed in-place step, and a rebuild that holds the tunnel's
prefixes until the new tunnel routes them."""

from __future__ import annotations

import copy
import functools
import ipaddress
import random
from pathlib import Path
from typing import Any, ClassVar

import attrs
import pytest
import trio
import trio.testing

from tunsup import ExitCode
from tunsup.config.keys import Key
from tunsup.config.spec import Endpoint, PeerSpec, TunnelSpec
from tunsup.engine.reload import rebuild_reason
from tunsup.engine.restart import RestartPolicy, RestartTracker
from tunsup.engine.supervisor import Change, ChangeFailed, StartFailed, Supervisor
from tunsup.engine.tunnel import Tunnel, TunnelOptions, TunnelState
from tunsup.host import uapi
from tunsup.host.dns import FileBackend
from tunsup.testing import Behaviour, FakeHost, spec
from tunsup.testing.fakehost import PEER, Fault

from .test_supervision import assert_host_restored, options

net = ipaddress.ip_network
OTHER = Key.generate_private().public_key()


def with_allowed(base: TunnelSpec, *prefixes: str) -> TunnelSpec:
    peer = attrs.evolve(base.peers[0], allowed_ips=tuple(net(p) for p in prefixes))
    return attrs.evolve(base, peers=(peer,))


def routes(fake: FakeHost, name: str = "wgt0") -> set[tuple[int, Any]]:
    link = fake.net.by_name(name)
    assert link is not None
    return set(link.routes)


def run_changes(fake: FakeHost, base: TunnelSpec, opts: TunnelOptions, steps: list[Any]
                ) -> tuple[ExitCode, list[Any]]:
    """Run ``base``; for each step (a spec, or a (spec, options) pair, or a
    callable taking the supervisor) call ``add`` and record its result or
    error with the host's routes after it; then stop."""
    seen: list[Any] = []

    async def main() -> ExitCode:
        tunnel = Tunnel(base, fake.host, opts)
        sup = Supervisor([tunnel], fake.host, handle_signals=False, persistent=True)
        result: dict[str, ExitCode] = {}
        async with trio.open_nursery() as nursery:
            async def runner() -> None:
                result["code"] = await sup.run()

            nursery.start_soon(runner)
            await sup.ready.wait()
            for step in steps:
                if callable(step):
                    got: Any = await step(sup)
                    seen.append(got)
                    continue
                new, new_opts = step if isinstance(step, tuple) else (step, opts)
                try:
                    got = await sup.add(new, new_opts)
                except Exception as exc:
                    got = exc
                link = fake.net.by_name(base.name)
                seen.append((got, set(link.routes) if link else None,
                             len(fake.started), copy.deepcopy(fake.net.state())))
            sup.stop("test over")
        return result["code"]

    code = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    return code, seen


# ------------------------------------------------------------------ the diff


def test_render_change_sends_only_what_differs_and_swapping_gives_the_inverse() -> None:
    old = with_allowed(spec(), "198.51.100.0/24")
    new = with_allowed(old, "198.51.100.0/24", "203.0.113.0/24")
    eps = {PEER: ("192.0.2.2", 51820)}
    request = uapi.render_change(old, new, eps, eps)
    assert request is not None
    lines = request.decode().rstrip("\n").splitlines()
    assert lines[0] == "set=1" and "replace_peers=true" not in lines
    assert f"public_key={PEER.hex()}" in lines and "replace_allowed_ips=true" in lines
    assert lines[-2:] == ["allowed_ip=198.51.100.0/24", "allowed_ip=203.0.113.0/24"]
    assert not any(x.startswith(("private_key", "listen_port", "fwmark")) for x in lines)
    inverse = uapi.render_change(new, old, eps, eps)
    assert inverse is not None and inverse.decode().rstrip("\n").splitlines()[-1] == \
        "allowed_ip=198.51.100.0/24"
    assert uapi.render_change(old, old, eps, eps) is None
    # Peer added and removed; keepalive and endpoint changes.
    added = attrs.evolve(old, peers=(*old.peers, PeerSpec(public_key=OTHER,
                                                          allowed_ips=(net("10.1.0.0/16"),))))
    text = (uapi.render_change(old, added, eps, eps) or b"").decode()
    assert f"public_key={OTHER.hex()}" in text and f"public_key={PEER.hex()}" not in text
    text = (uapi.render_change(added, old, eps, eps) or b"").decode()
    assert f"public_key={OTHER.hex()}\nremove=true" in text
    kept = attrs.evolve(old, peers=(attrs.evolve(old.peers[0], persistent_keepalive=25),))
    assert "persistent_keepalive_interval=25" in (uapi.render_change(old, kept, eps, eps)
                                                  or b"").decode()
    moved = {PEER: ("192.0.2.3", 51820)}
    assert "endpoint=192.0.2.3:51820" in (uapi.render_change(old, old, eps, moved)
                                          or b"").decode()


def test_rebuild_reasons() -> None:
    base, opts = spec(), options()
    assert rebuild_reason(base, opts, with_allowed(base, "10.0.0.0/8"), opts) is None
    assert rebuild_reason(base, opts, attrs.evolve(base, mtu=1300,
                                                   post_up=("true",)), opts) is None
    assert rebuild_reason(base, opts, base, options(helper=("other",))) == \
        "option helper changed"
    assert rebuild_reason(base, opts, base, options(tun_mode="helper")) == \
        "option tun_mode changed"
    assert "full-tunnel" in (rebuild_reason(base, opts, with_allowed(base, "0.0.0.0/0"), opts)
                             or "")
    dns = attrs.evolve(base, dns_servers=(ipaddress.ip_address("10.9.0.53"),))
    assert rebuild_reason(base, opts, dns, opts) is None
    assert rebuild_reason(dns, opts, base, opts) == "DNS removed"


# ------------------------------------------------------------------ in place


def test_allowed_ips_added_then_removed_in_place_make_before_break(fake: FakeHost) -> None:
    base = spec()
    wider = with_allowed(base, "198.51.100.0/24", "203.0.113.0/24")
    code, seen = run_changes(fake, base, options(), [wider, base])
    assert code == ExitCode.OK
    (first, routes1, helpers1, _), (second, routes2, helpers2, _) = seen
    assert isinstance(first[1], Change) and first[1].in_place is not None
    assert "routes +1/-0" in first[1].in_place and "peers +0/-0/~1" in first[1].in_place
    assert routes1 == {(254, net("198.51.100.0/24")), (254, net("203.0.113.0/24"))}
    assert isinstance(second[1], Change) and second[1].in_place is not None
    assert "routes +0/-1" in second[1].in_place
    assert routes2 == {(254, net("198.51.100.0/24"))}
    assert helpers1 == helpers2 == 1, "the helper was replaced"
    # The UAPI change is a diff (no replace_peers), then its way back.
    changes = [b for b in fake.bodies if b.startswith("set=1") and "replace_peers" not in b]
    assert len(changes) == 2
    assert "allowed_ip=203.0.113.0/24" in changes[0]
    assert "allowed_ip=203.0.113.0/24" not in changes[1]
    assert_host_restored(fake)


def test_make_before_break_order_of_host_operations(fake: FakeHost) -> None:
    base = spec()
    moved = with_allowed(base, "203.0.113.0/24")
    run_changes(fake, base, options(), [moved])
    ops = fake.ops
    start = max(i for i, op in enumerate(ops) if op == "connected_networks")
    during = ops[start:]
    assert during.index("add_routes") < during.index("delete_routes"), during


def test_addresses_mtu_peer_and_dns_free_changes_in_place(fake: FakeHost) -> None:
    base = spec()
    new = attrs.evolve(
        base, mtu=1280,
        addresses=(ipaddress.ip_interface("10.9.1.1/24"),),
        peers=(*base.peers, PeerSpec(public_key=OTHER, allowed_ips=(net("10.77.0.0/16"),),
                                     endpoint=Endpoint("192.0.2.9", 51820))))
    code, seen = run_changes(fake, base, options(), [new, base])
    assert code == ExitCode.OK
    (first, _, helpers, state1), (second, routes2, _, state2) = seen
    what = first[1].in_place
    assert "MTU 1420->1280" in what and "addresses +1/-1" in what and "peers +1/-0/~0" in what
    assert state1["wgt0"]["mtu"] == 1280
    assert state1["wgt0"]["addresses"] == {ipaddress.ip_interface("10.9.1.1/24")}
    assert (254, net("10.77.0.0/16")) in seen[0][1]
    assert helpers == 1
    assert "MTU 1280->1420" in second[1].in_place
    assert state2["wgt0"]["addresses"] == {ipaddress.ip_interface("10.9.0.1/24")}
    assert routes2 == {(254, net("198.51.100.0/24"))}
    assert_host_restored(fake)


def test_stop_after_changes_restores_the_host(fake: FakeHost) -> None:
    """The unwind walks back through every in-place record: stopping a
    tunnel that was changed twice (without changing back) leaves nothing."""
    base = spec()
    one = attrs.evolve(with_allowed(base, "203.0.113.0/24", "10.50.0.0/16"),
                       addresses=(*base.addresses, ipaddress.ip_interface("10.9.2.1/24")),
                       mtu=1300)
    two = with_allowed(one, "10.60.0.0/16")
    code, seen = run_changes(fake, base, options(kill_switch=True), [one, two])
    assert code == ExitCode.OK
    assert seen[1][1] == {(254, net("10.60.0.0/16"))}
    assert seen[1][3]["#unreachable"] == {(254, net("10.60.0.0/16"))}
    assert_host_restored(fake)
    assert fake.net.unreachable == set()


def test_failed_in_place_step_rolls_back_to_the_running_spec(fake: FakeHost) -> None:
    """The old route's removal fails: the new route added before it is
    removed again, the WireGuard change is reversed, the answer is a
    ChangeFailed and the tunnel keeps running its old configuration."""
    base = spec()
    moved = attrs.evolve(with_allowed(base, "203.0.113.0/24"), mtu=1300)

    fake.faults.append(Fault(op="delete_routes", nth=1))
    code, seen = run_changes(fake, base, options(), [moved, moved])
    assert code == ExitCode.OK
    failed, routes1, helpers, state1 = seen[0]
    assert isinstance(failed, ChangeFailed) and failed.restored, failed
    assert "rolled back" in str(failed)
    assert routes1 == {(254, net("198.51.100.0/24"))}
    assert state1["wgt0"]["mtu"] == 1420
    assert helpers == 1
    inverse = [b for b in fake.bodies if "replace_peers" not in b and b.startswith("set=1")]
    assert len(inverse) >= 2 and "allowed_ip=198.51.100.0/24" in inverse[1]
    # The running spec is still the old one: the same change applies next time.
    again = seen[1][0]
    assert isinstance(again[1], Change) and again[1].in_place is not None
    assert seen[1][1] == {(254, net("203.0.113.0/24"))}
    assert_host_restored(fake)


# ------------------------------------------------------------------ rebuild


def test_rebuild_holds_the_prefixes_until_the_new_tunnel_routes_them(fake: FakeHost) -> None:
    base = spec()
    code, seen = run_changes(fake, base, options(), [(base, options(helper=("fake-wg2",)))])
    assert code == ExitCode.OK
    _tunnel, change = seen[0][0]
    assert isinstance(change, Change) and change.rebuilt == "option helper changed"
    assert seen[0][2] == 2, "a rebuild starts a new helper"
    ops = fake.ops
    # The hold (unreachable add) comes before the old link's delete, and
    # goes after the new tunnel's routes.
    hold = ops.index("add_routes")
    first_delete = ops.index("delete_link")
    assert hold < first_delete
    assert seen[0][3]["#unreachable"] == set(), "the hold was left behind"
    assert_host_restored(fake)


def test_a_helper_restarted_after_a_change_gets_the_new_configuration(fake: FakeHost) -> None:
    base = spec()
    wider = with_allowed(base, "198.51.100.0/24", "203.0.113.0/24")

    async def kill_helper(sup: Supervisor) -> int:
        tunnel = sup.slots()[0].tunnel
        fake.current.die(1)
        await tunnel.wait_state(TunnelState.RESTARTING)
        await tunnel.wait_state(TunnelState.UP)
        return tunnel.restarts

    code, seen = run_changes(fake, base, options(), [wider, kill_helper])
    assert code == ExitCode.OK and seen[1] == 1
    full = [b for b in fake.bodies if "replace_peers=true" in b]
    assert len(full) == 2
    assert "allowed_ip=203.0.113.0/24" in full[1], "the restarted helper got the old peers"
    assert seen[0][1] == {(254, net("198.51.100.0/24")), (254, net("203.0.113.0/24"))}
    assert_host_restored(fake)


def test_a_rebuild_whose_start_fails_removes_the_hold_and_reports_it(fake: FakeHost) -> None:
    """The new helper crashes at once: the change is a StartFailed naming
    the new tunnel (its host changes undone), the hold routes are gone, and
    the host is as it was before the tunnel came up.  The tunnel is listed
    as failed (found from outside: it vanished from ``status``)."""
    base = spec()

    async def crash_next(sup: Supervisor) -> None:
        fake.plan.append(Behaviour.CRASH)

    async def listed(sup: Supervisor) -> list[str]:
        return [s.tunnel.name for s in sup.failed()]

    code, seen = run_changes(fake, base, options(),
                             [crash_next, (base, options(helper=("fake-wg2",))), listed])
    assert seen[2] == ["wgt0"], seen[2]
    failed = seen[1][0]
    assert isinstance(failed, StartFailed), failed
    assert failed.tunnel.options.helper == ("fake-wg2",)
    assert seen[1][3]["#unreachable"] == set()
    assert seen[1][1] is None, "the interface outlived a failed rebuild"
    assert code == ExitCode.OK
    assert_host_restored(fake)


# ------------------------------------------------------------------ DNS shared


def test_failed_change_after_its_dns_step_restores_the_previous_shared_dns(
        fake: FakeHost, tmp_path: Path) -> None:
    """Two tunnels share one resolv.conf.  wgt0's in-place change sets new
    DNS, then its last step (removing its old address) fails: the rollback
    names every step it undid, the file holds exactly what it held before
    (both tunnels' servers, wgt0's previous ones in place), and the stop
    gives back the original bytes."""
    path = tmp_path / "resolv.conf"
    original = b"nameserver 192.0.2.53\n"
    path.write_bytes(original)
    fake.host = attrs.evolve(fake.host, dns_backend=lambda kind: FileBackend(str(path)))
    dns = (ipaddress.ip_address("10.9.0.53"),)
    base0 = attrs.evolve(spec("wgt0"), dns_servers=dns, dns_search=("zero.example",))
    base1 = attrs.evolve(spec("wgt1"), dns_servers=(ipaddress.ip_address("10.9.1.53"),))
    changed = attrs.evolve(base0, dns_servers=(ipaddress.ip_address("10.9.0.54"),),
                           addresses=(ipaddress.ip_interface("10.9.5.1/24"),))
    opts = options(dns_backend="file")
    seen: dict[str, Any] = {}

    async def main() -> None:
        tunnels = [Tunnel(s, fake.host, opts) for s in (base0, base1)]
        sup = Supervisor(tunnels, fake.host, handle_signals=False, persistent=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await sup.ready.wait()
            seen["before"] = path.read_bytes()
            fake.faults.append(Fault(op="delete_address", nth=1))
            with pytest.raises(ChangeFailed) as failed:
                await sup.add(changed, opts)
            seen["failed"] = failed.value
            seen["after"] = path.read_bytes()
            seen["addresses"] = fake.net.state()["wgt0"]["addresses"]
            sup.stop("test over")

    trio.run(main)
    before = seen["before"]
    assert b"10.9.0.53" in before and b"10.9.1.53" in before
    failed = seen["failed"]
    assert failed.restored
    assert seen["after"] == before, "the rollback dropped or changed the shared DNS"
    assert seen["addresses"] == {ipaddress.ip_interface("10.9.0.1/24")}
    # Exactly the steps applied before the failure, most recent first.
    assert failed.rolled_back == ("DNS change of wgt0 (file)",
                                  "address 10.9.5.1/24 on wgt0"), failed.rolled_back
    assert str(failed).endswith("rolled back: DNS change of wgt0 (file); "
                                "address 10.9.5.1/24 on wgt0"), str(failed)
    assert path.read_bytes() == original
    assert_host_restored(fake)


# ------------------------------------------------------------------ rollback report


def test_a_rollback_step_that_fails_is_named_and_reported_incomplete(fake: FakeHost) -> None:
    """The old route's removal fails, and so does the rollback's removal of
    the new route: the host is NOT as before, so the change is reported
    incomplete (the reload's exit 3, as a stop's), naming the failed undo
    step and every step rolled back.  The route left stays on the tunnel's
    stack: the stop removes it and the host ends restored."""
    base = spec()
    moved = attrs.evolve(with_allowed(base, "203.0.113.0/24"), mtu=1300)
    opts = options()
    seen: dict[str, Any] = {}

    async def main() -> None:
        tunnel = Tunnel(base, fake.host, opts)
        sup = Supervisor([tunnel], fake.host, handle_signals=False, persistent=True)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await sup.ready.wait()
            fake.faults.append(Fault(op="delete_routes", times=2))
            seen["result"] = await sup.converge([(moved, opts)])
            seen["routes"] = routes(fake)
            sup.stop("test over")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    result = seen["result"]
    assert result.incomplete == ("wgt0",), result
    (name, why), = result.failed
    assert name == "wgt0"
    assert "rollback incomplete: undo 1 route(s) via wgt0 in table 254: " in why, why
    assert ("(rolled back: WireGuard change of wgt0 (peers +0/-0/~1); "
            "MTU 1420 -> 1300 on wgt0)") in why, why
    # The new route could not be removed: the host is not as before ...
    assert seen["routes"] == {(254, net("198.51.100.0/24")), (254, net("203.0.113.0/24"))}
    # ... and the stop, trying again, restores it.
    assert_host_restored(fake)


def test_reload_exit_code_is_3_when_a_tunnels_undo_was_incomplete() -> None:
    """The client maps the answer's ``incomplete`` to exit 3 (as a stop
    whose teardown was incomplete), a plain failure to 1."""
    from tunsup.control import client

    answers: list[dict[str, Any]] = [
        {"failed": {"wgt0": "x"}, "incomplete": ["wgt0"]}, {"failed": {"wgt0": "x"}},
        {"changed": {"wgt0": "DNS"}}]
    codes = []

    class Conn:
        """The control connection (the OS boundary), answering ``answer``."""

        answer: ClassVar[dict[str, Any]] = {}

        def __enter__(self) -> Conn:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def request(self, op: str, **kw: Any) -> dict[str, Any]:
            return self.answer

    original = client._connect_or_report
    client._connect_or_report = lambda *a, **k: Conn()  # type: ignore[assignment]
    try:
        for answer in answers:
            Conn.answer = answer
            codes.append(client.reload("/nonexistent"))
    finally:
        client._connect_or_report = original
    assert codes == [ExitCode.TEARDOWN_INCOMPLETE, ExitCode.FAILURE, ExitCode.OK]


def test_a_removed_endpoint_recreates_that_peer_in_one_request(fake: FakeHost) -> None:
    """UAPI cannot unset an endpoint: the peer whose Endpoint line was
    deleted is removed and added again in the same ``set=1`` (what
    wireguard-go applies as one, see the netns test), and the answer says
    so; the other peer is untouched."""
    base = attrs.evolve(spec(), peers=(
        attrs.evolve(spec().peers[0], endpoint=Endpoint("192.0.2.2", 51820)),
        PeerSpec(public_key=OTHER, allowed_ips=(net("10.77.0.0/16"),),
                 endpoint=Endpoint("192.0.2.9", 51820))))
    gone = attrs.evolve(base, peers=(attrs.evolve(base.peers[0], endpoint=None),
                                     base.peers[1]))
    code, seen = run_changes(fake, base, options(), [gone, base])
    assert code == ExitCode.OK
    first, second = seen[0][0][1], seen[1][0][1]
    assert "1 peer(s) re-created (Endpoint removed" in first.in_place, first
    assert "re-created" not in second.in_place, second
    assert seen[0][2] == 1, "the helper was replaced"
    change = next(b for b in fake.bodies if b.startswith("set=1") and "replace_peers" not in b)
    lines = change.rstrip("\n").splitlines()
    i = lines.index(f"public_key={PEER.hex()}")
    assert lines[i + 1] == "remove=true" and lines[i + 2] == f"public_key={PEER.hex()}"
    assert not any(x.startswith("endpoint=") for x in lines)
    assert f"public_key={OTHER.hex()}" not in lines
    assert_host_restored(fake)


def test_a_full_tunnels_rebuild_holds_its_default_route_and_rules(fake: FakeHost) -> None:
    """A full tunnel (0.0.0.0/0, Table = auto) rebuilt: before the old
    tunnel goes down, the hold adds an unreachable default to its table
    and ``fwmark 0`` copies of its rules; the new tunnel takes the same
    table and priorities (its route takes the held traffic over at once);
    then the hold goes, leaving exactly the rules of before."""
    base = with_allowed(spec(), "0.0.0.0/0")
    code, seen = run_changes(fake, base, options(),
                             [(base, options(helper=("fake-wg2",))),
                              (base, options(helper=("fake-wg3",)))])
    assert code == ExitCode.OK
    first, second = seen
    assert isinstance(first[0][1], Change) and first[0][1].rebuilt == "option helper changed"
    rules = first[3]["#rules"]
    assert [(r.priority, r.table, r.fwmark, r.invert) for r in rules] == [
        (32765, 51820, 51820, True), (32764, 254, None, False)], rules
    assert second[3]["#rules"] == rules, "the priorities drifted"
    assert first[3]["#unreachable"] == set(), "the hold was left behind"
    ops = fake.ops
    # The first rebuild: the hold (route, then both rules) before the old
    # tunnel's link goes; the new tunnel's rules before the hold's go.
    gone = ops.index("delete_link")
    hold = max(i for i in range(gone) if ops[i:i + 3] == ["add_routes", "add_rule", "add_rule"])
    assert "delete_rule" not in ops[hold:gone] and "add_rule" not in ops[hold + 3:gone]
    after = ops[gone:]
    old_gone = after.index("delete_rule")
    assert after[old_gone:old_gone + 2] == ["delete_rule", "delete_rule"]
    new_rules = after.index("add_rule")
    assert new_rules > old_gone and after[new_rules:new_rules + 2] == ["add_rule", "add_rule"]
    assert after[new_rules + 2:].count("delete_rule") >= 2
    assert_host_restored(fake)
    assert fake.net.policy_rules == []


def test_a_hold_left_by_a_crash_is_removed_by_recovery(fake: FakeHost, tmp_path: Path) -> None:
    """A full tunnel's hold journaled, then the process dies mid-rebuild:
    recovery (what ``cleanup`` runs) removes the hold's unreachable
    default and its rules, even for a tunnel about to start again (a hold
    is no protection the user asked for)."""
    import logging
    import os

    from tunsup.engine.effects import EffectContext, HeldRoutes, HeldRule
    from tunsup.engine.journal import Journal, JournalObserver
    from tunsup.engine.recovery import recover
    from tunsup.engine.undo import EffectStack
    from tunsup.host import PolicyRule

    state_dir = tmp_path / "state"

    async def crash() -> None:
        journal = Journal(str(state_dir), 2**22 + 13, 1)
        log = logging.getLogger("test")
        async with trio.open_nursery() as nursery:
            ctx = EffectContext(host=fake.host, log=log, nursery=nursery)
            stack = EffectStack(ctx, log=log, observer=JournalObserver(journal, "wgt0"))
            await stack.apply(HeldRoutes("wgt0", 51820, (net("0.0.0.0/0"),)))
            for priority, table, suppress in ((32765, 51820, None), (32764, 254, 0)):
                await stack.apply(HeldRule("wgt0", PolicyRule(
                    4, priority, table, fwmark=0, suppress_prefixlength=suppress)))
        await journal.close(remove=False)

    trio.run(crash)
    assert len(fake.net.policy_rules) == 2 and fake.net.unreachable
    report = trio.run(functools.partial(recover, str(state_dir), fake.host,
                                        me=(os.getpid(), 0), keep=lambda name: True))
    assert report.complete, report
    assert fake.net.policy_rules == [] and fake.net.unreachable == set()


# ------------------------------------------------------------------ restart policy


def test_a_changed_restart_policy_keeps_the_seeded_jitter(fake: FakeHost) -> None:
    """A reload that changes only the restart policy is made in place; the
    new policy's backoff must still draw its jitter from the tunnel's own
    (seeded) source, so that the next restart's delay is exactly the one
    the policy and the seed give."""
    seed = 20261201
    base, opts = spec(), options()
    policy = RestartPolicy(max_restarts=5, window=60.0, backoff_initial=4.0,
                           backoff_max=8.0, reset_after=30.0)
    changed = attrs.evolve(opts, restart=policy)
    seen: dict[str, float] = {}

    async def main() -> ExitCode:
        tunnel = Tunnel(base, fake.host, opts, rng=random.Random(seed))
        sup = Supervisor([tunnel], fake.host, handle_signals=False, persistent=True)
        result: dict[str, ExitCode] = {}
        async with trio.open_nursery() as nursery:
            async def runner() -> None:
                result["code"] = await sup.run()

            nursery.start_soon(runner)
            await sup.ready.wait()
            await sup.add(base, changed)
            assert sup.slots()[0].tunnel is tunnel, "the policy change was not made in place"
            dead = fake.current
            dead.die(1)
            await tunnel.wait_state(TunnelState.RESTARTING)
            await tunnel.wait_state(TunnelState.UP)
            assert dead.died_at is not None
            seen["backoff"] = fake.current.started_at - dead.died_at
            sup.stop("test over")
        return result["code"]

    code = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert code == ExitCode.OK
    expected = RestartTracker(policy, random.Random(seed)).failure(0.0)
    assert expected is not None
    assert seen["backoff"] == pytest.approx(expected, abs=1e-9), \
        "the backoff after the policy change did not come from the tunnel's seeded jitter"
    assert_host_restored(fake)


def test_the_tunnels_own_subnet_stays_routed_and_in_the_kill_switch(fake: FakeHost) -> None:
    """AllowedIPs 10.9.0.0/24 with the tunnel's address 10.9.0.1/24 in it:
    the tunnel's own subnet is no LAN.  An in-place change took it for one
    (the address's route on the tunnel's own link): every change took the
    prefix out of the kill switch, and moving the address out of it left
    the prefix routed nowhere (its traffic went to the LAN).  Now the
    prefix stays in the kill switch, and the address's route is replaced
    by tunsup's, the prefix held unreachable in between."""
    own = net("10.9.0.0/24")
    base = with_allowed(spec(), "198.51.100.0/24", "10.9.0.0/24")
    wider = with_allowed(base, "198.51.100.0/24", "10.9.0.0/24", "203.0.113.0/24")
    moved = attrs.evolve(wider, addresses=(ipaddress.ip_interface("10.9.9.1/24"),))
    async def ops_so_far(sup: Supervisor) -> list[str]:
        return list(fake.ops)

    code, seen = run_changes(fake, base, options(kill_switch=True), [wider, moved, ops_so_far])
    assert code == ExitCode.OK
    (first, routes1, _, state1), (second, routes2, _, state2), ops = seen
    assert isinstance(first[1], Change) and first[1].in_place is not None, first
    assert (254, own) in state1["#unreachable"], "the own subnet left the kill switch"
    assert (254, own) not in routes1  # the address's route serves it
    assert isinstance(second[1], Change) and second[1].in_place is not None, second
    assert "addresses +1/-1" in second[1].in_place and "routes +1/-0" in second[1].in_place
    assert (254, own) in routes2, "the prefix the old address covered is routed nowhere"
    assert (254, own) in state2["#unreachable"]
    # Held (unreachable) while the address's route gives way to tunsup's.
    hold = [op for op in ops if op in ("add_routes", "delete_address", "delete_routes")]
    assert hold[-4:] == ["add_routes", "delete_address", "add_routes", "delete_routes"], hold
    assert_host_restored(fake)


def test_an_automatic_mtu_stays_unless_its_setting_or_endpoints_change(fake: FakeHost) -> None:
    """Found from outside: a change of DNS alone changed an automatic MTU
    (1420 -> 1340): asked again, the route to the endpoint went through a
    full tunnel started meanwhile.  The MTU the start chose stays until
    the MTU setting or the endpoints change."""
    base = spec()
    dns_only = attrs.evolve(base, dns_servers=(ipaddress.ip_address("10.9.0.53"),))
    endpoint = attrs.evolve(dns_only, peers=(attrs.evolve(
        dns_only.peers[0], endpoint=Endpoint("192.0.2.7", 51820)),))

    async def full_tunnel_meanwhile(sup: Supervisor) -> None:
        async def through_a_tunnel(dst: object) -> int:
            return 1420

        fake.net.route_mtu = through_a_tunnel  # type: ignore[method-assign,assignment]

    code, seen = run_changes(fake, base, options(dns_backend="none"),
                             [full_tunnel_meanwhile, dns_only, endpoint])
    assert code == ExitCode.OK
    _, (first, _, _, state1), (second, _, _, state2) = seen
    assert isinstance(first[1], Change) and first[1].in_place is not None, first
    assert "MTU" not in first[1].in_place and state1["wgt0"]["mtu"] == 1420, first[1]
    assert isinstance(second[1], Change) and second[1].in_place is not None, second
    assert "MTU 1420->1340" in second[1].in_place and state2["wgt0"]["mtu"] == 1340


def test_an_endpoint_zone_naming_no_interface_is_said_with_its_line(fake: FakeHost) -> None:
    """Found from outside: ``Endpoint = [fe80::1%eth0]:51820`` where there
    is no eth0 passed ``check`` and failed the start with wireguard-go's
    bare EINVAL, after changes were made.  The start now fails first,
    naming the file, line and interface (``check`` too: test_input)."""
    base = spec()
    zoned = attrs.evolve(base, peers=(attrs.evolve(
        base.peers[0], endpoint=Endpoint("fe80::1%nosuch0", 51820), endpoint_line=7),))

    async def main() -> tuple[ExitCode, str]:
        tunnel = Tunnel(zoned, fake.host, options())
        code = await Supervisor([tunnel], fake.host, handle_signals=False).run()
        return code, str(tunnel.failure)

    code, failure = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert code == ExitCode.FAILURE
    assert f"{base.source}:7: endpoint [fe80::1%nosuch0]:51820: no network interface " \
           "'nosuch0' here" in failure, failure
    assert "start_helper" not in fake.ops  # nothing was started for it
    assert_host_restored(fake)


def test_removing_the_last_ipv4_address_rebuilds(fake: FakeHost) -> None:
    """Found by an independent review: with its last IPv4 address a link
    loses every IPv4 route through it (the fake host does as the kernel),
    so moving a tunnel with IPv4 AllowedIPs to IPv6 addresses only, in
    place, left it up without its IPv4 routes: their traffic went to the
    LAN.  Such a change is a rebuild (make-before-break, prefixes held)."""
    v6 = ipaddress.ip_interface("fd00:9::1/64")
    base = attrs.evolve(spec(), addresses=(*spec().addresses, v6))
    only_v6 = attrs.evolve(base, addresses=(v6,))
    assert rebuild_reason(base, options(), only_v6, options()) == (
        "its last IPv4 address removed (the kernel takes every IPv4 route of the link with it)")
    assert rebuild_reason(base, options(), with_allowed(only_v6, "2001:db8::/64"),
                          options()) is None
    code, seen = run_changes(fake, base, options(), [only_v6])
    assert code == ExitCode.OK
    ((_, got), routes, _, _), = seen
    assert isinstance(got, Change) and got.rebuilt is not None, got
    assert routes == {(254, net("198.51.100.0/24"))}, routes
    assert_host_restored(fake)
