"""Scratch network namespaces for the demo, the tests and the benchmarks.

Synchronous on purpose: these helpers run in test fixtures, in the demo's
orchestration process and in benchmark scripts, never on a trio thread of the
engine.  Everything created here is named with a caller-chosen prefix so that
a leak check can find leftovers.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def ip(*args: str, ns: str | None = None, check: bool = True) -> str:
    """Run ``ip`` (optionally ``-n NS``) and return its stdout."""
    argv = ["ip"] + (["-n", ns] if ns else []) + list(args)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {res.stderr.strip()}")
    return res.stdout


def ns_exec_argv(ns: str, argv: Sequence[str]) -> list[str]:
    """``argv`` wrapped to run inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def create_namespace(name: str) -> None:
    """Create namespace ``name`` with loopback up."""
    ip("netns", "add", name)
    ip("link", "set", "lo", "up", ns=name)
    # No IPv6 duplicate address detection: addresses are usable (and
    # snapshots stable) at once instead of "tentative" for a second or two.
    for scope in ("all", "default"):
        subprocess.run(
            ns_exec_argv(name, ["sysctl", "-qw", f"net.ipv6.conf.{scope}.accept_dad=0"]),
            capture_output=True, timeout=30, check=False,
        )


def delete_namespace(name: str) -> None:
    """Delete namespace ``name``, killing any process still inside it.

    Idempotent: a missing namespace is fine.
    """
    if not os.path.exists(os.path.join(NETNS_DIR, name)):
        return
    pids = ip("netns", "pids", name, check=False).split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), 9)
    for pid in pids:
        _reap_if_child(int(pid))
    ip("netns", "del", name, check=False)


def _reap_if_child(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, 0)


def list_namespaces() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def add_veth_pair(ns_a: str, if_a: str, ns_b: str, if_b: str) -> None:
    """A veth pair with one end in each namespace, both ends up."""
    ip("link", "add", if_a, "netns", ns_a, "type", "veth", "peer", "name", if_b, "netns", ns_b)
    ip("link", "set", if_a, "up", ns=ns_a)
    ip("link", "set", if_b, "up", ns=ns_b)


def run_in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Call ``fn`` in a fresh thread that has joined namespace ``ns``.

    ``setns(CLONE_NEWNET)`` is per-thread on Linux, so sockets ``fn`` opens
    (netlink included) live in ``ns`` while the rest of the process stays in
    its own namespace.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


# Fields of `ip -j` output that change by themselves and say nothing about
# what a program configured.
_VOLATILE = {
    "stats", "stats64", "operstate", "linkmode", "valid_life_time", "preferred_life_time",
    "expires", "age", "used", "cache", "flags_extended", "qdisc", "txqlen",
}
# Link flags the kernel sets as carrier comes and goes (a fresh veth pair
# shows NO-CARRIER for a moment after it is set up).
_CARRIER_FLAGS = {"NO-CARRIER", "LOWER_UP", "DORMANT", "linkdown"}


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: ([f for f in v if f not in _CARRIER_FLAGS]
                    if k == "flags" and isinstance(v, list) else _clean(v))
                for k, v in obj.items() if k not in _VOLATILE}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def _ip_json(ns: str, *args: str) -> list[Any]:
    out = ip("-j", *args, ns=ns)
    data = json.loads(out) if out.strip() else []
    return sorted(json.dumps(_clean(x), sort_keys=True) for x in data)


#: Sysctls a tunnel may change (full-tunnel routing).
SNAPSHOT_SYSCTLS = ("net.ipv4.conf.all.src_valid_mark",)


def snapshot(ns: str, files: Sequence[str] = ()) -> dict[str, Any]:
    """What a tunnel may change in ``ns``: links, addresses, routes of every
    table, policy rules (both families), a few sysctls, and the bytes of
    ``files``."""
    snap: dict[str, Any] = {
        "links": _ip_json(ns, "link", "show"),
        "addresses": _ip_json(ns, "address", "show"),
        "routes4": _ip_json(ns, "-4", "route", "show", "table", "all"),
        "routes6": _ip_json(ns, "-6", "route", "show", "table", "all"),
        "rules4": _ip_json(ns, "-4", "rule", "show"),
        "rules6": _ip_json(ns, "-6", "rule", "show"),
    }
    for key in SNAPSHOT_SYSCTLS:
        res = subprocess.run(ns_exec_argv(ns, ["sysctl", "-n", key]), capture_output=True,
                             text=True, timeout=30, check=False)
        snap[f"sysctl:{key}"] = res.stdout.strip()
    for path in files:
        try:
            with open(path, "rb") as f:
                snap[f"file:{path}"] = f.read()
        except FileNotFoundError:
            snap[f"file:{path}"] = None
    return snap


def diff_snapshots(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Human-readable differences; empty when the snapshots are equal."""
    lines: list[str] = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key), after.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            lines += [f"{key}: gone: {x}" for x in a if x not in b]
            lines += [f"{key}: new:  {x}" for x in b if x not in a]
        else:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines


@contextlib.contextmanager
def scratch_namespaces(*names: str) -> Iterator[tuple[str, ...]]:
    """Create namespaces ``names`` and always delete them afterwards."""
    created: list[str] = []
    try:
        for name in names:
            create_namespace(name)
            created.append(name)
        yield names
    finally:
        for name in reversed(created):
            delete_namespace(name)


def wireguard_socket(ifname: str) -> str:
    """Path of wireguard-go's UAPI socket for ``ifname`` (shared by all
    namespaces, hence unique interface names in tests)."""
    return f"/var/run/wireguard/{ifname}.sock"
