"""Crash recovery against the in-memory host (no network): what a journal
of a dead instance becomes when part of its undo fails."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import trio

from tunsup.engine.effects import Address, Routes
from tunsup.engine.journal import effect_to_dict, encode_line, journal_name, read_journal
from tunsup.engine.recovery import recover
from tunsup.testing import FakeHost, Fault, uapi_dir

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
