"""``tunsup demo``: a real tunnel between two throwaway namespaces.

Synchronous orchestration (it drives two ``tunsup run`` processes the way a
user would); nothing here runs on a trio thread.  Everything it creates is
removed in ``finally`` blocks, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from types import FrameType

from .config.keys import Key
from .host.uapi import parse_get
from .testing import netns as _netns
from .testing.service_process import ServiceFailed, ServiceProcess

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class DemoFailed(Exception):
    pass


def _say(msg: str) -> None:
    print(msg, flush=True)


def _conf(private: Key, address: str, peer_public: Key, allowed: str, endpoint: str | None,
          port: int, extra: str = "") -> str:
    lines = [
        "[Interface]",
        f"PrivateKey = {private.to_base64()}",
        f"Address = {address}",
        f"ListenPort = {port}",
        extra,
        "",
        "[Peer]",
        f"PublicKey = {peer_public.to_base64()}",
        f"AllowedIPs = {allowed}",
    ]
    if endpoint:
        lines.append(f"Endpoint = {endpoint}")
    return "\n".join(line for line in lines if line is not None) + "\n"


def _run_args(conf: str, resolv: str, workdir: str, label: str) -> list[str]:
    return [conf, "--dns", "file", "--resolv-conf", resolv,
            "--state-dir", os.path.join(workdir, f"{label}.state"),
            "--runtime-dir", os.path.join(workdir, f"{label}.run")]


def _uapi_status(ifname: str) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        s.connect(_netns.wireguard_socket(ifname))
        s.sendall(b"get=1\n\n")
        buf = b""
        while not buf.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    dev = parse_get(buf.decode())
    out = [f"    interface {ifname}: listening on UDP {dev.listen_port}"]
    now = time.time()
    for peer in dev.peers:
        age = f"{now - peer.last_handshake:.1f} s ago" if peer.last_handshake else "never"
        out.append(f"      peer {peer.public_key.to_base64()[:8]}... endpoint {peer.endpoint}, "
                   f"allowed {', '.join(map(str, peer.allowed_ips))}, handshake {age}, "
                   f"rx {peer.rx_bytes} B, tx {peer.tx_bytes} B")
    return "\n".join(out)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except KeyboardInterrupt:
        # Interrupted: stay deaf to further signals until the process exits,
        # so a repeated Ctrl-C or SIGTERM cannot cut the exit short.
        _ignore_stop_signals()
        raise
    signal.signal(signal.SIGTERM, old)


def main(*, debug: bool = False) -> int:
    if os.geteuid() != 0:
        print("tunsup demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    for tool in ("ip", "ping", "wireguard-go"):
        if shutil.which(tool) is None:
            print(f"tunsup demo: {tool!r} not found; install: apt-get install -y "
                  "--no-install-recommends wireguard-go iproute2 iputils-ping", file=sys.stderr)
            return 2
    try:
        with _sigterm_as_interrupt():
            return _demo(debug)
    except KeyboardInterrupt:
        print("tunsup demo: interrupted; everything it created has been removed",
              file=sys.stderr)
        return 130


def _close_services(services: list[ServiceProcess], debug: bool) -> None:
    for svc in services:
        if debug:
            print(f"--- tunsup ({svc.label}) log:\n{svc.output()}", file=sys.stderr)
        svc.close()


def _ignore_stop_signals() -> None:
    """During clean-up a second Ctrl-C must not abort it half-way."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _demo(debug: bool) -> int:
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"tsdemo-{tag}-a", f"tsdemo-{tag}-b"
    if_a, if_b = f"tsd{tag}a", f"tsd{tag}b"
    services: list[ServiceProcess] = []
    workdir = tempfile.mkdtemp(prefix="tunsup-demo-")
    t0 = time.monotonic()
    ok = False
    try:
        with contextlib.ExitStack() as cleanup:
            cleanup.enter_context(_netns.scratch_namespaces(ns_a, ns_b))
            # Unwound last-in first-out: signals are ignored first, then the
            # services are stopped (SIGTERM: tunsup tears down), and only
            # then are the namespaces deleted.
            cleanup.callback(_close_services, services, debug)
            cleanup.callback(_ignore_stop_signals)
            _say(f"1. namespaces {ns_a} and {ns_b}, joined by a veth pair "
                 "(192.0.2.1 <-> 192.0.2.2)")
            _netns.add_veth_pair(ns_a, "veth-a", ns_b, "veth-b")
            _netns.ip("address", "add", "192.0.2.1/24", "dev", "veth-a", ns=ns_a)
            _netns.ip("address", "add", "192.0.2.2/24", "dev", "veth-b", ns=ns_b)

            key_a, key_b = Key.generate_private(), Key.generate_private()
            conf_a = os.path.join(workdir, f"{if_a}.conf")
            conf_b = os.path.join(workdir, f"{if_b}.conf")
            resolv_a = os.path.join(workdir, "resolv-a.conf")
            resolv_b = os.path.join(workdir, "resolv-b.conf")
            for path in (resolv_a, resolv_b):
                with open(path, "w") as f:
                    f.write("nameserver 192.0.2.53\n")
            with open(conf_a, "w") as f:
                f.write(_conf(key_a, "198.51.100.1/24", key_b.public_key(),
                              "198.51.100.2/32, 203.0.113.0/24", "192.0.2.2:51821", 51820,
                              "DNS = 198.51.100.53, demo.internal"))
            with open(conf_b, "w") as f:
                f.write(_conf(key_b, "198.51.100.2/24", key_a.public_key(),
                              "198.51.100.1/32", None, 51821))
            os.chmod(conf_a, 0o600)
            os.chmod(conf_b, 0o600)
            _say(f"2. wg-quick configs with generated keys: {conf_a}, {conf_b}")

            before = {ns: _netns.snapshot(ns, [r]) for ns, r in ((ns_a, resolv_a),
                                                                  (ns_b, resolv_b))}
            _say("3. starting `tunsup run` in each namespace")
            for label, ns, conf, resolv in (("a", ns_a, conf_a, resolv_a),
                                            ("b", ns_b, conf_b, resolv_b)):
                services.append(ServiceProcess(ns, _run_args(conf, resolv, workdir, label),
                                               workdir, label))
            for svc in services:
                svc.wait_ready(READY_TIMEOUT)
                _say(f"   tunsup ({svc.label}) ready after {svc.ready_after:.2f} s "
                     "(process start included)")

            _say("4. ping across the tunnel: 198.51.100.1 -> 198.51.100.2")
            ping = subprocess.run(
                _netns.ns_exec_argv(ns_a, ["ping", "-c", "3", "-i", "0.2", "-W", "2",
                                           "198.51.100.2"]),
                capture_output=True, text=True, timeout=30, check=False)
            summary = [ln for ln in ping.stdout.splitlines() if "packets transmitted" in ln
                       or ln.startswith("rtt")]
            for line in summary:
                _say(f"   {line}")
            if ping.returncode != 0:
                raise DemoFailed("ping across the tunnel failed")

            _say("5. status (read over wireguard-go's UAPI socket)")
            _say(_uapi_status(if_a))
            _say(_uapi_status(if_b))
            routes = _netns.ip("route", "show", "dev", if_a, ns=ns_a).strip().splitlines()
            _say(f"    routes via {if_a}: " + "; ".join(r.strip() for r in routes))
            with open(resolv_a) as f:
                _say("    resolv.conf (a) while up: " + " | ".join(f.read().splitlines()))

            _say("6. stopping both with SIGTERM")
            for svc in services:
                code, took = svc.stop(timeout=STOP_TIMEOUT)
                _say(f"   tunsup ({svc.label}) exited {code} after {took * 1000:.0f} ms")
                if code != 0:
                    raise DemoFailed(f"tunsup ({svc.label}) exited {code}")

            _say("7. checking that the namespaces are exactly as before")
            problems = []
            for ns, resolv in ((ns_a, resolv_a), (ns_b, resolv_b)):
                problems += [f"{ns}: {d}" for d in _netns.diff_snapshots(
                    before[ns], _netns.snapshot(ns, [resolv]))]
                leftover = _netns.ip("netns", "pids", ns, check=False).split()
                if leftover:
                    problems.append(f"{ns}: processes left: {' '.join(leftover)}")
            for ifname in (if_a, if_b):
                if os.path.exists(_netns.wireguard_socket(ifname)):
                    problems.append(f"UAPI socket of {ifname} left behind")
            if problems:
                raise DemoFailed("host not restored:\n  " + "\n  ".join(problems))
            _say("   links, addresses, routes (all tables), rules and resolv.conf: identical; "
                 "no process left")
            ok = True
    except (DemoFailed, ServiceFailed) as exc:
        print(f"tunsup demo: FAILED: {exc}", file=sys.stderr)
        for svc in services:
            print(f"--- tunsup ({svc.label}) log, last lines:\n{svc.output_tail()}",
                  file=sys.stderr)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if ok:
        _say(f"8. namespaces removed. Demo passed in {time.monotonic() - t0:.1f} s.")
        return 0
    return 1
