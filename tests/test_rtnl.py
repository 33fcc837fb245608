"""Tests of the bulk route encoder (tunsup.host._rtnl).

Encoding and ACK parsing are checked without privileges; everything that
talks to the kernel runs in scratch network namespaces (root), on TUN devices
created there, and removes the namespaces afterwards.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import json
import logging
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tunsup.host import _rtnl
from tunsup.host._rtnl import (
    RouteBatchError,
    RouteBatchResult,
    add_routes,
    delete_routes,
    encode_route,
    parse_acks,
)
from tunsup.testing import netns as _netns

from .conftest import unique

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

little_endian = pytest.mark.skipif(
    sys.byteorder != "little", reason="expected bytes are written for a little-endian host"
)


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


# --- encoding, without the kernel -------------------------------------------


@little_endian
def test_encode_ipv4_add_bytes() -> None:
    msg = encode_route(net("10.1.2.0/24"), ifindex=7, table=254, seq=0x01020304)
    expected = bytes.fromhex(
        # nlmsghdr: len 52, RTM_NEWROUTE (24),
        # flags REQUEST|ACK|EXCL|CREATE = 0x605, seq, pid 0
        "34000000" "1800" "0506" "04030201" "00000000"
        # rtmsg: AF_INET, dst_len 24, src_len 0, tos 0, table 254,
        # proto static (4), scope link (253), type unicast (1), flags 0
        "02" "18" "00" "00" "fe" "04" "fd" "01" "00000000"
        # RTA_TABLE (15) = 254
        "0800" "0f00" "fe000000"
        # RTA_DST (1) = 10.1.2.0
        "0800" "0100" "0a010200"
        # RTA_OIF (4) = 7
        "0800" "0400" "07000000"
    )
    assert msg == expected


@little_endian
def test_encode_ipv6_delete_bytes() -> None:
    msg = encode_route(
        net("2001:db8:1::/48"), ifindex=7, table=1234, metric=100, seq=1, delete=True
    )
    expected = bytes.fromhex(
        # nlmsghdr: len 72, RTM_DELROUTE (25), flags REQUEST|ACK = 5, seq 1
        "48000000" "1900" "0500" "01000000" "00000000"
        # rtmsg: AF_INET6 (10), dst_len 48, table RT_TABLE_UNSPEC (1234 > 255),
        # proto static, scope universe (0), unicast
        "0a" "30" "00" "00" "00" "04" "00" "01" "00000000"
        # RTA_TABLE = 1234
        "0800" "0f00" "d2040000"
        # RTA_DST = 2001:db8:1::
        "1400" "0100" "20010db8000100000000000000000000"
        # RTA_OIF = 7
        "0800" "0400" "07000000"
        # RTA_PRIORITY (6) = 100
        "0800" "0600" "64000000"
    )
    assert msg == expected


@little_endian
def test_encode_default_route_has_no_dst() -> None:
    msg = encode_route(net("0.0.0.0/0"), ifindex=3, table=100, seq=9)
    expected = bytes.fromhex(
        "2c000000" "1800" "0506" "09000000" "00000000"
        "02" "00" "00" "00" "64" "04" "fd" "01" "00000000"
        "0800" "0f00" "64000000"
        "0800" "0400" "03000000"
    )
    assert msg == expected


# A decoder written independently of the module, for the property tests.
NLMSGHDR = struct.Struct("=IHHII")
RTMSG = struct.Struct("=BBBBBBBBI")


def decode_route(msg: bytes) -> dict[str, Any]:
    length, mtype, flags, seq, pid = NLMSGHDR.unpack_from(msg)
    assert length == len(msg) and pid == 0
    family, dst_len, src_len, tos, rtm_table, proto, scope, rtype, rflags = (
        RTMSG.unpack_from(msg, 16)
    )
    attrs_: dict[int, bytes] = {}
    off = 28
    while off < length:
        alen, atype = struct.unpack_from("=HH", msg, off)
        assert atype not in attrs_
        attrs_[atype] = msg[off + 4 : off + alen]
        off += (alen + 3) & ~3
    assert off == length
    return {
        "type": mtype, "flags": flags, "seq": seq, "family": family, "dst_len": dst_len,
        "src_len": src_len, "tos": tos, "rtm_table": rtm_table, "proto": proto,
        "scope": scope, "rtype": rtype, "rflags": rflags, "attrs": attrs_,
    }


def u32(value: bytes) -> int:
    (n,) = struct.unpack("=I", value)
    return int(n)


v4_nets = st.builds(
    lambda a, p: ipaddress.IPv4Network((a, p), strict=False),
    st.integers(0, 2**32 - 1), st.integers(0, 32),
)
v6_nets = st.builds(
    lambda a, p: ipaddress.IPv6Network((a, p), strict=False),
    st.integers(0, 2**128 - 1), st.integers(0, 128),
)
any_net = st.one_of(v4_nets, v6_nets)


@given(
    prefix=any_net,
    ifindex=st.integers(1, 2**31 - 1),
    table=st.integers(1, 2**32 - 1),
    metric=st.none() | st.integers(0, 2**32 - 1),
    seq=st.integers(0, 2**32 - 1),
    delete=st.booleans(),
)
def test_encode_decodes_back(
    prefix: IPNetwork, ifindex: int, table: int, metric: int | None, seq: int, delete: bool
) -> None:
    m = decode_route(encode_route(prefix, ifindex=ifindex, table=table, metric=metric,
                                  seq=seq, delete=delete))
    assert m["type"] == (25 if delete else 24)
    assert m["flags"] == (0x005 if delete else 0x605)
    assert m["seq"] == seq
    assert m["family"] == (2 if prefix.version == 4 else 10)
    assert m["scope"] == (253 if prefix.version == 4 else 0)
    assert (m["dst_len"], m["src_len"], m["tos"], m["rflags"]) == (prefix.prefixlen, 0, 0, 0)
    assert (m["proto"], m["rtype"]) == (_rtnl.ROUTE_PROTOCOL, 1)
    assert m["rtm_table"] == (table if table < 256 else 0)
    a = m["attrs"]
    assert u32(a.pop(15)) == table
    assert u32(a.pop(4)) == ifindex
    if metric is None:
        assert 6 not in a
    else:
        assert u32(a.pop(6)) == metric
    if prefix.prefixlen == 0:
        assert a == {}
    else:
        assert ipaddress.ip_address(a.pop(1)) == prefix.network_address
        assert a == {}


# Synthetic kernel replies, built as net/netlink/af_netlink.c:netlink_ack does.
NLMSG_ERROR, NLMSG_DONE, NLM_F_CAPPED, NLM_F_ACK_TLVS = 2, 3, 0x100, 0x200


def pad4(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def synth_ack(request: bytes, err: int, extack: str | None, capped: bool) -> bytes:
    seq = NLMSGHDR.unpack_from(request)[3]
    body = struct.pack("=i", -err) + (request[:16] if capped else request)
    flags = NLM_F_CAPPED if capped else 0
    tlvs = b""
    if extack is not None:
        flags |= NLM_F_ACK_TLVS
        tlvs += struct.pack("=HHI", 8, 2, 28)  # NLMSGERR_ATTR_OFFS, skipped
        text = extack.encode() + b"\0"
        tlvs += pad4(struct.pack("=HH", 4 + len(text), 1) + text)
    payload = pad4(body) + tlvs
    return NLMSGHDR.pack(16 + len(payload), NLMSG_ERROR, flags, seq, 1234) + payload


ack_specs = st.lists(
    st.tuples(
        any_net,
        st.integers(0, 2**32 - 1),
        st.sampled_from([0, 0, errno.EEXIST, errno.ENODEV, errno.ESRCH, errno.EACCES]),
        st.none() | st.text(st.characters(min_codepoint=1, max_codepoint=0xD7FF), max_size=60),
        st.booleans(),
        st.booleans(),
    ),
    max_size=20,
)


@given(ack_specs)
def test_parse_acks_round_trip(
    specs: list[tuple[IPNetwork, int, int, str | None, bool, bool]],
) -> None:
    buf = b""
    expected = []
    for prefix, seq, err, extack, capped, noise in specs:
        request = encode_route(prefix, ifindex=5, table=254, seq=seq)
        if noise:  # a message that is not an ACK is skipped
            buf += NLMSGHDR.pack(20, NLMSG_DONE, 2, seq, 0) + b"\0" * 4
        buf += synth_ack(request, err, extack, capped)
        expected.append((seq, err, extack))
    assert parse_acks(buf) == expected
    assert parse_acks(memoryview(bytearray(buf))) == expected


def test_parse_acks_rejects_garbage() -> None:
    ack = synth_ack(encode_route(net("10.0.0.0/8"), ifindex=1, table=254), 0, None, True)
    with pytest.raises(ValueError):
        parse_acks(ack[:-1])
    with pytest.raises(ValueError):
        parse_acks(ack + b"\0" * 7)
    with pytest.raises(ValueError):
        parse_acks(NLMSGHDR.pack(8, NLMSG_ERROR, 0, 1, 0))
    assert parse_acks(b"") == []


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        add_routes(1, [net("10.0.0.0/8")], table=0)
    with pytest.raises(ValueError):
        delete_routes(-1, [net("10.0.0.0/8")], table=254)
    with pytest.raises(ValueError):
        add_routes(1, [net("10.0.0.0/8")], table=254, metric=-1)
    with pytest.raises(TypeError):
        add_routes(1, ["10.0.0.0/8"], table=254)  # type: ignore[list-item]
    assert add_routes(1, [], table=254) == RouteBatchResult((), ())
    assert delete_routes(1, [], table=254) == 0


def test_error_is_an_oserror() -> None:
    e = RouteBatchError(errno.ENODEV, "route 10.1.2.0/24 table 254: No such device",
                        prefix=net("10.1.2.0/24"), table=254)
    assert isinstance(e, OSError)
    assert e.errno == errno.ENODEV
    assert str(e) == "route 10.1.2.0/24 table 254: No such device"


# --- against the kernel, in scratch namespaces -------------------------------


@functools.cache
def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    probe = f"tsrt-probe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                         check=False)
    if res.returncode != 0:
        return f"ip netns add is impossible here: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


_counter = itertools.count()


@attrs.define
class Scratch:
    """A namespace with two TUN devices, ``dev`` (ours) and ``other``."""

    ns: str
    dev: str = "tsrt0"
    other: str = "tsrt1"
    idx: int = 0
    other_idx: int = 0

    def run(self, fn: Callable[[], T]) -> T:
        return _netns.run_in_netns(self.ns, fn)

    def ip(self, *args: str) -> str:
        return _netns.ip(*args, ns=self.ns)

    def routes(self, *selector: str) -> list[dict[str, Any]]:
        """Routes of both families in every table (minus the local table)."""
        out: list[dict[str, Any]] = []
        for family in ("-4", "-6"):
            text = self.ip("-j", family, "route", "show", "table", "all", *selector)
            out += [r for r in (json.loads(text) if text.strip() else [])
                    if r.get("table") != "local" and r.get("type") not in ("multicast",)]
        return out

    def keys(self, *selector: str) -> set[tuple[str, str, str, str]]:
        """(dst, dev, table, protocol) of the routes."""
        return {
            (dst(r), r.get("dev", ""), r.get("table", "main"), r.get("protocol", "boot"))
            for r in self.routes(*selector)
        }

    def count(self, table: int, dev: str) -> int:
        text = self.ip("-j", "route", "show", "table", str(table), "dev", dev)
        return len(json.loads(text)) if text.strip() else 0


def dst(route: dict[str, Any]) -> str:
    """The destination of an ``ip -j route`` entry as a network."""
    d = str(route["dst"])
    return d if d == "default" else str(ipaddress.ip_network(d))


def link_index(s: Scratch, name: str) -> int:
    return int(json.loads(s.ip("-j", "link", "show", name))[0]["ifindex"])


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = unique("tsrt-")
    with _netns.scratch_namespaces(name):
        s = Scratch(name)
        for dev in (s.dev, s.other):
            s.ip("tuntap", "add", "dev", dev, "mode", "tun")
            s.ip("link", "set", dev, "up")
        s.idx, s.other_idx = link_index(s, s.dev), link_index(s, s.other)
        yield s


@pytest.mark.netns
def test_add_mixed_families(scratch: Scratch) -> None:
    s = scratch
    nets = [net(p) for p in ("10.1.2.0/24", "10.9.0.0/16", "192.0.2.7/32",
                             "2001:db8:1::/48", "2001:db8:2::/64")]
    result = s.run(lambda: add_routes(s.idx, nets, table=254))
    assert result == RouteBatchResult(tuple(nets), ())
    routes = s.routes("dev", s.dev)
    assert {dst(r) for r in routes} == {str(n) for n in nets}
    for r in routes:
        assert r["protocol"] == "static"
        assert "table" not in r  # main
        assert r.get("scope", "global") == ("link" if ":" not in r["dst"] else "global")
        assert r.get("type", "unicast") == "unicast"
    assert s.run(lambda: delete_routes(s.idx, nets, table=254)) == 5
    assert s.routes("dev", s.dev) == []


@pytest.mark.netns
def test_table_above_255_and_metric(scratch: Scratch) -> None:
    s = scratch
    nets = [net("10.20.0.0/16"), net("0.0.0.0/0"), net("2001:db8::/32"), net("::/0")]
    result = s.run(lambda: add_routes(s.idx, nets, table=1234, metric=77))
    assert result.added == tuple(nets)
    routes = s.routes("dev", s.dev)
    assert sorted(r["dst"] for r in routes) == ["10.20.0.0/16", "2001:db8::/32",
                                                 "default", "default"]
    assert {(r["table"], r["protocol"], r["metric"]) for r in routes} == {("1234", "static", 77)}
    assert s.routes("table", "main", "dev", s.dev) == []
    # Another metric is another route: not ours to delete.
    assert s.run(lambda: delete_routes(s.idx, nets[2:], table=1234, metric=78)) == 0
    assert s.run(lambda: delete_routes(s.idx, nets, table=1234, metric=77)) == 4
    assert s.routes("dev", s.dev) == []


@pytest.mark.netns
def test_unreachable_routes_for_the_kill_switch(scratch: Scratch) -> None:
    s = scratch
    nets = [net("0.0.0.0/0"), net("::/0"), net("198.51.100.0/24")]
    metric = 0xFFFFFFF0
    result = s.run(lambda: add_routes(_rtnl.UNREACHABLE, nets, table=4321, metric=metric))
    assert result.added == tuple(nets)
    routes = s.routes("table", "4321")
    assert {(r["type"], r["dst"], r["metric"], r["protocol"]) for r in routes} == {
        ("unreachable", "default", metric, "static"),
        ("unreachable", "198.51.100.0/24", metric, "static")}
    assert len(routes) == 3
    # A device route to the same prefix at a better metric coexists and wins.
    assert s.run(lambda: add_routes(s.idx, nets[:1], table=4321)).added == (nets[0],)
    assert s.run(lambda: delete_routes(s.idx, nets[:1], table=4321)) == 1
    assert s.run(lambda: delete_routes(_rtnl.UNREACHABLE, nets, table=4321, metric=metric)) == 3
    assert s.routes("table", "4321") == []


@pytest.mark.netns
def test_ipv6_default_metric_matches_kernel_default(scratch: Scratch) -> None:
    s = scratch
    p = net("2001:db8:5::/48")
    s.run(lambda: add_routes(s.idx, [p], table=254))
    assert [r["metric"] for r in s.routes("dev", s.dev)] == [1024]
    assert s.run(lambda: delete_routes(s.idx, [p], table=254)) == 1


@pytest.mark.netns
def test_ten_thousand_routes(scratch: Scratch) -> None:
    s = scratch
    v4 = [ipaddress.IPv4Network((0x0A000000 + (i << 8), 24)) for i in range(8000)]
    v6 = [ipaddress.IPv6Network(((0x20010DB8 << 96) + (i << 64), 64)) for i in range(2000)]
    nets: list[IPNetwork] = [*v4, *v6]
    result = s.run(lambda: add_routes(s.idx, nets, table=4242))
    assert len(result.added) == 10_000 and result.existed == ()
    assert s.count(4242, s.dev) == 8000
    text = s.ip("-j", "-6", "route", "show", "table", "4242", "dev", s.dev)
    assert len(json.loads(text)) == 2000
    assert {r["dst"] for r in json.loads(text)} == {str(n) for n in v6}
    assert s.run(lambda: delete_routes(s.idx, nets, table=4242)) == 10_000
    assert s.routes("table", "4242") == []


@pytest.mark.netns
def test_existing_route_is_reported_and_kept(scratch: Scratch) -> None:
    s = scratch
    s.ip("route", "add", "10.9.0.0/24", "dev", s.other)
    s.ip("-6", "route", "add", "2001:db8:9::/64", "dev", s.other)
    before = s.keys()
    ours = [net("10.9.1.0/24"), net("2001:db8:a::/64")]
    theirs = [net("10.9.0.0/24"), net("2001:db8:9::/64")]
    result = s.run(lambda: add_routes(s.idx, [ours[0], theirs[0], theirs[1], ours[1]],
                                      table=254))
    assert result == RouteBatchResult(tuple(ours), tuple(theirs))
    assert s.run(lambda: delete_routes(s.idx, ours, table=254)) == 2
    assert s.keys() == before
    # Even asked to delete them, we only match our device: theirs stay.
    assert s.run(lambda: delete_routes(s.idx, theirs, table=254)) == 0
    assert s.keys() == before


@pytest.mark.netns
def test_duplicates_are_sent_once(scratch: Scratch) -> None:
    s = scratch
    p = net("10.3.0.0/16")
    result = s.run(lambda: add_routes(s.idx, [p, p, ipaddress.IPv4Network("10.3.0.0/16")],
                                      table=254))
    assert result == RouteBatchResult((p,), ())
    assert s.run(lambda: delete_routes(s.idx, [p, p], table=254)) == 1


@pytest.mark.netns
def test_no_such_device(scratch: Scratch) -> None:
    s = scratch
    before = s.keys()
    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: add_routes(99999, [net("10.1.2.0/24"), net("10.1.3.0/24")],
                                 table=254))
    e = info.value
    assert e.errno == errno.ENODEV
    assert e.prefix == net("10.1.2.0/24")
    assert str(e).startswith("route 10.1.2.0/24 table 254: No such device")
    assert s.keys() == before


@pytest.mark.netns
def test_failure_mid_batch_rolls_back(scratch: Scratch) -> None:
    s = scratch
    before = s.keys()
    # IPv6 disabled on the device: the kernel refuses IPv6 routes via it
    # (EACCES), while IPv4 routes in the same and in earlier chunks succeed.
    _netns.ip("netns", "exec", s.ns, "sysctl", "-q", f"net.ipv6.conf.{s.dev}.disable_ipv6=1")
    bad = net("2001:db8:bad::/48")
    nets: list[IPNetwork] = [
        *(ipaddress.IPv4Network((0x0A400000 + (i << 8), 24)) for i in range(1000)),
        bad,
        *(ipaddress.IPv4Network((0x0A800000 + (i << 8), 24)) for i in range(1000)),
    ]
    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: add_routes(s.idx, nets, table=254))
    e = info.value
    assert e.errno == errno.EACCES
    assert e.prefix == bad and e.failed == 1
    assert str(e).startswith("route 2001:db8:bad::/48 table 254: Permission denied")
    if e.extack:  # the kernel says why
        assert e.extack in str(e)
    assert any("rolled back" in n for n in getattr(e, "__notes__", []))
    assert s.keys() == before
    assert s.count(254, s.dev) == 0


@pytest.mark.netns
def test_extack_text_in_error(scratch: Scratch) -> None:
    s = scratch
    s.ip("link", "set", s.dev, "down")
    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: add_routes(s.idx, [net("10.1.2.0/24")], table=254))
    e = info.value
    assert e.errno == errno.ENETDOWN
    assert e.extack  # "Nexthop device is not up" or similar
    assert str(e) == f"route 10.1.2.0/24 table 254: {os.strerror(errno.ENETDOWN)} ({e.extack})"


@pytest.mark.netns
def test_delete_is_idempotent(scratch: Scratch) -> None:
    s = scratch
    nets = [net("10.4.0.0/24"), net("2001:db8:4::/64")]
    s.run(lambda: add_routes(s.idx, nets, table=300))
    assert s.run(lambda: delete_routes(s.idx, nets, table=300)) == 2
    assert s.run(lambda: delete_routes(s.idx, nets, table=300)) == 0
    # A table that never existed, a device that is gone: still fine.
    assert s.run(lambda: delete_routes(s.idx, nets, table=301)) == 0
    s.ip("link", "del", s.dev)
    assert s.run(lambda: delete_routes(s.idx, nets, table=300)) == 0


@pytest.mark.netns
def test_delete_only_matches_our_routes(scratch: Scratch) -> None:
    s = scratch
    p4, p6 = "10.7.0.0/24", "2001:db8:7::/64"
    # Same prefix and table, our device, another protocol.
    s.ip("route", "add", p4, "dev", s.dev, "proto", "boot", "table", "100")
    s.ip("-6", "route", "add", p6, "dev", s.dev, "proto", "kernel", "table", "100")
    # Same prefix, table and protocol, another device.
    s.ip("route", "add", p4, "dev", s.other, "proto", "static", "table", "101")
    s.ip("-6", "route", "add", p6, "dev", s.other, "proto", "static", "table", "101")
    # Same prefix, device and protocol, another scope (IPv4) or table.
    s.ip("route", "add", p4, "dev", s.dev, "proto", "static", "scope", "global",
         "table", "102")
    s.ip("-6", "route", "add", p6, "dev", s.dev, "proto", "static", "table", "103")
    before = s.keys()
    assert len(before) == 6
    prefixes = [net(p4), net(p6)]
    for table in (100, 101, 102):
        assert s.run(functools.partial(delete_routes, s.idx, prefixes, table=table)) == 0
    assert s.keys() == before
    # Ours, added beside them in table 101, go; theirs stay.
    result = s.run(lambda: add_routes(s.idx, prefixes, table=101))
    assert result.existed == tuple(prefixes)  # same key (prefix, metric) in that table
    result = s.run(lambda: add_routes(s.idx, prefixes, table=104))
    assert result.added == tuple(prefixes)
    assert s.run(lambda: delete_routes(s.idx, prefixes, table=104)) == 2
    assert s.keys() == before


@pytest.mark.netns
def test_lost_answers_are_reported_not_guessed(
    scratch: Scratch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The kernel answers only failures (and each chunk's last request):
    with a tiny receive buffer and huge chunks in which every request fails
    (routes that already exist; then routes that are gone), it drops
    answers.  The routes without an answer are reported as uncertain, never
    taken for added (and rolled back) nor for deleted; the routes stay as
    the kernel has them."""
    s = scratch
    nets = [ipaddress.IPv4Network((0x0AC00000 + i, 32)) for i in range(2000)]
    assert len(s.run(lambda: add_routes(s.idx, nets, table=254)).added) == len(nets)
    monkeypatch.setattr(_rtnl, "RCVBUF_WANTED", 4096)
    monkeypatch.setattr(_rtnl, "ACK_TRUESIZE", 1)
    monkeypatch.setattr(_rtnl, "CHUNK_MAX", 2000)
    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: add_routes(s.idx, nets, table=254))  # every one: EEXIST
    e = info.value
    assert e.errno == errno.ENOBUFS
    assert e.uncertain and e.failed == len(e.uncertain)
    # Nothing was taken for ours: no rollback deleted any of them.
    assert {dst(r) for r in s.routes("dev", s.dev)} == {str(n) for n in nets}
    monkeypatch.undo()
    assert s.run(lambda: delete_routes(s.idx, nets, table=254)) == len(nets)
    monkeypatch.setattr(_rtnl, "RCVBUF_WANTED", 4096)
    monkeypatch.setattr(_rtnl, "ACK_TRUESIZE", 1)
    monkeypatch.setattr(_rtnl, "CHUNK_MAX", 2000)
    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: delete_routes(s.idx, nets, table=254))  # every one: ESRCH
    assert info.value.errno == errno.ENOBUFS
    assert info.value.uncertain
    monkeypatch.undo()
    assert s.run(lambda: delete_routes(s.idx, nets, table=254)) == 0
    assert s.routes("dev", s.dev) == []


@pytest.mark.netns
def test_routes_added_silently_before_lost_answers_are_removed_by_the_abort(
    scratch: Scratch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk mixing new routes (answered by nothing: successes are
    silent) with routes that exist on another device (each answered
    EEXIST) overflows a tiny receive buffer.  ``add_routes`` cannot tell
    the silent successes from failures whose answer was lost: they are
    uncertain, not rolled back there.  The ``Routes`` effect's abort, run
    by the effect stack over the intent's whole prefix list, removes them;
    the other device's routes stay."""
    from tunsup._errors import HostError
    from tunsup.engine.effects import Routes
    from tunsup.engine.undo import EffectContext, EffectStack
    from tunsup.host import Host
    from tunsup.host.netlink import NetlinkHost

    s = scratch
    theirs = [ipaddress.IPv4Network((0x0AC30000 + 2 * i, 32)) for i in range(1000)]
    ours = [ipaddress.IPv4Network((0x0AC30000 + 2 * i + 1, 32)) for i in range(1000)]
    s.run(lambda: add_routes(s.other_idx, theirs, table=254))
    before = s.keys()
    mixed = tuple(itertools.chain.from_iterable(zip(theirs, ours, strict=True)))
    real_add = _rtnl.add_routes

    def add_with_tiny_buffer(*args: Any, **kwargs: Any) -> _rtnl.RouteBatchResult:
        # Only the adding loses answers; the abort's delete has the real buffer.
        with monkeypatch.context() as m:
            m.setattr(_rtnl, "RCVBUF_WANTED", 4096)
            m.setattr(_rtnl, "ACK_TRUESIZE", 1)
            m.setattr(_rtnl, "CHUNK_MAX", 2000)
            return real_add(*args, **kwargs)

    monkeypatch.setattr(_rtnl, "add_routes", add_with_tiny_buffer)

    with pytest.raises(RouteBatchError) as info:
        s.run(lambda: _rtnl.add_routes(s.idx, mixed, table=254))
    e = info.value
    assert e.errno == errno.ENOBUFS
    assert set(ours) <= set(e.uncertain)  # never answered, so never taken for added
    assert {dst(r) for r in s.routes("dev", s.dev)} == {str(n) for n in ours}  # yet there
    assert s.run(lambda: delete_routes(s.idx, ours, table=254)) == len(ours)
    assert s.keys() == before

    async def through_the_stack() -> str:
        net = NetlinkHost()
        host = Host(net=net, start_helper=None, run_hook=None,  # type: ignore[arg-type]
                    dns_backend=None)  # type: ignore[arg-type]
        log = logging.getLogger("test_rtnl")
        try:
            async with trio.open_nursery() as nursery:
                stack = EffectStack(EffectContext(host=host, log=log, nursery=nursery), log=log)
                with pytest.raises(HostError) as failed:
                    await stack.apply(Routes(s.dev, s.idx, 254, mixed))
                assert not stack.records  # nothing recorded as applied
                report = await stack.unwind(30)
                assert report.complete, report
                return str(failed.value)
        finally:
            await net.close()

    message = s.run(lambda: trio.run(through_the_stack))
    assert "the state of" in message and "is unknown" in message
    assert s.routes("dev", s.dev) == []
    assert s.keys() == before


@pytest.mark.netns
def test_only_the_last_request_of_a_chunk_asks_for_an_ack(
    scratch: Scratch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Successes are not answered one by one (one ``recv`` each was most of
    the Python side of a large batch): the kernel's answers to a batch of
    3 chunks that all succeed are exactly 3 ACKs, the chunks' last
    requests'; failures in between are still each read and reported."""
    s = scratch
    monkeypatch.setattr(_rtnl, "CHUNK_MAX", 100)
    answers: list[int] = []
    real = _rtnl._RtnlSocket._record

    def record(self: object, view: memoryview, *args: object) -> None:
        answers.extend(seq for seq, _err, _msg in _rtnl.parse_acks(view))
        real(self, view, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_rtnl._RtnlSocket, "_record", record)
    monkeypatch.setattr(_rtnl, "_ACK", struct.Struct("<0s"))  # no fast path: see every answer
    nets = [ipaddress.IPv4Network((0x0AC10000 + i, 32)) for i in range(300)]
    assert len(s.run(lambda: add_routes(s.idx, nets, table=254)).added) == 300
    assert len(answers) == 3
    answers.clear()
    result = s.run(lambda: add_routes(s.idx, [*nets[:150], *(
        ipaddress.IPv4Network((0x0AC20000 + i, 32)) for i in range(150))], table=254))
    assert len(result.existed) == 150 and len(result.added) == 150
    assert len(answers) == 150 + 2  # each EEXIST, and the last of the other two chunks
    assert s.run(lambda: delete_routes(s.idx, nets, table=254)) == 300


def _link_message(mtype: int, family: int, index: int, name: str) -> bytes:
    text = name.encode() + b"\0"
    body = struct.pack("=BxHiII", family, 0, index, 0, 0)
    body += pad4(struct.pack("=HH", 4 + len(text), 3) + text)  # IFLA_IFNAME
    body += struct.pack("=HHI", 8, 27, 0)  # IFLA_GROUP, skipped
    return NLMSGHDR.pack(16 + len(body), mtype, 0, 0, 0) + body


def test_link_deletions_reads_only_deletions_of_links() -> None:
    """What the link watch hears: a link's deletion (family AF_UNSPEC)
    counts; a link's change (RTM_NEWLINK) and a bridge port's removal
    (RTM_DELLINK of family AF_BRIDGE: the link stays) do not."""
    af_bridge = 7
    datagram = (_link_message(_rtnl.RTM_NEWLINK, 0, 4, "wg0")
                + _link_message(_rtnl.RTM_DELLINK, af_bridge, 5, "port0")
                + _link_message(_rtnl.RTM_DELLINK, 0, 6, "wg1")
                + _link_message(_rtnl.RTM_DELLINK, 0, 7, "a-fifteen-chars"))
    assert _rtnl.link_deletions(datagram) == [(6, "wg1"), (7, "a-fifteen-chars")]
    assert _rtnl.link_deletions(memoryview(bytearray(datagram))) == [
        (6, "wg1"), (7, "a-fifteen-chars")]
    assert _rtnl.link_deletions(b"") == []


def test_link_deletions_rejects_a_cut_message() -> None:
    message = _link_message(_rtnl.RTM_DELLINK, 0, 6, "wg1")
    with pytest.raises(OSError, match="bad message length"):
        _rtnl.link_deletions(message[:-4])
    # A header claiming less than a header is no message either.
    with pytest.raises(OSError, match="bad message length"):
        _rtnl.link_deletions(NLMSGHDR.pack(8, _rtnl.RTM_DELLINK, 0, 0, 0) + b"\0" * 8)
