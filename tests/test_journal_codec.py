"""The journal's effect codec: records are written without cattrs (a fast
start), read back with it (recovery), and say exactly what cattrs would."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from typing import Any

import attrs
import cattrs
import pytest

from tunsup.engine import effects as fx
from tunsup.engine.journal import EFFECT_KINDS, effect_from_dict, effect_to_dict
from tunsup.host import PolicyRule
from tunsup.host.dns import FileDnsState, ResolvconfDnsState, ResolvedDnsState

N = ipaddress.ip_network
SAMPLES: list[Any] = [
    fx.Hooks("wg0", "PostUp", ("echo a", "echo b"), "PreDown", ()),
    fx.StartHelper("wg0", ("wireguard-go", "wg0"), pass_tun=True),
    fx.HelperRunning("wg0", ("wireguard-go", "wg0"), 123, None),
    fx.HelperRunning("wg0", ("wireguard-go", "wg0"), 123, 456789),
    fx.CreateTun("wg0", packet_info=True), fx.OwnedTun("wg0", 7), fx.HelperGeneration("wg0"),
    fx.Link("wg0", 7), fx.ConfigureWireguard("wg0", b"private_key=secret\n", 3.5),
    fx.WireguardConfigured("wg0"),
    fx.Address("wg0", 7, ipaddress.ip_interface("10.0.0.1/24"), owned=False),
    fx.Address("wg0", 7, ipaddress.ip_interface("fd00::1/64")),
    fx.Mtu("wg0", 7, 1420), fx.LinkUp("wg0", 7),
    fx.Routes("wg0", 7, 254, (N("10.1.0.0/16"), N("fd01::/48"), N("0.0.0.0/0"))),
    fx.Routes("wg0", 7, 254, ()),
    fx.Dns("wg0", "file", (ipaddress.ip_address("1.1.1.1"), ipaddress.ip_address("::1")),
           ("example.com",), 2.0, FileDnsState("/etc/resolv.conf", None, b"ns 1\n", 0o644)),
    fx.Dns("wg0", "file", (), (), state=FileDnsState("/r", b"\x00old", b"new", 0o600)),
    fx.Dns("wg0", "resolvconf", (), (), state=ResolvconfDnsState("wg0", "tun.wg0")),
    fx.Dns("wg0", "resolved", (), (), state=ResolvedDnsState("wg0")),
    fx.Dns("wg0", "none", (), ()),
    fx.Rule("wg0", PolicyRule(4, 32764, 51820, fwmark=51820, invert=True)),
    fx.Rule("wg0", PolicyRule(6, 32765, 254, suppress_prefixlength=0), owned=False),
    fx.Sysctl("wg0", "net.ipv4.conf.all.src_valid_mark", "1", "0"),
    fx.KillSwitch("wg0", 254, (N("10.1.0.0/16"),)),
    fx.HeldRoutes("wg0", 254, (N("10.2.0.0/16"), N("fd02::/48"))),
    fx.HeldRule("wg0", PolicyRule(4, 32765, 51820, fwmark=0)),
    fx.Dns("wg0", "file", (ipaddress.ip_address("10.0.0.54"),), (), layered=True,
           previous_servers=(ipaddress.ip_address("10.0.0.53"),), previous_search=("a.example",),
           state=FileDnsState("/r", b"old", b"new", 0o644, ifname="wg0", depth=2)),
    fx.MtuChanged("wg0", 7, 1420, 1380),
    fx.RoutesRemoved("wg0", 7, 254, (N("10.3.0.0/16"),), 5),
    fx.AddressRemoved("wg0", 7, ipaddress.ip_interface("10.0.0.2/24")),
    fx.WireguardChanged("wg0", "peer added", b"secret set", b"secret undo", 4.0),
]


def _cattrs_reference(effect: Any) -> dict[str, Any]:
    """What the cattrs converter the journal used to write with gave."""
    import base64

    from cattrs.gen import make_dict_unstructure_fn, override

    conv = cattrs.Converter()
    conv.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode())
    for ip in (ipaddress.IPv4Interface, ipaddress.IPv6Interface, ipaddress.IPv4Network,
               ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address):
        conv.register_unstructure_hook(ip, str)
    tags = {FileDnsState: "file", ResolvconfDnsState: "resolvconf",
            ResolvedDnsState: "resolved"}
    for cls in EFFECT_KINDS.values():
        secret = {f.name: override(omit=True) for f in attrs.fields(cls)  # type: ignore[arg-type]
                  if f.metadata.get("secret")}
        conv.register_unstructure_hook(cls, make_dict_unstructure_fn(cls, conv, **secret))
    data = {"kind": type(effect).__name__, **conv.unstructure(effect, type(effect))}
    if getattr(effect, "state", None) is not None:
        data["state"] = {"type": tags[type(effect.state)], **conv.unstructure(effect.state)}
    return data


def test_every_kind_is_sampled() -> None:
    assert {type(e).__name__ for e in SAMPLES} == set(EFFECT_KINDS)


@pytest.mark.parametrize("effect", SAMPLES, ids=lambda e: type(e).__name__)
def test_records_read_back_and_match_cattrs(effect: Any) -> None:
    data = json.loads(json.dumps(effect_to_dict(effect)))
    assert data == json.loads(json.dumps(_cattrs_reference(effect)))
    assert "secret" not in json.dumps(data)  # key material never journaled
    back = effect_from_dict(data)
    if isinstance(effect, fx.ConfigureWireguard):
        effect = attrs.evolve(effect, request=b"")
    if isinstance(effect, fx.WireguardChanged):
        effect = attrs.evolve(effect, request=b"", undo_request=b"")
    assert back == effect


def test_the_journal_imports_no_cattrs() -> None:
    code = ("import sys, tunsup.engine.journal as j, tunsup.engine.effects as fx\n"
            "j.effect_to_dict(fx.Link('wg0', 7))\n"
            "print('cattrs' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "False"


def test_undone_records_are_written_without_an_fsync_of_their_own(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Intents and applied records are fsync'd before the journal moves on;
    an "undone" record is only written (a teardown saves one fsync per
    record; undo is idempotent, so losing it costs a repeated undo)."""
    import os

    import trio

    from tunsup.engine.journal import Journal, JournalObserver, read_journal

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    journal = Journal(str(tmp_path), 4242, 1)
    observer = JournalObserver(journal, "wg0")
    link = fx.Link("wg0", 7)

    async def main() -> list[int]:
        await observer.intent(link)
        await observer.applied(link, link)
        before = len(synced)
        await observer.undone(link)
        after = len(synced)
        await journal.close(remove=False)
        return [before, after]

    before, after = trio.run(main)
    assert before >= 2 and after == before
    contents = read_journal(journal.path)
    assert len(contents.steps) == 1 and contents.pending() == []


def test_long_prefix_lists_are_written_exactly_each_time() -> None:
    """A Routes record's prefixes are made text once for its intent and
    applied records (equal tuples of the same networks); another tuple, even
    equal in length, is never given the text of the last one."""
    first = tuple(ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(200))
    second = (*first[:199], ipaddress.ip_network("2001:db8::/64"))
    intent = fx.Routes("wg0", 7, 254, first)
    record = attrs.evolve(intent, prefixes=tuple(list(first)))  # equal, not the same tuple
    for effect in (intent, record, fx.Routes("wg0", 7, 254, second), intent,
                   fx.Routes("wg0", 7, 254, first[:100] + first[101:])):
        assert effect_to_dict(effect) == _cattrs_reference(effect)
