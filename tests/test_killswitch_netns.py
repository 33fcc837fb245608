"""Make-before-break kill switch (issue 13 item 2), with real tunsup and
wireguard-go in the scratch namespaces of tests/test_fulltunnel_netns.py.

A 1 kHz UDP stream goes from the client namespace A to 198.51.100.1:9, an
address routed into the tunnel; a listener on it in B (the LAN gateway and
VPN server) counts datagrams by source: through the tunnel they come from
A's tunnel address 10.77.0.1, leaked through the LAN from 192.0.2.1.  The
service is then crashed as systemd would see it: SIGKILL of tunsup and its
helper, ``cleanup`` as ExecStopPost=, and ``run`` again (recovery, new
tunnel).  Not one datagram may leave through the LAN meanwhile.
"""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tunsup.testing import netns as _netns

from .conftest import needs_wireguard, unique
from .test_fulltunnel_netns import TARGET4, Net, ping, wait_until
from .test_fulltunnel_netns import net as net

pytestmark = [needs_wireguard, pytest.mark.netns]

TUNNEL_SOURCE, LAN_SOURCE = "10.77.0.1", "192.0.2.1"

#: Datagrams at 1 kHz until SIGTERM (or 5 minutes); a failed send (the kill
#: switch's "unreachable") is counted and the stream goes on.
SENDER = f"""
import signal, socket, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sent = failed = 0
end = time.monotonic() + 300
while not stop and time.monotonic() < end:
    try:
        s.sendto(b"x", ("{TARGET4}", 9))
        sent += 1
    except OSError:
        failed += 1
    time.sleep(0.001)
print(sent, failed, flush=True)
"""

#: One line per datagram: its source address; on SIGTERM it reads what is
#: still queued, then says "end".
LISTENER = f"""
import signal, socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("{TARGET4}", 9))
print("bound", flush=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
s.settimeout(0.05)
while not stop:
    try:
        print(s.recvfrom(64)[1][0], flush=True)
    except (TimeoutError, InterruptedError):
        pass
s.setblocking(False)
try:
    while True:
        print(s.recvfrom(64)[1][0], flush=True)
except BlockingIOError:
    pass
print("end", flush=True)
"""


class Stream:
    """The 1 kHz stream from A and the per-source counter in B."""

    def __init__(self, net: Net) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.listener = subprocess.Popen(
            _netns.ns_exec_argv(net.b, [sys.executable, "-c", LISTENER]),
            stdout=subprocess.PIPE, text=True)
        assert self.listener.stdout is not None
        assert self.listener.stdout.readline().strip() == "bound"
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.sender = subprocess.Popen(
            _netns.ns_exec_argv(net.a, [sys.executable, "-c", SENDER]),
            stdout=subprocess.PIPE, text=True)
        self.sent = self.failed = 0

    def _read(self) -> None:
        assert self.listener.stdout is not None
        for line in self.listener.stdout:
            source = line.strip()
            if source == "end":
                return
            with self._lock:
                self.counts[source] += 1

    def seen(self, source: str) -> int:
        with self._lock:
            return self.counts[source]

    def wait_for(self, source: str, more_than: int, timeout: float = 20) -> None:
        """Bounded polling until the listener has counted more than
        ``more_than`` datagrams from ``source``."""
        wait_until(lambda: self.seen(source) > more_than, timeout)

    def finish(self) -> None:
        """Stop the sender, then the listener once it has read all that is
        queued: the counts are final."""
        self.sender.send_signal(signal.SIGTERM)
        out, _ = self.sender.communicate(timeout=10)
        self.sent, self.failed = map(int, out.split())
        self.listener.send_signal(signal.SIGTERM)
        self.listener.wait(timeout=10)
        self._reader.join(timeout=10)
        assert not self._reader.is_alive()

    def close(self) -> None:
        for proc in (self.sender, self.listener):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def start_stream(net: Net) -> Iterator[Callable[[], Stream]]:
    """Starts the stream (once the tunnel is up: before, the LAN is the
    route); stopped after the test."""
    started: list[Stream] = []

    def start() -> Stream:
        started.append(Stream(net))
        return started[-1]

    try:
        yield start
    finally:
        for s in started:
            s.close()


def helper_pid(ns: str) -> str:
    (pid,) = [p for p in _netns.ip("netns", "pids", ns).split()
              if Path(f"/proc/{p}/comm").read_text().startswith("wireguard")]
    return pid


def crash(net: Net, client: object) -> None:
    """SIGKILL tunsup, then its helper; wait until the tunnel link is gone."""
    helper = helper_pid(net.a)
    proc = client.proc  # type: ignore[attr-defined]
    proc.send_signal(signal.SIGKILL)
    assert client.wait_exit(10) == -signal.SIGKILL  # type: ignore[attr-defined]
    subprocess.run(["kill", "-9", helper], check=False)
    wait_until(lambda: net.if_a not in _netns.ip("-o", "link", "show", ns=net.a))


def kill_switch_routes(ns: str) -> list[str]:
    """The unreachable routes of ``ns``, all tables, both families."""
    return [line for family in ("-4", "-6")
            for line in _netns.ip(family, "route", "show", "table", "all", ns=ns).splitlines()
            if line.startswith("unreachable")]


def cleanup(net: Net, *args: str) -> subprocess.CompletedProcess[str]:
    """``tunsup cleanup`` as the unit's ExecStopPost= runs it (same TOML)."""
    return subprocess.run(_netns.ns_exec_argv(net.a, [
        sys.executable, "-m", "tunsup", "cleanup", "-c", str(net.workdir / "client.toml"),
        "--state-dir", str(net.workdir / "a"), *args]),
        capture_output=True, text=True, timeout=120, check=False)


ALLOWED = {"full": "0.0.0.0/0, ::/0", "plain": "198.51.100.0/24, 2001:db8:100::/64"}


@pytest.mark.parametrize("routing", ["full", "plain"])
def test_crash_cleanup_and_restart_leak_nothing(net: Net, start_stream: Callable[[], Stream],
                                                routing: str) -> None:
    """Issue 13 item 2: the restarted service takes the kill switch over
    from the dead one; a normal stop then still restores everything."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed=ALLOWED[routing], kill_switch=True, tun="helper")
    client.wait_ready()
    stream = start_stream()
    stream.wait_for(TUNNEL_SOURCE, 50)
    closed = kill_switch_routes(net.a)
    crash(net, client)
    through_tunnel = stream.seen(TUNNEL_SOURCE)

    result = cleanup(net, "--keep-kill-switch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kill switch" in result.stdout and "kept" in result.stdout, result.stdout
    again = net.start_client(allowed=ALLOWED[routing], kill_switch=True, tun="helper")
    again.wait_ready()
    # One kill switch, the new tunnel's: the old one was handed over or
    # dropped (before READY), and none of it was lost on the way.
    assert len(kill_switch_routes(net.a)) == len(closed) > 0
    assert "taken over" in again.output() or routing == "full", again.output()
    # The stream flows through the new tunnel: the crash window is behind us.
    stream.wait_for(TUNNEL_SOURCE, through_tunnel + 50)
    stream.finish()
    assert stream.failed > 0, "the stream never met the closed kill switch"
    assert stream.seen(LAN_SOURCE) == 0, (
        f"{stream.seen(LAN_SOURCE)} plaintext datagram(s) left through the LAN "
        f"(sent {stream.sent}, refused {stream.failed})")
    # Nothing of the dead instance is left: only the live one's journal.
    assert len(list((net.workdir / "a").glob("journal-*"))) == 1
    assert again.stop()[0] == 0
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0


def test_the_counter_sees_the_leak_of_a_cleanup_that_opens_the_host(
        net: Net, start_stream: Callable[[], Stream]) -> None:
    """The control: ``cleanup --all`` (what ExecStopPost= used to do) opens
    the host until the restart, and the counter sees it; after it the kill
    switch is gone and the host is as before."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed=ALLOWED["plain"], kill_switch=True, tun="helper")
    client.wait_ready()
    stream = start_stream()
    stream.wait_for(TUNNEL_SOURCE, 50)
    crash(net, client)
    result = cleanup(net, "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    stream.wait_for(LAN_SOURCE, 10)
    stream.finish()
    assert stream.seen(LAN_SOURCE) > 0
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0


def test_kept_kill_switch_holds_until_cleanup_all(net: Net) -> None:
    """``cleanup --keep-kill-switch`` leaves the host closed (and says so);
    a second one keeps it still; ``cleanup --all`` restores the host."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(kill_switch=True, tun="helper")
    client.wait_ready()
    assert ping(net.a, TARGET4)
    crash(net, client)
    for _ in range(2):
        result = cleanup(net, "--keep-kill-switch")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "unreachable" in _netns.ip("route", "show", "table", "51820", ns=net.a)
        assert "lookup 51820" in _netns.ip("rule", "show", ns=net.a)
        assert not ping(net.a, TARGET4)
    result = cleanup(net, "--all")
    assert result.returncode == 0, result.stdout + result.stderr
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert not list((net.workdir / "a").glob("journal-*"))
    assert server.stop()[0] == 0


def test_a_tunnel_no_longer_configured_loses_its_kill_switch_at_start(
        net: Net) -> None:
    """Recovery keeps only what the run starts again: the kill switch of a
    tunnel gone from the configuration is removed (the host opens for it)."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed=ALLOWED["plain"], kill_switch=True, tun="helper")
    client.wait_ready()
    crash(net, client)
    assert cleanup(net, "--keep-kill-switch").returncode == 0
    assert "unreachable" in _netns.ip("route", "show", ns=net.a)
    # The same state directory, now configured with another tunnel name.
    net.if_a = unique("tsfc")
    other = net.start_client(allowed=ALLOWED["plain"], kill_switch=False, tun="helper")
    other.wait_ready()
    assert "unreachable" not in _netns.ip("route", "show", ns=net.a)
    assert other.stop()[0] == 0
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0


def test_cleanup_keeps_only_the_kill_switch_of_configured_tunnels(net: Net) -> None:
    """``cleanup --keep-kill-switch -c FILE`` keeps the kill switch of the
    tunnels FILE configures; one no longer there is removed."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed=ALLOWED["plain"], kill_switch=True, tun="helper")
    client.wait_ready()
    crash(net, client)
    other = net.workdir / f"{unique('tsfc')}.conf"
    other.write_text((net.workdir / f"{net.if_a}.conf").read_text())
    (net.workdir / "client.toml").write_text(f'[[tunnel]]\nconfig = "{other.name}"\n')
    result = cleanup(net, "--keep-kill-switch")
    assert result.returncode == 0, result.stdout + result.stderr
    assert kill_switch_routes(net.a) == []
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0


@pytest.mark.parametrize("kill_switch", [False, True])
def test_a_full_tunnel_rebuild_leaks_nothing(net: Net, start_stream: Callable[[], Stream],
                                             kill_switch: bool) -> None:
    """Issue 14: a full tunnel rebuilt by a reload (here: its TUN mode
    changed) holds its default route make-before-break, with or without
    the kill switch: its unmarked traffic is held (never routed through
    the LAN) from the old tunnel's teardown until the new one routes it,
    the new helper's own (marked) packets and the LAN still pass, and the
    host is as before after the stop."""
    from .test_service_netns import tunsup

    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(kill_switch=kill_switch, tun="helper")
    client.wait_ready()
    stream = start_stream()
    stream.wait_for(TUNNEL_SOURCE, 50)
    old = helper_pid(net.a)
    (net.workdir / "client.toml").write_text(
        f'[[tunnel]]\nconfig = "{net.if_a}.conf"\nkill_switch = {json.dumps(kill_switch)}\n'
        'tun = "owned"\n')
    res = tunsup("reload", "--runtime-dir", str(net.workdir / "a.run"))
    assert res.returncode == 0, res.stdout + res.stderr + client.output_tail()
    assert f"rebuilt: {net.if_a}: option tun_mode changed" in res.stdout, res.stdout
    assert helper_pid(net.a) != old
    through_tunnel = stream.seen(TUNNEL_SOURCE)
    stream.wait_for(TUNNEL_SOURCE, through_tunnel + 50)
    # The hold is gone: only the new tunnel's routes and rules are left.
    assert not [r for r in kill_switch_routes(net.a) if "metric 4294967279" in r]
    assert "0x0/0xffffffff" not in _netns.ip("rule", "show", ns=net.a)
    stream.finish()
    assert stream.seen(LAN_SOURCE) == 0, (
        f"{stream.seen(LAN_SOURCE)} plaintext datagram(s) left through the LAN during the "
        f"rebuild (sent {stream.sent}, refused {stream.failed})")
    lost = stream.sent - stream.seen(TUNNEL_SOURCE) - stream.seen(LAN_SOURCE)
    print(f"full-tunnel rebuild (kill_switch={kill_switch}): {stream.sent} sent, "
          f"{stream.seen(LAN_SOURCE)} leaked, {lost} lost, {stream.failed} refused (held)")
    assert client.stop()[0] == 0, client.output_tail()
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0
