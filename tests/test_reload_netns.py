"""Reload in place with real processes (issue 14): a 1 kHz UDP stream
from the client namespace to an address behind the tunnel, a counter on the
LAN router (which owns the client's default route's next hop and sinks
cleartext for the tunnel's prefix), and one reload per kind of change.
Every change must leak nothing; in-place ones keep the helper; routes are
exact after each step; the host is identical after the stop.

Topology (every namespace made by the test)::

    client  lan0 192.0.2.1 --- 192.0.2.254 lan0  router  wan0 198.51.100.1
                                   10.210.0.9/32 on lo (cleartext sink)
    peer    wan0 198.51.100.2 (and .3), WireGuard 10.210.0.9/24
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from tunsup.config.keys import Key
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceProcess

from .conftest import needs_wireguard, unique
from .test_crash_netns import STEPS as CRASH_STEPS
from .test_crash_netns import Crash, assert_restored_ns, crash  # noqa: F401 - a fixture
from .test_service_netns import tunsup
from .test_tunnel_netns import STEP_GUARD, Pair, helper_pids, pair, routes  # noqa: F401

pytestmark = [needs_wireguard, pytest.mark.netns]

UDP = str(Path(__file__).with_name("_udp.py"))
PORT = 9999
SINK = "10.210.0.9"

#: Filled by the test: change kind -> (leaked, lost); printed at the end.
RESULTS: dict[str, tuple[int, int]] = {}


@attrs.define
class Lab:
    client: str
    router: str
    peer: str
    workdir: Path
    ifname: str = attrs.field(factory=lambda: unique("tsr"))
    peer_if: str = attrs.field(factory=lambda: unique("tsp"))
    key_c: Key = attrs.field(factory=Key.generate_private)
    key_p: Key = attrs.field(factory=Key.generate_private)
    procs: list[subprocess.Popen[bytes]] = attrs.field(factory=list)
    services: list[ServiceProcess] = attrs.field(factory=list)

    @property
    def resolv(self) -> Path:
        return self.workdir / "resolv.conf"

    @property
    def rt(self) -> str:
        return str(self.workdir / "client.run")

    def client_conf(self, *, allowed: str = "10.210.0.0/24", addresses: str = "10.200.0.1/24",
                    dns: str | None = "10.200.0.53", mtu: int | None = None,
                    endpoint: str | None = "198.51.100.2:51821",
                    keepalive: int | None = None,
                    extra_peer: bool = False) -> str:
        other = Key.generate_private().public_key().to_base64()
        body = "[Interface]\n" f"PrivateKey = {self.key_c.to_base64()}\n" \
               f"Address = {addresses}\n"
        if dns:
            body += f"DNS = {dns}\n"
        if mtu:
            body += f"MTU = {mtu}\n"
        body += ("\n[Peer]\n" f"PublicKey = {self.key_p.public_key().to_base64()}\n"
                 + (f"Endpoint = {endpoint}\n" if endpoint else "")
                 + f"AllowedIPs = {allowed}\n")
        if keepalive:
            body += f"PersistentKeepalive = {keepalive}\n"
        if extra_peer:
            body += f"\n[Peer]\nPublicKey = {other}\nAllowedIPs = 10.220.0.0/24\n"
        path = self.workdir / f"{self.ifname}.conf"
        path.write_text(body)
        path.chmod(0o600)
        return str(path)

    def peer_conf(self) -> str:
        path = self.workdir / f"{self.peer_if}.conf"
        path.write_text(f"""\
[Interface]
PrivateKey = {self.key_p.to_base64()}
Address = {SINK}/24
ListenPort = 51821

[Peer]
PublicKey = {self.key_c.public_key().to_base64()}
AllowedIPs = 10.200.0.0/24, 10.201.0.0/24, 10.210.0.1/32
""")
        path.chmod(0o600)
        return str(path)

    def service(self, ns: str, conf: str, label: str) -> ServiceProcess:
        svc = ServiceProcess(ns, [conf, "--dns", "file", "--resolv-conf", str(self.resolv),
                                  "--state-dir", str(self.workdir / f"{label}.state"),
                                  "--runtime-dir", str(self.workdir / f"{label}.run")],
                             str(self.workdir), label, env=STEP_GUARD)
        self.services.append(svc)
        return svc

    def spawn(self, ns: str, *args: str) -> None:
        self.procs.append(subprocess.Popen(
            _netns.ns_exec_argv(ns, [sys.executable, UDP, *args]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))

    def endpoint(self) -> str:
        """The peer's endpoint as the client's helper has it (``wg show``)."""
        argv = _netns.ns_exec_argv(self.client, ["wg", "show", self.ifname, "endpoints"])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        mine = self.key_p.public_key().to_base64()
        return next(line.split("\t")[1] for line in out.splitlines() if line.startswith(mine))

    def tunnel_routes(self) -> set[str]:
        out = _netns.ip("-j", "route", "show", "dev", self.ifname, ns=self.client)
        return {r["dst"] for r in json.loads(out or "[]") if r.get("protocol") != "kernel"}


@pytest.fixture
def lab(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Lab]:
    client, router, peer = netns("trc"), netns("trl"), netns("trp")
    _netns.add_veth_pair(client, "lan0", router, "lan0")
    _netns.add_veth_pair(router, "wan0", peer, "wan0")
    ip = _netns.ip
    ip("address", "add", "192.0.2.1/24", "dev", "lan0", ns=client)
    ip("route", "add", "default", "via", "192.0.2.254", ns=client)
    ip("address", "add", "192.0.2.254/24", "dev", "lan0", ns=router)
    ip("address", "add", "198.51.100.1/24", "dev", "wan0", ns=router)
    ip("address", "add", f"{SINK}/32", "dev", "lo", ns=router)
    subprocess.run(_netns.ns_exec_argv(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]),
                   check=True, timeout=30)
    ip("address", "add", "198.51.100.2/24", "dev", "wan0", ns=peer)
    ip("address", "add", "198.51.100.3/24", "dev", "wan0", ns=peer)
    ip("route", "add", "default", "via", "198.51.100.1", ns=peer)
    lab = Lab(client, router, peer, tmp_path)
    lab.resolv.write_text("nameserver 192.0.2.53\n")
    try:
        yield lab
    finally:
        for proc in lab.procs:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for svc in lab.services:
            svc.close()


def _read(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _window(lab: Lab, t0: float, t1: float) -> tuple[int, int, int]:
    """(sent, leaked, lost) for the datagrams sent between t0 and t1."""
    seqs = set()
    for line in _read(lab.workdir / "sent.log"):
        parts = line.split()
        if len(parts) == 3 and t0 <= float(parts[1]) <= t1:
            seqs.add(int(parts[0]))
    leaked = {int(x) for x in _read(lab.workdir / "lan.log") if x.isdigit()} & seqs
    delivered = {int(x) for x in _read(lab.workdir / "peer.log") if x.isdigit()} & seqs
    return len(seqs), len(leaked), len(seqs - leaked - delivered)


def _now() -> float:
    return time.monotonic()


def _settle(lab: Lab, seconds: float) -> None:
    """Let datagrams in flight arrive: wait until the peer's counter has
    seen a datagram sent after ``seconds`` from now (the stream is live)."""
    import time

    target = _now() + seconds
    deadline = target + 10
    while True:
        lines = _read(lab.workdir / "sent.log")
        last = lines[-1].split() if lines else []
        if last and float(last[1]) >= target:
            return
        assert time.monotonic() < deadline, "the sender stalled"
        time.sleep(0.05)


def _delivering(lab: Lab, timeout: float = 20) -> None:
    """Wait until the peer receives a datagram sent from now on (after a
    new session: a handshake wireguard-go may hold back for up to its
    5 s rekey timeout)."""
    lines = _read(lab.workdir / "sent.log")
    last = int(lines[-1].split()[0]) if lines else -1
    deadline = time.monotonic() + timeout
    while not any(x.isdigit() and int(x) > last for x in _read(lab.workdir / "peer.log")):
        assert time.monotonic() < deadline, "the stream does not come through the tunnel"
        time.sleep(0.05)


#: (kind, change to the client's configuration, cumulative; routes through
#: the tunnel after it; whether it applies in place).
STEPS: list[tuple[str, dict[str, Any], set[str], bool]] = [
    ("AllowedIPs added", {"allowed": "10.210.0.0/24, 10.211.0.0/24"},
     {"10.210.0.0/24", "10.211.0.0/24"}, True),
    ("AllowedIPs removed", {"allowed": "10.210.0.0/24"}, {"10.210.0.0/24"}, True),
    ("peer added", {"extra_peer": True}, {"10.210.0.0/24", "10.220.0.0/24"}, True),
    ("peer removed", {"extra_peer": False}, {"10.210.0.0/24"}, True),
    ("endpoint", {"endpoint": "198.51.100.3:51821"}, {"10.210.0.0/24"}, True),
    # UAPI cannot unset an endpoint: the peer is re-created in one request
    # (the stream is lost until the endpoint is back, never leaked).
    ("endpoint removed", {"endpoint": None}, {"10.210.0.0/24"}, True),
    ("endpoint restored", {"endpoint": "198.51.100.3:51821"}, {"10.210.0.0/24"}, True),
    ("keepalive", {"keepalive": 25}, {"10.210.0.0/24"}, True),
    ("DNS", {"dns": "10.200.0.54"}, {"10.210.0.0/24"}, True),
    ("MTU", {"mtu": 1300}, {"10.210.0.0/24"}, True),
    ("address added", {"addresses": "10.200.0.1/24, 10.201.0.1/24"}, {"10.210.0.0/24"}, True),
    ("address removed", {"addresses": "10.200.0.1/24"}, {"10.210.0.0/24"}, True),
    # The tunnel's own subnet is no LAN: the route tunsup added for the
    # prefix stays when an address in it comes (it was taken out as
    # "directly connected" and the prefix left the kill switch).
    ("address inside AllowedIPs", {"addresses": "10.210.0.1/24"}, {"10.210.0.0/24"}, True),
    # DNS removed altogether: a rebuild (make-before-break, prefixes held).
    # Started with that address, the tunnel has no route of its own for
    # the prefix: the address's route serves it.
    ("forced rebuild", {"dns": None}, set(), False),
    # Out again: tunsup's route replaces the address's, which goes with
    # the address (the kernel refuses the two side by side); it left the
    # prefix to the LAN.
    ("address outside AllowedIPs", {"addresses": "10.200.0.1/24"}, {"10.210.0.0/24"}, True),
]


def test_every_kind_of_change_leaks_nothing(lab: Lab) -> None:
    before = _netns.snapshot(lab.client, [str(lab.resolv)])
    peer = lab.service(lab.peer, lab.peer_conf(), "peer")
    peer.wait_ready(60)
    conf = lab.client_conf()
    client = lab.service(lab.client, conf, "client")
    client.wait_ready(60)
    lab.spawn(lab.router, "count", str(PORT), str(lab.workdir / "lan.log"))
    lab.spawn(lab.peer, "count", str(PORT), str(lab.workdir / "peer.log"))
    for name in ("lan.log", "peer.log"):
        while "ready" not in _read(lab.workdir / name):
            assert all(p.poll() is None for p in lab.procs), "a counter died"
            time.sleep(0.05)
    lab.spawn(lab.client, "send", SINK, str(PORT), str(lab.workdir / "sent.log"))
    # The handshake: wait until the stream arrives through the tunnel.
    deadline = time.monotonic() + 30
    while not any(x.isdigit() for x in _read(lab.workdir / "peer.log")):
        assert time.monotonic() < deadline, "no datagram came through the tunnel"
        time.sleep(0.05)
    _settle(lab, 0.3)
    assert lab.tunnel_routes() == {"10.210.0.0/24"}
    pid = helper_pids(lab.client)
    report = []
    current: dict[str, Any] = {}
    for kind, change, expected, in_place in STEPS:
        current.update(change)
        lab.client_conf(**current)
        t0 = _now()
        res = tunsup("reload", "--runtime-dir", lab.rt, timeout=60)
        t1 = _now()
        assert res.returncode == 0, f"{kind}: {res.stdout}{res.stderr}\n{client.output_tail()}"
        assert ("changed in place" if in_place else "rebuilt") in res.stdout, \
            f"{kind}: {res.stdout}"
        _settle(lab, 0.5)
        sent, leaked, lost = _window(lab, t0 - 0.2, t1 + 0.2)
        RESULTS[kind] = (leaked, lost)
        report.append(f"{kind}: {sent} sent, {leaked} leaked, {lost} lost "
                      f"({res.stdout.strip()})")
        assert leaked == 0, "\n".join(report)
        assert lab.tunnel_routes() == expected, kind
        assert lab.endpoint() == (current.get("endpoint", "198.51.100.2:51821") or "(none)"), \
            kind
        now = helper_pids(lab.client)
        if in_place:
            assert now == pid, f"{kind}: the helper was replaced"
            if kind == "endpoint restored":
                _delivering(lab)  # the re-created peer's first handshake
                _settle(lab, 0.3)
        else:
            assert now != pid, f"{kind}: not rebuilt"
            pid = now
            # The new helper's handshake: wait for the stream again.
            _settle(lab, 1.0)
    print("\n".join(["per change kind:", *report]))
    # Every datagram before and between the steps went through the tunnel.
    for proc in lab.procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    total = {int(x) for x in _read(lab.workdir / "lan.log") if x.isdigit()}
    assert not total, f"{len(total)} datagram(s) leaked in cleartext"
    client.stop()
    assert client.wait_exit(60) == 0, client.output_tail()
    diff = _netns.diff_snapshots(before, _netns.snapshot(lab.client, [str(lab.resolv)]))
    assert not diff, "host not restored:\n" + "\n".join(diff)


# ------------------------------------------------------------------ crash points

#: Effects of an in-place change of the configuration below: address added,
#: MTU, WireGuard change, routes added, routes removed, DNS, address removed.
RELOAD_STEPS = 7


def _crash_conf(c: Crash, keys: tuple[Key, Key], *, changed: bool) -> str:
    hooks = c.workdir / "hooks.log"
    first = range(100, 120) if not changed else range(110, 130)
    allowed = ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in first)
    path = c.workdir / f"{c.ifname}.conf"
    path.write_text(f"""\
[Interface]
PrivateKey = {keys[0].to_base64()}
Address = {"10.250.0.1/24, 10.251.0.1/24" if changed else "10.250.0.1/24, fd00:250::1/64"}
DNS = {"10.250.0.54" if changed else "10.250.0.53"}, crash.example
{"MTU = 1300" if changed else ""}
PreUp = echo PreUp >> {hooks}
PostUp = echo PostUp >> {hooks}
PreDown = echo PreDown >> {hooks}
PostDown = echo PostDown >> {hooks}

[Peer]
PublicKey = {keys[1].public_key().to_base64()}
Endpoint = 192.0.2.2:51820
AllowedIPs = {allowed}
{"PersistentKeepalive = 25" if changed else ""}
""")
    return str(path)


def _reload_with_crash(c: Crash, point: str | None) -> ServiceProcess:
    keys = (Key.generate_private(), Key.generate_private())
    svc = c.run(_crash_conf(c, keys, changed=False), crash_at=point)
    svc.wait_ready(60)
    _crash_conf(c, keys, changed=True)
    svc.proc.send_signal(signal.SIGHUP)
    return svc


@pytest.mark.parametrize("point", [f"{when}:{CRASH_STEPS + k}"
                                   for k in range(1, RELOAD_STEPS + 1)
                                   for when in ("intent", "effect", "applied")])
def test_crash_at_every_step_of_an_in_place_change_then_cleanup_restores(
        crash: Crash, point: str) -> None:  # noqa: F811 - the imported fixture
    before = crash.snapshot()
    svc = _reload_with_crash(crash, point)
    code = svc.wait_exit(60)
    assert code == -signal.SIGKILL, f"{point}: exit {code}\n{svc.output()}"
    assert "reloaded:" not in svc.output()
    result = crash.cleanup()
    assert result.returncode == 0, result.stdout + result.stderr
    assert_restored_ns(crash, before)
    assert crash.journals() == []


def test_the_reload_crash_points_cover_every_step(crash: Crash) -> None:  # noqa: F811
    """RELOAD_STEPS is exactly the number of in-place effects: one more
    never fires, and the change then stops cleanly."""
    before = crash.snapshot()
    svc = _reload_with_crash(crash, f"intent:{CRASH_STEPS + RELOAD_STEPS + 1}")
    deadline = time.monotonic() + 30
    while "reloaded:" not in svc.output():
        assert time.monotonic() < deadline, svc.output_tail()
        assert svc.proc.poll() is None, svc.output_tail()
        time.sleep(0.05)
    out = svc.output()
    assert ("peers +0/-0/~1, routes +10/-10, addresses +1/-1, DNS" in out
            and "MTU 1420->1300" in out), out
    assert svc.stop()[0] == 0, svc.output_tail()
    assert_restored_ns(crash, before)


# ------------------------------------------------------------------ up, failure


def test_up_of_a_changed_file_changes_in_place_and_a_failed_change_rolls_back(
        pair: Pair) -> None:  # noqa: F811 - the imported fixture
    name = unique("tsu")
    conf = pair.conf_a(name)
    before = _netns.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf, label="svc")
    svc.wait_ready(60)
    rt = str(pair.workdir / "svc.run")
    pid = helper_pids(pair.ns_a)

    # up of the changed file: in place, not refused.
    pair.conf_a(name, allowed="10.200.0.2/32, 10.202.0.0/24")
    res = tunsup("up", conf, "--runtime-dir", rt)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"tunnel {name} changed in place: peers +0/-0/~1, routes +1/-0" in res.stdout
    assert helper_pids(pair.ns_a) == pid
    assert {r["dst"] for r in routes(pair.ns_a, "route", "show", "dev", name)
            if r.get("protocol") != "kernel"} == {"10.202.0.0/24"}

    # A change whose last step (DNS) fails is rolled back: exit 1, host as before.
    resolv = Path(pair.resolv("a"))
    resolv.unlink()
    resolv.mkdir()
    pair.conf_a(name, allowed="10.200.0.2/32, 10.203.0.0/24", extra="DNS = 10.200.0.53\nMTU = 1300")
    changed = _netns.snapshot(pair.ns_a)
    res = tunsup("reload", "--runtime-dir", rt)
    assert res.returncode == 1, res.stdout + res.stderr
    assert f"failed: {name}: tunnel {name}: in-place change failed: " in res.stderr
    assert "; rolled back: " in res.stderr and "INCOMPLETE" not in res.stderr, res.stderr
    diff = _netns.diff_snapshots(changed, _netns.snapshot(pair.ns_a))
    assert not diff, "not rolled back:\n" + "\n".join(diff)
    assert helper_pids(pair.ns_a) == pid
    resolv.rmdir()
    resolv.write_text("nameserver 192.0.2.53\nsearch lan.example\n")

    # The tunnel still runs the configuration before the failed change.
    pair.conf_a(name, allowed="10.200.0.2/32, 10.202.0.0/24")
    res = tunsup("reload", "--runtime-dir", rt)
    assert res.returncode == 0 and f"unchanged: {name}" in res.stdout, res.stdout + res.stderr
    assert svc.stop()[0] == 0, svc.output_tail()
    diff = _netns.diff_snapshots(before, _netns.snapshot(pair.ns_a))
    assert not diff, "host not restored:\n" + "\n".join(diff)
