"""Waits that really end (issue 10, items 3, 5, 6): blocking calls in
abandonable threads under a deadline, bounded crash recovery, and journal
records encoded off the trio thread.  Real clock, short bounds; the calls
block on events that are set only after the test (never sleeps)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import trio

from tunsup._bounded import bounded
from tunsup._errors import HostError
from tunsup.config.keys import Key
from tunsup.engine.effects import Dns, EffectContext
from tunsup.engine.journal import Journal, JournalObserver, journal_name
from tunsup.engine.recovery import recover
from tunsup.host.dns import DnsError
from tunsup.testing import FakeHost
from tunsup.testing import netns as _netns
from tunsup.testing import uapi_dir as make_uapi_dir

from .conftest import needs_netns, unique

#: Each test bounds its wait by GUARD seconds; a safety valve releases what
#: blocks after SAFETY seconds, so that with the defect back the test fails
#: (the guard fires) instead of hanging.
GUARD, SAFETY = 2, 4


@pytest.fixture
def never() -> Iterator[threading.Event]:
    """An event the test never sets (but for the safety valve); released
    afterwards so that abandoned threads end."""
    event = threading.Event()
    valve = threading.Timer(SAFETY, event.set)
    valve.start()
    yield event
    valve.cancel()
    event.set()


@pytest.fixture
def fake_host() -> Iterator[FakeHost]:
    with make_uapi_dir() as path:
        yield FakeHost(path)


# --- item 3: the bounded-wait helper and its call sites ----------------------


def test_bounded_call_that_never_returns_times_out(never: threading.Event) -> None:
    async def main() -> None:
        with trio.fail_after(GUARD):  # a plain to_thread under fail_after waits for good
            with pytest.raises(HostError, match=r"probing timed out after 0\.2 s"):
                await bounded(0.2, "probing", never.wait)

    trio.run(main)


def test_bounded_call_is_cancellable_and_tells_the_thread(never: threading.Event) -> None:
    gave_up = threading.Event()

    async def main() -> None:
        with trio.fail_after(GUARD):
            with trio.move_on_after(0.2) as scope:
                await bounded(60, "probing", never.wait, gave_up=gave_up)
            assert scope.cancelled_caught
        assert gave_up.is_set()

    trio.run(main)


def test_bounded_passes_results_and_errors() -> None:
    def boom() -> None:
        raise OSError(5, "Input/output error")

    async def main() -> None:
        assert await bounded(1, "adding", lambda a, b: a + b, 2, 3) == 5
        with pytest.raises(OSError, match="Input/output"):
            await bounded(1, "failing", boom)

    trio.run(main)


def test_dns_backend_probe_that_hangs_is_bounded(fake_host: FakeHost,
                                                 never: threading.Event) -> None:
    """The "auto" DNS backend probe (it walks PATH and reads files) ran in a
    thread trio could not abandon: its timeout never fired."""

    def hanging_probe(kind: str) -> None:
        never.wait()

    fake_host.host.dns_backend = hanging_probe  # type: ignore[assignment]
    effect = Dns("wgt0", "auto", (ipaddress.ip_address("192.0.2.53"),), (), timeout=0.2)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ctx = EffectContext(host=fake_host.host, log=_log(), nursery=nursery)
            with trio.fail_after(GUARD):
                with pytest.raises(DnsError, match=r"DNS backend timed out after 0\.2 s"):
                    await effect.prepare(ctx)

    trio.run(main)


def _log() -> logging.Logger:
    return logging.getLogger("tunsup.test")


# --- item 5: crash recovery on a hung state disk ------------------------------


#: The journal read as on a hung disk: tunsup opens a journal without
#: waiting (a FIFO in its place is refused at once), so the hang is the
#: read's own: it opens the file as a plain open() does, which waits for a
#: FIFO's writer as a read from a hung NFS server waits.
HUNG_READ = """
import tunsup.engine.journal

def read_on_a_hung_disk(path, limit):
    with open(path, "rb") as f:
        return f.read()
"""
#: The same in a ``tunsup run`` process.
HUNG_RUN = HUNG_READ + """
tunsup.engine.journal.read_regular_file = read_on_a_hung_disk
from tunsup.cli import entry
entry()
"""


@pytest.fixture
def fifo_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A journal whose read blocks (see HUNG_READ): a FIFO without a writer."""
    from tunsup.engine import journal

    path = tmp_path / journal_name(999_999, 1)
    os.mkfifo(path)
    scope: dict[str, Any] = {}
    exec(HUNG_READ, scope)  # the subprocess test's function
    monkeypatch.setattr(journal, "read_regular_file", scope["read_on_a_hung_disk"])
    valve = threading.Timer(SAFETY, _release, (path,))
    valve.start()
    yield path
    valve.cancel()
    _release(path)


def test_recovery_read_that_blocks_is_bounded(fifo_journal: Path, fake_host: FakeHost) -> None:
    async def main() -> None:
        with trio.fail_after(GUARD):  # with the bug: blocked until a writer comes
            report = await recover(str(fifo_journal.parent), fake_host.host, io_timeout=0.2)
        assert report.failures == (f"reading {fifo_journal} timed out after 0.2 s; "
                                   "journal left as it is",)
        assert not report.complete

    trio.run(main)


def test_recovery_read_that_blocks_is_cancellable(fifo_journal: Path,
                                                  fake_host: FakeHost) -> None:
    """A SIGTERM during recovery cancels it: the blocked read is abandoned."""

    async def main() -> None:
        with trio.fail_after(GUARD):
            with trio.move_on_after(0.2) as scope:
                await recover(str(fifo_journal.parent), fake_host.host)  # io_timeout: 10 s
            assert scope.cancelled_caught

    trio.run(main)


def _release(fifo: Path) -> None:
    """Open the FIFO's write end once, so that the abandoned reader ends."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return  # no reader (any more)
    os.close(fd)


# --- item 6: journal records are encoded off the trio thread -------------------


class _Probe(ipaddress.IPv4Network):
    """A prefix that notes which thread turns it into text (the encoding)."""

    threads: ClassVar[set[int]] = set()

    def __str__(self) -> str:
        _Probe.threads.add(threading.get_ident())
        return super().__str__()


def test_journal_records_are_encoded_off_the_trio_thread(tmp_path: Path) -> None:
    from tunsup.engine.effects import Routes
    from tunsup.engine.journal import read_journal

    prefixes = tuple(_Probe(f"10.{i // 256}.{i % 256}.0/24") for i in range(2000))
    effect = Routes("wgt0", 7, 254, prefixes)
    journal = Journal(str(tmp_path), 4242, 1)
    observer = JournalObserver(journal, "wgt0")

    async def main() -> None:
        await observer.intent(effect)
        await observer.applied(effect, effect)
        await journal.close(remove=False)

    _Probe.threads.clear()
    trio.run(main)
    assert _Probe.threads and threading.get_ident() not in _Probe.threads
    steps = read_journal(journal.path).steps
    assert len(steps) == 1 and steps[0].record == Routes(
        "wgt0", 7, 254, tuple(ipaddress.ip_network(str(p)) for p in prefixes))


def _blocked_on_fifo(pid: int) -> bool:
    """Whether a thread of ``pid`` waits in open() of a FIFO for a writer."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for tid in tasks:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/wchan") as f:
            if f.read().strip() == "wait_for_partner":
                return True
    return False


@needs_netns
def test_sigterm_ends_run_while_recovery_is_blocked(
    tmp_path: Path, netns: Callable[[str], str]
) -> None:
    """``tunsup run`` whose crash recovery blocks reading the state disk
    (a FIFO as a dead instance's journal) ends promptly on SIGTERM, with the
    exit status of a clean stop: nothing of its own was applied."""
    ns = netns("rec")
    ifname = unique("rc")
    conf = tmp_path / f"{ifname}.conf"
    conf.write_text(f"""\
[Interface]
PrivateKey = {Key.generate_private().to_base64()}
Address = 10.251.0.1/24

[Peer]
PublicKey = {Key.generate_private().public_key().to_base64()}
AllowedIPs = 10.251.1.0/24
""")
    conf.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    # No safety valve: the test kills the service if SIGTERM does not end it.
    os.mkfifo(state / journal_name(999_999, 1))
    runtime = tmp_path / "rt"
    argv = [sys.executable, "-c", HUNG_RUN, "run", str(conf), "--state-dir", str(state),
            "--runtime-dir", str(runtime), "--dns", "none"]
    proc = subprocess.Popen(_netns.ns_exec_argv(ns, argv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1000):  # the service reaches recovery: its read blocks
            if _blocked_on_fifo(proc.pid) or proc.poll() is not None:
                break
            threading.Event().wait(0.01)
        assert _blocked_on_fifo(proc.pid), "recovery never blocked on the FIFO"
        proc.send_signal(signal.SIGTERM)
        try:
            # With the bug: SIGTERM is received, but the process stays.
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail("tunsup run did not end on SIGTERM while recovery was blocked")
        assert proc.returncode == 0, err
        assert "received SIGTERM: stopping" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_deadline_raises_the_given_error_and_lets_results_through() -> None:
    from tunsup._bounded import deadline

    class Boom(Exception):
        pass

    async def main() -> None:
        with pytest.raises(Boom, match=r"^nothing came within 1s$"), \
                deadline(1, "nothing came within 1s", Boom):
            await trio.sleep_forever()
        with deadline(1, "unused"):
            await trio.sleep(0.5)
        # A cancellation from outside is not turned into the error.
        with trio.move_on_after(0.5) as outer:
            with deadline(5, "unused"):
                await trio.sleep_forever()
        assert outer.cancelled_caught

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
