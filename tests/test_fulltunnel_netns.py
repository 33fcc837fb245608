"""Full-tunnel routing (AllowedIPs = 0.0.0.0/0, ::/0), the LAN, and the
kill switch, with real tunsup and wireguard-go in scratch namespaces.

Topology: namespace A (the client) and B (the VPN server) share a "LAN"
veth, 192.0.2.0/24 and 2001:db8:1::/64, where B is also A's default
gateway.  B serves 198.51.100.1 and 2001:db8:100::1 on its loopback: sent
through the tunnel, packets arrive from A's tunnel address; leaked, they
would arrive over the LAN.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tunsup.config.keys import Key
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceProcess

from .conftest import needs_wireguard, unique
from .test_tunnel_netns import STEP_GUARD

pytestmark = [needs_wireguard, pytest.mark.netns]

TARGET4, TARGET6 = "198.51.100.1", "2001:db8:100::1"


@attrs.define
class Net:
    a: str
    b: str
    workdir: Path
    if_a: str = attrs.field(factory=lambda: unique("tsfa"))
    if_b: str = attrs.field(factory=lambda: unique("tsfb"))
    key_a: Key = attrs.field(factory=Key.generate_private)
    key_b: Key = attrs.field(factory=Key.generate_private)
    services: list[ServiceProcess] = attrs.field(factory=list)

    def start_server(self) -> ServiceProcess:
        conf = self.workdir / f"{self.if_b}.conf"
        conf.write_text(f"""\
[Interface]
PrivateKey = {self.key_b.to_base64()}
Address = 10.77.0.2/24, fd00:77::2/64
ListenPort = 51821

[Peer]
PublicKey = {self.key_a.public_key().to_base64()}
AllowedIPs = 10.77.0.1/32, fd00:77::1/128
""")
        return self._run(self.b, str(conf), "b", [])

    def start_client(self, allowed: str = "0.0.0.0/0, ::/0", endpoint: str = "192.0.2.2:51821",
                     **options: object) -> ServiceProcess:
        conf = self.workdir / f"{self.if_a}.conf"
        conf.write_text(f"""\
[Interface]
PrivateKey = {self.key_a.to_base64()}
Address = 10.77.0.1/24, fd00:77::1/64
DNS = 10.77.0.53

[Peer]
PublicKey = {self.key_b.public_key().to_base64()}
AllowedIPs = {allowed}
Endpoint = {endpoint}
PersistentKeepalive = 1
""")
        toml = self.workdir / "client.toml"
        lines = [f'[[tunnel]]\nconfig = "{conf.name}"']
        lines += [f"{k} = {json.dumps(v)}" for k, v in options.items()]
        toml.write_text("\n".join(lines) + "\n")
        return self._run(self.a, "-c", "a", [str(toml)])

    def _run(self, ns: str, first: str, label: str, rest: list[str]) -> ServiceProcess:
        svc = ServiceProcess(ns, [first, *rest, "--dns", "file", "--resolv-conf",
                                  str(self.resolv), "--state-dir", str(self.workdir / label),
                                  "--runtime-dir", str(self.workdir / f"{label}.run")],
                             str(self.workdir), label, env=STEP_GUARD)
        self.services.append(svc)
        return svc

    @property
    def resolv(self) -> Path:
        return self.workdir / "resolv.conf"

    def snapshot(self) -> dict[str, object]:
        return _netns.snapshot(self.a, [str(self.resolv)])

    def cleanup(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(_netns.ns_exec_argv(self.a, [
            sys.executable, "-m", "tunsup", "cleanup", "--state-dir", str(self.workdir / "a")]),
            capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture
def net(netns: Callable[[str], str], tmp_path: Path) -> Iterator[Net]:
    a, b = netns("tsfa"), netns("tsfb")
    _netns.add_veth_pair(a, "lan0", b, "lan0")
    _netns.ip("address", "add", "192.0.2.1/24", "dev", "lan0", ns=a)
    _netns.ip("address", "add", "192.0.2.2/24", "dev", "lan0", ns=b)
    _netns.ip("-6", "address", "add", "2001:db8:1::1/64", "dev", "lan0", "nodad", ns=a)
    _netns.ip("-6", "address", "add", "2001:db8:1::2/64", "dev", "lan0", "nodad", ns=b)
    # B is A's LAN gateway: what leaks out of the tunnel reaches B over the LAN.
    _netns.ip("route", "add", "default", "via", "192.0.2.2", ns=a)
    _netns.ip("-6", "route", "add", "default", "via", "2001:db8:1::2", ns=a)
    _netns.ip("address", "add", f"{TARGET4}/32", "dev", "lo", ns=b)
    _netns.ip("-6", "address", "add", f"{TARGET6}/128", "dev", "lo", ns=b)
    n = Net(a, b, tmp_path)
    n.resolv.write_text("nameserver 192.0.2.53\n")
    try:
        yield n
    finally:
        for svc in n.services:
            svc.close()
        n.cleanup()


def ping(ns: str, target: str) -> bool:
    res = subprocess.run(_netns.ns_exec_argv(ns, ["ping", "-c", "2", "-i", "0.2", "-W", "1",
                                                  target]),
                         capture_output=True, text=True, timeout=30, check=False)
    return res.returncode == 0


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def tx_packets(ns: str, dev: str) -> int:
    link = json.loads(_netns.ip("-s", "-j", "link", "show", dev, ns=ns))[0]
    return int(link["stats64"]["tx"]["packets"])


def udp_source_seen(net: Net, target: str, wait: float = 10) -> str:
    """Send one UDP datagram from A to ``target``:9; return the source
    address B's listener saw, or "" if nothing arrived within ``wait``."""
    family = "AF_INET6" if ":" in target else "AF_INET"
    listener = subprocess.Popen(_netns.ns_exec_argv(net.b, [
        sys.executable, "-c",
        f"import socket; s=socket.socket(socket.{family}, socket.SOCK_DGRAM); "
        f"s.bind(('{target}', 9)); print('bound', flush=True); s.settimeout({wait}); "
        "print(s.recvfrom(100)[1][0], flush=True)"]),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert listener.stdout is not None
        assert listener.stdout.readline().strip() == "bound"
        # The send itself may fail (unreachable): that is what fail-closed means.
        subprocess.run(_netns.ns_exec_argv(net.a, [
            sys.executable, "-c",
            f"import socket; socket.socket(socket.{family}, socket.SOCK_DGRAM)"
            f".sendto(b'x', ('{target}', 9))"]), check=False, timeout=30,
            stderr=subprocess.DEVNULL)
        return listener.stdout.readline().strip()
    finally:
        listener.kill()
        listener.wait()


@pytest.mark.parametrize("family", [4, 6])
def test_full_tunnel_routes_everything_but_the_lan_and_restores(net: Net, family: int) -> None:
    target = TARGET4 if family == 4 else TARGET6
    neighbour = "192.0.2.2" if family == 4 else "2001:db8:1::2"
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed="0.0.0.0/0" if family == 4 else "::/0")
    client.wait_ready()
    out = client.output()
    assert "full tunnel: default route(s) in table 51820, fwmark 0xca6c" in out

    # Through the tunnel: B sees A's tunnel address as the source.
    tunnel_tx = tx_packets(net.a, net.if_a)
    expected = "10.77.0.1" if family == 4 else "fd00:77::1"
    assert udp_source_seen(net, target) == expected
    assert ping(net.a, target)
    assert tx_packets(net.a, net.if_a) > tunnel_tx
    # The LAN neighbour stays directly reachable, not through the tunnel.
    tunnel_tx = tx_packets(net.a, net.if_a)
    assert ping(net.a, neighbour)
    assert tx_packets(net.a, net.if_a) == tunnel_tx
    # WireGuard's own UDP leaves over the LAN (no loop): the handshake worked
    # and the fwmark rule is there.
    rules = _netns.ip(f"-{family}", "rule", "show", ns=net.a)
    assert "not from all fwmark 0xca6c lookup 51820" in rules
    assert "from all lookup main suppress_prefixlength 0" in rules

    assert client.stop()[0] == 0, client.output()
    assert server.stop()[0] == 0
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)


def test_src_valid_mark_is_restored(net: Net) -> None:
    _netns.ip("link", "set", "lo", "up", ns=net.a)
    subprocess.run(_netns.ns_exec_argv(net.a, ["sysctl", "-qw",
                                               "net.ipv4.conf.all.src_valid_mark=0"]), check=True)
    client = net.start_client()
    client.wait_ready()
    assert _netns.ip("netns", "exec", net.a, "sysctl", "-n",
                     "net.ipv4.conf.all.src_valid_mark").strip() == "1"
    assert client.stop()[0] == 0
    assert _netns.ip("netns", "exec", net.a, "sysctl", "-n",
                     "net.ipv4.conf.all.src_valid_mark").strip() == "0"


def test_lan_through_the_tunnel_when_asked(net: Net) -> None:
    client = net.start_client(lan="tunnel")
    client.wait_ready()
    assert "suppress_prefixlength" not in _netns.ip("rule", "show", ns=net.a)
    assert client.stop()[0] == 0


def test_allowed_ips_inside_the_lan_are_kept_direct(net: Net) -> None:
    client = net.start_client(allowed="192.0.2.128/25, 203.0.113.0/24")
    client.wait_ready()
    assert "AllowedIPs 192.0.2.128/25 lies inside the directly connected network " \
           "192.0.2.0/24 on lan0" in client.output()
    routes = _netns.ip("route", "show", "dev", net.if_a, ns=net.a)
    assert "203.0.113.0/24" in routes and "192.0.2.128/25" not in routes
    assert client.stop()[0] == 0


@pytest.mark.parametrize("allowed", ["0.0.0.0/0, ::/0", "198.51.100.0/24, 2001:db8:100::/48"])
@pytest.mark.parametrize(("kill_switch", "tun"), [(True, "helper"), (False, "helper"),
                                                  (True, "owned")])
def test_kill_switch_holds_after_tunsup_and_helper_are_killed(net: Net, kill_switch: bool,
                                                              tun: str, allowed: str) -> None:
    """With the helper-created TUN the link dies with the helper: only the
    kill switch stops the leak.  With tunsup's own persistent TUN the link and
    its routes outlive both processes, and packets wait in the TUN."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(allowed=allowed, kill_switch=kill_switch, tun=tun)
    client.wait_ready()
    assert ping(net.a, TARGET4)
    # tunsup dies, then its helper: the tunnel link and its routes are gone.
    (helper,) = [pid for pid in _netns.ip("netns", "pids", net.a).split()
                 if Path(f"/proc/{pid}/comm").read_text().startswith("wireguard")]
    client.proc.send_signal(signal.SIGKILL)
    assert client.wait_exit(10) == -signal.SIGKILL
    subprocess.run(["kill", "-9", helper], check=False)
    if tun == "helper":
        wait_until(lambda: net.if_a not in _netns.ip("-o", "link", "show", ns=net.a))
    else:
        wait_until(lambda: not Path(f"/proc/{helper}").exists()
                   or "State:\tZ" in Path(f"/proc/{helper}/status").read_text())
        assert net.if_a in _netns.ip("-o", "link", "show", ns=net.a)
    if kill_switch:
        # Fail closed: nothing reaches the targets, neither ping nor UDP.
        assert not ping(net.a, TARGET4) and not ping(net.a, TARGET6)
        assert udp_source_seen(net, TARGET4, wait=2) == ""
        assert udp_source_seen(net, TARGET6, wait=2) == ""
        table = "51820" if "/0" in allowed else "main"
        assert "unreachable" in _netns.ip("route", "show", "table", table, ns=net.a)
        # (owned: the TUN still holds the routes; nothing reads it any more)
    else:
        # The control: without a kill switch the traffic leaks over the LAN.
        assert ping(net.a, TARGET4)
        assert udp_source_seen(net, TARGET4) == "192.0.2.1"
    result = net.cleanup()
    assert result.returncode == 0, result.stdout + result.stderr
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
    assert server.stop()[0] == 0


def test_hostname_endpoint_is_re_resolved_and_updated(net: Net) -> None:
    """`ip netns exec` shows /etc/netns/NS/hosts as /etc/hosts: the test
    moves the server's name to another LAN address while the tunnel is up."""
    _netns.ip("address", "add", "192.0.2.3/24", "dev", "lan0", ns=net.b)
    etc = Path("/etc/netns") / net.a
    etc.mkdir(parents=True)
    hosts = etc / "hosts"
    try:
        hosts.write_text("127.0.0.1 localhost\n192.0.2.2 vpn.test\n")
        server = net.start_server()
        server.wait_ready()
        client = net.start_client(allowed="10.77.0.0/24", endpoint="vpn.test:51821",
                                  resolve_interval=0.2)
        client.wait_ready()
        assert "endpoint vpn.test resolved to 192.0.2.2" in client.output()
        with open(hosts, "r+") as f:  # in place: the bind mount keeps the inode
            f.truncate(0)
            f.write("127.0.0.1 localhost\n192.0.2.3 vpn.test\n")
        wait_until(lambda: "endpoint vpn.test changed: 192.0.2.2 -> 192.0.2.3"
                   in client.output())
        status = subprocess.run(["wg", "show", net.if_a, "endpoints"], capture_output=True,
                                text=True, timeout=10, check=True).stdout
        assert "192.0.2.3:51821" in status
        # Traffic flows over the new address (a handshake may be needed first).
        wait_until(lambda: ping(net.a, "10.77.0.2"), timeout=30)
        assert client.stop()[0] == 0
    finally:
        hosts.unlink(missing_ok=True)
        etc.rmdir()


def test_kill_switch_holds_while_the_helper_restarts(net: Net) -> None:
    """The helper dies while tunsup runs: during the restart backoff nothing
    leaks (helper-created TUN: the link is gone, the kill switch catches the
    traffic), and afterwards the tunnel carries traffic again."""
    before = net.snapshot()
    server = net.start_server()
    server.wait_ready()
    client = net.start_client(kill_switch=True, tun="helper", backoff_initial=6.0,
                              backoff_max=6.0)
    client.wait_ready()
    assert ping(net.a, TARGET4)
    (helper,) = [pid for pid in _netns.ip("netns", "pids", net.a).split()
                 if Path(f"/proc/{pid}/comm").read_text().startswith("wireguard")]
    subprocess.run(["kill", "-9", helper], check=True)
    # The backoff (3 to 6 s) has begun once this is logged.
    wait_until(lambda: "restarting the helper in" in client.output())
    assert net.if_a not in _netns.ip("-o", "link", "show", ns=net.a)
    assert not ping(net.a, TARGET4)
    assert udp_source_seen(net, TARGET4, wait=1) == ""
    wait_until(lambda: "helper restarted" in client.output(), timeout=30)
    wait_until(lambda: ping(net.a, TARGET4), timeout=30)
    assert udp_source_seen(net, TARGET4) == "10.77.0.1"
    assert client.stop()[0] == 0, client.output()
    assert server.stop()[0] == 0
    diff = _netns.diff_snapshots(before, net.snapshot())
    assert not diff, "\n".join(diff)
