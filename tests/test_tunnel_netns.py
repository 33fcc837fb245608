"""End-to-end: real tunsup, real wireguard-go, in namespaces the tests create.

Each test snapshots its namespace (links, addresses, routes of every table,
rules, the resolv.conf it points tunsup at) before starting tunsup and
asserts the snapshot is identical after tunsup exits.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import attrs
import pytest

from tunsup.config.keys import Key
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceFailed, ServiceProcess

from .conftest import WORST_STEPS, needs_wireguard, unique

pytestmark = [needs_wireguard, pytest.mark.netns]

#: The blocking guard: every tunsup run here logs any trio step over 50 ms
#: as an error, and the fixture fails the test if one shows up.
STEP_GUARD = {"TUNSUP_STEP_LIMIT_MS": "50"}


@attrs.define
class Pair:
    """Two namespaces joined by veth: 192.0.2.1 (a) <-> 192.0.2.2 (b)."""

    ns_a: str
    ns_b: str
    workdir: Path
    key_a: Key = attrs.field(factory=Key.generate_private)
    key_b: Key = attrs.field(factory=Key.generate_private)
    services: list[ServiceProcess] = attrs.field(factory=list)

    def resolv(self, label: str) -> str:
        path = self.workdir / f"resolv-{label}.conf"
        if not path.exists():
            path.write_text("nameserver 192.0.2.53\nsearch lan.example\n")
        return str(path)

    def write_conf(self, ifname: str, body: str) -> str:
        path = self.workdir / f"{ifname}.conf"
        path.write_text(body)
        path.chmod(0o600)
        return str(path)

    def conf_a(self, ifname: str, *, allowed: str = "10.200.0.2/32", extra: str = "",
               peer_extra: str = "") -> str:
        return self.write_conf(ifname, f"""\
[Interface]
PrivateKey = {self.key_a.to_base64()}
Address = 10.200.0.1/24, fd00:200::1/64
ListenPort = 51820
{extra}

[Peer]
PublicKey = {self.key_b.public_key().to_base64()}
AllowedIPs = {allowed}
Endpoint = 192.0.2.2:51821
{peer_extra}
""")

    def conf_b(self, ifname: str) -> str:
        return self.write_conf(ifname, f"""\
[Interface]
PrivateKey = {self.key_b.to_base64()}
Address = 10.200.0.2/24, fd00:200::2/64
ListenPort = 51821

[Peer]
PublicKey = {self.key_a.public_key().to_base64()}
AllowedIPs = 10.200.0.1/32, fd00:200::1/128
""")

    def run(self, ns: str, *args: str, label: str = "svc", dns: str = "file") -> ServiceProcess:
        resolv = self.resolv("a" if ns == self.ns_a else "b")
        svc = ServiceProcess(ns, [*args, "--dns", dns, "--resolv-conf", resolv,
                                  "--state-dir", str(self.workdir / f"{label}.state"),
                                  "--runtime-dir", str(self.workdir / f"{label}.run")],
                             str(self.workdir), label, env=STEP_GUARD)
        self.services.append(svc)
        return svc

    def snapshot(self, ns: str) -> dict[str, object]:
        return _netns.snapshot(ns, [self.resolv("a" if ns == self.ns_a else "b")])


_WORST_STEP = re.compile(r"worst trio step: ([\d.]+) ms \(task (.*)\)")


@pytest.fixture
def pair(netns: Callable[[str], str], tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[Pair]:
    ns_a, ns_b = netns("tsa"), netns("tsb")
    _netns.add_veth_pair(ns_a, "veth0", ns_b, "veth0")
    _netns.ip("address", "add", "192.0.2.1/24", "dev", "veth0", ns=ns_a)
    _netns.ip("address", "add", "192.0.2.2/24", "dev", "veth0", ns=ns_b)
    p = Pair(ns_a, ns_b, tmp_path)
    try:
        yield p
    finally:
        for svc in p.services:
            svc.close()
    for svc in p.services:
        for m in _WORST_STEP.finditer(svc.output()):
            WORST_STEPS.append((float(m.group(1)), m.group(2), request.node.name))
    slow = [line for svc in p.services for line in svc.output().splitlines()
            if "slow trio step" in line]
    assert not slow, "the trio thread was blocked:\n" + "\n".join(slow)


def assert_restored(pair: Pair, ns: str, before: dict[str, object]) -> None:
    diff = _netns.diff_snapshots(before, pair.snapshot(ns))
    assert not diff, "host not restored:\n" + "\n".join(diff)
    assert _netns.ip("netns", "pids", ns).split() == [], "a process is left in the namespace"


def ping(ns: str, address: str, count: int = 2) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_netns.ns_exec_argv(ns, ["ping", "-c", str(count), "-i", "0.2",
                                                   "-W", "2", address]),
                          capture_output=True, text=True, timeout=30, check=False)


def routes(ns: str, *args: str) -> list[dict[str, object]]:
    out = _netns.ip("-j", *args, ns=ns)
    return json.loads(out) if out.strip() else []


def wait_for_output(svc: ServiceProcess, text: str, timeout: float = 30) -> None:
    """Block until ``text`` shows up in the service's log (polls its file;
    the notify socket's recv timeout paces the loop)."""
    deadline = time.monotonic() + timeout
    while text not in svc.output():
        assert time.monotonic() < deadline, f"{text!r} not seen:\n{svc.output_tail()}"
        assert svc.proc.poll() is None or text in svc.output(), svc.output_tail()
        svc.notify.settimeout(0.02)
        with contextlib.suppress(TimeoutError):
            svc.notify.recv(4096)


def test_tunnel_up_ping_and_sigterm_restores_everything(pair: Pair) -> None:
    if_a, if_b = unique("tsa"), unique("tsb")
    conf_a = pair.conf_a(if_a, allowed="10.200.0.2/32, fd00:200::2/128, 203.0.113.0/24",
                         extra="DNS = 10.200.0.53, corp.example")
    conf_b = pair.conf_b(if_b)
    before_a, before_b = pair.snapshot(pair.ns_a), pair.snapshot(pair.ns_b)

    svc_b = pair.run(pair.ns_b, conf_b, label="b")
    svc_a = pair.run(pair.ns_a, conf_a, label="a")
    svc_b.wait_ready()
    svc_a.wait_ready()

    assert ping(pair.ns_a, "10.200.0.2").returncode == 0
    assert ping(pair.ns_a, "fd00:200::2").returncode == 0
    # The resolver file holds the tunnel's DNS while up.
    resolv = Path(pair.resolv("a")).read_text()
    assert "nameserver 10.200.0.53" in resolv and "search corp.example" in resolv
    # A route per AllowedIPs prefix not covered by the address's prefix route.
    via = {r["dst"] for r in routes(pair.ns_a, "route", "show", "dev", if_a)}
    assert "203.0.113.0/24" in via
    link = routes(pair.ns_a, "link", "show", "dev", if_a)[0]
    assert link["mtu"] == 1420  # path MTU to the endpoint (1500) - 80

    code, _ = svc_a.stop(signal.SIGTERM)
    assert code == 0, svc_a.output()
    code, _ = svc_b.stop(signal.SIGINT)
    assert code == 0, svc_b.output()
    assert_restored(pair, pair.ns_a, before_a)
    assert_restored(pair, pair.ns_b, before_b)
    out = svc_a.output()
    # 10.200.0.2/32 and fd00:200::2/128 are covered by the addresses' own
    # prefix routes; 203.0.113.0/24 needs one, which goes with the link at
    # stop (not removed on its own first: assert_restored checked it is gone).
    assert "1 route(s) added to table 254" in out
    assert "route(s) removed" not in out
    # Teardown order is the exact reverse of the stack: the owned TUN's
    # addresses, state and routes sit below the helper's generation (they
    # go with the TUN), the link's own record above it (deleted first).
    order = [out.index(s) for s in ("DNS restored", f"link {if_a} set down and deleted",
                                    "helper pid")]
    assert order == sorted(order), out
    # One tunnel: its helper starts while its link is configured (no other
    # helper to wake: which one logs first is a race, see test_scale for the
    # order), and DNS comes once both are done.
    up = [out.index(s) for s in (f"link {if_a} up", "1 route(s) added", "DNS set")]
    assert up == sorted(up), out
    assert out.index("started helper") < out.index("DNS set"), out


def test_failing_postup_exits_1_and_restores(pair: Pair) -> None:
    if_a = unique("tsa")
    marker = pair.workdir / "postdown-ran"
    conf = pair.conf_a(if_a, extra=f"DNS = 10.200.0.53\nPostUp = false\n"
                                   f"PreDown = touch {pair.workdir}/predown-ran\n"
                                   f"PostDown = touch {marker}")
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    assert svc.wait_exit(30) == 1, svc.output()
    assert "hook 'false' exited with status 1" in svc.output()
    assert_restored(pair, pair.ns_a, before)
    # PreUp/PostDown were applied as a pair, so PostDown ran; PostUp failed,
    # so its inverse (PreDown) did not.
    assert marker.exists()
    assert not (pair.workdir / "predown-ran").exists()


def test_hooks_run_in_wg_quick_order_with_interface_expanded(pair: Pair) -> None:
    if_a = unique("tsa")
    log = pair.workdir / "hooks.log"
    hooks = "\n".join(f"{name} = echo {name} %i >> {log}"
                      for name in ("PreUp", "PostUp", "PreDown", "PostDown"))
    conf = pair.conf_a(if_a, extra=hooks)
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready()
    assert svc.stop()[0] == 0
    assert log.read_text().split("\n")[:-1] == [
        f"PreUp {if_a}", f"PostUp {if_a}", f"PreDown {if_a}", f"PostDown {if_a}"]


def test_bad_config_exits_2_and_changes_nothing(pair: Pair) -> None:
    if_a = unique("tsa")
    conf = pair.write_conf(if_a, f"""\
[Interface]
PrivateKey = {pair.key_a.to_base64()}
Address = 10.200.0.1/24
ListenPort = 99999
""")
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    assert svc.wait_exit(30) == 2
    out = svc.output()
    assert f"{conf}:4:" in out
    assert pair.key_a.to_base64() not in out
    assert_restored(pair, pair.ns_a, before)


def test_existing_route_and_address_survive(pair: Pair) -> None:
    if_a = unique("tsa")
    # A route identical to an AllowedIPs prefix, already there through the LAN.
    _netns.ip("route", "add", "203.0.113.0/24", "via", "192.0.2.2", ns=pair.ns_a)
    conf = pair.conf_a(if_a, allowed="10.200.0.2/32, 203.0.113.0/24, 198.51.100.0/24")
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready()
    assert "route 203.0.113.0/24 already exists" in svc.output()
    assert {r["dst"] for r in routes(pair.ns_a, "route", "show", "dev", if_a)} >= {
        "198.51.100.0/24"}
    assert svc.stop()[0] == 0
    assert_restored(pair, pair.ns_a, before)
    assert routes(pair.ns_a, "route", "show", "203.0.113.0/24")[0]["gateway"] == "192.0.2.2"


def test_table_number_and_table_off(pair: Pair) -> None:
    if_a, if_c = unique("tsa"), unique("tsc")
    conf_a = pair.conf_a(if_a, allowed="198.51.100.0/24", extra="Table = 1234")
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf_a, label="a")
    svc.wait_ready()
    assert [r["dst"] for r in routes(pair.ns_a, "route", "show", "table", "1234")] == [
        "198.51.100.0/24"]
    assert svc.stop()[0] == 0
    conf_c = pair.conf_a(if_c, allowed="198.51.100.0/24", extra="Table = off")
    svc = pair.run(pair.ns_a, conf_c, label="c")
    svc.wait_ready()
    assert not [r for r in routes(pair.ns_a, "route", "show", "table", "all", "dev", if_c)
                if r.get("protocol") != "kernel" and r.get("type") != "local"
                and r.get("table") != "local" and not str(r["dst"]).startswith(("fe80", "ff00"))
                and r["dst"] not in ("10.200.0.0/24", "fd00:200::/64")]
    assert svc.stop()[0] == 0
    assert_restored(pair, pair.ns_a, before)


def test_ten_thousand_allowed_ips_up_and_down(pair: Pair) -> None:
    if_a = unique("tsa")
    prefixes = [f"10.{i // 256}.{i % 256}.0/24" for i in range(1, 10_001)]
    # 10.200.0.0/24 is covered by the address's own prefix route.
    prefixes = [p for p in prefixes if not p.startswith("10.200.0.")]
    conf = pair.conf_a(if_a, allowed=", ".join(prefixes))
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready(60)
    installed = routes(pair.ns_a, "route", "show", "dev", if_a, "proto", "static")
    assert len(installed) == len(prefixes)
    assert {r["dst"] for r in installed} == set(prefixes)
    assert svc.stop(timeout=60)[0] == 0
    assert_restored(pair, pair.ns_a, before)


def test_toml_config_runs_two_tunnels(pair: Pair) -> None:
    if_a, if_c = unique("tsa"), unique("tsc")
    pair.conf_a(if_a, allowed="198.51.100.0/25")
    conf_c = pair.write_conf(if_c, f"""\
[Interface]
PrivateKey = {Key.generate_private().to_base64()}
Address = 10.201.0.1/24

[Peer]
PublicKey = {Key.generate_private().public_key().to_base64()}
AllowedIPs = 198.51.100.128/25
""")
    toml = pair.workdir / "tunsup.toml"
    toml.write_text(f"""\
stop_timeout = 20
[dns]
backend = "file"
resolv_conf = "{pair.resolv('a')}"
[[tunnel]]
config = "{if_a}.conf"
stop_grace = 1.0
[[tunnel]]
config = "{Path(conf_c).name}"
""")
    before = pair.snapshot(pair.ns_a)
    svc = ServiceProcess(pair.ns_a, ["-c", str(toml), "--state-dir", str(pair.workdir / "st"),
                                     "--runtime-dir", str(pair.workdir / "rt")],
                         str(pair.workdir), "toml", env=STEP_GUARD)
    pair.services.append(svc)
    svc.wait_ready()
    names = {link["ifname"] for link in routes(pair.ns_a, "link", "show")}
    assert {if_a, if_c} <= names
    assert svc.stop()[0] == 0
    assert_restored(pair, pair.ns_a, before)


def test_interface_that_already_exists_fails_without_touching_it(pair: Pair) -> None:
    if_a = unique("tsa")
    _netns.ip("tuntap", "add", "dev", if_a, "mode", "tun", ns=pair.ns_a)
    conf = pair.conf_a(if_a)
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    assert svc.wait_exit(30) == 1
    assert f"interface {if_a} already exists" in svc.output()
    assert_restored(pair, pair.ns_a, before)


def test_helper_that_exits_at_start_fails_cleanly(pair: Pair) -> None:
    if_a = unique("tsa")
    pair.conf_a(if_a)
    toml = pair.workdir / "t.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{if_a}.conf"\nhelper = ["false"]\n')
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, "-c", str(toml))
    assert svc.wait_exit(30) == 1
    assert "helper false" in svc.output() and "exited with status 1" in svc.output()
    assert_restored(pair, pair.ns_a, before)


def helper_pids(ns: str) -> list[int]:
    return [int(p) for p in _netns.ip("netns", "pids", ns).split()
            if Path(f"/proc/{p}/comm").read_text().startswith("wireguard")]


def test_helper_killed_with_restarts_off_fails_and_restores(pair: Pair) -> None:
    """restart_max = 0: the first death fails the tunnel; exit 1, host restored."""
    if_a = unique("tsa")
    pair.conf_a(if_a, allowed="10.200.0.2/32, 198.51.100.0/24", extra="DNS = 10.200.0.53")
    toml = pair.workdir / "t.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{if_a}.conf"\nrestart_max = 0\n')
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, "-c", str(toml))
    svc.wait_ready()
    (helper,) = helper_pids(pair.ns_a)
    os.kill(helper, signal.SIGKILL)
    assert svc.wait_exit(30) == 1, svc.output()
    out = svc.output()
    assert "killed by SIGKILL" in out
    assert "helper failed 1 times within 60 s (restart_max = 0); giving up" in out
    assert "no tunnel is left: exiting" in out
    assert_restored(pair, pair.ns_a, before)


def test_unresolvable_endpoint_fails_before_any_change(pair: Pair) -> None:
    """A bad endpoint hostname fails before any change, exit 1."""
    if_a = unique("tsa")
    conf = pair.conf_a(if_a)
    Path(conf).write_text(Path(conf).read_text().replace("192.0.2.2:51821",
                                                         "no-such-host.invalid:1"))
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    with pytest.raises(ServiceFailed):
        svc.wait_ready(30)
    assert svc.wait_exit(5) == 1
    # Reported at the Endpoint line, not the [Peer] header (issue 10 item 23).
    line = Path(conf).read_text().split("\n").index("Endpoint = no-such-host.invalid:1") + 1
    assert f"{conf}:{line}: cannot resolve endpoint no-such-host.invalid:1" in svc.output()
    assert_restored(pair, pair.ns_a, before)


def test_stop_during_start_cancels_the_wait_and_restores(pair: Pair) -> None:
    """SIGTERM while the start is parked waiting for the helper's UAPI socket:
    the wait is cancelled at once and what was applied is undone."""
    if_a = unique("tsa")
    pair.conf_a(if_a, extra="PreUp = true")
    toml = pair.workdir / "t.toml"
    # A helper that never opens its UAPI socket.
    toml.write_text(f'[[tunnel]]\nconfig = "{if_a}.conf"\n'
                    'helper = ["sh", "-c", "sleep 600", "--"]\nstart_timeout = 300\n')
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, "-c", str(toml))
    wait_for_output(svc, "started helper sh")  # parked in the UAPI wait now
    code, took = svc.stop(signal.SIGTERM, timeout=30)
    assert code == 0, svc.output()
    assert took < 10  # the 300 s start timeout did not apply
    assert_restored(pair, pair.ns_a, before)


def test_helper_ignoring_sigterm_is_killed_after_grace(pair: Pair) -> None:
    if_a = unique("tsa")
    pair.conf_a(if_a)
    toml = pair.workdir / "t.toml"
    # sh ignores SIGTERM and outlives wireguard-go: only SIGKILL ends it.
    toml.write_text(f'[[tunnel]]\nconfig = "{if_a}.conf"\nstop_grace = 0.5\n'
                    'helper = ["sh", "-c", "trap \\"\\" TERM; wireguard-go -f \\"$0\\"; '
                    'sleep 600"]\n')
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, "-c", str(toml))
    svc.wait_ready()
    code, _ = svc.stop(timeout=30)
    assert code == 0, svc.output()
    assert "still running 0.5s after SIGTERM; sending SIGKILL" in svc.output()
    assert "killed by SIGKILL" in svc.output()
    assert_restored(pair, pair.ns_a, before)


def test_second_signal_during_teardown_does_not_interrupt_it(pair: Pair) -> None:
    if_a = unique("tsa")
    started = pair.workdir / "predown-started"
    release = pair.workdir / "release"
    # PreDown waits (on a file, not a clock) so the second signal lands
    # while teardown is in progress.
    conf = pair.conf_a(if_a, extra=f"DNS = 10.200.0.53\nPreDown = touch {started}; "
                                   f"while [ ! -e {release} ]; do sleep 0.05; done")
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready()
    svc.proc.send_signal(signal.SIGTERM)
    wait_for_output(svc, "running hook: touch")
    while not started.exists():
        wait_for_output(svc, "running hook")
    svc.proc.send_signal(signal.SIGINT)
    wait_for_output(svc, "received SIGINT: already stopping")
    release.touch()
    assert svc.wait_exit(30) == 0, svc.output()
    assert "Traceback" not in svc.output()
    assert_restored(pair, pair.ns_a, before)


def test_hung_predown_hook_cannot_starve_the_rest_of_teardown(pair: Pair) -> None:
    if_a = unique("tsa")
    pair.conf_a(if_a, allowed="10.200.0.2/32, 198.51.100.0/24",
                extra="DNS = 10.200.0.53\nPreDown = sleep 600")
    toml = pair.workdir / "t.toml"
    toml.write_text(f'stop_timeout = 2\n[[tunnel]]\nconfig = "{if_a}.conf"\n')
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, "-c", str(toml))
    svc.wait_ready()
    code, took = svc.stop(timeout=60)
    assert code == 3, svc.output()  # the hook's failure is reported ...
    # ... naming the hook: its own timeout fires before the step's deadline.
    assert "undo PostUp/PreDown hooks" in svc.output()
    assert "PreDown hook failed: hook 'sleep 600' did not finish within" in svc.output()
    assert took < 20
    assert_restored(pair, pair.ns_a, before)  # ... and everything else was undone


def test_same_name_in_another_namespace_is_refused_and_left_alone(pair: Pair) -> None:
    """wireguard-go's UAPI socket directory is shared by all namespaces: a
    tunnel of the same name elsewhere must be refused, not disturbed."""
    if_a = unique("tsa")
    conf = pair.conf_a(if_a)
    svc_b = pair.run(pair.ns_b, conf, label="b")
    svc_b.wait_ready()
    before = pair.snapshot(pair.ns_a)
    svc_a = pair.run(pair.ns_a, conf, label="a")
    assert svc_a.wait_exit(30) == 1
    assert "already runs" in svc_a.output()
    assert_restored(pair, pair.ns_a, before)
    assert svc_b.proc.poll() is None  # the other one still runs ...
    assert os.path.exists(_netns.wireguard_socket(if_a))  # ... with its socket
    assert svc_b.stop()[0] == 0


def test_existing_address_elsewhere_survives(pair: Pair) -> None:
    if_a = unique("tsa")
    _netns.ip("address", "add", "10.200.0.1/24", "dev", "veth0", ns=pair.ns_a)
    conf = pair.conf_a(if_a)
    before = pair.snapshot(pair.ns_a)
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready()
    assert svc.stop()[0] == 0
    assert_restored(pair, pair.ns_a, before)
    addrs = routes(pair.ns_a, "address", "show", "dev", "veth0")[0]["addr_info"]
    assert "10.200.0.1" in [a["local"] for a in addrs]


def test_backgrounded_hook_does_not_hold_up_the_start(pair: Pair) -> None:
    if_a = unique("tsa")
    done = pair.workdir / "background-done"
    gate = pair.workdir / "gate"
    conf = pair.conf_a(if_a, extra=f"PostUp = (while [ ! -e {gate} ]; do sleep 0.05; done; "
                                   f"touch {done}) &")
    svc = pair.run(pair.ns_a, conf)
    svc.wait_ready()
    assert not done.exists()  # up while the background job still runs
    gate.touch()
    assert svc.stop()[0] == 0
    while _netns.ip("netns", "pids", pair.ns_a).split():
        wait_for_output(svc, "tunnel down")
    assert done.exists()
