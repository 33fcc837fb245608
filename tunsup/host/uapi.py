"""WireGuard cross-platform UAPI client (``get=1`` / ``set=1``).

The user-space helper (wireguard-go) listens on ``/var/run/wireguard/IFACE.sock``
and speaks a line protocol of ``key=value`` pairs; a request and a reply each
end with a blank line, and every reply ends with ``errno=N``
(https://www.wireguard.com/xplatform/).  tunsup speaks it directly, so the
``wg`` binary is never needed.

All socket I/O is trio-native and bounded by a deadline: a helper that accepts
a connection and never answers (e.g. because it is SIGSTOPped) costs at most
``timeout`` seconds, never a blocked event loop.  Key material appears only in
the bytes sent to the socket: never in logs, exception messages or ``repr``.
"""

from __future__ import annotations

import errno as _errno
import functools
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

import attrs
import trio

from .._bounded import deadline
from .._errors import HostError
from ..config.ifname import is_valid_ifname
from ..config.keys import Key
from ..config.spec import IPNetwork, TunnelSpec, network_text

__all__ = [
    "MAX_REPLY",
    "UAPI_DIR",
    "DeviceStatus",
    "PeerStatus",
    "UapiError",
    "parse_get",
    "render_set",
    "socket_path",
    "uapi_get",
    "uapi_set",
    "wait_for_socket",
]

log = logging.getLogger(__name__)

UAPI_DIR = "/var/run/wireguard"

#: Largest reply accepted from a UAPI socket.  A peer with 10,000 allowed IPs
#: gives ~300 KB, so this is far above any real configuration while still
#: bounding memory against a misbehaving server.
MAX_REPLY = 16 * 1024 * 1024

_RECV_CHUNK = 64 * 1024
#: Replies larger than this are parsed in a worker thread: parsing ~10,000
#: allowed IPs takes ~50 ms, too long for the trio thread.
PARSE_IN_THREAD = 32 * 1024
_RETRY_FIRST = 0.002
_RETRY_MAX = 0.05


class UapiError(HostError):
    """A UAPI exchange failed: no socket, no answer in time, ``errno != 0``
    or a malformed reply.

    ``errno`` is the value the server reported (wireguard-go sends negative
    numbers, e.g. ``-22``), or ``None`` when the failure is not a reported
    error.  The message never contains key material.
    """

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


@attrs.frozen
class PeerStatus:
    """One peer as reported by ``get=1`` (the preshared key is not kept)."""

    public_key: Key
    #: ``IP:port`` or ``[IPv6]:port`` as reported, ``None`` when unknown.
    endpoint: str | None
    #: Empty when read with ``prefixes=False`` (see :func:`parse_get`).
    allowed_ips: tuple[IPNetwork, ...]
    #: Unix time in seconds of the last handshake, ``None`` if never.
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    #: Seconds, ``None`` when off.
    persistent_keepalive: int | None
    #: How many ``allowed_ip`` lines the peer has (read either way).
    allowed_ip_count: int = 0


@attrs.frozen
class DeviceStatus:
    """A device as reported by ``get=1`` (the private key is not kept)."""

    listen_port: int | None
    fwmark: int | None
    peers: tuple[PeerStatus, ...]


def socket_path(ifname: str, uapi_dir: str = UAPI_DIR) -> str:
    """Path of the UAPI socket of interface ``ifname``.

    Raises :class:`ValueError` for a name that is not a valid interface name
    (so a name can never point outside ``uapi_dir``).
    """
    if not is_valid_ifname(ifname):
        raise ValueError(f"invalid interface name {ifname!r}")
    return os.path.join(uapi_dir, f"{ifname}.sock")


# --------------------------------------------------------------------- render


def _format_endpoint(host: str, port: int, index: int) -> str:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"endpoint of peer #{index} is not an IP address: {host!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"endpoint of peer #{index} has an invalid port {port}")
    if isinstance(addr, ipaddress.IPv6Address):
        return f"[{addr}]:{port}"
    return f"{addr}:{port}"


def render_set(spec: TunnelSpec, endpoints: Mapping[Key, tuple[str, int]]) -> bytes:
    """The full ``set=1`` request that configures the device from scratch.

    Device lines: ``private_key`` (if any), ``listen_port`` (if any),
    ``fwmark`` (``0`` when unset, so a previous mark is cleared),
    ``replace_peers=true``; then for each peer ``public_key``,
    ``preshared_key`` (if any), ``endpoint`` taken from ``endpoints`` (a
    resolved IP string and port keyed by the peer's public key; a peer absent
    from the mapping gets no endpoint), ``persistent_keepalive_interval`` (if
    any), ``replace_allowed_ips=true`` and its ``allowed_ip`` lines.  Ends
    with the terminating blank line.

    Raises :class:`ValueError` for an endpoint that is not an IP address and
    port (the message names the peer by position, never by key).
    """
    lines = ["set=1"]
    if spec.private_key is not None:
        lines.append(f"private_key={spec.private_key.hex()}")
    if spec.listen_port is not None:
        lines.append(f"listen_port={spec.listen_port}")
    lines.append(f"fwmark={spec.fwmark or 0}")
    lines.append("replace_peers=true")
    for index, peer in enumerate(spec.peers, 1):
        lines.append(f"public_key={peer.public_key.hex()}")
        if peer.preshared_key is not None:
            lines.append(f"preshared_key={peer.preshared_key.hex()}")
        resolved = endpoints.get(peer.public_key)
        if resolved is not None:
            host, port = resolved
            lines.append(f"endpoint={_format_endpoint(host, port, index)}")
        if peer.persistent_keepalive is not None:
            lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network_text(net)}" for net in peer.allowed_ips)
    return ("\n".join(lines) + "\n\n").encode("ascii")


# ---------------------------------------------------------------------- parse


_ZERO_KEY = "0" * 64


def render_change(old: TunnelSpec, new: TunnelSpec,
                  old_endpoints: Mapping[Key, tuple[str, int]],
                  new_endpoints: Mapping[Key, tuple[str, int]]) -> bytes | None:
    """The ``set=1`` request that turns a device configured as ``old``
    into ``new`` without touching what is the same (``wg syncconf``):
    changed device keys, ``remove=true`` for each peer gone, and for each
    peer added or changed its whole state (``replace_allowed_ips=true``).
    ``fwmark`` is taken from the specs as given.  None when nothing
    differs.  Swapping the arguments gives the inverse request.

    A WireGuard device cannot forget a peer's endpoint (UAPI has no
    "unset"): a peer whose endpoint was removed is re-created instead,
    ``remove=true`` then its whole state in the same request (wireguard-go
    applies it as one; the peer's session is dropped, so it handshakes
    anew).  See :func:`endpoint_removed`."""
    lines = ["set=1"]
    if old.private_key != new.private_key:
        lines.append("private_key=" + (new.private_key.hex() if new.private_key else _ZERO_KEY))
    if old.listen_port != new.listen_port:
        lines.append(f"listen_port={new.listen_port or 0}")
    if (old.fwmark or 0) != (new.fwmark or 0):
        lines.append(f"fwmark={new.fwmark or 0}")
    before = {p.public_key: p for p in old.peers}
    after = {p.public_key for p in new.peers}
    recreated = set(endpoint_removed(old, new, old_endpoints, new_endpoints))
    for peer in old.peers:
        if peer.public_key not in after:
            lines += [f"public_key={peer.public_key.hex()}", "remove=true"]
    for index, peer in enumerate(new.peers, 1):
        was = before.get(peer.public_key)
        resolved = new_endpoints.get(peer.public_key)
        if peer.public_key in recreated:
            lines += [f"public_key={peer.public_key.hex()}", "remove=true"]
        elif (was is not None and was.preshared_key == peer.preshared_key
                and was.allowed_ips == peer.allowed_ips
                and was.persistent_keepalive == peer.persistent_keepalive
                and old_endpoints.get(peer.public_key) == resolved):
            continue
        lines.append(f"public_key={peer.public_key.hex()}")
        lines.append("preshared_key=" + (peer.preshared_key.hex() if peer.preshared_key
                                         else _ZERO_KEY))
        if resolved is not None:
            lines.append(f"endpoint={_format_endpoint(*resolved, index)}")
        lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive or 0}")
        lines.append("replace_allowed_ips=true")
        lines.extend(f"allowed_ip={network_text(net)}" for net in peer.allowed_ips)
    if len(lines) == 1:
        return None
    return ("\n".join(lines) + "\n\n").encode("ascii")


def endpoint_removed(old: TunnelSpec, new: TunnelSpec,
                     old_endpoints: Mapping[Key, tuple[str, int]],
                     new_endpoints: Mapping[Key, tuple[str, int]]) -> list[Key]:
    """The peers of both specs that had an endpoint and have none now: the
    ones :func:`render_change` re-creates."""
    kept = {p.public_key for p in old.peers}
    return [p.public_key for p in new.peers
            if p.public_key in kept and p.public_key in old_endpoints
            and p.public_key not in new_endpoints]


def render_endpoint_update(public_key: Key, host: str, port: int) -> bytes:
    """A ``set=1`` request changing only one peer's endpoint."""
    return (f"set=1\npublic_key={public_key.hex()}\nupdate_only=true\n"
            f"endpoint={_format_endpoint(host, port, 0)}\n\n").encode()


def _describe_errno(value: int) -> str:
    code = abs(value)
    name = _errno.errorcode.get(code)
    if name is None:
        return f"errno={value}"
    return f"errno={value} ({name}: {os.strerror(code)})"


def _reply_lines(text: str) -> list[tuple[int, str, str]]:
    """``(line number, key, value)`` up to the first blank line.

    Raises :class:`UapiError` for a line without ``=`` (without quoting it:
    it could hold key material) and for a reply without ``errno``.
    """
    out: list[tuple[int, str, str]] = []
    for number, line in enumerate(text.split("\n"), 1):
        if line == "":
            break
        key, sep, value = line.partition("=")
        if not sep or not key:
            raise UapiError(f"malformed UAPI reply: line {number} is not key=value")
        out.append((number, key, value))
    return out


def _check_errno(pairs: list[tuple[int, str, str]], what: str) -> None:
    for number, key, value in pairs:
        if key == "errno":
            try:
                code = int(value)
            except ValueError:
                raise UapiError(
                    f"malformed UAPI reply: line {number}: errno is not an integer"
                ) from None
            if code != 0:
                raise UapiError(f"UAPI {what} failed: {_describe_errno(code)}", errno=code)
            return
    raise UapiError(f"malformed UAPI reply to {what}: no errno line")


def _int(number: int, key: str, value: str) -> int:
    try:
        result = int(value, 10)
    except ValueError:
        raise UapiError(f"malformed UAPI reply: line {number}: {key} is not an integer") from None
    if result < 0:
        raise UapiError(f"malformed UAPI reply: line {number}: {key} is negative")
    return result


def _key(number: int, key: str, value: str) -> Key:
    try:
        raw = bytes.fromhex(value)
        return Key(raw)
    except ValueError:
        raise UapiError(
            f"malformed UAPI reply: line {number}: {key} is not a 32-byte hex key"
        ) from None


@attrs.define
class _PeerBuilder:
    public_key: Key
    endpoint: str | None = None
    allowed_ips: list[IPNetwork] = attrs.Factory(list)
    allowed_ip_count: int = 0
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    keepalive: int = 0

    def build(self) -> PeerStatus:
        handshake: float | None = None
        if self.handshake_sec or self.handshake_nsec:
            handshake = self.handshake_sec + self.handshake_nsec / 1e9
        return PeerStatus(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=tuple(self.allowed_ips),
            last_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            persistent_keepalive=self.keepalive or None,
            allowed_ip_count=self.allowed_ip_count,
        )


_DEVICE_KEYS = frozenset({"private_key", "listen_port", "fwmark"})


def parse_get(text: str, *, prefixes: bool = True) -> DeviceStatus:
    """Parse the reply to ``get=1``.

    Reads up to the first blank line (or the end of ``text``).  Unknown keys
    are ignored (forward compatibility); the private and preshared keys are
    read past and not kept.  With ``prefixes=False`` the ``allowed_ip``
    lines are only counted (``allowed_ip_count``; ``allowed_ips`` stays
    empty): what the probe and ``status`` read, for which parsing 10,000
    prefixes into objects took longer than the rest of the answer.  Raises
    :class:`UapiError` when the reply has ``errno != 0`` (``.errno`` set) or
    is malformed; messages name the line and key, never the value.
    """
    pairs = _reply_lines(text)
    _check_errno(pairs, "get")
    listen_port: int | None = None
    fwmark: int | None = None
    peers: list[_PeerBuilder] = []
    for number, key, value in pairs:
        if key == "errno":
            break
        if key == "public_key":
            peers.append(_PeerBuilder(_key(number, key, value)))
            continue
        if not peers:
            if key == "listen_port":
                listen_port = _int(number, key, value) or None
            elif key == "fwmark":
                fwmark = _int(number, key, value) or None
            elif key == "private_key":
                _key(number, key, value)  # validated, not kept
            continue
        peer = peers[-1]
        if key in _DEVICE_KEYS:
            raise UapiError(f"malformed UAPI reply: line {number}: {key} inside a peer")
        if key == "endpoint":
            peer.endpoint = value or None
        elif key == "allowed_ip":
            peer.allowed_ip_count += 1
            try:
                if prefixes:
                    peer.allowed_ips.append(ipaddress.ip_network(value, strict=False))
                elif value.count("/") != 1:
                    raise ValueError(value)
            except ValueError:
                raise UapiError(
                    f"malformed UAPI reply: line {number}: allowed_ip {value!r} is not a prefix"
                ) from None
        elif key == "last_handshake_time_sec":
            peer.handshake_sec = _int(number, key, value)
        elif key == "last_handshake_time_nsec":
            peer.handshake_nsec = _int(number, key, value)
        elif key == "rx_bytes":
            peer.rx_bytes = _int(number, key, value)
        elif key == "tx_bytes":
            peer.tx_bytes = _int(number, key, value)
        elif key == "persistent_keepalive_interval":
            peer.keepalive = _int(number, key, value)
        elif key == "preshared_key":
            _key(number, key, value)  # validated, not kept
        elif key == "protocol_version":
            _int(number, key, value)
    return DeviceStatus(
        listen_port=listen_port,
        fwmark=fwmark,
        peers=tuple(p.build() for p in peers),
    )


# ------------------------------------------------------------------------ I/O


async def _connect(path: str) -> trio.SocketStream:
    try:
        return await trio.open_unix_socket(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UapiError(f"cannot connect to UAPI socket {path}: {reason}") from None


async def _read_reply(stream: trio.SocketStream, path: str, what: str, note: str) -> bytes:
    """Bytes up to and including the first blank line, at most MAX_REPLY."""
    limit = MAX_REPLY
    buf = bytearray()
    while True:
        try:
            chunk = await stream.receive_some(_RECV_CHUNK)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise UapiError(
                f"UAPI {what} on {path}: connection broken while reading the reply{note}"
            ) from exc
        if not chunk:
            raise UapiError(
                f"UAPI {what} on {path}: connection closed before the end of the reply{note}"
            )
        start = max(0, len(buf) - 1)
        buf += chunk
        end = buf.find(b"\n\n", start)
        if end >= 0 and end + 2 <= limit:
            return bytes(buf[: end + 2])
        if len(buf) > limit:
            raise UapiError(f"UAPI {what} on {path}: reply exceeds {limit} bytes")


async def _exchange(path: str, request: bytes, what: str) -> str:
    """Send ``request``, read the reply up to its blank line, close.

    No deadline of its own: callers wrap it in ``trio.fail_after``.
    """
    stream = await _connect(path)
    async with stream:
        note = ""
        try:
            await stream.send_all(request)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # The server may have answered (e.g. errno=-22) and closed before
            # reading the whole request: prefer its answer if there is one.
            note = f" (sending the request failed: {exc.__cause__ or exc})"
        reply = await _read_reply(stream, path, what, note)
    try:
        return reply.decode("ascii")
    except UnicodeDecodeError:
        raise UapiError(f"UAPI {what} on {path}: reply is not ASCII text") from None


async def uapi_set(path: str, request: bytes, *, timeout: float) -> None:
    """Send a ``set=1`` request (see :func:`render_set`) and check ``errno``.

    Connects, sends, reads the reply up to its blank line and closes, all
    within ``timeout`` seconds.  Raises :class:`UapiError` when the socket is
    missing or refuses, the server does not answer within ``timeout``, the
    reply is malformed or too large, or reports ``errno != 0``.

    Cancellation: cancellable at every step; a cancellation from outside
    propagates as ``trio.Cancelled`` (the connection is closed).  If it
    lands after the request was sent, the server may have applied it.
    """
    if not request.startswith(b"set=1\n") or not request.endswith(b"\n\n"):
        raise ValueError("a UAPI set request starts with 'set=1' and ends with a blank line")
    with deadline(timeout, f"UAPI socket {path} did not answer within {timeout:g}s", UapiError):
        reply = await _exchange(path, request, "set")
    _check_errno(_reply_lines(reply), "set")
    log.debug("uapi set on %s: ok (%d bytes sent)", path, len(request))


async def uapi_get(path: str, *, timeout: float, prefixes: bool = True) -> DeviceStatus:
    """Send ``get=1`` and parse the reply (see :func:`parse_get`, also for
    ``prefixes``).

    Connects, sends, reads the reply up to its blank line (at most
    :data:`MAX_REPLY` bytes) and closes, all within ``timeout`` seconds;
    a reply over :data:`PARSE_IN_THREAD` bytes is then parsed in a worker
    thread.  Raises :class:`UapiError` as :func:`uapi_set` does.

    Cancellation: cancellable at every step; a cancellation from outside
    propagates as ``trio.Cancelled`` (the connection is closed; a parse
    under way is abandoned); ``get`` has no side effects on the device.
    """
    with deadline(timeout, f"UAPI socket {path} did not answer within {timeout:g}s", UapiError):
        reply = await _exchange(path, b"get=1\n\n", "get")
    parse = functools.partial(parse_get, reply, prefixes=prefixes)
    if len(reply) > PARSE_IN_THREAD:
        return await trio.to_thread.run_sync(parse, abandon_on_cancel=True)
    return parse()


_RETRYABLE = (FileNotFoundError, ConnectionRefusedError)


def _peer_pid(stream: trio.SocketStream) -> int:
    creds = stream.socket.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                     struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return int(pid)


async def listener_pid(path: str, *, timeout: float = 2.0) -> int | None:
    """The pid listening on the UAPI socket at ``path``, or None when no
    process is (no file, or a stale one that refuses connections).

    Cancellation: cancellable; nothing is left open.
    """
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(path)
    except (*_RETRYABLE, trio.TooSlowError):
        return None
    try:
        return _peer_pid(stream)
    finally:
        stream.socket.close()


async def wait_for_socket(
    path: str,
    *,
    timeout: float,
    give_up: Callable[[], str | None] | None = None,
) -> int:
    """Wait until a ``connect()`` to the UAPI socket at ``path`` succeeds;
    return the pid of the process listening on it (``SO_PEERCRED``), so the
    caller can check it is its own helper (the socket directory is shared by
    every network namespace).

    A missing file (or directory) and ``ECONNREFUSED`` (a stale socket file)
    are retried with sleeps growing from 2 ms to 50 ms; any other ``OSError``
    fails at once.  ``give_up`` is called after each failed attempt: a
    non-``None`` return (e.g. ``"helper exited with status 1"``) aborts with
    ``UapiError(reason)``.  The connection used for the check is closed at
    once.  Raises ``UapiError("... did not appear within Xs")`` after
    ``timeout`` seconds.

    Cancellation: cancellable at every step (only sleeps and a non-blocking
    connect); a cancellation from outside propagates as ``trio.Cancelled``
    and leaves nothing open.
    """
    delay = _RETRY_FIRST
    try:
        with trio.fail_after(timeout):
            while True:
                try:
                    stream = await trio.open_unix_socket(path)
                except _RETRYABLE:
                    pass
                except OSError as exc:
                    why = exc.strerror or type(exc).__name__
                    raise UapiError(f"cannot connect to UAPI socket {path}: {why}") from None
                else:
                    pid = _peer_pid(stream)
                    stream.socket.close()
                    return pid
                if give_up is not None:
                    reason = give_up()
                    if reason is not None:
                        raise UapiError(reason)
                await trio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
    except trio.TooSlowError:
        raise UapiError(f"UAPI socket {path} did not appear within {timeout:g}s") from None
