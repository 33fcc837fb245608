"""Many tunnels in one service (issue 13 items 4 and 5), against the
in-memory host: up/down cycles keep the supervisor's and the journal's
memory (and the journal file) bounded; compaction keeps exactly what is
pending."""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tunsup._errors import ExitCode
from tunsup.engine.journal import Journal, JournalObserver, compacted, read_journal
from tunsup.engine.supervisor import HISTORY_SIZE, Supervisor
from tunsup.engine.tunnel import Tunnel, TunnelOptions, TunnelState
from tunsup.testing import Behaviour, FakeHost, Fault, spec

from .test_supervision import options


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
                    fake.net.calls.clear()
                    fake.net.applied_calls.clear()
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


def test_compaction_keeps_records_as_written_without_decoding_their_effects() -> None:
    """What compaction keeps is decided by the records' kinds, steps and
    hooks, never by their effects, which it keeps as written: an effect
    this version cannot even decode is kept, byte for byte (decoding every
    route of every record was all of a compaction's cost)."""
    from tunsup.engine.journal import encode_line

    header = encode_line({"op": "open", "pid": 1, "start_time": 1, "version": 1,
                          "created": 0.0})
    future = {"kind": "not-yet-invented", "anything": [1, 2, 3]}
    kept = [encode_line({"op": "intent", "seq": 1, "tunnel": "a", "effect": future}),
            encode_line({"op": "applied", "seq": 1, "record": future})]
    dropped = [encode_line({"op": "intent", "seq": 2, "tunnel": "a", "effect": future}),
               encode_line({"op": "undone", "seq": 2})]
    assert compacted([header, kept[0], dropped[0], kept[1], dropped[1]]) == [header, *kept]


def test_journal_is_not_rewritten_while_nothing_was_undone(tmp_path: Path) -> None:
    """Only ``undone`` records let a compaction drop anything: a bring-up
    of many tunnels (intents and records only) crosses the threshold but
    does not rewrite the file (it used to, parsing every record meanwhile,
    while every append waited); the first ``undone`` records make it due
    again, and it keeps exactly the steps not undone."""
    import ipaddress

    from tunsup.engine.effects import Address

    state = str(tmp_path)
    effects = [Address(f"wg{i}", 7, ipaddress.ip_interface(f"10.0.{i}.1/24"))
               for i in range(60)]

    async def main() -> Journal:
        journal = Journal(state, os.getpid(), 1, compact_min=4 * 1024)
        observers = [JournalObserver(journal, e.ifname) for e in effects]
        for observer, effect in zip(observers, effects, strict=True):
            await observer.intent(effect)
            await observer.applied(effect, effect)
        assert journal.size > 3 * journal.compact_min
        assert journal.compactions == 0
        for observer, effect in list(zip(observers, effects, strict=True))[:50]:
            await observer.undone(effect)
        assert journal.compactions >= 1
        lines = (tmp_path / os.path.basename(journal.path)).read_bytes().count(b"\n")
        assert lines < 1 + 2 * len(effects) + 50  # some undone steps were dropped
        await journal.close(remove=False)
        return journal

    journal = trio.run(main)
    left = read_journal(journal.path)
    assert [s.intent for s in left.steps if not s.undone] == effects[50:]


def test_journal_is_compacted_only_once_half_of_it_is_undone(tmp_path: Path) -> None:
    """A compaction rewrites what is applied to drop what is undone: it is
    due only once the undone records are at least half of the file.  Before,
    anything undone made it due: a ``down`` next to a tunnel of 10,000
    routes rewrote their 660 KB record (130 ms) in the middle of its
    teardown to drop 1 KB (``tunsup down`` took 176 ms instead of ~35)."""
    import ipaddress

    from tunsup.engine.effects import Address, Routes

    state = str(tmp_path)
    big = Routes("wg0", 7, 254, tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")
                                      for i in range(2000)))
    small = [Address(f"wg{i}", 8, ipaddress.ip_interface(f"10.9.{i}.1/24")) for i in range(1, 9)]

    async def main() -> Journal:
        journal = Journal(state, os.getpid(), 1, compact_min=4 * 1024)
        observers = {e: JournalObserver(journal, e.ifname) for e in [big, *small]}
        for effect, observer in observers.items():
            await observer.intent(effect)
            await observer.applied(effect, effect)
        assert journal.size > 10 * journal.compact_min
        for effect in small:
            await observers[effect].undone(effect)
        assert journal.compactions == 0  # a few hundred bytes to drop
        await observers[big].undone(big)
        # It runs after the append that made it due (which does not wait
        # for it), before the next job of the journal's thread.
        await journal.close(remove=False)
        assert journal.compactions == 1
        return journal

    journal = trio.run(main)
    assert read_journal(journal.path).steps == ()
    assert os.path.getsize(journal.path) < 200  # the open record


def test_an_append_that_makes_a_compaction_due_does_not_wait_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The compaction is a job of its own on the journal's thread: the
    append whose record made it due (a teardown's last one, before the
    tunnel is reported down) returns without waiting for the rewrite; the
    next append waits for it.  Here the compacted file's fsync is held
    (the disk is slow) until the first append has returned."""
    import ipaddress
    import threading

    from tunsup.engine import journal as journal_mod
    from tunsup.engine.effects import Routes

    held = threading.Event()
    release = threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(journal_mod.COMPACT_SUFFIX):
            held.set()
            release.wait(5)
        real_fsync(fd)

    monkeypatch.setattr(journal_mod.os, "fsync", fsync)
    big = Routes("wg0", 7, 254, tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24")
                                      for i in range(2000)))
    order: list[str] = []

    async def main() -> None:
        journal = Journal(str(tmp_path), os.getpid(), 1, compact_min=4 * 1024)
        observer = JournalObserver(journal, "wg0")
        await observer.intent(big)
        await observer.applied(big, big)
        await observer.undone(big)
        order.append(f"undone returned after {journal.compactions} compaction(s)")
        await trio.to_thread.run_sync(held.wait, 10)
        order.append("compaction under way")
        release.set()
        await journal.close(remove=False)
        order.append(f"closed after {journal.compactions} compaction(s)")

    trio.run(main)
    assert order == ["undone returned after 0 compaction(s)", "compaction under way",
                     "closed after 1 compaction(s)"]


# --- concurrent starts and teardowns, bounded --------------------------------

#: Virtual seconds after which a test here has hung: everything runs under
#: ``MockClock(autojump_threshold=0)`` with no thread (FakeHost starts
#: none), so once every task waits the clock jumps to this deadline and
#: the test fails instead of hanging in real time.
HANG_LIMIT = 1000.0
#: Virtual seconds each helper start and each link deletion take.
STEP = 1.0


def _timed_run(fake: FakeHost, count: int, max_parallel: int) -> tuple[float, float, int]:
    """Run ``count`` tunnels under one supervisor whose every helper start
    and link deletion take STEP virtual seconds; return the virtual time
    from ``run`` to READY, from ``stop`` to the return, and the exit code."""
    fake.faults.append(Fault(op="start_helper", kind="delay", delay=STEP, times=None))
    fake.faults.append(Fault(op="delete_link", kind="delay", delay=STEP, times=None))
    times: dict[str, float] = {}

    async def main() -> int:
        tunnels = [Tunnel(spec(f"wgt{i}"), fake.host, options()) for i in range(count)]
        sup = Supervisor(tunnels, fake.host, handle_signals=False, max_parallel=max_parallel)
        async with trio.open_nursery() as nursery:
            began = trio.current_time()
            code: list[int] = []

            async def run() -> None:
                code.append(await sup.run())

            nursery.start_soon(run)
            await sup.ready.wait()
            times["up"] = trio.current_time() - began
            assert [t.state for t in tunnels] == [TunnelState.UP] * count
            stopping = trio.current_time()
            sup.stop("test over")
        times["stop"] = trio.current_time() - stopping
        return code[0]

    async def bounded() -> int:
        with trio.fail_after(HANG_LIMIT):
            return await main()

    code = trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))
    return times["up"], times["stop"], code


@pytest.mark.parametrize(("count", "max_parallel", "rounds"),
                         [(20, 4, 5), (20, 1, 20), (6, 16, 1)])
def test_starts_and_teardowns_run_concurrently_at_most_max_parallel_at_once(
        fake: FakeHost, count: int, max_parallel: int, rounds: int) -> None:
    """Issue 13 item 4: with every helper start (and link deletion) taking
    one virtual second, ``count`` tunnels come up (and go down) in
    ``ceil(count / max_parallel)`` seconds: concurrently, never more than
    ``max_parallel`` at once.  Virtual time under MockClock: exact, not a
    timing measurement."""
    up, stop, code = _timed_run(fake, count, max_parallel)
    assert code == ExitCode.OK
    assert rounds * STEP <= up < (rounds + 1) * STEP, up
    assert rounds * STEP <= stop < (rounds + 1) * STEP, stop
    assert fake.net.links == {} and fake.alive == set()


def _ops_of_a_start(fake: FakeHost, count: int, max_parallel: int
                    ) -> tuple[list[str], float, int]:
    """Start ``count`` tunnels under one supervisor (helper starts take STEP
    virtual seconds), stop; return the host operations up to READY, the
    virtual time to READY and the exit code."""
    fake.faults.append(Fault(op="start_helper", kind="delay", delay=STEP, times=None))
    seen: dict[str, Any] = {}

    async def main() -> int:
        tunnels = [Tunnel(spec(f"wgt{i}"), fake.host, options()) for i in range(count)]
        sup = Supervisor(tunnels, fake.host, handle_signals=False, max_parallel=max_parallel)
        code: list[int] = []
        async with trio.open_nursery() as nursery:
            began = trio.current_time()

            async def run() -> None:
                code.append(await sup.run())

            nursery.start_soon(run)
            await sup.ready.wait()
            seen["up"] = trio.current_time() - began
            seen["ops"] = list(fake.ops)
            assert [t.state for t in tunnels] == [TunnelState.UP] * count
            sup.stop("test over")
        return code[0]

    async def bounded() -> int:
        with trio.fail_after(HANG_LIMIT):
            return await main()

    code = trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))
    return seen["ops"], seen["up"], code


LINK_OPS = ("create_tun", "add_address", "set_link_up", "add_routes")


@pytest.mark.parametrize(("count", "max_parallel"), [(7, 3), (7, 1), (4, 16), (2, 4)])
def test_initial_tunnels_configure_every_link_before_any_helper_starts(
        fake: FakeHost, count: int, max_parallel: int) -> None:
    """Every wireguard-go wakes up for each link, address and route change
    in the namespace: the initial tunnels (owned TUN) put all their links
    in place before the first helper starts, so no helper sees another
    tunnel's changes.  Starts stay bounded: the helpers then start
    ``max_parallel`` at once (each takes STEP virtual seconds), in
    configuration order, and a tunnel waiting for the others holds no
    start slot (with ``max_parallel`` below the count this would otherwise
    never end)."""
    ops, up, code = _ops_of_a_start(fake, count, max_parallel)
    assert code == ExitCode.OK
    first_helper = ops.index("start_helper")
    link_changes = [i for i, op in enumerate(ops) if op in LINK_OPS]
    assert len(link_changes) == len(LINK_OPS) * count
    assert max(link_changes) < first_helper, ops
    assert ops.count("start_helper") == count
    # Slots taken again in configuration order: round by round (each
    # start takes STEP), the helpers of the next max_parallel tunnels.
    started = [h.argv[-1] for h in fake.started]
    names = [f"wgt{i}" for i in range(count)]
    assert [set(started[i:i + max_parallel]) for i in range(0, count, max_parallel)] == \
        [set(names[i:i + max_parallel]) for i in range(0, count, max_parallel)]
    rounds = -(-count // max_parallel)
    assert rounds * STEP <= up < (rounds + 1) * STEP, up
    assert_all_stopped(fake)


def test_a_single_initial_tunnel_starts_its_helper_while_its_link_is_configured(
        fake: FakeHost) -> None:
    """With one initial tunnel there is no other helper for its link
    changes to wake up: its helper starts while the link is configured (as
    an `up`'s does: the cold start of one tunnel, ~7 ms), and it still
    reaches READY with everything in place and stops cleanly."""
    # Installing the routes takes as long as starting the helper: one after
    # the other they would take 2 * STEP.
    fake.faults.append(Fault(op="add_routes", kind="delay", delay=STEP, times=None))
    ops, up, code = _ops_of_a_start(fake, 1, 4)
    assert code == ExitCode.OK
    assert ops.index("start_helper") < ops.index("add_routes"), ops
    assert all(op in ops for op in LINK_OPS)
    # The helper's start overlapped the link's configuration.
    assert STEP <= up < 2 * STEP, up
    assert_all_stopped(fake)


def test_a_tunnel_failing_before_the_helpers_start_stops_the_others_waiting(
        fake: FakeHost) -> None:
    """A tunnel whose link cannot be configured fails the initial start
    (as before): the tunnels already waiting for the others' links are
    cancelled and unwound, no helper ever started, nothing is left."""
    fake.faults.append(Fault(op="add_address", nth=3, kind="errno"))

    async def main() -> tuple[int, list[Tunnel]]:
        tunnels = [Tunnel(spec(f"wgt{i}"), fake.host, options()) for i in range(5)]
        sup = Supervisor(tunnels, fake.host, handle_signals=False, max_parallel=2)
        with trio.fail_after(HANG_LIMIT):
            return await sup.run(), tunnels

    code, tunnels = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert code == ExitCode.FAILURE
    assert "start_helper" not in fake.ops
    assert all(t.report is None or t.report.complete for t in tunnels)
    assert_all_stopped(fake)


def test_a_tunnel_started_alone_starts_its_helper_while_its_link_is_configured(
        fake: FakeHost) -> None:
    """Owned TUN, no other tunnel starting with it (an `up`): the helper
    starts while the link's addresses, state and routes are applied, not
    after them (initial tunnels keep their links first: see the test
    above); the stacks keep their order all the same (the link's records
    right above the TUN's, so that they go with it at a stop, the helper's
    generation above them), and the MTU is set again once the helper runs
    (wireguard-go resets it).  Helper mode keeps the helper first (it
    creates the link)."""
    async def start(mode: str) -> tuple[list[str], list[str]]:
        fake.net.ops.clear()
        tunnel = Tunnel(spec(f"wgt{mode[0]}"), fake.host, options(tun_mode=mode))
        async with trio.open_nursery() as nursery:
            await nursery.start(tunnel.run)
            ops = list(fake.ops)
            assert tunnel._stack is not None
            records = [type(r).__name__ for r in tunnel._stack.records]
            nursery.cancel_scope.cancel()
        return ops, records

    async def main() -> tuple[tuple[list[str], list[str]], tuple[list[str], list[str]]]:
        with trio.fail_after(HANG_LIMIT):
            return await start("owned"), await start("helper")

    (owned, stack), (helper, _) = trio.run(
        main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert owned.index("start_helper") < owned.index("add_routes")
    assert stack[stack.index("OwnedTun"):] == [
        "OwnedTun", "Address", "Mtu", "LinkUp", "Routes", "HelperGeneration", "Link"]
    mtus = [i for i, op in enumerate(owned) if op == "set_mtu"]
    assert len(mtus) == 2 and owned.index("add_routes") < mtus[1]  # the helper's, once it runs
    assert helper.index("start_helper") < helper.index("add_address")
    assert_all_stopped(fake)


def test_a_tunnel_started_alone_configures_its_helper_while_its_routes_go_in(
        fake: FakeHost) -> None:
    """The helper's WireGuard configuration (10,000 allowed IPs: ~15 ms in
    wireguard-go) does not wait for the link's routes (10,000: ~100 ms):
    it reaches the helper while they are being installed."""
    fake.faults.append(Fault(op="add_routes", kind="delay", delay=STEP, times=None))
    real_add_routes = fake.net.add_routes
    seen: list[list[str]] = []

    async def add_routes(*args: Any, **kwargs: Any) -> Any:
        result = await real_add_routes(*args, **kwargs)
        seen.append(list(fake.requests))  # what the helper got meanwhile
        return result

    fake.net.add_routes = add_routes  # type: ignore[method-assign]

    async def main() -> None:
        with trio.fail_after(HANG_LIMIT):
            tunnel = Tunnel(spec("wgt0"), fake.host, options())
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.run)
                nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen and "set=1" in seen[0], seen
    assert_all_stopped(fake)


def test_a_helper_made_link_takes_its_routes_and_addresses_at_a_stop(
        fake: FakeHost) -> None:
    """Helper mode: the helper's generation holds the link, its WireGuard
    configuration, then the link's addresses and routes.  A stop deletes
    the link and lets the routes and addresses go with it (the WireGuard
    configuration between them lives in the helper): none is removed one
    by one (10,000 routes would take longer than the rest of the stop)."""
    async def main() -> None:
        with trio.fail_after(HANG_LIMIT):
            tunnel = Tunnel(spec("wgt0"), fake.host, options(tun_mode="helper"))
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.run)
                fake.net.ops.clear()
                nursery.cancel_scope.cancel()
            assert tunnel.report is not None and tunnel.report.complete, tunnel.report

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "delete_link" in fake.ops, fake.ops
    assert not {"delete_routes", "delete_address"} & set(fake.ops), fake.ops
    assert_all_stopped(fake)


@pytest.mark.parametrize("failing", ["helper", "link", "both"])
def test_a_failure_on_either_side_of_a_start_alone_restores_the_host(
        fake: FakeHost, failing: str, caplog: pytest.LogCaptureFixture) -> None:
    """While the helper starts and the link is configured together, a
    helper that dies before its UAPI socket, a route that cannot be added,
    or both: the start fails with that error (not an exception group),
    the other side is stopped, the helper's generation undone (not left to
    the last-resort kill), and the host restored."""
    if failing in ("helper", "both"):
        fake.plan = [Behaviour.CRASH]
    if failing in ("link", "both"):
        fake.faults.append(Fault(op="add_routes", kind="errno"))

    async def main() -> BaseException | None:
        with trio.fail_after(HANG_LIMIT):
            tunnel = Tunnel(spec("wgt0"), fake.host, options())
            with contextlib.suppress(Exception):
                async with trio.open_nursery() as nursery:
                    await nursery.start(tunnel.run)
            return tunnel.failure  # what the bring-up raised

    error = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert error is not None and not isinstance(error, BaseExceptionGroup), repr(error)
    if failing == "link":
        assert "EIO" in str(error) or "Input/output" in str(error), error
    elif failing == "helper":
        assert "exited" in str(error) or "status 1" in str(error), error
    assert "still running after teardown" not in caplog.text
    assert_all_stopped(fake)


@pytest.mark.parametrize("at_ms", range(14))  # the start takes ~12 virtual ms
def test_a_start_alone_cancelled_at_any_moment_restores_the_host(
        fake: FakeHost, at_ms: int, caplog: pytest.LogCaptureFixture) -> None:
    """A stop that comes at any moment of a start alone (every host
    operation takes a virtual millisecond, so the moments fall on every
    step of both sides): nothing failed, the teardown is complete, no
    helper needed the last-resort kill, the host is as before."""
    fake.faults.append(Fault(op=None, kind="delay", delay=0.001, times=None))

    async def main() -> Tunnel:
        tunnel = Tunnel(spec("wgt0"), fake.host, options())
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tunnel.run)
                await trio.sleep(at_ms / 1000)
                nursery.cancel_scope.cancel()
        return tunnel

    tunnel = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert tunnel.failure is None, repr(tunnel.failure)
    assert tunnel.report is not None and tunnel.report.complete, tunnel.report
    assert "still running after teardown" not in caplog.text
    assert_all_stopped(fake)


def assert_all_stopped(fake: FakeHost) -> None:
    assert fake.net.links == {}, fake.net.links
    assert fake.tun_fds == set(), "a TUN fd was left open"
    assert fake.alive == set(), "a helper was left running"
