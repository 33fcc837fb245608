"""Crash safety with real processes in scratch namespaces: tunsup is
SIGKILLed at every step of a bring-up (test-only fault points), then
`tunsup cleanup` must give the host back exactly as it was."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tunsup import pidfile
from tunsup.config.keys import Key
from tunsup.engine.journal import encode_line, journal_name, read_journal
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceProcess

from .conftest import needs_wireguard, unique
from .test_tunnel_netns import STEP_GUARD, assert_restored, ping

pytestmark = [needs_wireguard, pytest.mark.netns]

#: Effects of the bring-up below, in order: PreUp/PostDown hooks, the owned
#: TUN, its MTU, 2 addresses, link up, routes (the helper starts while they
#: are applied, one tunnel alone: see Tunnel._bring_up), the helper generation (helper, WireGuard
#: configuration, MTU again), link, DNS, PostUp/PreDown hooks.
STEPS = 14
#: 600 routes go in chunks of 256: a crash after 300 lands mid-batch.
N_ROUTES = 600


@attrs.define
class Crash:
    ns: str
    workdir: Path
    ifname: str = attrs.field(factory=lambda: unique("tsk"))
    services: list[ServiceProcess] = attrs.field(factory=list)

    @property
    def resolv(self) -> Path:
        return self.workdir / "resolv.conf"

    @property
    def state_dir(self) -> Path:
        return self.workdir / "state"

    def conf(self, extra_allowed: str = "", pre_down: str | None = None) -> str:
        path = self.workdir / f"{self.ifname}.conf"
        allowed = ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(100, 100 + N_ROUTES))
        hooks = self.workdir / "hooks.log"
        pre_down = pre_down or f"echo PreDown >> {hooks}"
        path.write_text(f"""\
[Interface]
PrivateKey = {Key.generate_private().to_base64()}
Address = 10.250.0.1/24, fd00:250::1/64
DNS = 10.250.0.53, crash.example
PreUp = echo PreUp >> {hooks}
PostUp = echo PostUp >> {hooks}
PreDown = {pre_down}
PostDown = echo PostDown >> {hooks}

[Peer]
PublicKey = {Key.generate_private().public_key().to_base64()}
Endpoint = 192.0.2.2:51820
AllowedIPs = {allowed}{extra_allowed}
""")
        return str(path)

    def run(self, conf: str, crash_at: str | None = None, label: str = "svc") -> ServiceProcess:
        env = dict(STEP_GUARD)
        if crash_at:
            env["TUNSUP_CRASH_AT"] = crash_at
        svc = ServiceProcess(self.ns, [conf, "--dns", "file", "--resolv-conf", str(self.resolv),
                                       "--state-dir", str(self.state_dir),
                                       "--runtime-dir", str(self.workdir / "run")],
                             str(self.workdir), f"{label}{len(self.services)}", env=env)
        self.services.append(svc)
        return svc

    def cleanup(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "tunsup", "cleanup", "--state-dir", str(self.state_dir),
                *args]
        return subprocess.run(_netns.ns_exec_argv(self.ns, argv), capture_output=True,
                              text=True, timeout=120, check=False)

    def snapshot(self) -> dict[str, object]:
        return _netns.snapshot(self.ns, [str(self.resolv)])

    def journals(self) -> list[str]:
        return sorted(p.name for p in self.state_dir.glob("journal-*"))


@pytest.fixture
def crash(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Crash]:
    ns = netns("tsk")
    _netns.ip("link", "add", "veth0", "type", "veth", "peer", "name", "veth1", ns=ns)
    _netns.ip("address", "add", "192.0.2.1/24", "dev", "veth0", ns=ns)
    _netns.ip("link", "set", "veth0", "up", ns=ns)
    _netns.ip("link", "set", "veth1", "up", ns=ns)
    c = Crash(ns, tmp_path)
    c.resolv.write_text("nameserver 192.0.2.53\n")
    try:
        yield c
    finally:
        for svc in c.services:
            svc.close()
        # Whatever a failed test left: a recovery pass, then the namespace
        # deletion (the netns fixture) takes the rest.
        c.cleanup()


CRASH_POINTS = ([f"{when}:{k}" for k in range(1, STEPS + 1)
                 for when in ("intent", "effect", "applied")]
                + [f"routes:{N_ROUTES // 2}"])


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_crash_at_every_step_then_cleanup_restores(crash: Crash, point: str) -> None:
    conf = crash.conf()
    before = crash.snapshot()
    svc = crash.run(conf, crash_at=point)
    code = svc.wait_exit(60)
    assert code == -signal.SIGKILL, f"{point}: exit {code}\n{svc.output()}"
    assert f"TUNSUP_CRASH_AT={point}: SIGKILL" in svc.output()
    assert crash.journals(), "the crash left no journal"

    dry = crash.cleanup("--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert "object(s) to undo" in dry.stdout

    result = crash.cleanup()
    assert result.returncode == 0, result.stdout + result.stderr
    assert_restored_ns(crash, before)
    assert crash.journals() == []
    # Idempotent: a second pass finds nothing.
    again = crash.cleanup()
    assert again.returncode == 0 and "nothing to clean up" in again.stdout


def test_the_crash_points_cover_every_step(crash: Crash) -> None:
    """STEPS is exactly the number of effects: one more never fires."""
    svc = crash.run(crash.conf(), crash_at=f"intent:{STEPS + 1}")
    svc.wait_ready(60)
    assert svc.stop()[0] == 0
    svc2 = crash.run(crash.conf(), crash_at=f"applied:{STEPS}")
    assert svc2.wait_exit(60) == -signal.SIGKILL
    assert crash.cleanup().returncode == 0


def assert_restored_ns(crash: Crash, before: dict[str, object]) -> None:
    diff = _netns.diff_snapshots(before, crash.snapshot())
    assert not diff, "host not restored:\n" + "\n".join(diff)
    assert _netns.ip("netns", "pids", crash.ns).split() == [], "a process is left"
    assert not os.path.exists(_netns.wireguard_socket(crash.ifname))


def test_dry_run_changes_nothing_and_lists_every_object(crash: Crash) -> None:
    svc = crash.run(crash.conf(), crash_at=f"applied:{STEPS}")
    assert svc.wait_exit(60) == -signal.SIGKILL
    crashed = crash.snapshot()
    dry = crash.cleanup("--dry-run")
    assert dry.returncode == 0
    lines = [ln.strip() for ln in dry.stdout.splitlines() if ln.startswith("  undo")]
    assert lines[0] == f"undo PostUp/PreDown hooks of {crash.ifname}"
    assert lines[-2] == f"undo TUN device {crash.ifname}"
    assert lines[-1] == f"undo PreUp/PostDown hooks of {crash.ifname}"
    assert any(ln.startswith("undo helper wireguard-go (pid") for ln in lines)
    assert any(f"{N_ROUTES} route(s) via {crash.ifname}" in ln for ln in lines)
    assert any(ln.startswith(f"undo DNS of {crash.ifname} (file)") for ln in lines)
    assert crash.snapshot() == crashed
    assert crash.cleanup().returncode == 0


def test_sigkill_then_run_again_recovers_by_itself(netns: Callable[[str], str],
                                                   tmp_path: Path) -> None:
    from .test_tunnel_netns import Pair

    ns_a, ns_b = netns("tsa"), netns("tsb")
    _netns.add_veth_pair(ns_a, "veth0", ns_b, "veth0")
    _netns.ip("address", "add", "192.0.2.1/24", "dev", "veth0", ns=ns_a)
    _netns.ip("address", "add", "192.0.2.2/24", "dev", "veth0", ns=ns_b)
    pair = Pair(ns_a, ns_b, tmp_path)
    try:
        if_a, if_b = unique("tsa"), unique("tsb")
        conf_a = pair.conf_a(if_a, extra="DNS = 10.200.0.53")
        before = pair.snapshot(ns_a)
        peer = pair.run(ns_b, pair.conf_b(if_b), label="b")
        peer.wait_ready()
        first = pair.run(ns_a, conf_a, label="a")
        first.wait_ready()
        first.proc.send_signal(signal.SIGKILL)
        assert first.wait_exit(10) == -signal.SIGKILL
        second = pair.run(ns_a, conf_a, label="a")  # same state and runtime dirs
        second.wait_ready()
        assert "recovery: undone" in second.output()
        assert ping(ns_a, "10.200.0.2").returncode == 0
        assert second.stop()[0] == 0
        assert peer.stop()[0] == 0
        assert_restored(pair, ns_a, before)
        assert list((tmp_path / "a.state").glob("journal-*")) == []
    finally:
        for svc in pair.services:
            svc.close()


def _status(runtime_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tunsup", "status", "--runtime-dir",
                           str(runtime_dir)], capture_output=True, text=True, timeout=60,
                          check=False)


def test_cleanup_removes_a_dead_services_pid_file_and_socket(crash: Crash) -> None:
    """Issue 10 item 17: after SIGKILL and cleanup, status used to keep
    saying "'tunsup cleanup' undoes what it left" (exit 1)."""
    run_dir = crash.workdir / "run"
    before = crash.snapshot()
    svc = crash.run(crash.conf())
    svc.wait_ready(60)
    svc.proc.send_signal(signal.SIGKILL)
    assert svc.wait_exit(10) == -signal.SIGKILL
    dead = _status(run_dir)
    assert dead.returncode == 1 and "'tunsup cleanup' undoes" in dead.stdout, dead.stdout
    dry = crash.cleanup("--dry-run", "--runtime-dir", str(run_dir))
    assert f"would remove {run_dir / 'control.sock'}" in dry.stdout, dry.stdout
    assert (run_dir / "tunsup.pid").exists()

    result = crash.cleanup("--runtime-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"removed {run_dir / 'tunsup.pid'} (its service is gone)" in result.stdout
    assert_restored_ns(crash, before)
    assert sorted(os.listdir(run_dir)) == ["tunsup.lock"]
    gone = _status(run_dir)
    assert gone.returncode == 3 and gone.stdout.strip() == "tunsup is not running"


def test_cleanup_never_removes_a_live_owners_runtime_files(crash: Crash,
                                                           tmp_path: Path) -> None:
    """A pid file naming a live process (pid and start time: this test's
    own) and its socket stay, though no instance lock is held."""
    crash.state_dir.mkdir(mode=0o700)
    run_dir = tmp_path / "live.run"
    run_dir.mkdir()
    me = pidfile.myself()
    (run_dir / "tunsup.pid").write_text(f"{me.pid} {me.start_time}\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(run_dir / "control.sock"))
        result = crash.cleanup("--runtime-dir", str(run_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "removed" not in result.stdout
        assert (run_dir / "control.sock").exists() and (run_dir / "tunsup.pid").exists()
        # The same start time under another pid is someone else: that one
        # is dead.  Found from outside: its files went even when its
        # journal was not in the state directory cleaned up (another one,
        # named by mistake), which hid the crash: they stay, and it is said.
        (run_dir / "tunsup.pid").write_text(f"4000000 {me.start_time}\n")
        result = crash.cleanup("--runtime-dir", str(run_dir))
        assert result.returncode == 0, result.stdout + result.stderr
        assert "removed" not in result.stdout
        assert f"left no journal in {crash.state_dir}" in result.stderr, result.stderr
        assert (run_dir / "control.sock").exists() and (run_dir / "tunsup.pid").exists()
        # With its journal there (recovered now), they go.
        opened = {"op": "open", "pid": 4000000, "start_time": me.start_time, "version": 1,
                  "created": 0}
        (crash.state_dir / journal_name(4000000, me.start_time)).write_bytes(
            encode_line(opened))
        result = crash.cleanup("--runtime-dir", str(run_dir))
        assert "removed" in result.stdout, result.stdout + result.stderr
        assert not (run_dir / "tunsup.pid").exists()
        assert not (run_dir / "control.sock").exists()


def test_reused_pid_is_never_touched(crash: Crash) -> None:
    """A journal names a helper pid that now belongs to an unrelated process
    (another start time): cleanup leaves that process alone."""
    bystander = subprocess.Popen(["sleep", "600"])
    try:
        crash.state_dir.mkdir(mode=0o700)
        dead_owner = (4_000_000, 1)  # no such pid
        record = {"kind": "HelperRunning", "ifname": crash.ifname,
                  "argv": ["sleep", "600"], "pid": bystander.pid, "start_time": 12345}
        lines = [
            {"op": "open", "pid": dead_owner[0], "start_time": dead_owner[1], "version": 1,
             "created": 0},
            {"op": "intent", "seq": 1, "tunnel": crash.ifname,
             "effect": {"kind": "StartHelper", "ifname": crash.ifname, "argv": ["sleep", "600"]}},
            {"op": "applied", "seq": 1, "record": record},
        ]
        (crash.state_dir / journal_name(*dead_owner)).write_bytes(
            b"".join(encode_line(x) for x in lines))
        result = crash.cleanup()
        assert result.returncode == 0, result.stdout + result.stderr
        assert bystander.poll() is None, "an unrelated process was signalled"
        assert "pid reused by another process: left alone" in result.stderr
    finally:
        bystander.kill()
        bystander.wait()


def test_corrupt_journal_is_quarantined_and_readable_records_recovered(crash: Crash) -> None:
    before = crash.snapshot()
    svc = crash.run(crash.conf(), crash_at=f"applied:{STEPS}")
    assert svc.wait_exit(60) == -signal.SIGKILL
    (journal,) = crash.state_dir.glob("journal-*")
    lines = journal.read_bytes().splitlines(keepends=True)
    # Garbage in the middle (a record we cannot read), the rest intact.
    lines.insert(3, b"this is not a journal record\n")
    journal.write_bytes(b"".join(lines))
    result = crash.cleanup()
    assert result.returncode == 3, result.stdout + result.stderr
    assert "journal record(s) were unreadable" in result.stderr
    assert "damaged journal kept aside as" in result.stderr
    assert list(crash.state_dir.glob("journal-*.corrupt.*"))
    assert_restored_ns(crash, before)  # everything readable was undone


def test_torn_last_write_is_recovered_with_a_warning(crash: Crash) -> None:
    before = crash.snapshot()
    svc = crash.run(crash.conf(), crash_at=f"applied:{STEPS}")
    assert svc.wait_exit(60) == -signal.SIGKILL
    (journal,) = crash.state_dir.glob("journal-*")
    data = journal.read_bytes()
    journal.write_bytes(data + b'0badc0de {"op":"intent","seq":99,"tun')  # torn append
    result = crash.cleanup()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torn by the crash" in result.stderr
    assert list(crash.state_dir.glob("journal-*.corrupt.*"))
    assert_restored_ns(crash, before)


def test_existing_identical_route_survives_crash_and_recovery(crash: Crash) -> None:
    _netns.ip("route", "add", "203.0.113.0/24", "via", "192.0.2.2", ns=crash.ns)
    before = crash.snapshot()
    svc = crash.run(crash.conf(extra_allowed=", 203.0.113.0/24"), crash_at=f"applied:{STEPS}")
    assert svc.wait_exit(60) == -signal.SIGKILL
    assert crash.cleanup().returncode == 0
    assert_restored_ns(crash, before)
    route = json.loads(_netns.ip("-j", "route", "show", "203.0.113.0/24", ns=crash.ns))
    assert route[0]["gateway"] == "192.0.2.2"


def test_live_instance_owns_the_state(crash: Crash) -> None:
    conf = crash.conf()
    svc = crash.run(conf)
    svc.wait_ready(60)
    result = crash.cleanup()
    assert result.returncode == 1, result.stdout + result.stderr
    assert "a live instance owns" in result.stderr
    # Named by its pid (found in /proc/locks: a state directory has no pid file).
    assert f"pid {svc.proc.pid} already runs with this state" in result.stderr
    second = crash.run(conf, label="second")
    assert second.wait_exit(30) == 2
    assert "already runs with this state" in second.output()
    assert svc.proc.poll() is None
    assert svc.stop()[0] == 0
    assert crash.journals() == []


def test_journal_files_are_private(crash: Crash) -> None:
    svc = crash.run(crash.conf(), crash_at=f"applied:{STEPS}")
    assert svc.wait_exit(60) == -signal.SIGKILL
    assert crash.state_dir.stat().st_mode & 0o777 == 0o700
    (journal,) = crash.state_dir.glob("journal-*")
    assert journal.stat().st_mode & 0o777 == 0o600
    text = journal.read_text()
    assert "PrivateKey" not in text and "private_key" not in text
    assert crash.cleanup().returncode == 0


def test_stop_force_never_runs_the_same_pre_down_twice_at_once(crash: Crash) -> None:
    """Issue 10, item 20: the service is SIGKILLed (``stop --force``) while its
    PreDown runs; that hook, in its own session, survives.  Cleanup must end
    it before running the PreDown again, and restore everything."""
    first, marks = crash.workdir / "first", crash.workdir / "marks"
    # The first run parks like a hung PreDown; the second notes whether the
    # first still runs meanwhile.
    pre_down = (f"echo PreDown $$ >> {marks}; "
                f"[ -e {first} ] || {{ echo $$ > {first}; exec sleep 1000; }}; "
                f"grep -q '^State:.*[RSD]' /proc/$(cat {first})/status 2>/dev/null "
                f"&& echo CONCURRENT >> {marks}; true")
    before = crash.snapshot()
    svc = crash.run(crash.conf(pre_down=pre_down))
    svc.wait_ready(60)
    svc.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while not (first.exists() and first.read_text().strip()):  # no event to wait on
        assert time.monotonic() < deadline, svc.output()
        time.sleep(0.02)
    hook = int(first.read_text())
    try:
        # Journaled just after its spawn: kill the service once it is.
        while not any(step.down_started is not None
                      for path in crash.state_dir.glob("journal-*.log")
                      for step in read_journal(str(path)).steps):
            assert time.monotonic() < deadline, svc.output()
            time.sleep(0.02)
        svc.proc.send_signal(signal.SIGKILL)
        assert svc.wait_exit(10) == -signal.SIGKILL
        assert "State:\tS" in Path(f"/proc/{hook}/status").read_text()  # outlived it
        result = crash.cleanup()
        assert result.returncode == 0, result.stdout + result.stderr
        lines = marks.read_text().split("\n")
        assert "CONCURRENT" not in lines, "the same PreDown ran twice at once"
        assert f"ending hook pid {hook}" in result.stderr
        assert [ln.split()[0] for ln in lines if ln] == ["PreDown", "PreDown"]
        assert_restored_ns(crash, before)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(hook, signal.SIGKILL)


# --- crashes while the journal is compacted (issue 13 item 5) -----------------

#: Bound on the up/down cycles it takes a journal to reach its first
#: compaction (COMPACT_MIN = 64 KiB: about 25 cycles of the second tunnel
#: next to the first one's 600 routes).
MAX_CYCLES = 200
COMPACT_POINTS = ["compact-write:1", "compact-written:1", "compact-renamed:1"]


@pytest.mark.parametrize("point", COMPACT_POINTS)
def test_crash_during_compaction_then_cleanup_restores(crash: Crash, point: str) -> None:
    """SIGKILL half-way through writing the compacted journal, once it is
    written (not renamed), and right after the rename (directory not yet
    fsync'd): ``cleanup`` still undoes everything the first tunnel holds
    (its 600 routes, addresses, DNS, hooks, helper: records that were
    appended before the compaction, so compaction must have kept them) and
    whatever the second one held, and leaves no journal and no ``.compact``
    file behind."""
    from tunsup.control.client import Connection

    before = crash.snapshot()
    svc = crash.run(crash.conf(), crash_at=point)
    svc.wait_ready(60)
    second = unique("tsk")
    conf = crash.workdir / f"{second}.conf"
    conf.write_text(f"""\
[Interface]
PrivateKey = {Key.generate_private().to_base64()}
Address = 10.251.0.1/24
DNS = 10.251.0.53

[Peer]
PublicKey = {Key.generate_private().public_key().to_base64()}
AllowedIPs = 10.251.1.0/24
""")
    conf.chmod(0o600)
    cycles = 0
    with contextlib.suppress(ConnectionError, OSError), \
            Connection(str(crash.workdir / "run"), timeout=30) as conn:
        while cycles < MAX_CYCLES:
            conn.request("up", config=str(conf), timeout=60)
            conn.request("down", name=second, timeout=60)
            cycles += 1
    code = svc.wait_exit(60)
    assert code == -signal.SIGKILL, f"{point}: exit {code} after {cycles} cycles\n{svc.output()}"
    assert f"TUNSUP_CRASH_AT={point}: SIGKILL" in svc.output()
    left = crash.journals()
    assert any(name.endswith(".log") for name in left), left
    if point != "compact-renamed:1":
        assert any(name.endswith(".compact") for name in left), left

    result = crash.cleanup()
    assert result.returncode == 0, result.stdout + result.stderr
    assert_restored_ns(crash, before)
    assert crash.journals() == []
