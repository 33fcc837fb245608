"""Crash recovery against the in-memory host (no network): what a journal
of a dead instance becomes when part of its undo fails."""

from __future__ import annotations

import functools
import ipaddress
import logging
from pathlib import Path

import trio

from tunsup.engine.effects import Address, Effect, EffectContext, KillSwitch, Routes, Rule
from tunsup.engine.journal import effect_to_dict, encode_line, journal_name, read_journal
from tunsup.engine.recovery import recover
from tunsup.engine.undo import EffectStack
from tunsup.host import PolicyRule
from tunsup.testing import FakeHost, Fault, uapi_dir
from tunsup.testing.fakehost import FakeNet

#: No such process: the journal's owner is dead.
DEAD = (4_000_000, 1)


def test_leftovers_keep_their_tunnel_names(tmp_path: Path) -> None:
    """Issue 10 item 18: the journal rewritten with what could not be undone
    named every leftover's tunnel "?" (keyed by ``id()`` of objects rebuilt
    on each call), so later recoveries could not say whose it was.  Both
    kinds of leftover keep their tunnel: an applied record and an intent
    whose outcome was never recorded."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    routes = Routes("wga", 7, 254, (ipaddress.ip_network("198.51.100.0/24"),))
    address = Address("wgb", 8, ipaddress.ip_interface("10.9.0.1/24"))
    lines = [
        {"op": "open", "pid": DEAD[0], "start_time": DEAD[1], "version": 1, "created": 0},
        {"op": "intent", "seq": 1, "tunnel": "wga", "effect": effect_to_dict(routes)},
        {"op": "applied", "seq": 1, "record": effect_to_dict(routes)},
        {"op": "intent", "seq": 2, "tunnel": "wgb", "effect": effect_to_dict(address)},
    ]
    path = state / journal_name(*DEAD)
    path.write_bytes(b"".join(encode_line(line) for line in lines))

    with uapi_dir() as sockets:
        fake = FakeHost(sockets)
        fake.faults.extend([Fault("delete_routes", times=None),
                            Fault("delete_address", times=None)])
        report = trio.run(recover, str(state), fake.host)

    assert len(report.failures) == 2, report
    left = read_journal(str(path))
    assert [(s.tunnel, s.intent.describe()) for s in left.steps] == [
        ("wga", routes.describe()), ("wgb", address.describe())]
    assert [s.record is not None for s in left.steps] == [True, False]


def _dead_journal(state: Path, steps: list[tuple[str, Effect]]) -> Path:
    """A dead instance's journal in which every effect of ``steps`` was applied."""
    lines: list[dict[str, object]] = [
        {"op": "open", "pid": DEAD[0], "start_time": DEAD[1], "version": 1, "created": 0}]
    for seq, (tunnel, effect) in enumerate(steps, 1):
        lines += [{"op": "intent", "seq": seq, "tunnel": tunnel, "effect": effect_to_dict(effect)},
                  {"op": "applied", "seq": seq, "record": effect_to_dict(effect)}]
    path = state / journal_name(*DEAD)
    path.write_bytes(b"".join(encode_line(line) for line in lines))
    return path


NET_A = ipaddress.ip_network("198.51.100.0/24")
NET_B = ipaddress.ip_network("203.0.113.0/24")
DEFAULT = ipaddress.ip_network("0.0.0.0/0")


def test_kept_kill_switch_stays_journaled_until_a_cleanup_removes_it(tmp_path: Path) -> None:
    """Issue 13 item 2: recovery for a run that starts wga again keeps wga's
    kill switch and the rule leading to it (on the host and in the journal),
    undoes the rest, and removes wgb's (no longer configured).  If the run
    dies before its own stands, a plain cleanup still finds and removes it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    rule = PolicyRule(4, 32765, 51820, fwmark=51820, invert=True)
    path = _dead_journal(state, [
        ("wga", KillSwitch("wga", 51820, (DEFAULT,))),
        ("wga", Rule("wga", rule)),
        ("wga", Routes("wga", 7, 254, (NET_A,))),
        ("wgb", KillSwitch("wgb", 254, (NET_B,))),
    ])
    with uapi_dir() as sockets:
        fake = FakeHost(sockets)
        net = fake.host.net
        assert isinstance(net, FakeNet)
        net.unreachable |= {(51820, DEFAULT), (254, NET_B)}
        net.policy_rules.append(rule)
        report = trio.run(functools.partial(recover, str(state), fake.host,
                                            keep={"wga"}.__contains__))
        assert report.complete and len(report.kept) == 2, report
        assert net.unreachable == {(51820, DEFAULT)}
        assert net.policy_rules == [rule]
        left = read_journal(str(path))
        assert [(s.tunnel, type(s.record).__name__) for s in left.steps] == [
            ("wga", "KillSwitch"), ("wga", "Rule")]

        report = trio.run(recover, str(state), fake.host)
        assert report.complete and not report.kept, report
        assert net.unreachable == set() and net.policy_rules == []
        assert not path.exists()


def test_adopted_kill_switch_is_handed_over_then_dropped(tmp_path: Path) -> None:
    """The new tunnel's kill switch finds the adopted routes already there:
    it owns them from then on (a drop of the old one leaves them, the new
    one's undo removes them); what it does not take over goes at the drop,
    and the dead instance's journal with it."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = _dead_journal(state, [("wga", KillSwitch("wga", 254, (NET_A, NET_B)))])
    with uapi_dir() as sockets:
        fake = FakeHost(sockets)
        net = fake.host.net
        assert isinstance(net, FakeNet)
        net.unreachable |= {(254, NET_A), (254, NET_B)}

        async def main() -> None:
            report = await recover(str(state), fake.host, keep={"wga"}.__contains__)
            adoption = report.adoption
            assert adoption is not None and adoption.tunnels == {"wga"}
            async with trio.open_nursery() as nursery:
                ctx = EffectContext(host=fake.host, log=logging.getLogger("t"),
                                    nursery=nursery, adopted=adoption)
                stack = EffectStack(ctx, log=logging.getLogger("t"))
                record = await stack.apply(KillSwitch("wga", 254, (NET_A,)))
                assert isinstance(record, KillSwitch) and record.prefixes == (NET_A,)
                drop = await adoption.drop("wga")
                assert drop.complete and not adoption.tunnels
                assert net.unreachable == {(254, NET_A)}
                assert not path.exists()
                await stack.unwind(10)
                assert net.unreachable == set()

        trio.run(main)
