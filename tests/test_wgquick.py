"""tunsup.config.wgquick: parsing wg-quick files, FILE:LINE errors, no key leaks."""

from __future__ import annotations

import ipaddress
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tunsup._errors import ConfigError
from tunsup.config.keys import Key
from tunsup.config.spec import (
    Endpoint,
    IPAddress,
    IPInterface,
    IPNetwork,
    PeerSpec,
    RouteTable,
    TunnelSpec,
)
from tunsup.config.wgquick import load_conf, parse_conf

K1 = Key(bytes(range(32)))
K2 = Key(bytes(range(32, 64)))
K3 = Key(bytes(range(64, 96)))
K4 = Key(bytes(range(96, 128)))

PATH = "/etc/wireguard/wg0.conf"


def conf(text: str) -> str:
    """Dedent a test file and fill in keys: {k1}..{k4} are base64 keys."""
    return textwrap.dedent(text).format(
        k1=K1.to_base64(), k2=K2.to_base64(), k3=K3.to_base64(), k4=K4.to_base64()
    )


def error(text: str, path: str = PATH) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_conf(text, path)
    return info.value


def v4(s: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(s)


def v6(s: str) -> ipaddress.IPv6Network:
    return ipaddress.IPv6Network(s)


# --- a realistic file ---------------------------------------------------------

FULL = """\
# Office tunnel, managed by hand
[Interface]
PrivateKey = {k1}
Address = 10.8.0.2/24, fd00:8::2/64
Address = 192.0.2.7
ListenPort = 51820
MTU = 1420
DNS = 10.8.0.1, fd00:8::1, corp.example.com, ~example.net, ~.
Table = 1234
FwMark = 0xca6c
PreUp = logger -t tunsup "bringing up %i"
PostUp = ip rule add fwmark 0xca6c table 1234 # policy for %i
PostUp = resolvectl domain %i ~corp.example.com
PreDown = true
PostDown = ip rule del fwmark 0xca6c table 1234
SaveConfig = false

[Peer]
# the office gateway
PublicKey = {k2}
PresharedKey = {k3}
AllowedIPs = 10.8.0.0/24, fd00:8::/64
AllowedIPs = 0.0.0.0/0
Endpoint = vpn.example.com:51820
PersistentKeepalive = 25

[Peer]
PublicKey = {k4}
AllowedIPs = 198.51.100.9/24, 203.0.113.0/25, 203.0.113.0/25
Endpoint = [2001:DB8::1]:4500
"""


def test_full_file() -> None:
    spec = parse_conf(conf(FULL), PATH)
    assert spec == TunnelSpec(
        name="wg0",
        source=PATH,
        private_key=K1,
        addresses=(
            ipaddress.IPv4Interface("10.8.0.2/24"),
            ipaddress.IPv6Interface("fd00:8::2/64"),
            ipaddress.IPv4Interface("192.0.2.7/32"),
        ),
        listen_port=51820,
        mtu=1420,
        dns_servers=(ipaddress.IPv4Address("10.8.0.1"), ipaddress.IPv6Address("fd00:8::1")),
        dns_search=("corp.example.com", "~example.net", "~."),
        table=1234,
        fwmark=0xCA6C,
        pre_up=('logger -t tunsup "bringing up %i"',),
        post_up=(
            "ip rule add fwmark 0xca6c table 1234",
            "resolvectl domain %i ~corp.example.com",
        ),
        pre_down=("true",),
        post_down=("ip rule del fwmark 0xca6c table 1234",),
        peers=(
            PeerSpec(
                public_key=K2,
                preshared_key=K3,
                allowed_ips=(v4("10.8.0.0/24"), v6("fd00:8::/64"), v4("0.0.0.0/0")),
                endpoint=Endpoint("vpn.example.com", 51820),
                persistent_keepalive=25,
                line=18,
            ),
            PeerSpec(
                public_key=K4,
                allowed_ips=(v4("198.51.100.0/24"), v4("203.0.113.0/25")),
                endpoint=Endpoint("2001:db8::1", 4500),
                line=27,
            ),
        ),
    )
    assert spec.route_table == 1234
    assert str(spec.peers[1].endpoint) == "[2001:db8::1]:4500"


def test_load_conf(tmp_path: Path) -> None:
    path = tmp_path / "office.conf"
    path.write_text(conf(FULL), encoding="utf-8")
    spec = load_conf(path)
    assert spec.name == "office"
    assert spec.source == str(path)
    assert spec == parse_conf(conf(FULL), str(path))
    assert load_conf(str(path)) == spec


def test_minimal_file_defaults() -> None:
    spec = parse_conf("[Interface]\n", "/x/tun.conf")
    assert spec == TunnelSpec(name="tun", source="/x/tun.conf")
    assert spec.private_key is None
    assert spec.table == "auto"
    assert spec.route_table == 254


def test_case_insensitive_sections_and_keys() -> None:
    spec = parse_conf(
        conf(
            """\
            [INTERFACE]
            privatekey = {k1}
            ADDRESS = 10.0.0.1
            mtu = 1400
            postup = echo %i
            TABLE = OFF
            [ peer ]
            PUBLICKEY = {k2}
            allowedips = 10.0.0.0/8
            persistentKEEPALIVE = Off
            """
        ),
        PATH,
    )
    assert spec.private_key == K1
    assert spec.addresses == (ipaddress.IPv4Interface("10.0.0.1/32"),)
    assert spec.mtu == 1400
    assert spec.post_up == ("echo %i",)
    assert spec.table == "off"
    assert spec.peers[0].public_key == K2
    assert spec.peers[0].allowed_ips == (v4("10.0.0.0/8"),)
    assert spec.peers[0].persistent_keepalive is None


def test_comments_and_blank_lines() -> None:
    spec = parse_conf(
        conf(
            """\

            # leading comment
            [Interface] # trailing comment on a header
               # indented comment
            PrivateKey = {k1}   # a comment right after a key ending in '='
            Address=10.0.0.1/24#no spaces
            PostUp = echo a#b

            [Peer]
            PublicKey={k2}
            """
        ),
        PATH,
    )
    assert spec.private_key == K1
    assert spec.addresses == (ipaddress.IPv4Interface("10.0.0.1/24"),)
    assert spec.post_up == ("echo a",)  # as in wg-quick: '#' always starts a comment
    assert spec.peers[0].public_key == K2
    assert spec.peers[0].line == 9


def test_crlf_and_bom() -> None:
    text = "\ufeff[Interface]\r\nAddress = 10.0.0.1\r\n[Peer]\r\nPublicKey = " + K2.to_base64()
    spec = parse_conf(text + "\r\n", PATH)
    assert spec.addresses == (ipaddress.IPv4Interface("10.0.0.1/32"),)
    assert spec.peers[0].line == 3


def test_hooks_kept_verbatim_in_order() -> None:
    spec = parse_conf(
        "[Interface]\n"
        "PostUp = iptables -A FORWARD -i %i -j ACCEPT; echo '%i' = done\n"
        "PreUp = a\nPostUp = b %i%i\nPreDown = c\nPostDown = d\nPreUp = e\n",
        PATH,
    )
    assert spec.post_up == ("iptables -A FORWARD -i %i -j ACCEPT; echo '%i' = done", "b %i%i")
    assert spec.pre_up == ("a", "e")
    assert spec.pre_down == ("c",)
    assert spec.post_down == ("d",)


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ("auto", "auto"),
        ("off", "off"),
        ("main", 254),
        ("254", 254),
        ("1", 1),
        ("4294967295", 2**32 - 1),
    ],
)
def test_table_values(table: str, expected: object) -> None:
    spec = parse_conf(f"[Interface]\nTable = {table}\n", PATH)
    assert spec.table == expected


@pytest.mark.parametrize(
    ("mark", "expected"),
    [("off", None), ("0", None), ("0x0", None), ("51820", 51820), ("0xCA6C", 0xCA6C),
     ("4294967295", 2**32 - 1), ("0xffffffff", 2**32 - 1)],
)  # fmt: skip
def test_fwmark_values(mark: str, expected: int | None) -> None:
    assert parse_conf(f"[Interface]\nFwMark = {mark}\n", PATH).fwmark == expected


def test_peer_values() -> None:
    spec = parse_conf(
        conf(
            """\
            [Peer]
            PublicKey = {k2}
            AllowedIPs = 10.0.0.1/24, 10.0.0.0/24, 2001:db8::1
            AllowedIPs = 10.0.0.0/24
            Endpoint = 192.0.2.1:1
            PersistentKeepalive = 0
            [Peer]
            PublicKey = {k3}
            Endpoint = host-1.example.:65535
            PersistentKeepalive = 65535
            [Interface]
            Table = off
            """
        ),
        "/t/x.y.conf",
    )
    assert spec.name == "x.y"
    first, second = spec.peers
    assert first.allowed_ips == (v4("10.0.0.0/24"), v6("2001:db8::1/128"))
    assert first.endpoint == Endpoint("192.0.2.1", 1)
    assert first.persistent_keepalive is None
    assert second.endpoint == Endpoint("host-1.example.", 65535)
    assert second.persistent_keepalive == 65535
    assert spec.allowed_ips == (v4("10.0.0.0/24"), v6("2001:db8::1/128"))


def test_default_route_allowed_with_table_auto_for_full_tunnel() -> None:
    spec = parse_conf(conf("[Interface]\n[Peer]\nPublicKey = {k2}\n"
                           "AllowedIPs = 0.0.0.0/0, ::/0\n"), PATH)
    assert spec.table == "auto"
    assert spec.allowed_ips == (v4("0.0.0.0/0"), v6("::/0"))


def test_default_route_allowed_with_explicit_table() -> None:
    for table in ("off", "main", "51820"):
        spec = parse_conf(
            conf(f"[Interface]\nTable = {table}\n[Peer]\nPublicKey = {{k2}}\nAllowedIPs = ::/0\n"),
            PATH,
        )
        assert spec.peers[0].allowed_ips == (v6("::/0"),)


# --- errors -------------------------------------------------------------------

HEAD = "[Interface]\nPrivateKey = {k1}\n"  # lines 1-2
PEER = "[Peer]\nPublicKey = {k2}\n"

LABEL64 = "x" * 30 + "-" + "y" * 33


ERRORS: list[tuple[str, int | None, str]] = [
    # structure
    ("[Interface]\n[Peers]\n", 2, "unknown section [Peers]; expected [Interface] or [Peer]"),
    ("[Interface\n", 1, "malformed section header"),
    ("[Interface]\n[" + "x" * 50 + "]\n", 2, "unknown section; expected"),
    ("# hi\nAddress = 10.0.0.1\n[Interface]\n", 2, "key outside any section"),
    (HEAD + "Address 10.0.0.1\n", 3, "expected 'Key = value' or a [Section] header"),
    (HEAD + "= 10.0.0.1\n", 3, "expected 'Key = value'"),
    (HEAD + PEER + "\n[Interface]\n", 6, "second [Interface] section (the first is at line 1)"),
    ("# only peers\n" + PEER, None, "no [Interface] section"),
    ("", None, "no [Interface] section"),
    # unknown keys
    (HEAD + PEER + "AllowedIP = 10.0.0.0/8\n", 5,
     "unknown key 'AllowedIP' in [Peer]; did you mean 'AllowedIPs'?"),
    (HEAD + "Adress = 10.0.0.1\n", 3,
     "unknown key 'Adress' in [Interface]; did you mean 'Address'?"),
    (HEAD + "Frobnicate = 1\n", 3, "unknown key 'Frobnicate' in [Interface]"),
    (HEAD + "Endpoint = 192.0.2.1:1\n", 3,
     "unknown key 'Endpoint' in [Interface]; Endpoint belongs in [Peer]"),
    (HEAD + PEER + "listenport = 1\n", 5,
     "unknown key 'listenport' in [Peer]; ListenPort belongs in [Interface]"),
    # empty values and duplicates
    (HEAD + "Address =\n", 3, "Address needs a value"),
    (HEAD + "PostUp =   # nothing\n", 3, "PostUp needs a value"),
    ("[Interface]\nPrivateKey =\n", 2, "PrivateKey needs a value"),
    (HEAD + "ListenPort = 1\nMTU = 1400\nlistenport = 2\n", 5,
     "ListenPort is given twice (first at line 3)"),
    (HEAD + "PrivateKey = {k3}\n", 3, "PrivateKey is given twice (first at line 2)"),
    (HEAD + PEER + "Endpoint = a:1\nEndpoint = b:2\n", 6,
     "Endpoint is given twice (first at line 5)"),
    (HEAD + PEER + "PublicKey = {k3}\n", 5, "PublicKey is given twice (first at line 4)"),
    # [Interface] values
    ("[Interface]\nPrivateKey = abc\n", 2,
     "PrivateKey is not a valid WireGuard key: must be 44 characters of base64 ending in '='"),
    (HEAD + "Address = 10.0.0.1/24, 10.0.0.300\n", 3,
     "Address '10.0.0.300' is not an IP address with an optional /prefix"),
    (HEAD + "Address = 10.0.0.1/33\n", 3, "Address '10.0.0.1/33' is not an IP address"),
    (HEAD + "Address = fe80::1%eth0/64\n", 3, "Address 'fe80::1%eth0/64' is not an IP address"),
    (HEAD + "Address = 10.0.0.1,\n", 3, "Address has an empty entry (a stray comma?)"),
    (HEAD + "ListenPort = 65536\n", 3, "ListenPort must be a number from 0 to 65535, not '65536'"),
    (HEAD + "ListenPort = -1\n", 3, "ListenPort must be a number from 0 to 65535, not '-1'"),
    (HEAD + "MTU = 575\n", 3, "MTU must be a number from 576 to 65535, not '575'"),
    (HEAD + "MTU = 1279\nAddress = 10.0.0.1, fd00::1\n" + PEER, 3,
     "MTU 1279 is below 1280, the minimum for IPv6 (the Address at line 4 is IPv6)"),
    (HEAD + "Address = fd00::1\nMTU = 1000\n", 4, "MTU 1000 is below 1280, the minimum for IPv6"),
    (HEAD + "DNS = 10.0.0.1, bad_name.example\n", 3,
     "DNS 'bad_name.example' is neither an IP address nor a valid domain name"),
    (HEAD + "DNS = 10.0.0.256\n", 3, "DNS '10.0.0.256' is neither an IP address"),
    (HEAD + "DNS = -lead.example\n", 3, "DNS '-lead.example' is neither"),
    (HEAD + f"DNS = {LABEL64}.example\n", 3, f"DNS '{LABEL64}.example' is neither"),
    (HEAD + "DNS = ~\n", 3, "DNS '~' is neither"),
    (HEAD + "DNS = .\n", 3, "DNS '.' is neither"),
    (HEAD + "DNS = 10.0.0.1,,10.0.0.2\n", 3, "DNS has an empty entry"),
    (HEAD + "Table = 255\n", 3, "Table 255 is the kernel's local table; choose another number"),
    (HEAD + "Table = 0\n", 3,
     "Table must be off, auto, main or a number from 1 to 4294967295, not '0'"),
    (HEAD + "Table = 4294967296\n", 3, "Table must be off, auto, main or a number"),
    (HEAD + "Table = default\n", 3, "Table must be off, auto, main or a number"),
    (HEAD + "FwMark = 0x100000000\n", 3,
     "FwMark must be off or a number from 0 to 4294967295 (decimal or 0x hex), not '0x100000000'"),
    (HEAD + "FwMark = twelve\n", 3, "FwMark must be off or a number"),
    (HEAD + "SaveConfig = true\n", 3,
     "SaveConfig = true is not supported: tunsup never rewrites your configuration file"),
    (HEAD + "SaveConfig = yes\n", 3, "SaveConfig must be true or false, not 'yes'"),
    # [Peer] values
    (HEAD + "[Peer]\nAllowedIPs = 10.0.0.0/8\n", 3, "[Peer] has no PublicKey"),
    (HEAD + "[Peer]\n[Peer]\nPublicKey = {k2}\n", 3, "[Peer] has no PublicKey"),
    (HEAD + PEER + PEER, 6,
     "PublicKey is the same as the one at line 4; each [Peer] needs its own key"),
    (HEAD + "[Peer]\nPublicKey = {k2}x\n", 4,
     "PublicKey is not a valid WireGuard key: must be 44 characters of base64 ending in '='"),
    (HEAD + PEER + "PresharedKey = " + "A" * 42 + "!=\n", 5,
     "PresharedKey is not a valid WireGuard key: is not valid base64"),
    (HEAD + PEER + "AllowedIPs = 10.0.0.0/8,\n", 5,
     "AllowedIPs has an empty entry (a stray comma?)"),
    (HEAD + PEER + "AllowedIPs = 10.0.0.0/8, , 10.1.0.0/16\n", 5, "AllowedIPs has an empty entry"),
    (HEAD + PEER + "AllowedIPs = 10.0.0.0/99\n", 5,
     "AllowedIPs '10.0.0.0/99' is not an IP network (address/prefix)"),
    (HEAD + PEER + "Endpoint = 2001:db8::1:51820\n", 5,
     "Endpoint '2001:db8::1:51820': write an IPv6 address in brackets, as in [2001:db8::1]:51820"),
    (HEAD + PEER + "Endpoint = vpn.example.com\n", 5,
     "Endpoint 'vpn.example.com' has no port; write host:port"),
    (HEAD + PEER + "Endpoint = vpn.example.com:0\n", 5,
     "Endpoint port must be a number from 1 to 65535, not '0'"),
    (HEAD + PEER + "Endpoint = 192.0.2.1:65536\n", 5,
     "Endpoint port must be a number from 1 to 65535"),
    (HEAD + PEER + "Endpoint = 192.0.2.1:\n", 5,
     "Endpoint port must be a number from 1 to 65535, not ''"),
    (HEAD + PEER + "Endpoint = [2001:db8::1]51820\n", 5,
     "Endpoint '[2001:db8::1]51820' must be host:port or [IPv6 address]:port"),
    (HEAD + PEER + "Endpoint = [192.0.2.1]:51820\n", 5, "Endpoint '[192.0.2.1]:51820' must be"),
    (HEAD + PEER + "Endpoint = vpn_1.example.com:1\n", 5,
     "Endpoint host 'vpn_1.example.com' is neither an IP address nor a valid host name"),
    (HEAD + PEER + "Endpoint = 192.0.2.300:1\n", 5, "Endpoint host '192.0.2.300' is neither"),
    (HEAD + PEER + "Endpoint = :51820\n", 5, "Endpoint host '' is neither"),
    (HEAD + PEER + "PersistentKeepalive = 65536\n", 5,
     "PersistentKeepalive must be a number from 0 to 65535, not '65536'"),
    (HEAD + PEER + "PersistentKeepalive = on\n", 5, "PersistentKeepalive must be a number"),
    # across the file
    (HEAD + "Table = off\n" + PEER + "AllowedIPs = 10.0.0.0/24\n[Peer]\nPublicKey = {k3}\n"
     "AllowedIPs = 10.1.0.0/16\nAllowedIPs = 10.0.0.9/24\n", 10,
     "AllowedIPs 10.0.0.0/24 is already given at line 6 for the [Peer] at line 4; "
     "a network can route to one peer only"),
    # a [Peer] before [Interface] is fine
    (PEER + "AllowedIPs = 0.0.0.0/0\n[Interface]\nTable = off\n", None, "<no error>"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "message"), ERRORS)
def test_errors(text: str, line: int | None, message: str) -> None:
    text = conf(text)
    if message == "<no error>":
        parse_conf(text, PATH)
        return
    e = error(text)
    where = f"{PATH}:{line}" if line is not None else PATH
    assert str(e).startswith(f"{where}: {message}")
    assert e.line == line
    assert e.path == PATH
    for key in (K1, K2, K3, K4):
        assert key.to_base64() not in str(e)


def test_first_problem_wins() -> None:
    e = error(conf(HEAD + "Address = nope\nListenPort = nope\n"))
    assert e.line == 3


@pytest.mark.parametrize(
    "path",
    [
        "/etc/wireguard/this-is-too-long.conf",
        "/x/wg 0.conf",
        "/x/wg:0.conf",
        "/x/..conf",
        "/x/...conf",
        "",
    ],
)
def test_bad_interface_name(path: str) -> None:
    e = error("[Interface]\n", path)
    assert e.line is None
    name = Path(path).stem
    assert str(e) == (
        f"{path}: interface name {name!r} (the file name without .conf) must be "
        "1 to 15 characters of letters, digits and _ = + . - (not '.' or '..')"
    )


@pytest.mark.parametrize("name", ["a", "wg0", "wg_0=+.-", "x" * 15, "A.b"])
def test_good_interface_name(name: str) -> None:
    assert parse_conf("[Interface]\n", f"/x/{name}.conf").name == name


def test_load_conf_unreadable(tmp_path: Path) -> None:
    missing = tmp_path / "nope.conf"
    with pytest.raises(ConfigError) as info:
        load_conf(missing)
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"
    assert info.value.line is None
    with pytest.raises(ConfigError) as info:
        load_conf(tmp_path)
    assert str(info.value) == f"{tmp_path}: not a regular file"


def test_load_conf_bad_utf8(tmp_path: Path) -> None:
    path = tmp_path / "wg1.conf"
    path.write_bytes(b"[Interface]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_conf(os.fspath(path))
    assert str(info.value) == f"{path}:2: is not valid UTF-8"


# --- key material never reaches a message -------------------------------------

keys = st.binary(min_size=32, max_size=32).map(Key)

#: Broken files; {key} is the secret, {other} another valid key.
LEAKY: list[str] = [
    "[Interface]\nPrivateKey = {key}\nAddress = 10.0.0.300\n",
    "[Interface]\nPrivateKey = {key}\nAddress = 10.0.0.1\nAddress = {key}\n",
    "[Interface]\nPrivatKey = {key}\n",
    "[Interface]\nPrivateKey: {key}\n",
    "[Interface]\n{key}\n",
    "[Interface]\n{key}= x\n",
    "[Interface]\n[{key}]\n",
    "{key}\n",
    "PrivateKey = {key}\n",
    "[Interface]\nPrivateKey = {key}x\n",
    "[Interface]\nPrivateKey = x{key}\n",
    "[Interface]\nPrivateKey = {key}\nPrivateKey = {key}\n",
    "[Interface]\nPrivateKey = {key}\nDNS = {key}\n",
    "[Interface]\nPrivateKey = {key}\nTable = {key}\n",
    "[Interface]\nPrivateKey = {key}\nSaveConfig = {key}\n",
    "[Interface]\nPrivateKey = {key}\nMTU = {key}\n",
    "[Interface]\nPrivateKey = {key}\nFwMark = {key}\n",
    "[Interface]\nPrivateKey = {key}\n[Peer]\nPublicKey = {key}\nPublicKey = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {key}\n[Peer]\nPublicKey = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nPresharedKey = {key}\nEndpoint = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nPresharedKey = {key}\nEndpoint = {key}:1\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nEndpoint = [{key}]:1\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nAllowedIPs = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nPresharedKey = {key}\nPersistentKeepalive = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {other}\nPublicKey = {key}\n",
    "[Interface]\n[Peer]\nPresharedKey = {key}\nAllowedIP = 10.0.0.0/8\n",
    "[Interface]\n[Peer]\nPresharedKey = {key}\n",
    "[Interface]\n[Peer]\nPresharedKey = {key}\nPresharedKey = {key}\n",
    "[Interface]\n[Peer]\nPublicKey = {key}\nAllowedIPs = 0.0.0.0/0, 10.0.0.0/33\n",
    "[Interface]\n[Peer]\nPublicKey = {key}\nAllowedIPs = 10.0.0.0/8\n[Peer]\n"
    "PublicKey = {other}\nAllowedIPs = 10.0.0.0/8\n",
    "[Interface]\nPrivateKey = {key}\nMTU = 1000\nAddress = ::1\n",
]


@given(
    key=keys,
    other=keys,
    template=st.sampled_from(LEAKY),
    mangle=st.sampled_from(["keep", "strip-pad", "hex", "lower"]),
)
@example(key=K1, other=K2, template=LEAKY[0], mangle="keep")
def test_key_material_never_in_messages(key: Key, other: Key, template: str, mangle: str) -> None:
    assume(key != other)
    b64 = key.to_base64()
    secret = {"keep": b64, "strip-pad": b64[:-1], "hex": key.hex(), "lower": b64.lower()}[mangle]
    text = template.replace("{key}", secret).replace("{other}", other.to_base64())
    e = error(text)
    message = str(e)
    for needle in (b64, b64[:-1], b64.lower(), key.hex(), secret):
        assert needle not in message
        for i in range(0, len(needle) - 12, 4):  # not even a piece of it
            assert needle[i : i + 12] not in message


# --- round trip ---------------------------------------------------------------

label = st.from_regex(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,12}[a-zA-Z0-9])?", fullmatch=True)
dns_names = st.builds(
    lambda labels, dot: ".".join(labels) + dot,
    st.lists(label, min_size=1, max_size=4).filter(lambda ls: not ls[-1].isdigit()),
    st.sampled_from(["", "."]),
)
ip_addresses: st.SearchStrategy[IPAddress] = st.ip_addresses()
interfaces: st.SearchStrategy[IPInterface] = ip_addresses.flatmap(
    lambda a: st.integers(0, a.max_prefixlen).map(lambda p: ipaddress.ip_interface(f"{a}/{p}"))
)
networks: st.SearchStrategy[IPNetwork] = interfaces.map(lambda i: i.network)
hook_text = st.text(
    st.characters(blacklist_characters="#\n\r", blacklist_categories=["Cs"]), min_size=1
).filter(lambda s: s == s.strip() and s != "")
endpoints = st.builds(
    Endpoint,
    st.one_of(ip_addresses.map(str), dns_names),
    st.integers(1, 65535),
)


@st.composite
def specs(draw: st.DrawFn) -> TunnelSpec:
    name = draw(
        st.from_regex(r"[a-zA-Z0-9_=+.-]{1,15}", fullmatch=True).filter(
            lambda n: n not in (".", "..")
        ),
    )
    addresses = draw(st.lists(interfaces, max_size=4, unique=True))
    has_v6 = any(a.version == 6 for a in addresses)
    words: list[RouteTable] = ["auto", "off"]
    table = draw(
        st.one_of(
            st.sampled_from(words),
            st.integers(1, 2**32 - 1).filter(lambda n: n != 255),
        )
    )
    all_nets = draw(st.lists(networks, max_size=8, unique=True))
    if table == "auto":
        all_nets = [n for n in all_nets if n.prefixlen > 0]
    peer_keys = draw(st.lists(keys, max_size=4, unique=True))
    owners = [draw(st.integers(0, len(peer_keys) - 1)) if peer_keys else -1 for _ in all_nets]
    peers = tuple(
        PeerSpec(
            public_key=key,
            preshared_key=draw(st.none() | keys),
            allowed_ips=tuple(n for n, o in zip(all_nets, owners, strict=True) if o == i),
            endpoint=draw(st.none() | endpoints),
            persistent_keepalive=draw(st.none() | st.integers(1, 65535)),
        )
        for i, key in enumerate(peer_keys)
    )
    hooks = st.lists(hook_text, max_size=3).map(tuple)
    return TunnelSpec(
        name=name,
        source=f"/etc/wireguard/{name}.conf",
        private_key=draw(st.none() | keys),
        addresses=tuple(addresses),
        listen_port=draw(st.none() | st.integers(0, 65535)),
        mtu=draw(st.none() | st.integers(1280 if has_v6 else 576, 65535)),
        dns_servers=tuple(draw(st.lists(ip_addresses, max_size=3, unique=True))),
        dns_search=tuple(
            draw(
                st.lists(
                    st.one_of(dns_names, dns_names.map("~".__add__), st.just("~.")),
                    max_size=3,
                    unique=True,
                )
            )
        ),
        table=table,
        fwmark=draw(st.none() | st.integers(1, 2**32 - 1)),
        pre_up=draw(hooks),
        post_up=draw(hooks),
        pre_down=draw(hooks),
        post_down=draw(hooks),
        peers=peers,
    )


@attrs.frozen
class Style:
    """How the renderer writes a spec (all of these must parse the same)."""

    case: Callable[[str], str]
    split_lists: bool
    comments: bool
    interface_last: bool
    hex_fwmark: bool


styles = st.builds(
    Style,
    st.sampled_from([str, str.lower, str.upper]),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.booleans(),
)


def render(spec: TunnelSpec, style: Style) -> tuple[str, list[int]]:
    """Write *spec* as a wg-quick file; return it and each [Peer] header's line."""
    lines: list[str] = []
    peer_lines: list[int] = []

    def put(key: str, value: object) -> None:
        comment = "  # note" if style.comments else ""
        lines.append(f"{style.case(key)} = {value}{comment}")

    def put_list(key: str, values: tuple[object, ...]) -> None:
        if not values:
            return
        if style.split_lists:
            for value in values:
                put(key, value)
        else:
            put(key, ", ".join(map(str, values)))

    def interface() -> None:
        lines.append("[Interface]")
        if spec.private_key:
            put("PrivateKey", spec.private_key.to_base64())
        put_list("Address", spec.addresses)
        if spec.listen_port is not None:
            put("ListenPort", spec.listen_port)
        if spec.mtu is not None:
            put("MTU", spec.mtu)
        put_list("DNS", spec.dns_servers + spec.dns_search)
        if spec.table != "auto" or style.comments:
            put("Table", spec.table)
        if spec.fwmark is not None:
            put("FwMark", hex(spec.fwmark) if style.hex_fwmark else spec.fwmark)
        for key, hooks in [
            ("PreUp", spec.pre_up),
            ("PostUp", spec.post_up),
            ("PreDown", spec.pre_down),
            ("PostDown", spec.post_down),
        ]:
            for hook in hooks:
                lines.append(f"{style.case(key)} = {hook}")
        lines.append("")

    if style.comments:
        lines.append("# generated")
    if not style.interface_last:
        interface()
    for peer in spec.peers:
        lines.append("[Peer]")
        peer_lines.append(len(lines))
        put("PublicKey", peer.public_key.to_base64())
        if peer.preshared_key:
            put("PresharedKey", peer.preshared_key.to_base64())
        put_list("AllowedIPs", peer.allowed_ips)
        if peer.endpoint:
            put("Endpoint", peer.endpoint)
        if peer.persistent_keepalive:
            put("PersistentKeepalive", peer.persistent_keepalive)
        lines.append("")
    if style.interface_last:
        interface()
    return "\n".join(lines), peer_lines


@given(spec=specs(), style=styles)
def test_round_trip(spec: TunnelSpec, style: Style) -> None:
    text, peer_lines = render(spec, style)
    expected = attrs.evolve(
        spec,
        peers=tuple(attrs.evolve(p, line=n) for p, n in zip(spec.peers, peer_lines, strict=True)),
    )
    assert parse_conf(text, spec.source) == expected


def test_a_network_given_again_for_the_same_peer_is_kept_once_at_its_first_line() -> None:
    """wg accepts a prefix twice for one peer (host bits masked): kept once,
    in file order, with the line it was first given on; the peer's lines
    stay parallel to its networks, and the tunnel's list has no duplicate."""
    text = conf(HEAD + "Table = off\n" + PEER
                + "AllowedIPs = 10.0.0.0/24, 10.0.0.0/24\n"   # line 6: twice on one line
                + "AllowedIPs = 10.1.0.0/16\n"                # line 7
                + "AllowedIPs = 10.0.0.9/24, 10.2.0.0/16\n")  # line 8: 10.0.0.0/24 again
    spec = parse_conf(text, PATH)
    (peer,) = spec.peers
    nets = [ipaddress.ip_network(n) for n in ("10.0.0.0/24", "10.1.0.0/16", "10.2.0.0/16")]
    assert list(peer.allowed_ips) == nets
    assert list(peer.allowed_lines) == [6, 7, 8]
    assert peer.allowed_line(nets[0]) == 6
    assert list(spec.allowed_ips) == nets
