"""Many tunnels in one service (issue 13 items 4 and 5), against the
in-memory host: up/down cycles keep the supervisor's and the journal's
memory (and the journal file) bounded; compaction keeps exactly what is
pending."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tunsup.engine.journal import Journal, JournalObserver, compacted, read_journal
from tunsup.engine.restart import RestartPolicy
from tunsup.engine.supervisor import HISTORY_SIZE, Supervisor
from tunsup.engine.tunnel import Tunnel, TunnelOptions
from tunsup.testing import FakeHost, spec, uapi_dir


@pytest.fixture
def fake() -> Iterator[FakeHost]:
    with uapi_dir() as path:
        yield FakeHost(path)


def options(**changes: Any) -> TunnelOptions:
    settings: dict[str, Any] = {
        "helper": ("fake-wg",), "tun_header": "none", "stop_grace": 2.0,
        "restart": RestartPolicy(backoff_initial=0.2, backoff_max=5.0)}
    return TunnelOptions(**{**settings, **changes})


def _cycles(fake: FakeHost, state: str, cycles: int, checkpoints: tuple[int, ...],
            ) -> dict[int, dict[str, Any]]:
    """Run a service-like supervisor with a journal and one tunnel; take a
    second tunnel up and down ``cycles`` times; at each checkpoint, count
    live objects and record the journal's size."""
    out: dict[int, dict[str, Any]] = {}

    async def main() -> None:
        journal = Journal(state, os.getpid(), 1, compact_min=16 * 1024)

        def make(s: Any, o: TunnelOptions) -> Tunnel:
            return Tunnel(s, fake.host, o, observer=JournalObserver(journal, s.name))

        sup = Supervisor([make(spec("wgt0"), options())], fake.host, handle_signals=False,
                         persistent=True, make_tunnel=make, journal=journal)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await sup.ready.wait()
            for i in range(cycles + 1):
                if i in checkpoints:
                    # The fake host's own records are not tunsup's.
                    fake.net.ops.clear()
                    fake.started[:] = [h for h in fake.started if not h.exited.is_set()]
                    fake.requests.clear()
                    fake.net.deleted.clear()
                    gc.collect()
                    objects = gc.get_objects()
                    out[i] = {
                        "objects": len(objects),
                        "tunnels": sum(isinstance(o, Tunnel) for o in objects),
                        "history": len(sup.history),
                        "journal": os.path.getsize(journal.path),
                        "queued": len(journal._queue),
                    }
                    del objects
                if i == cycles:
                    break
                await sup.add(spec("wgt1"), options())
                await sup.remove("wgt1")
            sup.stop()

    trio.run(main)
    return out


def test_up_down_cycles_keep_memory_and_the_journal_bounded(fake: FakeHost,
                                                            tmp_path: Path) -> None:
    """Before the fix every tunnel ever run stayed in ``history`` with its
    effect stacks (about 14 KB a cycle) and the journal only grew (2.8 KB
    a cycle)."""
    out = _cycles(fake, str(tmp_path), 300, (50, 300))
    first, last = out[50], out[300]
    assert last["history"] <= HISTORY_SIZE
    assert last["tunnels"] <= HISTORY_SIZE + 2, last
    # A leak of one tunnel per cycle is > 100 objects a cycle: 25,000 here.
    assert last["objects"] - first["objects"] < 2000, (first, last)
    # Compacted while running: a few times the compaction threshold at most.
    assert last["journal"] < 2 * 16 * 1024 + 8 * 1024, last
    assert last["queued"] == 0


def test_compaction_keeps_exactly_the_pending_steps(tmp_path: Path) -> None:
    """Reading a compacted journal gives the same pending steps (records,
    hooks, stale marks) as reading the whole one."""
    path = tmp_path / "journal-1-1.log"
    import ipaddress

    from tunsup.engine.effects import Address, LinkUp
    from tunsup.engine.journal import effect_to_dict, encode_line

    lines = [encode_line({"op": "open", "pid": 1, "start_time": 1, "version": 1,
                          "created": 0.0})]
    seq = 0
    for cycle in range(20):
        for name in ("a", "b"):
            for effect in (LinkUp(name, 7 + cycle), Address(
                    name, 7 + cycle, ipaddress.ip_interface(f"10.0.{cycle}.1/24"))):
                seq += 1
                lines.append(encode_line({"op": "intent", "seq": seq, "tunnel": name,
                                          "effect": effect_to_dict(effect)}))
                lines.append(encode_line({"op": "applied", "seq": seq,
                                          "record": effect_to_dict(effect)}))
                if name == "a" or cycle < 19:
                    lines.append(encode_line({"op": "undone", "seq": seq}))
    path.write_bytes(b"".join(lines))
    before = read_journal(str(path))
    kept = compacted(lines)
    assert kept is not None and len(kept) < len(lines) // 5
    small = tmp_path / "journal-1-1.compact.log"
    small.write_bytes(b"".join(kept))
    after = read_journal(str(small))
    assert [attrs.evolve(s) for s in after.steps] == [s for s in before.steps if not s.undone]
    assert [(s.seq, e) for s, e in after.pending()] == [(s.seq, e) for s, e in before.pending()]
