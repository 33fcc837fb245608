"""Route dumps decoded without pyroute2 (tunsup.host._rtnl.dump_routes)
behind NetlinkHost.link_routes / connected_networks, in a scratch namespace."""

from __future__ import annotations

import ipaddress
import json
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import trio

from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns


def _script(script: str, ns: str, *args: str, tuns: tuple[str, ...] = ()) -> Any:
    """Run ``script`` (it enters namespace ``ns`` itself) in a fresh
    interpreter, after creating the TUN links ``tuns`` in ``ns``; its
    output, decoded from JSON."""
    import subprocess
    import sys

    for dev in tuns:
        _netns.ip("tuntap", "add", dev, "mode", "tun", ns=ns)
    done = subprocess.run([sys.executable, "-c", script, ns, *args], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def net(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    return ipaddress.ip_network(text)


def test_link_routes_and_connected_networks(netns: Callable[[str], str]) -> None:
    ns = netns("dmp")

    def ip(*args: str) -> str:
        return _netns.ip(*args, ns=ns)

    for dev in ("d0", "d1"):
        ip("tuntap", "add", dev, "mode", "tun")
        ip("link", "set", dev, "up")
    ip("addr", "add", "192.0.2.1/24", "dev", "d0")
    ip("-6", "addr", "add", "2001:db8::1/64", "dev", "d0", "nodad")
    ip("addr", "add", "10.9.0.1/16", "dev", "d1")
    ip("route", "add", "198.51.100.0/24", "dev", "d0")
    ip("route", "add", "203.0.113.0/24", "dev", "d0", "table", "1000")
    ip("-6", "route", "add", "2001:db8:1::/48", "dev", "d0", "table", "1000")
    ip("route", "add", "unreachable", "10.8.0.0/16")
    ip("route", "add", "0.0.0.0/0", "dev", "d0", "table", "1000")
    # Enough routes on another link for several datagrams of dump.
    batch = "".join(f"route add 10.{i // 250 + 100}.{i % 250}.0/24 dev d1\n"
                    for i in range(3000))
    _netns.run_in_netns(ns, lambda: _rtnl.add_routes(
        socket.if_nametoindex("d1"),
        [net(line.split()[2]) for line in batch.splitlines()], table=254))

    async def main() -> tuple[list[object], list[object], list[object], int]:
        host = NetlinkHost()
        try:
            d0 = socket.if_nametoindex("d0")
            main_routes = await host.link_routes(d0, 254)
            table_routes = await host.link_routes(d0, 1000)
            connected = await host.connected_networks()
        finally:
            await host.close()
        return list(main_routes), list(table_routes), list(connected), d0

    main_routes, table_routes, connected, d0 = _netns.run_in_netns(ns, lambda: trio.run(main))
    # Filtered by protocol (the kernel does it: the 3000 static routes of
    # d1 are not sent for connected_networks to throw away).
    kernel = _netns.run_in_netns(ns, lambda: _rtnl.dump_routes(
        socket.AF_INET, table=254, protocol=2))
    assert {(r.network(), r.protocol) for r in kernel} == {
        (net("192.0.2.0/24"), 2), (net("10.9.0.0/16"), 2)}
    # What `ip` shows (any fe80::/64 included) is what link_routes says.
    shown = {net(r["dst"] if r["dst"] != "default" else f"{zero}/0")
             for v, zero in (("-4", "0.0.0.0"), ("-6", "::"))
             for r in json.loads(ip(v, "-j", "route", "show", "table", "254", "dev", "d0",
                                    "type", "unicast"))}
    assert {net("192.0.2.0/24"), net("198.51.100.0/24"), net("2001:db8::/64")} <= shown
    assert sorted(main_routes, key=str) == sorted(shown, key=str)
    assert set(table_routes) == {net("203.0.113.0/24"), net("2001:db8:1::/48"),
                                 net("0.0.0.0/0")}
    d1 = _netns.run_in_netns(ns, lambda: socket.if_nametoindex("d1"))
    assert sorted(connected, key=str) == sorted([
        (net("192.0.2.0/24"), "d0", d0), (net("2001:db8::/64"), "d0", d0),
        (net("10.9.0.0/16"), "d1", d1)], key=str)


OPS = """
import ipaddress, json, socket, sys
import trio
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS = sys.argv[1]

async def main():
    host = NetlinkHost()
    out = {}
    try:
        i = await host.link_index("t0")
        out["index"] = i == socket.if_nametoindex("t0")
        out["name"] = await host.link_name(i)
        out["missing"] = [await host.link_index("nope0"), await host.link_name(99999)]
        await host.set_mtu(i, 1333)
        out["up"] = await host.set_link_up(i, True)
        out["up_wrong_name"] = await host.set_link_up(i, True, name="other")
        a = ipaddress.ip_interface("10.77.0.1/24")
        b = ipaddress.ip_interface("fd77::1/64")
        out["add"] = [await host.add_address(i, a), await host.add_address(i, a),
                      await host.add_address(i, b)]
        out["mtu_via_link"] = await host.route_mtu(ipaddress.ip_address("10.77.0.9"))
        out["mtu_none"] = await host.route_mtu(ipaddress.ip_address("192.0.2.9"))
        out["default_mtu"] = await host.route_mtu(None)
        out["del"] = [await host.delete_address(i, a), await host.delete_address(i, a)]
        out["del_link"] = [await host.delete_link(i, "wrong"), await host.delete_link(i, "t0"),
                           await host.delete_link(i, "t0")]
        out["gone"] = await host.link_index("t0")
    finally:
        await host.close()
    return out

out = _netns.run_in_netns(NS, lambda: trio.run(main))
out["pyroute2"] = "pyroute2" in sys.modules
print(json.dumps(out))
"""


def test_link_and_address_calls_without_pyroute2(netns: Callable[[str], str]) -> None:
    """Links, MTU, addresses and route lookups of a bring-up and teardown
    work, with their ownership answers, and never import pyroute2."""
    ns = netns("nlo")
    _netns.ip("link", "set", "lo", "up", ns=ns)
    out = _script(OPS, ns, tuns=("t0",))
    assert out == {
        "index": True, "name": "t0", "missing": [None, None], "up": True,
        "up_wrong_name": False, "add": [True, False, True], "mtu_via_link": 1333,
        "mtu_none": None, "default_mtu": None, "del": [True, False],
        "del_link": [False, True, False], "gone": None, "pyroute2": False,
    }


DELETE_MANY = r"""
import json, socket, sys
import trio
from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS = sys.argv[1]
requests = []
real_request = _rtnl.request

def counted(mtype, body, **kwargs):
    requests.append(mtype)  # every request still goes to the kernel
    return real_request(mtype, body, **kwargs)

_rtnl.request = counted

async def main():
    host = NetlinkHost()
    names = [f"t{i}" for i in range(5)]
    index = {n: socket.if_nametoindex(n) for n in [*names, "t5"]}
    asked = [(index[n], n) for n in names] + [(index["t5"], "wrong")]
    out = [None] * len(asked)

    async def delete(i, link):
        out[i] = await host.delete_link(*link)

    try:
        async with trio.open_nursery() as nursery:
            for i, link in enumerate(asked):
                nursery.start_soon(delete, i, link)
    finally:
        await host.close()
    left = sorted((n, g) for _i, n, g in _rtnl.dump_links())
    return {"deleted": out, "left": left,
            "dellink_requests": requests.count(_rtnl.RTM_DELLINK)}

print(json.dumps(_netns.run_in_netns(NS, lambda: trio.run(main))))
"""


def test_concurrent_link_deletions_go_as_one_request(netns: Callable[[str], str]) -> None:
    """Links deleted at once (many tunnels stopping) take fewer kernel
    requests than links (one wait for the kernel's unregistering instead
    of one each), and each caller still gets its own link's answer: a link
    whose index no longer has the name asked for is left alone (False),
    and a link of another owner in a link group of its own stays."""
    ns = netns("nld")
    _netns.ip("tuntap", "add", "f0", "mode", "tun", ns=ns)
    _netns.ip("link", "set", "f0", "group", "7", ns=ns)
    out = _script(DELETE_MANY, ns, tuns=("t0", "t1", "t2", "t3", "t4", "t5"))
    assert out["deleted"] == [True] * 5 + [False]
    assert out["left"] == [["f0", 7], ["lo", 0], ["t5", 0]]
    assert out["dellink_requests"] < 5, out


CUT_SHORT = r"""
import json, socket, sys, threading, time
import trio
import trio.testing
from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS = sys.argv[1]
real_request, real_dump = _rtnl.request, _rtnl.dump_links
first_done = threading.Event()
dumps = []
stuck = {}

def request(mtype, body, **kwargs):
    if mtype == _rtnl.RTM_DELLINK and not first_done.is_set():
        first_done.wait(10)  # the first deletion holds the others back
    return real_request(mtype, body, **kwargs)

def dump_links(**kwargs):
    dumps.append(1)
    if len(dumps) == 1:  # the kernel does not answer the group in time
        stuck["token"].run_sync_soon(stuck["scope"].cancel)
        time.sleep(2)
    return real_dump(**kwargs)

_rtnl.request, _rtnl.dump_links = request, dump_links

async def main():
    host = NetlinkHost()
    index = {n: socket.if_nametoindex(n) for n in ("ta", "t0", "t1", "t2")}
    out = {}
    stuck["token"] = trio.lowlevel.current_trio_token()
    stuck["scope"] = trio.CancelScope()

    async def delete(name, scope=None):
        with scope or trio.CancelScope():
            out[name] = await host.delete_link(index[name], name)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(delete, "ta")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(delete, "t0", stuck["scope"])  # leads the next group
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(delete, "t1")
            nursery.start_soon(delete, "t2")
            await trio.testing.wait_all_tasks_blocked()
            first_done.set()
    finally:
        await host.close()
    return {"deleted": out, "left": sorted(n for _i, n, _g in real_dump())}

print(json.dumps(_netns.run_in_netns(NS, lambda: trio.run(main))))
"""


def test_link_deletions_of_a_group_cut_short_try_again(netns: Callable[[str], str]) -> None:
    """The deletion leading a group is cancelled while the kernel does not
    answer: the others of its group are not lost with it, each tries again
    and gets its own answer."""
    out = _script(CUT_SHORT, netns("nlc"), tuns=("ta", "t0", "t1", "t2"))
    assert out["deleted"] == {"ta": True, "t1": True, "t2": True}
    assert out["left"] == ["lo", "t0"]


DELETE_ONE_THREAD = r"""
import json, socket, sys, threading
import trio
from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS = sys.argv[1]
threads = []  # kept: no two of them can share an id
real_request = _rtnl.request

def request(mtype, body, **kwargs):
    if mtype == _rtnl.RTM_DELLINK:
        threads.append(threading.current_thread())
    return real_request(mtype, body, **kwargs)

_rtnl.request = request

async def main():
    host = NetlinkHost()
    try:
        await host.link_index("lo")  # the shared worker's thread
        shared = [t for t in threading.enumerate() if t.name == "tunsup-netlink"]
        out = [await host.delete_link(socket.if_nametoindex(n), n) for n in ("t0", "t1", "t2")]
    finally:
        await host.close()
    return {"deleted": out, "threads": len({id(t) for t in threads}),
            "on_shared": any(t in shared for t in threads)}

print(json.dumps(_netns.run_in_netns(NS, lambda: trio.run(main))))
"""


def test_link_deletions_one_after_another_share_one_thread(
        netns: Callable[[str], str]) -> None:
    """Deletions run on a thread of their own, not the shared netlink
    thread (each waits for the kernel's unregistering), and that thread
    serves every deletion of the service's life: one started per deletion
    cost every stop a thread start."""
    out = _script(DELETE_ONE_THREAD, netns("nlt"), tuns=("t0", "t1", "t2"))
    assert out == {"deleted": [True] * 3, "threads": 1, "on_shared": False}


def test_rule_deletes_take_exactly_the_rule_they_describe(netns: Callable[[str], str]) -> None:
    """A full tunnel's rule and a rebuild's hold of it, at one priority and
    table, differ in the fwmark (T against 0) and the invert flag only.  On
    a delete the kernel takes a fwmark of 0 for "any" and does not compare
    the invert flag: without a protocol of their own, deleting the hold
    took the tunnel's rule (listed first).  The fake host deletes as the
    kernel does (the first match, the same wildcards): checked here too."""
    from tunsup.host import HOLD_RULE_PROTOCOL, RULE_PROTOCOL, PolicyRule
    from tunsup.testing import FakeHost

    ns = netns("rul")
    own = PolicyRule(4, 32765, 51820, fwmark=51820, invert=True, protocol=RULE_PROTOCOL)
    hold = PolicyRule(4, 32765, 51820, fwmark=0, protocol=HOLD_RULE_PROTOCOL)
    bare = [PolicyRule(4, 32765, 51820, fwmark=51820, invert=True),
            PolicyRule(4, 32765, 51820, fwmark=0)]

    async def delete_hold(host: Any, rules: list[PolicyRule]) -> list[PolicyRule]:
        """Add both, delete the second (the hold), return what is left."""
        for rule in rules:
            assert await host.add_rule(rule)
        assert await host.delete_rule(rules[1])
        left = [r for r in await host.rules(4) if r.table == 51820]
        for rule in left:
            assert await host.delete_rule(rule)
        return left

    async def kernel(rules: list[PolicyRule]) -> list[PolicyRule]:
        host = NetlinkHost()
        try:
            return await delete_hold(host, rules)
        finally:
            await host.close()

    with tempfile.TemporaryDirectory() as path:
        for rules, expected in (([own, hold], [own]), (bare, [bare[1]])):
            assert _netns.run_in_netns(ns, lambda r=rules: trio.run(kernel, r)) == expected
            assert trio.run(delete_hold, FakeHost(path).net, rules) == expected


SETTLES_AT_ANNOUNCEMENT = r"""
import json, socket, sys, threading
import trio
from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS, WATCH = sys.argv[1], sys.argv[2] == "watch"
returned = threading.Event()  # set once delete_link has returned
held = []
real_request = _rtnl.request

def request(mtype, body, **kwargs):
    answer = real_request(mtype, body, **kwargs)
    if mtype == _rtnl.RTM_DELLINK and not held:
        # The link is deleted and announced; this request now stands for
        # one still waiting in the kernel (RCU), until delete_link returns
        # (bounded: 20 s, past the host's timeout of 3 s).
        held.append(returned.wait(20))
    return answer

_rtnl.request = request
if not WATCH:
    def no_watch():
        raise OSError(24, "Too many open files")
    _rtnl.open_link_watch = no_watch

async def main():
    host = NetlinkHost(timeout=3)
    out = {}
    try:
        try:
            out["first"] = await host.delete_link(socket.if_nametoindex("t0"), "t0")
        except Exception as exc:
            out["first"] = f"{type(exc).__name__}: {exc}"
        out["gone"] = "t0" not in {n for _i, n, _g in _rtnl.dump_links()}
        returned.set()
        # The held request's thread serves on: the next deletion runs on it.
        out["second"] = await host.delete_link(socket.if_nametoindex("t1"), "t1")
        out["replaced"] = host._delete_worker.replaced
    finally:
        returned.set()
        await host.close()
    out["held_released_by_return"] = held == [True]
    out["left"] = sorted(n for _i, n, _g in _rtnl.dump_links())
    return out

print(json.dumps(_netns.run_in_netns(NS, lambda: trio.run(main))))
"""


def _settles(netns: Callable[[str], str], watch: str) -> dict[str, Any]:
    out: dict[str, Any] = _script(SETTLES_AT_ANNOUNCEMENT, netns("nls"), watch,
                                  tuns=("t0", "t1"))
    return out


def test_link_deletion_done_when_the_kernel_announces_it(
        netns: Callable[[str], str]) -> None:
    """A link deletion is done once the kernel announces the link deleted
    (unregistered: gone from the namespace with its routes and addresses),
    not when its request returns: that waits ~15-50 ms more for RCU, which
    every `tunsup down` paid.  Here the request is held until the deletion
    has returned, which without the announcement never happens (the
    deletion times out).  The held request's thread is not written off:
    it serves the next deletion."""
    out = _settles(netns, "watch")
    assert out == {"first": True, "gone": True, "second": True, "replaced": 0,
                   "held_released_by_return": True, "left": ["lo"]}


def test_link_deletion_without_a_watch_waits_for_its_request(
        netns: Callable[[str], str]) -> None:
    """Without a socket to hear the kernel's announcement (no file
    descriptor left), a deletion waits for its request, as before: here
    the held request outlasts the call's timeout, and the deletion says
    so instead of claiming success."""
    out = _settles(netns, "none")
    assert out["first"].startswith("HostError: delete link t0: no answer within"), out
    assert out["gone"] is True  # the kernel did delete it, late
    assert out["second"] is True and out["replaced"] == 1
    assert out["left"] == ["lo"]


WATCH_DECOYS = r"""
import json, socket, struct, subprocess, sys
import trio
from tunsup.host import _rtnl
from tunsup.host.netlink import _announced_deleted
from tunsup.testing import netns as _netns

NS, OTHER = sys.argv[1], sys.argv[2]

def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)

def dellink(index, name):
    text = name.encode() + b"\0"
    body = struct.pack("=BxHiII", 0, 0, index, 0, 0)
    body += struct.pack("=HH", 4 + len(text), 3) + text + b"\0" * (-len(text) % 4)
    return struct.pack("=IHHII", 16 + len(body), _rtnl.RTM_DELLINK, 0, 0, 0) + body

def go():
    watch = _rtnl.open_link_watch()
    portid = watch.getsockname()[0]
    # Decoys, all announced before the one deletion asked for: (77, "t5").
    forger = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)
    forger.sendto(dellink(77, "t5"), (portid, 0))  # not from the kernel
    ip("link", "add", "d5", "index", "77", "type", "veth", "peer", "name", "d5p")
    ip("link", "del", "d5")  # index 77, another name
    ip("link", "add", "t5", "type", "veth", "peer", "name", "t5p")
    ip("link", "del", "t5")  # the name, another index
    ip("link", "add", "t5", "index", "77", "type", "veth", "peer", "name", "t5p")
    ip("link", "set", "t5", "netns", OTHER)  # moved away, not deleted
    ip("-n", OTHER, "link", "set", "t5", "netns", NS)  # back, index 77 kept
    ip("link", "del", "t5")  # the deletion asked for
    got = trio.run(_announced_deleted, watch, [(77, "t5")])
    # What is left unread must not hold the deletion asked for: had a
    # decoy settled it, the real announcement would still be there.
    left = []
    while True:
        try:
            left += _rtnl.read_link_deletions(watch)
        except BlockingIOError:
            break
    watch.close()
    forger.close()
    return {"got": got, "left": left}

print(json.dumps(_netns.run_in_netns(NS, go)))
"""


def test_link_watch_hears_only_the_deletion_asked_for(netns: Callable[[str], str]) -> None:
    """A deletion is settled by the kernel's announcement of that very
    link (index and name) only: not by a message another process sends
    to the watch, nor the deletion of a link with the same index or the
    same name, nor the link's move to another namespace (it lives on)."""
    out = _script(WATCH_DECOYS, netns("nlw"), netns("nlwo"))
    assert out["got"] == [True]
    assert [77, "t5"] not in out["left"], out


DELETE_REFUSED = r"""
import errno, json, socket, sys
import trio
from tunsup.host import _rtnl
from tunsup.host.netlink import NetlinkHost
from tunsup.testing import netns as _netns

NS = sys.argv[1]
real_request = _rtnl.request

def request(mtype, body, **kwargs):
    if mtype == _rtnl.RTM_DELLINK:
        (index,) = _rtnl._IFINFOMSG.unpack_from(body)[2:3]
        if index in (0, socket.if_nametoindex("t1")):  # 0: the group's
            raise OSError(errno.EBUSY, "Device or resource busy")
    return real_request(mtype, body, **kwargs)

_rtnl.request = request

async def main():
    host = NetlinkHost(timeout=5)
    out = {}

    async def delete(name):
        try:
            out[name] = await host.delete_link(socket.if_nametoindex(name), name)
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"

    try:
        async with trio.open_nursery() as nursery:  # one group of three
            for name in ("t0", "t1", "t2"):
                nursery.start_soon(delete, name)
    finally:
        await host.close()
    out["left"] = sorted(n for _i, n, _g in _rtnl.dump_links())
    return out

print(json.dumps(_netns.run_in_netns(NS, lambda: trio.run(main))))
"""


def test_a_refused_link_deletion_raises_its_own_error_with_the_watch_on(
        netns: Callable[[str], str]) -> None:
    """A deletion the kernel refuses is never announced: the caller gets
    its request's error (not a success), and the links deleted with it
    in one group each get their own answer."""
    out = _script(DELETE_REFUSED, netns("nlr"), tuns=("t0", "t1", "t2"))
    assert out["t1"] == "HostError: delete link t1: EBUSY (Device or resource busy)", out
    assert out["t0"] is True and out["t2"] is True
    assert out["left"] == ["lo", "t1"]
