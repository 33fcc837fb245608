"""What a power cut can take from the journal, and that recovery still
restores what outlives a reboot (see tunsup.engine.journal, "Durability").

A power cut keeps only what was fsync'd: the file as it was at its last
fsync (seen at the OS boundary: ``os.fsync`` is wrapped to note the
journal's size).  The kernel's state (links, addresses, routes) is gone
after it: recovery then runs against a fresh in-memory host, with the
files (resolv.conf) as they were."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tunsup._errors import HostError
from tunsup.engine.effects import (
    Address,
    Dns,
    Effect,
    EffectContext,
    Hooks,
    LinkUp,
    Routes,
)
from tunsup.engine.journal import (
    Journal,
    JournalObserver,
    decode_line,
    journal_name,
    read_journal,
)
from tunsup.engine.recovery import recover
from tunsup.engine.undo import EffectStack
from tunsup.host.dns import FileBackend
from tunsup.testing import FakeHost, uapi_dir

ORIGINAL = b"nameserver 192.0.2.1\n"
#: No such process: the journal's owner is dead.
DEAD = (2**22 + 21, 1)
IFNAME = "wgd0"


def _effects(index: int) -> list[Effect]:
    """A bring-up's effects after its link: hooks first and last (so that
    the exact reverse gives wg-quick's order), DNS last but one."""
    return [
        Hooks(IFNAME, "PreUp", ("pre-up",), "PostDown", ("post-down",)),
        Address(IFNAME, index, ipaddress.ip_interface("10.61.0.1/24")),
        LinkUp(IFNAME, index),
        Routes(IFNAME, index, 254, (ipaddress.ip_network("198.51.100.0/24"),)),
        Dns(IFNAME, "file", (ipaddress.ip_address("10.61.0.53"),), ()),
        Hooks(IFNAME, "PostUp", ("post-up",), "PreDown", ("pre-down",)),
    ]


def _host(fake: FakeHost, resolv: Path) -> FakeHost:
    fake.host = attrs.evolve(fake.host, dns_backend=lambda kind: FileBackend(str(resolv)))
    return fake


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """Sizes of each file at each of its fsyncs, by path."""
    sizes: dict[str, list[int]] = {}
    real: Callable[[int], None] = os.fsync

    def fsync(fd: int) -> None:
        real(fd)
        path = os.readlink(f"/proc/self/fd/{fd}")
        sizes.setdefault(path, []).append(os.fstat(fd).st_size)

    monkeypatch.setattr(os, "fsync", fsync)
    return sizes


@contextlib.asynccontextmanager
async def _journaled_stack(journal: Journal, fake: FakeHost
                           ) -> AsyncIterator[tuple[int, EffectStack]]:
    """A persistent link on ``fake`` and an effect stack journaled to
    ``journal``, in a nursery: (the link's index, the stack)."""
    index = fake.net.create(IFNAME, persistent=True)
    async with trio.open_nursery() as nursery:
        log = logging.getLogger("test")
        ctx = EffectContext(host=fake.host, log=log, nursery=nursery)
        yield index, EffectStack(ctx, log=log, observer=JournalObserver(journal, IFNAME))


def test_power_cut_after_any_step_leaves_what_recovery_needs(
        tmp_path: Path, synced: dict[str, list[int]]) -> None:
    """After each step of a bring-up, what a power cut would leave of the
    journal holds every intent, and the applied record of every change
    that outlives a reboot (hooks, DNS); the records of kernel changes
    (address, link up, routes) are written but left to the next fsync.
    Recovery from what is left after any step runs the down hooks due and
    gives resolv.conf back."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(ORIGINAL)
    journal = Journal(str(tmp_path / "state"), *DEAD)
    #: After each step: the journal as of its last fsync, and resolv.conf.
    cuts: list[tuple[bytes, bytes]] = []

    async def bring_up() -> None:
        with uapi_dir() as sockets:
            fake = _host(FakeHost(sockets), resolv)
            async with _journaled_stack(journal, fake) as (index, stack):
                for effect in _effects(index):
                    await stack.apply(effect)
                    data = Path(journal.path).read_bytes()
                    cuts.append((data[:synced[journal.path][-1]], resolv.read_bytes()))
        await journal.close(remove=False)  # the process "dies" here, DNS still set

    trio.run(bring_up)
    kinds = [type(e).__name__ for e in _effects(0)]
    for done, (cut, resolv_then) in enumerate(cuts, 1):
        state = tmp_path / f"after-{done}"
        state.mkdir(mode=0o700)
        path = state / journal_name(*DEAD)
        path.write_bytes(cut)
        steps = read_journal(str(path)).steps
        assert [type(s.intent).__name__ for s in steps] == kinds[:done], "an intent was lost"
        for step in steps:
            kept = step.record is not None
            assert kept == (not step.intent.gone_on_reboot or step.seq < done), (
                f"after step {done}: {step.intent.describe()}: record "
                f"{'durable' if kept else 'lost'}")
        resolv.write_bytes(resolv_then)
        hooks = trio.run(_recover_after_reboot, state, resolv)
        assert hooks == (["pre-down"] if done == len(kinds) else []) + ["post-down"]
        assert resolv.read_bytes() == ORIGINAL, f"after step {done}"
        assert list(state.iterdir()) == []


async def _recover_after_reboot(state: Path, resolv: Path) -> list[str]:
    """Recover ``state`` on a host whose kernel state is gone (a fresh
    fake) and whose files are as they are; the hooks it ran."""
    with uapi_dir() as sockets:
        fake = _host(FakeHost(sockets), resolv)
        report = await recover(str(state), fake.host, me=(os.getpid(), 0))
        assert report.complete, report
        return fake.hooks


def test_a_teardown_writes_its_undone_records_at_once_and_in_order(tmp_path: Path) -> None:
    """An unwind does not wait for each undone record to be written before
    its next step (one trip to the journal's thread per record on the path
    of every stop): it queues them and writes them together at its end, in
    the order of the undos, before it returns."""
    journal = Journal(str(tmp_path / "state"), *DEAD)

    async def main() -> int:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            async with _journaled_stack(journal, fake) as (index, stack):
                for effect in _effects(index)[1:-2]:  # address, link up, routes
                    await stack.apply(effect)
                await stack.flush()  # as a bring-up does before it reports up
                writes = journal.commits
                report = await stack.unwind(10)
                assert report.complete
                writes = journal.commits - writes
        await journal.close(remove=False)
        return writes

    assert trio.run(main) == 1
    contents = read_journal(journal.path)
    assert contents.pending() == [] and not contents.damaged
    undone = [line for line in Path(journal.path).read_bytes().splitlines() if b'"undone"' in line]
    assert [int(line.split(b'"seq":')[1].rstrip(b"}")) for line in undone] == [3, 2, 1]


class _GatedWrites:
    """``os.write`` of the journal's first applied record (or intent: ``op``),
    held or failed at the OS boundary: the journal's thread blocks in (or
    fails) the write.  Two of them stack (each wraps the ``os.write`` it
    finds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, fail: bool = False,
                 record: str | None = None, op: str = "applied") -> None:
        self.gate = threading.Event()
        self.tried = threading.Event()
        self.fail = fail
        real = os.write
        # Any such line, or that of one kind of effect exactly.
        kind = f'"kind":"{record}"'.encode() if record is not None else None
        mark = f'"op":"{op}"'.encode()

        def matches(line: bytes) -> bool:
            return mark in line and (kind is None or kind + b"," in line or kind + b"}" in line)

        def write(fd: int, data: bytes) -> int:  # type: ignore[override]
            if not self.tried.is_set() and any(map(matches, bytes(data).splitlines())):
                self.tried.set()
                if self.fail:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.gate.wait(30)
            return real(fd, data)

        monkeypatch.setattr(os, "write", write)


def _ops(path: str) -> list[tuple[str, int]]:
    return [(entry["op"], entry["seq"]) for entry in map(decode_line, Path(path).read_bytes()
                                                         .splitlines(keepends=True))
            if entry is not None and "seq" in entry]


def _tunnel_with_journal(journal: Journal, fake: FakeHost) -> Any:
    from tunsup.engine.restart import RestartPolicy
    from tunsup.engine.tunnel import Tunnel
    from tunsup.testing import spec

    from .test_supervision import options

    return Tunnel(spec("wgt0"), fake.host,
                  options(restart=RestartPolicy(backoff_initial=0.01, backoff_max=0.01)),
                  observer=JournalObserver(journal, "wgt0"))


async def _reported_only_once_written(writes: _GatedWrites, journal: Journal,
                                      reported: Callable[[], bool],
                                      wait_reported: Callable[[], Awaitable[object]]
                                      ) -> list[Any]:
    """With the held record's write under way: nothing is reported until
    the write is let go; then every step of the journal has its record
    (returned)."""
    try:
        assert await trio.to_thread.run_sync(writes.tried.wait, 10)
        await trio.testing.wait_all_tasks_blocked(0.05)
        assert not reported(), "reported before its record was written"
    finally:
        writes.gate.set()
    with trio.fail_after(10):
        await wait_reported()
    steps = read_journal(journal.path).steps
    assert steps and all(step.record is not None for step in steps)
    return steps


def test_a_change_does_not_wait_for_its_record_but_the_next_change_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel change's applied record is written without the bring-up
    waiting for it (one trip to the journal's thread less per change),
    yet before the next change is made: that change's intent is written
    behind it.  A flush waits for it."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    writes = _GatedWrites(monkeypatch)

    async def main() -> None:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            async with _journaled_stack(journal, fake) as (index, stack), \
                    trio.open_nursery() as nursery:
                try:
                    with trio.fail_after(10):  # its record's write is held
                        await stack.apply(Address(IFNAME, index,
                                                  ipaddress.ip_interface("10.61.0.1/24")))
                    nursery.start_soon(stack.apply, LinkUp(IFNAME, index))
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    assert not fake.net.links[index].up, "the next change was made first"
                    flushed = False

                    async def flush() -> None:
                        nonlocal flushed
                        await stack.flush()
                        flushed = True

                    nursery.start_soon(flush)
                    await trio.testing.wait_all_tasks_blocked(0.05)
                    assert not flushed, "a flush did not wait for the held record"
                finally:
                    writes.gate.set()
            assert fake.net.links[index].up and flushed
        await journal.close(remove=False)

    trio.run(main)
    assert _ops(journal.path) == [("intent", 1), ("applied", 1), ("intent", 2), ("applied", 2)]


def test_a_record_that_could_not_be_written_fails_the_next_change_before_it_is_made(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write of an applied record fails on its own (nobody waits for
    it): the next change is not made (its apply raises that error after
    writing its intent, which it closes at once), and a flush raises it
    too; after the teardown nothing is left pending in the journal."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    writes = _GatedWrites(monkeypatch, fail=True)

    async def main() -> None:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            async with _journaled_stack(journal, fake) as (index, stack):
                await stack.apply(Address(IFNAME, index, ipaddress.ip_interface("10.61.0.1/24")))
                # Its write has failed, alone, before the next intent's.
                await trio.to_thread.run_sync(writes.tried.wait, 10)
                with pytest.raises(HostError, match="No space"):
                    await stack.apply(LinkUp(IFNAME, index))
                assert not fake.net.links[index].up
                with pytest.raises(HostError, match="No space"):
                    await stack.flush()
                assert (await stack.unwind(10)).complete
        await journal.close(remove=False)

    trio.run(main)
    contents = read_journal(journal.path)
    assert contents.pending() == [], "an intent without a change is left open"


def test_a_tunnel_is_reported_up_only_once_every_record_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The last change of a bring-up has no next intent to write its
    record first: the tunnel waits for it before it reports up."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    writes = _GatedWrites(monkeypatch, record="Link")  # the owned TUN's, the last

    async def main() -> None:
        with uapi_dir() as sockets:
            tunnel = _tunnel_with_journal(journal, FakeHost(sockets))
            async with trio.open_nursery() as nursery:
                started = trio.Event()

                async def run() -> None:
                    await nursery.start(tunnel.run)
                    started.set()

                nursery.start_soon(run)
                steps = await _reported_only_once_written(writes, journal, started.is_set,
                                                          started.wait)
                assert type(steps[-1].record).__name__ == "Link"  # the one held: the last
                nursery.cancel_scope.cancel()
        await journal.close(remove=False)

    trio.run(main)


class _ContendedLock:
    """A lock that says when a second thread waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.contended = threading.Event()

    def __enter__(self) -> None:
        if not self._lock.acquire(blocking=False):
            self.contended.set()
            self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_a_record_a_written_off_write_left_behind_fails_the_next_change(tmp_path: Path) -> None:
    """Another task's write took a change's record into its batch, then
    hung and was written off (its caller gave up); the next change's
    intent, written by the fresh thread, gets to the file first.  The
    change must not be made while that record is unwritten."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    busy, entered, hung = threading.Event(), threading.Event(), threading.Event()
    journal._file_lock = file_lock = _ContendedLock()  # the hung write holds it

    def hanging_entry() -> dict[str, object]:
        entered.set()
        hung.wait(30)
        return {"op": "hook", "seq": 99, "phase": "up", "index": 0, "pid": 1,
                "start_time": None}

    async def main() -> None:
        observer = JournalObserver(journal, IFNAME)
        address = Address(IFNAME, 7, ipaddress.ip_interface("10.61.0.1/24"))
        await observer.intent(address)
        try:
            async with trio.open_nursery() as nursery:
                other = trio.CancelScope()

                async def other_append() -> None:
                    with other:
                        await journal.append(hanging_entry)

                journal._worker.post(lambda: busy.wait(30), what="busy")  # the thread is busy
                nursery.start_soon(other_append)
                await trio.testing.wait_all_tasks_blocked()
                await observer.applied(address, address)  # queued behind the other's
                busy.set()  # the other's write takes both, and hangs
                assert await trio.to_thread.run_sync(entered.wait, 10)
                other.cancel()  # its caller gives up: the thread is written off

            async def next_change() -> None:
                with pytest.raises(HostError, match="earlier record was not written"):
                    await observer.intent(LinkUp(IFNAME, 7))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(next_change)
                # The fresh thread took the next intent alone and waits for
                # the file; the hung one then ends, and puts the record back.
                assert await trio.to_thread.run_sync(file_lock.contended.wait, 10)
                hung.set()
        finally:
            hung.set()
        await journal.close(remove=False)

    trio.run(main)
    lines = [json.loads(line.split(b" ", 1)[1]) for line in Path(journal.path).read_bytes()
             .splitlines()]
    assert [(e["op"], e.get("seq")) for e in lines[1:]] == [("intent", 1), ("intent", 2)]


@pytest.mark.parametrize("change", ["reload", "restart"])
def test_a_change_to_a_running_tunnel_is_reported_only_once_its_records_are_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, change: str) -> None:
    """The last record of the change held in its write: a reload's (an MTU
    changed in place: no WireGuard change to settle after it) does not
    return, a restarted helper's tunnel (the MTU the helper reset) is not
    up again, before it is written."""
    from tunsup.engine.tunnel import TunnelState

    journal = Journal(str(tmp_path / "state"), *DEAD)

    async def main() -> None:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            tunnel = _tunnel_with_journal(journal, fake)
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.run)
                reported: Callable[[], bool]
                wait: Callable[[], Awaitable[object]]
                if change == "reload":
                    writes = _GatedWrites(monkeypatch, record="MtuChanged")
                    changed = trio.Event()

                    async def reload() -> None:
                        summary = await tunnel.reconfigure(attrs.evolve(tunnel.spec, mtu=1300),
                                                           tunnel.options)
                        assert "MTU" in summary, summary
                        changed.set()

                    nursery.start_soon(reload)
                    reported, wait = changed.is_set, changed.wait
                else:
                    writes = _GatedWrites(monkeypatch, record="Mtu")
                    fake.current.die(1, "ERROR: gone")
                    reported = lambda: tunnel.state is TunnelState.UP  # noqa: E731
                    wait = lambda: tunnel.wait_state(TunnelState.UP)  # noqa: E731
                await _reported_only_once_written(writes, journal, reported, wait)
                assert tunnel.restarts == (change == "restart")
                nursery.cancel_scope.cancel()
        await journal.close(remove=False)

    trio.run(main)


def test_recovering_a_tunnel_started_alone_lets_its_link_take_its_records(
        tmp_path: Path) -> None:
    """A tunnel started alone journals its helper among its link's records
    (the helper starts while the link is configured).  Recovering what a
    kill -9 leaves of it undoes neither its routes nor its address nor its
    MTU one by one (10,000 routes on a deleted link): they go with the
    link, as after a start whose helper came last."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    dead = tmp_path / "dead"
    dead.mkdir(mode=0o700)

    async def run_and_keep_the_journal() -> list[str]:
        with uapi_dir() as sockets:
            tunnel = _tunnel_with_journal(journal, FakeHost(sockets))
            async with trio.open_nursery() as nursery:
                await nursery.start(tunnel.run)
                _keep_what_a_kill_leaves(journal, dead)
                nursery.cancel_scope.cancel()
        return await _steps_kept(journal, dead)

    journaled = trio.run(run_and_keep_the_journal)
    # The helper's start between the link's records (else this tests nothing).
    assert journaled.index("StartHelper") < journaled.index("Routes"), journaled
    ops = _ops_of_recovery(dead)
    assert not {"delete_routes", "delete_address"} & set(ops), ops


def test_a_helper_configured_before_its_routes_still_lets_the_link_take_them(
        tmp_path: Path) -> None:
    """A tunnel started alone configures its helper (WireGuard, over UAPI)
    while its link is configured: here, before its routes (the link is set
    up only once the configuration is journaled).  Its records then sit
    between the link's in the journal; recovering what a kill -9 leaves
    still deletes no route and no address one by one."""
    from tunsup.engine.restart import RestartPolicy
    from tunsup.engine.tunnel import Tunnel
    from tunsup.testing import spec

    from .test_supervision import options

    journal = Journal(str(tmp_path / "state"), *DEAD)
    dead = tmp_path / "dead"
    dead.mkdir(mode=0o700)

    class Watching(JournalObserver):
        """The product's observer, telling the test when the helper's
        configuration is journaled."""

        configured = trio.Event()

        async def applied(self, intent: Any, record: Any) -> None:
            await super().applied(intent, record)
            if type(record).__name__ == "WireguardConfigured":
                self.configured.set()

    async def run_and_keep_the_journal() -> list[str]:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            observer = Watching(journal, "wgt0")
            real_set_link_up = fake.net.set_link_up

            async def set_link_up(index: int, up: bool, **kwargs: Any) -> bool:
                if up:
                    await observer.configured.wait()
                return await real_set_link_up(index, up, **kwargs)

            fake.net.set_link_up = set_link_up  # type: ignore[method-assign]
            tunnel = Tunnel(spec("wgt0"), fake.host, options(
                restart=RestartPolicy(backoff_initial=0.01, backoff_max=0.01)),
                observer=observer)
            async with trio.open_nursery() as nursery:
                with trio.fail_after(30):
                    await nursery.start(tunnel.run)
                await observer.flush()
                _keep_what_a_kill_leaves(journal, dead)
                nursery.cancel_scope.cancel()
        return await _steps_kept(journal, dead)

    journaled = trio.run(run_and_keep_the_journal)
    # The routes' intent comes once the link is up, which waits for the
    # configuration's record: they sit above it (the link's other records
    # may come before or after it).
    assert journaled.index("CreateTun") < journaled.index("ConfigureWireguard") \
        < journaled.index("Routes"), journaled
    ops = _ops_of_recovery(dead)
    assert not {"delete_routes", "delete_address"} & set(ops), ops


def _keep_what_a_kill_leaves(journal: Journal, dead: Path) -> None:
    """Copy ``journal`` into ``dead``: what a kill -9 would leave now."""
    shutil.copy(journal.path, dead / journal_name(*DEAD))


async def _steps_kept(journal: Journal, dead: Path) -> list[str]:
    """Close (and remove) the live journal; the kinds of the intents of
    the copy kept in ``dead``, in journal order."""
    await journal.close(remove=True)
    return [type(s.intent).__name__ for s in read_journal(str(dead / journal_name(*DEAD))).steps]


def _ops_of_recovery(dead: Path) -> list[str]:
    """Recover the journal in ``dead`` on a fresh fake host; its host
    operations (the recovery must be complete)."""
    async def recovery() -> list[str]:
        with uapi_dir() as sockets:
            fake = FakeHost(sockets)
            report = await recover(str(dead), fake.host, me=(os.getpid(), 0))
            assert report.complete, report
            return list(fake.ops)

    return trio.run(recovery)


def test_a_record_another_stack_of_the_tunnel_starts_meanwhile_fails_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stacks of one tunnel (its own and the helper's generation, while
    the helper starts as the link is configured) share its observer: a
    record one of them starts while the other's intent is being written
    comes after that intent in the queue, and its write still under way
    does not fail the other's change."""
    journal = Journal(str(tmp_path / "state"), *DEAD)
    intent_held = _GatedWrites(monkeypatch, op="intent", record="LinkUp")
    record_held = _GatedWrites(monkeypatch, record="Address")
    observer = JournalObserver(journal, IFNAME)
    address = Address(IFNAME, 7, ipaddress.ip_interface("10.61.0.1/24"))
    link_up = LinkUp(IFNAME, 7)

    async def main() -> None:
        await observer.intent(address)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(observer.intent, link_up)  # the other stack
                assert await trio.to_thread.run_sync(intent_held.tried.wait, 10)
                await observer.applied(address, address)  # queued after that intent
                intent_held.gate.set()  # the intent is written; the record is not yet
                assert await trio.to_thread.run_sync(record_held.tried.wait, 10)
        finally:
            intent_held.gate.set()
            record_held.gate.set()
        await observer.flush()
        await journal.close(remove=False)

    trio.run(main)
    assert _ops(journal.path) == [("intent", 1), ("intent", 2), ("applied", 1)]
