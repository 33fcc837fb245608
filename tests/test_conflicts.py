"""Conflicting claims of several tunnels, refused up front (issue 13 item 3):
the pure check over specs, and ``tunsup check`` naming both lines."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tunsup.config.conflicts import Tenant, find_conflicts
from tunsup.config.keys import Key
from tunsup.config.spec import TunnelSpec
from tunsup.config.wgquick import parse_conf

ROOT = Path(__file__).resolve().parent.parent


def conf_text(allowed: str, interface: str = "") -> str:
    return (f"[Interface]\nPrivateKey = {Key.generate_private().to_base64()}\n{interface}\n"
            f"[Peer]\nPublicKey = {Key.generate_private().public_key().to_base64()}\n"
            f"AllowedIPs = {allowed}\n")


def spec(name: str, allowed: str, interface: str = "") -> TunnelSpec:
    return parse_conf(conf_text(allowed, interface), f"/etc/wg/{name}.conf")


def messages(*tenants: Tenant, running: tuple[Tenant, ...] = ()) -> list[str]:
    return [str(e) for e in find_conflicts(tenants, running)]


def test_overlapping_allowed_ips_in_one_table_name_both_lines() -> None:
    a = spec("wga", "10.1.0.0/16")
    b = spec("wgb", "192.0.2.0/24\nAllowedIPs = 10.1.2.0/24", "ListenPort = 51000")
    (msg,) = messages(Tenant(a), Tenant(b))
    assert msg.startswith("/etc/wg/wgb.conf:7: AllowedIPs 10.1.2.0/24 of wgb overlaps "
                          "10.1.0.0/16 of wga (/etc/wg/wga.conf:6), both routed in table 254")
    assert "allow_overlap" in msg


def test_equal_prefixes_and_ipv6_overlap() -> None:
    a, b = spec("wga", "fd00::/64"), spec("wgb", "fd00::/64")
    assert len(messages(Tenant(a), Tenant(b))) == 1


def test_overlap_allowed_only_when_both_allow_it() -> None:
    a, b = spec("wga", "10.1.0.0/16"), spec("wgb", "10.1.2.0/24")
    assert messages(Tenant(a, True), Tenant(b, True)) == []
    assert len(messages(Tenant(a, True), Tenant(b))) == 1
    assert len(messages(Tenant(a), Tenant(b, True))) == 1


def test_other_tables_and_table_off_do_not_overlap() -> None:
    a = spec("wga", "10.1.0.0/16")
    assert messages(Tenant(a), Tenant(spec("wgb", "10.1.0.0/16", "Table = 1000"))) == []
    assert messages(Tenant(a), Tenant(spec("wgb", "10.1.0.0/16", "Table = off"))) == []
    assert len(messages(Tenant(spec("wgb", "10.0.0.0/8", "Table = 1000")),
                        Tenant(spec("wgc", "10.1.0.0/16", "Table = 1000")))) == 1


def test_two_full_tunnels_are_refused_a_full_and_a_split_one_are_not() -> None:
    full_a, full_b = spec("wga", "0.0.0.0/0"), spec("wgb", "::/0, 10.9.0.0/16")
    (msg,) = messages(Tenant(full_a), Tenant(full_b))
    assert msg.startswith("/etc/wg/wgb.conf:6: wgb is a full tunnel")
    assert "(/etc/wg/wga.conf:6)" in msg
    # The split tunnel's prefix is more specific than the full tunnel's
    # default route, which lives in a policy table of its own.
    assert messages(Tenant(full_a), Tenant(spec("wgc", "10.1.0.0/16"))) == []
    # An explicit table is not "auto": its default route is an ordinary one.
    assert messages(Tenant(full_a), Tenant(spec("wgd", "0.0.0.0/0", "Table = 1234"))) == []


def test_one_listen_port_twice() -> None:
    a = spec("wga", "10.1.0.0/24", "ListenPort = 51820")
    b = spec("wgb", "10.2.0.0/24", "ListenPort = 51820")
    (msg,) = messages(Tenant(a), Tenant(b))
    assert msg.startswith("/etc/wg/wgb.conf:3: ListenPort 51820 is also the port of wga "
                          "(/etc/wg/wga.conf:3)")
    assert messages(Tenant(spec("wgc", "10.3.0.0/24", "ListenPort = 0")),
                    Tenant(spec("wgd", "10.4.0.0/24", "ListenPort = 0"))) == []


def test_one_fwmark_twice() -> None:
    a = spec("wga", "10.1.0.0/24", "FwMark = 0x1234")
    b = spec("wgb", "10.2.0.0/24", "FwMark = 4660")
    (msg,) = messages(Tenant(a), Tenant(b))
    assert msg.startswith("/etc/wg/wgb.conf:3: FwMark 0x1234 is also the fwmark of wga "
                          "(/etc/wg/wga.conf:3)")


def test_one_interface_name_twice_against_the_running_set() -> None:
    running = spec("wga", "10.1.0.0/24")
    again = parse_conf(conf_text("10.2.0.0/24"), "/srv/other/wga.conf")
    (msg,) = messages(Tenant(again), running=(Tenant(running),))
    assert msg == ("/srv/other/wga.conf:1: interface wga is also the interface of "
                   "/etc/wg/wga.conf:1; names must be unique")


def test_running_tunnels_are_not_checked_against_each_other() -> None:
    a, b = spec("wga", "10.1.0.0/16"), spec("wgb", "10.1.0.0/16")
    assert messages(Tenant(spec("wgc", "192.0.2.0/24")), running=(Tenant(a), Tenant(b))) == []
    assert len(messages(Tenant(spec("wgc", "10.1.1.0/24")), running=(Tenant(a),))) == 1


def test_many_disjoint_prefixes() -> None:
    nets = ", ".join(f"10.{i // 256}.{i % 256}.0/24" for i in range(4096))
    other = ", ".join(f"10.{16 + i // 256}.{i % 256}.0/24" for i in range(4096))
    assert messages(Tenant(spec("wga", nets)), Tenant(spec("wgb", other))) == []
    assert len(messages(Tenant(spec("wga", nets)),
                        Tenant(spec("wgb", other + ", 10.3.3.128/25")))) == 1


_nets = st.builds(lambda a, n: ipaddress.ip_network((a & ~((1 << (8 - n)) - 1), 24 + n)),
                  st.integers(0, 255), st.integers(0, 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_nets, min_size=1, max_size=6, unique=True), min_size=2, max_size=4))
def test_sweep_finds_exactly_the_overlapping_pairs(groups: list[list[ipaddress.IPv4Network]]
                                                   ) -> None:
    """Against the pairwise definition, on small random sets."""
    tenants = [Tenant(spec(f"wg{i}", ", ".join(str(n) for n in group)))
               for i, group in enumerate(groups)]
    want = {(i, j) for i in range(len(groups)) for j in range(i + 1, len(groups))
            if any(a.overlaps(b) for a in groups[i] for b in groups[j])}
    found = {(int(m.split(" of ")[2].split(" ")[0][2:]), int(m.split(" of ")[1].split(" ")[0][2:]))
             for m in messages(*tenants)}
    assert found == want


def test_check_names_both_files_and_lines(tmp_path: Path) -> None:
    a, b = tmp_path / "tca.conf", tmp_path / "tcb.conf"
    a.write_text(conf_text("10.7.0.0/16", "ListenPort = 51999"))
    b.write_text(conf_text("10.7.3.0/24", "ListenPort = 51999"))
    for path in (a, b):
        path.chmod(0o600)
    res = subprocess.run([sys.executable, "-m", "tunsup", "check", str(a), str(b)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{b}:3: ListenPort 51999 is also the port of tca ({a}:3)" in res.stderr
    assert (f"{b}:6: AllowedIPs 10.7.3.0/24 of tcb overlaps 10.7.0.0/16 of tca ({a}:6)"
            in res.stderr)
    toml = tmp_path / "tunsup.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{a}"\n[[tunnel]]\nconfig = "{b}"\n')
    res = subprocess.run([sys.executable, "-m", "tunsup", "check", str(toml)],
                         capture_output=True, text=True, cwd=ROOT, timeout=60, check=False)
    assert res.returncode == 2 and f"({a}:6)" in res.stderr, res.stdout + res.stderr
