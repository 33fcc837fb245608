"""Many tunnels in one real service (issue 13 item 4): fifty tunnels come
up together, ``status`` lists every one, and a stop gives the namespace
back exactly as it was.  Functional only: the timings are measured by
``scripts/bench_many``, not asserted here."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tunsup.config.keys import Key
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceProcess

from .conftest import needs_wireguard, unique
from .test_service_netns import status_json
from .test_tunnel_netns import STEP_GUARD

pytestmark = [needs_wireguard, pytest.mark.netns]

COUNT = 50
#: Tunnels (by position) that also set DNS: their claims on the one
#: resolv.conf are made concurrently.
WITH_DNS = (0, 17, 49)


def _conf(workdir: Path, name: str, i: int) -> str:
    path = workdir / f"{name}.conf"
    dns = f"DNS = 10.{100 + i}.0.53\n" if i in WITH_DNS else ""
    path.write_text(f"""\
[Interface]
PrivateKey = {Key.generate_private().to_base64()}
Address = 10.{100 + i}.0.1/24
{dns}
[Peer]
PublicKey = {Key.generate_private().public_key().to_base64()}
AllowedIPs = 10.{100 + i}.1.0/24, fd00:{100 + i}::/64
""")
    path.chmod(0o600)
    return str(path)


def test_fifty_tunnels_in_one_service(netns: Callable[[str], str], tmp_path: Path) -> None:
    ns = netns("tsm")
    names = [unique("tsm") for _ in range(COUNT)]
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 192.0.2.53\n")
    state, rt = tmp_path / "state", tmp_path / "run"
    toml = tmp_path / "tunsup.toml"
    toml.write_text(
        f'state_dir = "{state}"\nruntime_dir = "{rt}"\nmax_parallel = 16\n'
        f'[dns]\nbackend = "file"\nresolv_conf = "{resolv}"\n'
        + "".join(f'[[tunnel]]\nconfig = "{_conf(tmp_path, n, i)}"\n'
                  for i, n in enumerate(names)))
    before = _netns.snapshot(ns, [str(resolv)])
    svc = ServiceProcess(ns, ["-c", str(toml)], str(tmp_path), "many", env=STEP_GUARD)
    try:
        svc.wait_ready(180)
        tunnels = {t["name"]: t for t in status_json(str(rt))["tunnels"]}
        assert sorted(tunnels) == sorted(names)
        assert {t["state"] for t in tunnels.values()} == {"up"}
        links = {link["ifname"] for link in json.loads(_netns.ip("-j", "link", "show", ns=ns))}
        assert set(names) <= links
        helpers = {t["helper_pid"] for t in tunnels.values()}
        assert len(helpers) == COUNT and None not in helpers
        text = resolv.read_text()
        # Claimed concurrently, merged in configuration order.
        assert [ln for ln in text.splitlines() if ln.startswith("nameserver")] == [
            f"nameserver 10.{100 + i}.0.53" for i in WITH_DNS], text
        code, _ = svc.stop(timeout=120)
        assert code == 0, svc.output_tail()
    finally:
        svc.close()
    diff = _netns.diff_snapshots(before, _netns.snapshot(ns, [str(resolv)]))
    assert not diff, "host not restored:\n" + "\n".join(diff)
    assert _netns.ip("netns", "pids", ns).split() == [], "a process is left"
    assert not any(os.path.exists(_netns.wireguard_socket(n)) for n in names)
    assert list(state.glob("journal-*")) == []
