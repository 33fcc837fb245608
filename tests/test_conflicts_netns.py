"""Conflicts with the running tunnels, refused by ``up`` and ``reload``
with exit 2 naming both files and lines; nothing changes on the host
(issue 13 item 3).  A real service in a scratch namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import needs_wireguard, unique
from .test_service_netns import extra_conf, link_index, start, tunnels_by_name, tunsup
from .test_tunnel_netns import Pair, assert_restored
from .test_tunnel_netns import pair as _pair_fixture

pair = _pair_fixture

pytestmark = [needs_wireguard, pytest.mark.netns]


def test_up_and_reload_refuse_conflicts_with_running_tunnels(pair: Pair) -> None:
    if_a, if_c, if_d, if_e = (unique(p) for p in ("tka", "tkc", "tkd", "tke"))
    conf_a = extra_conf(pair, if_a, 220, "198.51.100.0/25", extra="ListenPort = 51990")
    toml = pair.workdir / "tunsup.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{conf_a}"\n')
    before = pair.snapshot(pair.ns_a)
    svc, rt = start(pair, "-c", str(toml))
    svc.wait_ready()
    resolv = Path(pair.resolv("a")).read_bytes()

    # AllowedIPs at line 8 of each file made by extra_conf.
    conf_c = extra_conf(pair, if_c, 221, "198.51.100.64/26")
    res = tunsup("up", conf_c, "--runtime-dir", rt)
    assert res.returncode == 2, res.stdout + res.stderr
    assert (f"{conf_c}:8: AllowedIPs 198.51.100.64/26 of {if_c} overlaps 198.51.100.0/25 "
            f"of {if_a} ({conf_a}:8)") in res.stderr
    conf_p = extra_conf(pair, unique("tkp"), 222, "203.0.113.0/25", extra="ListenPort = 51990")
    res = tunsup("up", conf_p, "--runtime-dir", rt)
    assert res.returncode == 2 and f"({conf_a}:4)" in res.stderr, res.stdout + res.stderr
    assert link_index(pair.ns_a, if_c) is None
    assert list(tunnels_by_name(rt)) == [if_a]

    conf_d = extra_conf(pair, if_d, 223, "192.0.2.128/25")
    assert tunsup("up", conf_d, "--runtime-dir", rt).returncode == 0
    conf_e = extra_conf(pair, if_e, 224, "192.0.2.192/26")
    toml.write_text(f'[[tunnel]]\nconfig = "{conf_a}"\n[[tunnel]]\nconfig = "{conf_e}"\n')
    res = tunsup("reload", "--runtime-dir", rt)
    assert res.returncode == 2, res.stdout + res.stderr
    assert f"{conf_e}:8: AllowedIPs 192.0.2.192/26 of {if_e} overlaps" in res.stderr
    assert f"({conf_d}:8)" in res.stderr
    assert sorted(tunnels_by_name(rt)) == sorted([if_a, if_d])
    assert link_index(pair.ns_a, if_e) is None
    assert Path(pair.resolv("a")).read_bytes() == resolv

    assert tunsup("stop", "--runtime-dir", rt).returncode == 0
    assert svc.proc.poll() == 0
    assert_restored(pair, pair.ns_a, before)
