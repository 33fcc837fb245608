"""Tests of the WireGuard UAPI client: rendering, parsing, a fake UAPI server
under a mock clock, and a real wireguard-go in a scratch namespace."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tunsup.config.keys import Key
from tunsup.config.spec import Endpoint, IPNetwork, PeerSpec, TunnelSpec
from tunsup.host import uapi
from tunsup.host.uapi import (
    DeviceStatus,
    PeerStatus,
    UapiError,
    parse_get,
    render_set,
    socket_path,
    uapi_get,
    uapi_set,
    wait_for_socket,
)
from tunsup.testing.netns import list_namespaces, ns_exec_argv, scratch_namespaces, wireguard_socket

from .conftest import unique

PRIV = Key(bytes(range(32)))
PUB1 = Key(bytes([0x11] * 32))
PSK = Key(bytes([0x22] * 32))
PUB2 = Key(bytes([0x33] * 32))
SECRETS = [PRIV, PSK]


def net(text: str) -> IPNetwork:
    return ipaddress.ip_network(text)


def two_peer_spec() -> TunnelSpec:
    return TunnelSpec(
        name="wg-test",
        source="wg-test.conf",
        private_key=PRIV,
        listen_port=51820,
        fwmark=0x1234,
        peers=(
            PeerSpec(
                public_key=PUB1,
                preshared_key=PSK,
                allowed_ips=(net("10.0.0.0/24"), net("fd00::/64")),
                endpoint=Endpoint("vpn.example.net", 51821),
                persistent_keepalive=25,
            ),
            PeerSpec(
                public_key=PUB2,
                allowed_ips=(net("0.0.0.0/0"),),
                endpoint=Endpoint("192.0.2.7", 51820),
            ),
        ),
    )


def assert_no_secret(text: str) -> None:
    for key in SECRETS:
        assert key.hex() not in text
        assert key.to_base64() not in text


def run(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """trio.run under a mock clock that jumps whenever every task is blocked."""
    return trio.run(fn, *args, clock=trio.testing.MockClock(autojump_threshold=0))


# ------------------------------------------------------------------ socket_path


def test_socket_path() -> None:
    assert socket_path("wg0") == "/var/run/wireguard/wg0.sock"
    assert socket_path("wg0") == wireguard_socket("wg0")
    assert socket_path("x", "/tmp/d") == "/tmp/d/x.sock"
    for bad in ["", "..", "a/b", "x" * 16, "a b"]:
        with pytest.raises(ValueError):
            socket_path(bad)


# ------------------------------------------------------------------- render_set


def test_render_set_exact_bytes() -> None:
    spec = two_peer_spec()
    endpoints = {PUB1: ("2001:0db8::1", 51821), PUB2: ("192.0.2.7", 51820)}
    expected = (
        "set=1\n"
        "private_key=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n"
        "listen_port=51820\n"
        "fwmark=4660\n"
        "replace_peers=true\n"
        f"public_key={'11' * 32}\n"
        f"preshared_key={'22' * 32}\n"
        "endpoint=[2001:db8::1]:51821\n"
        "persistent_keepalive_interval=25\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd00::/64\n"
        f"public_key={'33' * 32}\n"
        "endpoint=192.0.2.7:51820\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=0.0.0.0/0\n"
        "\n"
    ).encode()
    assert render_set(spec, endpoints) == expected


def test_render_set_minimal_and_missing_endpoint() -> None:
    spec = TunnelSpec(
        name="wg1",
        source="wg1.conf",
        peers=(PeerSpec(public_key=PUB2, endpoint=Endpoint("unresolved.example", 1)),),
    )
    assert render_set(spec, {}) == (
        f"set=1\nfwmark=0\nreplace_peers=true\npublic_key={'33' * 32}\n"
        "replace_allowed_ips=true\n\n"
    ).encode()
    no_peers = TunnelSpec(name="wg1", source="wg1.conf")
    assert render_set(no_peers, {}) == b"set=1\nfwmark=0\nreplace_peers=true\n\n"


@pytest.mark.parametrize("endpoint", [("vpn.example.net", 1), ("192.0.2.1\nx=y", 1),
                                      ("192.0.2.1", 0), ("192.0.2.1", 70000)])
def test_render_set_rejects_bad_endpoint(endpoint: tuple[str, int]) -> None:
    with pytest.raises(ValueError) as info:
        render_set(two_peer_spec(), {PUB1: endpoint})
    assert "peer #1" in str(info.value)
    assert_no_secret(str(info.value))


def test_no_key_material_in_reprs() -> None:
    spec = two_peer_spec()
    status = parse_get(REALISTIC_GET)
    texts = [repr(spec), str(spec), repr(spec.peers), repr(status), str(status)]
    texts += [repr(p) for p in status.peers]
    for bad in [REALISTIC_GET.replace("errno=0", "errno=-22"),
                REALISTIC_GET.replace(f"private_key={PRIV.hex()}", f"private_key={PRIV.hex()}zz"),
                REALISTIC_GET.replace(f"preshared_key={PSK.hex()}", f"preshared_key={PSK.hex()}0"),
                REALISTIC_GET.replace(f"private_key={PRIV.hex()}", f"{PRIV.hex()}")]:
        with pytest.raises(UapiError) as info:
            parse_get(bad)
        texts += [str(info.value), repr(info.value)]
    for text in texts:
        assert_no_secret(text)


# -------------------------------------------------------------------- parse_get

REALISTIC_GET = (
    f"private_key={PRIV.hex()}\n"
    "listen_port=51820\n"
    "fwmark=4660\n"
    f"public_key={PUB1.hex()}\n"
    f"preshared_key={PSK.hex()}\n"
    "protocol_version=1\n"
    "endpoint=[2001:db8::1]:51821\n"
    "last_handshake_time_sec=1700000000\n"
    "last_handshake_time_nsec=250000000\n"
    "tx_bytes=1234\n"
    "rx_bytes=5678\n"
    "persistent_keepalive_interval=25\n"
    "allowed_ip=10.0.0.0/24\n"
    "allowed_ip=fd00::/64\n"
    f"public_key={PUB2.hex()}\n"
    f"preshared_key={'00' * 32}\n"
    "protocol_version=1\n"
    "last_handshake_time_sec=0\n"
    "last_handshake_time_nsec=0\n"
    "tx_bytes=0\n"
    "rx_bytes=0\n"
    "persistent_keepalive_interval=0\n"
    "allowed_ip=0.0.0.0/0\n"
    "some_future_key=whatever\n"
    "errno=0\n"
    "\n"
)

REALISTIC_STATUS = DeviceStatus(
    listen_port=51820,
    fwmark=0x1234,
    peers=(
        PeerStatus(
            public_key=PUB1,
            endpoint="[2001:db8::1]:51821",
            allowed_ips=(net("10.0.0.0/24"), net("fd00::/64")),
            last_handshake=1700000000.25,
            rx_bytes=5678,
            tx_bytes=1234,
            persistent_keepalive=25,
            allowed_ip_count=2,
        ),
        PeerStatus(
            public_key=PUB2,
            endpoint=None,
            allowed_ips=(net("0.0.0.0/0"),),
            last_handshake=None,
            rx_bytes=0,
            tx_bytes=0,
            persistent_keepalive=None,
            allowed_ip_count=1,
        ),
    ),
)


def test_parse_get_realistic() -> None:
    assert parse_get(REALISTIC_GET) == REALISTIC_STATUS
    # Without the trailing blank line, too.
    assert parse_get(REALISTIC_GET.rstrip("\n")) == REALISTIC_STATUS


def test_parse_get_counts_prefixes_without_parsing_them() -> None:
    """What the probe and ``status`` read: every field but the prefixes,
    which are only counted (10,000 of them took longer to parse than all
    the rest of the answer)."""
    counted = parse_get(REALISTIC_GET, prefixes=False)
    assert counted == attrs.evolve(REALISTIC_STATUS, peers=tuple(
        attrs.evolve(p, allowed_ips=()) for p in REALISTIC_STATUS.peers))
    assert [p.allowed_ip_count for p in counted.peers] == [2, 1]
    with pytest.raises(UapiError, match="line 2: allowed_ip"):
        parse_get(f"public_key={'11' * 32}\nallowed_ip=nonsense\nerrno=0\n\n",
                  prefixes=False)


def test_parse_get_empty_device() -> None:
    assert parse_get("errno=0\n\n") == DeviceStatus(listen_port=None, fwmark=None, peers=())


@pytest.mark.parametrize("code", [-22, 5, -2])
def test_parse_get_errno(code: int) -> None:
    with pytest.raises(UapiError) as info:
        parse_get(f"errno={code}\n\n")
    assert info.value.errno == code
    assert f"errno={code}" in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        "listen_port=1\n\n",  # no errno
        "",
        "\nerrno=0\n\n",  # blank line first: nothing before it
        "listen_port=1\nnonsense\nerrno=0\n\n",
        "=1\nerrno=0\n\n",
        "errno=abc\n\n",
        "listen_port=x\nerrno=0\n\n",
        "fwmark=-1\nerrno=0\n\n",
        f"public_key={'11' * 31}\nerrno=0\n\n",
        f"public_key={'11' * 32}\nallowed_ip=10.0.0.300/8\nerrno=0\n\n",
        f"public_key={'11' * 32}\nrx_bytes=1.5\nerrno=0\n\n",
        f"public_key={'11' * 32}\nlisten_port=1\nerrno=0\n\n",
    ],
)
def test_parse_get_malformed(text: str) -> None:
    with pytest.raises(UapiError) as info:
        parse_get(text)
    assert info.value.errno is None


# ------------------------------------------------------------- fake UAPI server

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@pytest.fixture
def sock(tmp_path: Path) -> str:
    path = str(tmp_path / "wg.sock")
    assert len(path) < 100, "AF_UNIX path too long"
    return path


async def serve(
    path: str, handler: Handler, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """A unix-socket server running ``handler`` for each connection."""
    # Bound synchronously: trio's async bind() of an AF_UNIX path runs in a
    # worker thread, which takes real time the mock clock would jump over.
    std = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    std.bind(path)
    std.listen(16)
    listener_sock = trio.socket.from_stdlib_socket(std)
    with listener_sock:
        listener = trio.SocketListener(listener_sock)
        task_status.started()

        async def one(stream: trio.SocketStream) -> None:
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError):
                    await handler(stream)

        async with trio.open_nursery() as nursery:
            while True:
                nursery.start_soon(one, await listener.accept())


def bind_stale(path: str) -> None:
    """Leave a socket file nobody listens on (connect gets ECONNREFUSED)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(path)


async def read_request(stream: trio.SocketStream) -> bytes:
    buf = b""
    while b"\n\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
    return buf


async def with_server(path: str, handler: Handler, body: Callable[[], Awaitable[Any]]) -> Any:
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, path, handler)
        try:
            return await body()
        finally:
            nursery.cancel_scope.cancel()


class FakeWireGuard:
    """Answers get with REALISTIC_GET and set with errno=0, in small chunks
    (so replies arrive split, even inside the final blank line)."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def __call__(self, stream: trio.SocketStream) -> None:
        request = await read_request(stream)
        self.requests.append(request)
        reply = REALISTIC_GET.encode() if request == b"get=1\n\n" else b"errno=0\n\n"
        for i in range(0, len(reply), 7):
            await stream.send_all(reply[i : i + 7])
            await trio.sleep(0.001)


def test_get_and_set_against_fake_server(sock: str) -> None:
    server = FakeWireGuard()
    request = render_set(two_peer_spec(), {PUB2: ("192.0.2.7", 51820)})

    async def body() -> DeviceStatus:
        await uapi_set(sock, request, timeout=5)
        return await uapi_get(sock, timeout=5)

    assert run(with_server, sock, server, body) == REALISTIC_STATUS
    assert server.requests == [request, b"get=1\n\n"]


def test_large_reply_within_cap(sock: str) -> None:
    nets = [ipaddress.ip_network(f"10.{i // 256}.{i % 256}.0/24") for i in range(10_000)]
    reply = (
        f"public_key={PUB1.hex()}\n" + "".join(f"allowed_ip={n}\n" for n in nets) + "errno=0\n\n"
    ).encode()

    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(reply)

    async def body() -> DeviceStatus:
        return await uapi_get(sock, timeout=5)

    status: DeviceStatus = run(with_server, sock, handler, body)
    assert status.peers[0].allowed_ips == tuple(nets)


def test_server_never_answers(sock: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await trio.sleep_forever()

    async def body() -> tuple[str, float]:
        start = trio.current_time()
        with pytest.raises(UapiError) as info:
            await uapi_get(sock, timeout=3)
        return str(info.value), trio.current_time() - start

    wall = time.monotonic()
    message, elapsed = run(with_server, sock, handler, body)
    assert "did not answer within 3s" in message
    assert elapsed == pytest.approx(3)
    assert time.monotonic() - wall < 2  # the mock clock jumped


def test_set_never_answers(sock: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # not even reading

    request = render_set(two_peer_spec(), {})

    async def body() -> str:
        with pytest.raises(UapiError) as info:
            await uapi_set(sock, request, timeout=0.5)
        return str(info.value)

    message = run(with_server, sock, handler, body)
    assert "did not answer within 0.5s" in message
    assert_no_secret(message)


def test_errno_reply(sock: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"errno=-22\n\n")

    async def body() -> list[UapiError]:
        errors = []
        with pytest.raises(UapiError) as info:
            await uapi_set(sock, render_set(two_peer_spec(), {}), timeout=5)
        errors.append(info.value)
        with pytest.raises(UapiError) as info:
            await uapi_get(sock, timeout=5)
        errors.append(info.value)
        return errors

    for error in run(with_server, sock, handler, body):
        assert error.errno == -22
        assert "EINVAL" in str(error)
        assert_no_secret(str(error))


def test_errno_before_request_fully_read(sock: str) -> None:
    """The server rejects a huge request after its first line and closes:
    the client reports the server's errno, not a broken pipe."""

    async def handler(stream: trio.SocketStream) -> None:
        await stream.receive_some(10)
        await stream.send_all(b"errno=-22\n\n")

    lines = "".join(f"allowed_ip=10.{i // 256 % 256}.{i % 256}.0/24\n" for i in range(200_000))
    request = f"set=1\npublic_key={PUB1.hex()}\n{lines}\n".encode()

    async def body() -> UapiError:
        with pytest.raises(UapiError) as info:
            await uapi_set(sock, request, timeout=5)
        return info.value

    error: UapiError = run(with_server, sock, handler, body)
    assert error.errno == -22


def test_oversized_reply(sock: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uapi, "MAX_REPLY", 100_000)
    sent: list[int] = [0]

    async def endless(stream: trio.SocketStream) -> None:
        await read_request(stream)
        while True:
            await stream.send_all(b"allowed_ip=10.0.0.0/8\n" * 1000)
            sent[0] += 1

    async def terminated_too_late(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"x=y\n" * 30_000 + b"errno=0\n\n")

    for handler in (endless, terminated_too_late):

        async def body() -> str:
            with pytest.raises(UapiError) as info:
                await uapi_get(sock, timeout=5)
            return str(info.value)

        assert "exceeds 100000 bytes" in run(with_server, sock, handler, body)
        os.unlink(sock)
    assert sent[0] < 100  # the client stopped reading and closed


def test_server_closes_without_answer(sock: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await read_request(stream)
        await stream.send_all(b"listen_port=1\n")

    async def body() -> str:
        with pytest.raises(UapiError) as info:
            await uapi_get(sock, timeout=5)
        return str(info.value)

    assert "closed before the end of the reply" in run(with_server, sock, handler, body)


def test_missing_and_refusing_socket(sock: str) -> None:
    async def body() -> list[str]:
        messages = []
        with pytest.raises(UapiError) as info:
            await uapi_get(sock, timeout=5)
        messages.append(str(info.value))
        # A stale socket file nobody listens on: ECONNREFUSED.
        bind_stale(sock)
        with pytest.raises(UapiError) as info:
            await uapi_set(sock, b"set=1\n\n", timeout=5)
        messages.append(str(info.value))
        return messages

    missing, refused = run(body)
    assert "cannot connect" in missing
    assert "cannot connect" in refused and "refused" in refused


def test_set_rejects_unterminated_request(sock: str) -> None:
    async def body() -> None:
        await uapi_set(sock, b"set=1\nfwmark=0\n", timeout=1)

    with pytest.raises(ValueError):
        run(body)


def test_outside_cancellation_propagates(sock: str) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    seen: list[str] = []

    async def body() -> bool:
        with trio.move_on_after(1) as scope:
            try:
                await uapi_get(sock, timeout=10)
            except trio.Cancelled:
                seen.append("cancelled")
                raise
        with trio.move_on_after(1) as scope2:
            await wait_for_socket(sock + ".absent", timeout=10)
        return scope.cancelled_caught and scope2.cancelled_caught

    assert run(with_server, sock, handler, body)
    assert seen == ["cancelled"]


# -------------------------------------------------------------- wait_for_socket


def test_wait_for_socket_appears_later(sock: str) -> None:
    events: list[str] = []

    async def handler(stream: trio.SocketStream) -> None:
        data = await stream.receive_some(100)
        events.append("eof" if data == b"" else "data")

    async def main() -> float:
        async with trio.open_nursery() as nursery:

            async def late_server() -> None:
                # A stale socket file first (ECONNREFUSED), then the real one.
                await trio.sleep(0.1)
                bind_stale(sock)
                await trio.sleep(0.2)
                os.unlink(sock)
                await nursery.start(serve, sock, handler)

            nursery.start_soon(late_server)
            start = trio.current_time()
            await wait_for_socket(sock, timeout=5)
            elapsed = trio.current_time() - start
            await trio.sleep(0.1)  # let the handler see the probe close
            nursery.cancel_scope.cancel()
        return elapsed

    elapsed = run(main)
    assert 0.3 <= elapsed <= 0.3 + 0.051
    assert events == ["eof"]


def test_wait_for_socket_give_up(sock: str) -> None:
    calls: list[float] = []

    def give_up() -> str | None:
        calls.append(trio.current_time())
        return "helper exited with status 1" if len(calls) == 4 else None

    async def body() -> str:
        with pytest.raises(UapiError) as info:
            await wait_for_socket(sock, timeout=5, give_up=give_up)
        return str(info.value)

    assert run(body) == "helper exited with status 1"
    # Polled between attempts, after sleeps of 2, 4 and 8 ms.
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert gaps == pytest.approx([0.002, 0.004, 0.008])


def test_wait_for_socket_timeout(sock: str) -> None:
    async def body() -> tuple[str, float]:
        start = trio.current_time()
        with pytest.raises(UapiError) as info:
            await wait_for_socket(sock, timeout=0.5, give_up=lambda: None)
        return str(info.value), trio.current_time() - start

    message, elapsed = run(body)
    assert message == f"UAPI socket {sock} did not appear within 0.5s"
    assert elapsed == pytest.approx(0.5)


# ---------------------------------------------------------------- integration

needs_wireguard_go = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("wireguard-go") is None or shutil.which("ip") is None,
    reason="needs root, iproute2 and wireguard-go",
)


def random_peer(allowed: list[str], **kwargs: Any) -> PeerSpec:
    return PeerSpec(
        public_key=Key.generate_private().public_key(),
        allowed_ips=tuple(ipaddress.ip_network(a) for a in allowed),
        **kwargs,
    )


def by_key(status: DeviceStatus) -> dict[Key, PeerStatus]:
    return {p.public_key: p for p in status.peers}


@pytest.mark.netns
@needs_wireguard_go
def test_wireguard_go_roundtrip(tmp_path: Path) -> None:
    ns = unique("tsu-uapi-")
    ifname = unique("tsu")
    path = socket_path(ifname)
    log_path = tmp_path / "wireguard-go.log"
    spawned: list[int] = []

    private = Key.generate_private()
    peer1 = random_peer(
        [f"10.1.0.{i}/32" for i in range(60)],
        preshared_key=Key.generate_private(),
        persistent_keepalive=25,
    )
    peer2 = random_peer([f"fd00:0:0:{i:x}::/64" for i in range(40)])
    spec = TunnelSpec(
        name=ifname, source="test", private_key=private, listen_port=51820, fwmark=0x1234,
        peers=(peer1, peer2),
    )
    endpoints = {peer1.public_key: ("192.0.2.1", 51820), peer2.public_key: ("2001:db8::1", 51821)}
    peer3 = random_peer([f"10.{i // 256}.{i % 256}.1/32" for i in range(10_000)])
    spec2 = TunnelSpec(name=ifname, source="test", private_key=private, peers=(peer3,))

    async def main() -> tuple[DeviceStatus, DeviceStatus, int | None]:
        with open(log_path, "wb") as log:
            proc = await trio.lowlevel.open_process(
                ns_exec_argv(ns, ["wireguard-go", "-f", ifname]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        spawned.append(proc.pid)
        try:

            def exited() -> str | None:
                code = proc.poll()
                return None if code is None else f"wireguard-go exited with status {code}"

            await wait_for_socket(path, timeout=10, give_up=exited)
            await uapi_set(path, render_set(spec, endpoints), timeout=10)
            first = await uapi_get(path, timeout=10)
            await uapi_set(path, render_set(spec2, {}), timeout=10)
            second = await uapi_get(path, timeout=10)
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()
                    with trio.move_on_after(5):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        return first, second, proc.returncode

    try:
        with scratch_namespaces(ns):
            first, second, code = trio.run(main)
    finally:
        assert ns not in list_namespaces()
        for p in spawned:
            with pytest.raises(ProcessLookupError):
                os.kill(p, 0)
    assert code == 0, log_path.read_text(errors="replace")
    assert not os.path.exists(path)

    assert first.listen_port == 51820
    assert first.fwmark == 0x1234
    peers = by_key(first)
    assert set(peers) == {peer1.public_key, peer2.public_key}
    for spec_peer, endpoint in [(peer1, "192.0.2.1:51820"), (peer2, "[2001:db8::1]:51821")]:
        got = peers[spec_peer.public_key]
        assert set(got.allowed_ips) == set(spec_peer.allowed_ips)
        assert len(got.allowed_ips) == len(spec_peer.allowed_ips)
        assert got.endpoint == endpoint
        assert got.persistent_keepalive == spec_peer.persistent_keepalive
        assert got.last_handshake is None
        assert got.rx_bytes == got.tx_bytes == 0
    assert sum(len(p.allowed_ips) for p in first.peers) == 100

    # replace_peers / fwmark=0: the second set replaced everything.
    assert second.fwmark is None
    assert [p.public_key for p in second.peers] == [peer3.public_key]
    assert set(second.peers[0].allowed_ips) == set(peer3.allowed_ips)
    assert second.peers[0].endpoint is None


@pytest.mark.netns
@needs_wireguard_go
def test_wait_for_socket_sees_wireguard_go_exit(tmp_path: Path) -> None:
    """A helper that fails at start-up (an interface name longer than 15
    characters) aborts the wait through give_up, long before the timeout."""
    ns = unique("tsu-uapi-")
    ifname = unique("tsu-too-long-")
    path = os.path.join(uapi.UAPI_DIR, f"{ifname}.sock")
    spawned: list[int] = []

    async def main() -> tuple[str, float]:
        with open(tmp_path / "wireguard-go.log", "wb") as log:
            proc = await trio.lowlevel.open_process(
                ns_exec_argv(ns, ["wireguard-go", "-f", ifname]),
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )
        spawned.append(proc.pid)
        try:

            def exited() -> str | None:
                code = proc.poll()
                return None if code is None else f"wireguard-go exited with status {code}"

            start = trio.current_time()
            with pytest.raises(UapiError) as info:
                await wait_for_socket(path, timeout=30, give_up=exited)
            return str(info.value), trio.current_time() - start
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.kill()
                await proc.wait()

    try:
        with scratch_namespaces(ns):
            message, elapsed = trio.run(main)
    finally:
        assert ns not in list_namespaces()
        for p in spawned:
            with pytest.raises(ProcessLookupError):
                os.kill(p, 0)
    assert message.startswith("wireguard-go exited with status ")
    assert message != "wireguard-go exited with status 0"
    assert elapsed < 10
