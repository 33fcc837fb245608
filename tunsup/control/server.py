"""The control socket: framed NDJSON requests, peer credentials, log streams.

:class:`ControlServer` listens on ``runtime_dir/control.sock`` (mode 0660,
group from the configuration) and answers the ops of
:mod:`tunsup.control.protocol` by calling an :class:`Ops` object; it knows nothing
of the engine.  Each connection is its own task with an idle timeout (no
complete request for ``idle_timeout`` seconds closes it) and a per-request
timeout, and every send is bounded, so a slow, stuck or hostile client
costs one task and blocks no one.  Protocol errors (an oversized frame,
invalid JSON or JSON nested too deeply, text that is not valid Unicode, an
unknown op, a peer that is neither root nor in the allowed group) get an
error frame and the connection is closed gracefully (our side shut down,
the peer's leftover input drained for a moment, so the error frame is not
lost to a reset).

Idle connections never lock out a request: at ``max_connections`` a new
connection evicts the one idle longest (waiting for a request); only when
none is idle is the newcomer refused, cheaply (a best-effort frame, no
task).  A client that goes away, even mid-stream, is no error.

Log subscriptions (``logs`` with ``follow``) are fed by the log hub of
:mod:`tunsup._log` through a bounded memory channel, never waited for:
entries that do not fit are skipped and counted (a ``{"skipped": N}``
frame where they were), and a subscriber that does not read is dropped
at the send timeout.  :meth:`ControlServer.finish` has the service's exit
event sent to every subscriber after what is queued, before the process
exits, so ``tunsup stop`` can report whether teardown completed.  The
group's members hold at most ``max_group_followers`` subscriptions.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import attrs
import trio

from .._bounded import bounded
from .._errors import HostError
from .._log import Entry, LogHub
from ..config.settings import ControlSettings as ControlSettings
from . import protocol as proto

log = logging.getLogger("tunsup.control")

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UNIX_PATH_MAX = 107
#: Bound on one file operation on the socket's path (runtime directory).
FILE_TIMEOUT = 2.0


class OpError(Exception):
    """An op failed; becomes an error response (the connection stays open)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Ops(Protocol):
    """What the service answers.  Each method raises :class:`OpError` on
    failure; each is cancelled when its request times out (ops that change
    tunnels keep running in the service regardless)."""

    async def status(self) -> dict[str, Any]:
        """The service and its tunnels.  Cancelled when the request times out."""
        ...

    async def up(self, config: str) -> dict[str, Any]:
        """Start a tunnel from a wg-quick file; answers once it is up.  A
        cancellation abandons the wait, never the start."""
        ...

    async def down(self, name: str) -> dict[str, Any]:
        """Stop a tunnel; answers once its teardown ended.  A cancellation
        abandons the wait, never the teardown."""
        ...

    async def reload(self) -> dict[str, Any]:
        """Read the configuration again and converge to it.  A cancellation
        abandons the wait, never the reload."""
        ...


class _ProtocolError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Reader:
    """Newline-delimited frames from a stream, each at most ``limit`` bytes."""

    def __init__(self, stream: trio.SocketStream, limit: int) -> None:
        self._stream = stream
        self._limit = limit
        self._buf = bytearray()

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    async def frame(self) -> bytes | None:
        """The next frame without its newline; None at a clean EOF.

        Raises _ProtocolError for an oversized or truncated frame.
        Cancellable; a cancellation loses nothing already buffered."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                if end + 1 > self._limit:
                    raise _ProtocolError(proto.TOO_LARGE,
                                         f"request frame over {self._limit} bytes")
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            if len(self._buf) >= self._limit:
                raise _ProtocolError(proto.TOO_LARGE, f"request frame over {self._limit} bytes")
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                if self._buf:
                    raise _ProtocolError(proto.BAD_FRAME, "connection closed inside a frame")
                return None
            self._buf += chunk


@attrs.define(eq=False)
class _Follower:
    """One live log subscription."""

    send: trio.MemorySendChannel[tuple[str, Any]]
    scope: trio.CancelScope
    privileged: bool = True
    #: Entries not queued since the last one that was (the buffer was full).
    skipped: int = 0
    #: The service's exit event, sent once the queue is drained.
    event: dict[str, Any] | None = None
    done: trio.Event = attrs.field(factory=trio.Event)


Handler = Callable[["_Connection", Any, dict[str, Any]], Awaitable[None]]


class _Connection:
    def __init__(self, server: ControlServer, stream: trio.SocketStream) -> None:
        self.server = server
        self.stream = stream
        self.reader = _Reader(stream, server.settings.max_request)
        self.open = True
        #: Root (or the service's uid), as opposed to a member of the group.
        self.privileged = False
        #: Since when the connection waits for a request (trio clock); None
        #: while a request is being answered or a log stream runs.
        self.idle_since: float | None = trio.current_time()
        #: Cancelled to evict the connection.
        self.scope = trio.CancelScope()
        self.evicted = False

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame within the send timeout; a client that does not
        read gets its connection closed.  Cancellable."""
        with trio.move_on_after(self.server.settings.send_timeout) as scope:
            await self.stream.send_all(proto.encode(frame))
        if scope.cancelled_caught:
            self.open = False
            raise trio.BrokenResourceError("client did not read within the send timeout")


class ControlServer:
    """Serves :class:`Ops` on a unix socket.  Single use."""

    def __init__(self, path: str, ops: Ops, hub: LogHub,
                 settings: ControlSettings | None = None) -> None:
        self.path = path
        self.ops = ops
        self.hub = hub
        self.settings = settings or ControlSettings()
        #: The connections being served (an evicted one leaves at once).
        self._live: set[_Connection] = set()
        self._followers: set[_Follower] = set()
        #: Set by finish(): the service is exiting.
        self._exit_event: dict[str, Any] | None = None
        self._inode: tuple[int, int] | None = None
        self._handlers: dict[str, Handler] = {
            "ping": self._op_ping,
            "status": self._op_status,
            "up": self._op_up,
            "down": self._op_down,
            "reload": self._op_reload,
            "logs": self._op_logs,
        }

    @property
    def connections(self) -> int:
        return len(self._live)

    # ------------------------------------------------------------ listening

    async def _bind(self) -> trio.socket.SocketType:
        """Create the listening socket at its public path.  Raises OSError
        (another server answers there, the path is too long...).
        Cancellable; a cancellation leaves no socket file behind."""
        if len(os.fsencode(self.path)) > _UNIX_PATH_MAX - 12:
            raise OSError(errno.ENAMETOOLONG, f"control socket path too long: {self.path}")
        if await _listening(self.path):
            raise OSError(errno.EADDRINUSE, f"another process serves {self.path}")
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        tmp = os.path.join(os.path.dirname(self.path), f".ctl{os.getpid()}")
        try:
            await bounded(FILE_TIMEOUT, f"removing {tmp}", _unlink_quietly, tmp)
            await sock.bind(tmp)
            sock.listen(self.settings.listen_backlog)
            # Permissions are set before the socket gets its public name, so
            # it is never reachable with looser ones.
            self._inode = await bounded(FILE_TIMEOUT, f"publishing {self.path}", _publish,
                                        tmp, self.path, self.settings.group)
        except BaseException:
            sock.close()
            with trio.CancelScope(shield=True):
                await bounded(FILE_TIMEOUT, f"removing {tmp}", _unlink_quietly, tmp)
            raise
        return sock

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        """Bind, report started, and serve until cancelled.

        Raises OSError (before ``started``) when the socket cannot be
        created, e.g. when another service answers on it.  Cancellation
        closes every connection at once and removes the socket file (if it
        is still ours)."""
        sock = await self._bind()
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await self._accept_loop(sock, nursery)
        finally:
            sock.close()
            with trio.CancelScope(shield=True):
                try:
                    await bounded(FILE_TIMEOUT, f"removing {self.path}", _unlink_if_ours,
                                  self.path, self._inode)
                except HostError as exc:
                    log.warning("control socket: %s", exc)

    async def _accept_loop(self, sock: trio.socket.SocketType, nursery: trio.Nursery) -> None:
        """Accept connections and give each its own task until cancelled."""
        while True:
            try:
                conn, _ = await sock.accept()
            except OSError as exc:
                # EMFILE and friends: back off, keep serving the others.
                log.warning("control socket: accept failed: %s", exc)
                await trio.sleep(0.1)
                continue
            if len(self._live) >= self.settings.max_connections and not self._evict_idlest():
                _refuse(conn, proto.BUSY, f"too many connections ({len(self._live)} busy)")
                continue
            connection = _Connection(self, trio.SocketStream(conn))
            self._live.add(connection)
            nursery.start_soon(self._connection, connection)

    def _evict_idlest(self) -> bool:
        """Make room by evicting the connection idle longest (it gets a
        ``busy`` frame, best effort); False when every connection is busy.
        Idle connections must never lock out a new request: a leaking
        script's forgotten sockets go before a ``status`` or ``stop``."""
        idle = [c for c in self._live if c.idle_since is not None]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since or 0.0)
        victim.evicted = True
        victim.scope.cancel()
        self._live.discard(victim)
        log.debug("control: evicted the connection idle longest (limit %d reached)",
                  self.settings.max_connections)
        return True

    async def finish(self, event: dict[str, Any]) -> None:
        """Send ``event`` (``{"type": "exit", ...}``) to every log subscriber
        and wait (at most ``finish_timeout`` seconds) until they have it.
        A subscriber arriving meanwhile (a second ``tunsup stop``) gets the
        event at once.  Cancellable; callers cancel :meth:`serve` afterwards."""
        self._exit_event = event
        followers = list(self._followers)
        for follower in followers:
            # After what is queued (never lost to a full queue).
            follower.event = event
            follower.send.close()
        with trio.move_on_after(self.settings.finish_timeout):
            for follower in followers:
                await follower.done.wait()

    # ------------------------------------------------------------ connections

    async def _connection(self, conn: _Connection) -> None:
        """Serve one connection until it ends or is evicted; never raises
        (errors are logged; a client going away is no error).  Cancellation
        closes the connection at once."""
        try:
            async with conn.stream:
                with conn.scope:
                    await self._serve_peer(conn)
                if conn.evicted:
                    _notify_nowait(conn.stream.socket, proto.error(
                        None, proto.BUSY, "closed: idle longest while the connection limit "
                        f"({self.settings.max_connections}) was reached"))
        except Exception as exc:
            if _client_gone(exc):
                log.debug("control: a client went away: %s", exc)
            else:
                log.error("control connection failed: %s", exc, exc_info=exc)
        finally:
            self._live.discard(conn)

    async def _serve_peer(self, conn: _Connection) -> None:
        """Check the peer's credentials, then answer its requests.
        Cancellable."""
        refused, conn.privileged = self._check_peer(conn.stream.socket)
        if refused is not None:
            await self._protocol_error(conn, None, proto.FORBIDDEN, refused)
            return
        await self._requests(conn)

    def _check_peer(self, raw: trio.socket.SocketType) -> tuple[str | None, bool]:
        """(None, privileged) when the peer may talk to us, else (why not,
        False).  Privileged: root or the service's own uid; members of the
        configured group may use every op but ``up``."""
        creds = raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        if uid in (0, os.geteuid()):
            return None, True
        group = self.settings.group
        if group is not None and (gid == group or group in _peer_groups(raw)):
            return None, False
        allowed = "root" if group is None else f"root or group {group}"
        return f"permission denied: uid {uid} is not allowed (only {allowed})", False

    async def _requests(self, conn: _Connection) -> None:
        """Read and answer requests one at a time until EOF, a protocol
        error or the idle timeout.  Cancellable."""
        settings = self.settings
        while conn.open:
            conn.idle_since = trio.current_time()
            try:
                with trio.move_on_after(settings.idle_timeout) as idle:
                    line = await conn.reader.frame()
            except _ProtocolError as exc:
                conn.idle_since = None
                await self._protocol_error(conn, None, exc.code, exc.message)
                return
            conn.idle_since = None
            if idle.cancelled_caught:
                what = "inside a frame" if conn.reader.pending else "without a request"
                await self._protocol_error(conn, None, proto.IDLE,
                                           f"{settings.idle_timeout:g} s {what}; closing")
                return
            if line is None:
                return
            try:
                request = _parse(line)
            except _ProtocolError as exc:
                await self._protocol_error(conn, None, exc.code, exc.message)
                return
            rid, op = request["id"], request["op"]
            handler = self._handlers.get(op)
            if handler is None:
                await self._protocol_error(conn, rid, proto.UNKNOWN_OP, f"unknown op {op!r}")
                return
            log.debug("control: op %s", op)
            await handler(conn, rid, request)

    async def _protocol_error(self, conn: _Connection, rid: Any, code: str,
                              message: str) -> None:
        """Send an error frame and close gracefully: shut our side down,
        then discard what the client still sends for a moment, so that its
        unread bytes do not turn our close into a reset that would destroy
        the error frame before it is read.
        Bounded (send timeout, one second of draining); cancellable."""
        log.debug("control: closing a connection: %s", message)
        conn.open = False
        try:
            await conn.send(proto.error(rid, code, message))
            await conn.stream.send_eof()
            with trio.move_on_after(1.0):
                discarded = 0
                while discarded < 4 * 1024 * 1024:
                    chunk = await conn.stream.receive_some(65536)
                    if not chunk:
                        break
                    discarded += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def _answer(self, conn: _Connection, rid: Any, timeout: float,
                      call: Callable[[], Awaitable[dict[str, Any]]]) -> None:
        """Run one op under ``timeout`` and send its response.
        Cancellable; the op's own cancellation behaviour applies to it."""
        frame: dict[str, Any]
        with trio.move_on_after(timeout) as scope:
            try:
                frame = proto.response(rid, await call())
            except OpError as exc:
                frame = proto.error(rid, exc.code, exc.message)
            except Exception as exc:
                # A bug, not the client's fault: the client still gets an
                # answer, and the log the traceback.
                log.error("control: an op failed unexpectedly: %s", exc, exc_info=exc)
                frame = proto.error(rid, proto.INTERNAL, f"internal error: {exc}")
        if scope.cancelled_caught:
            frame = proto.error(rid, proto.TIMEOUT, f"no answer within {timeout:g} s")
        await conn.send(frame)

    # ------------------------------------------------------------ ops

    async def _op_ping(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``ping``.  Cancellable."""
        async def call() -> dict[str, Any]:
            return {"pong": True, "pid": os.getpid()}

        await self._answer(conn, rid, self.settings.request_timeout, call)

    async def _op_status(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``status`` within the request timeout.  Cancellable."""
        await self._answer(conn, rid, self.settings.request_timeout, self.ops.status)

    async def _op_up(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``up`` (root only).  Cancellation abandons the wait only."""
        config = request.get("config")
        if not conn.privileged:
            # A wg-quick file's hooks run as root: only root may name one.
            await conn.send(proto.error(rid, proto.FORBIDDEN, "only root may bring a tunnel "
                                        "up (a wg-quick file's hooks run as root)"))
            return
        if not isinstance(config, str) or not os.path.isabs(config):
            await conn.send(proto.error(rid, proto.BAD_ARGS,
                                        "'config' must be an absolute path to a .conf file"))
            return
        await self._answer(conn, rid, self.settings.change_timeout,
                           lambda: self.ops.up(config))

    async def _op_down(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``down``.  Cancellation abandons the wait only."""
        name = request.get("name")
        if not isinstance(name, str) or not name:
            await conn.send(proto.error(rid, proto.BAD_ARGS, "'name' must be a tunnel name"))
            return
        await self._answer(conn, rid, self.settings.change_timeout,
                           lambda: self.ops.down(name))

    async def _op_reload(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``reload``.  Cancellation abandons the wait only."""
        await self._answer(conn, rid, self.settings.change_timeout, self.ops.reload)

    async def _op_logs(self, conn: _Connection, rid: Any, request: dict[str, Any]) -> None:
        """Answer ``logs``: the backlog, then (with ``follow``) the live
        stream.  Cancellable."""
        backlog = request.get("backlog", 100)
        follow = request.get("follow", False)
        if (not isinstance(backlog, int) or isinstance(backlog, bool) or backlog < 0
                or not isinstance(follow, bool)):
            await conn.send(proto.error(rid, proto.BAD_ARGS, "'backlog' must be an integer "
                                        ">= 0 and 'follow' a boolean"))
            return
        if not follow:
            entries = self.hub.recent(backlog)
            await conn.send(proto.response(rid, {"backlog": len(entries), "follow": False}))
            for entry in entries:
                await conn.send({"log": entry})
            return
        if self._exit_event is not None:
            # The service is exiting: the backlog, then how it ended.
            entries = self.hub.recent(backlog)
            await conn.send(proto.response(rid, {"backlog": len(entries), "follow": True}))
            for entry in entries:
                await conn.send({"log": entry})
            await conn.send({"event": self._exit_event})
            conn.open = False
            return
        await self._follow(conn, rid, backlog)

    async def _follow(self, conn: _Connection, rid: Any, backlog: int) -> None:
        """Stream the backlog, then live entries, until the client closes,
        falls too far behind, or the service exits (after the exit event).
        The connection is dedicated to the stream: further input is
        discarded.  Cancellable."""
        if not conn.privileged and sum(
                not f.privileged for f in self._followers) >= self.settings.max_group_followers:
            await conn.send(proto.error(rid, proto.BUSY, "too many log subscriptions of the "
                                        f"group ({self.settings.max_group_followers})"))
            return
        send, receive = trio.open_memory_channel[tuple[str, Any]](self.settings.follow_buffer)
        follower = _Follower(send, trio.CancelScope(), conn.privileged)
        trio_thread = threading.get_ident()
        token = trio.lowlevel.current_trio_token()

        def push(entry: Entry) -> None:
            # A burst (thousands of hook lines at a stop) must not end the
            # stream, nor queue without bound: what does not fit is
            # counted, and the count goes where the entries were.
            try:
                if follower.skipped:
                    send.send_nowait(("skipped", follower.skipped))
                    follower.skipped = 0
                send.send_nowait(("log", entry))
            except trio.WouldBlock:
                follower.skipped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        def deliver(entry: Entry) -> None:
            # Called by the log hub in whatever thread logged.
            if threading.get_ident() == trio_thread:
                push(entry)
            else:
                with contextlib.suppress(trio.RunFinishedError):
                    token.run_sync_soon(push, entry)

        past, unsubscribe = self.hub.subscribe(deliver, backlog)
        self._followers.add(follower)
        try:
            with follower.scope:
                await conn.send(proto.response(rid, {"backlog": len(past), "follow": True}))
                for entry in past:
                    await conn.send({"log": entry})
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._until_eof, conn, nursery.cancel_scope)
                    async for kind, item in receive:
                        if follower.event is not None:
                            # The service is exiting (finish() waits at most
                            # finish_timeout): the last of what is queued,
                            # then the event, without a slow reader holding
                            # it behind thousands of lines.
                            await self._send_last(conn, [(kind, item), *_drained(receive)])
                            break
                        await conn.send({kind: item})
                    # Closed by finish(): the rest, then how the service ended.
                    if follower.skipped:
                        await conn.send({"skipped": follower.skipped})
                    if follower.event is not None:
                        await conn.send({"event": follower.event})
                    nursery.cancel_scope.cancel()
        finally:
            unsubscribe()
            self._followers.discard(follower)
            follower.done.set()
            conn.open = False

    async def _send_last(self, conn: _Connection, queued: list[tuple[str, Any]]) -> None:
        """Send the last :data:`FINAL_ENTRIES` of ``queued``, the older ones
        counted in one ``skipped`` frame before them.  Cancellable."""
        older, last = queued[:-FINAL_ENTRIES], queued[-FINAL_ENTRIES:]
        skipped = sum(item if kind == "skipped" else 1 for kind, item in older)
        if skipped:
            await conn.send({"skipped": skipped})
        for kind, item in last:
            await conn.send({kind: item})

    async def _until_eof(self, conn: _Connection, scope: trio.CancelScope) -> None:
        """Discard input until the client closes, then cancel ``scope``.
        Cancellable."""
        try:
            while await conn.stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()


#: Entries still queued for a follower when the service exits that are
#: sent (the last ones: the end of the teardown); older ones are counted.
FINAL_ENTRIES = 200


def _drained(receive: trio.MemoryReceiveChannel[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """What ``receive`` holds now (it is closed: nothing more comes)."""
    items = []
    while True:
        try:
            items.append(receive.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel):
            return items


def _parse(line: bytes) -> dict[str, Any]:
    """The request of one frame.  Raises _ProtocolError for anything that
    is not a JSON object of valid Unicode with an id and an op."""
    try:
        request = json.loads(line)
        # "\ud800" escapes decode to lone surrogates, which are no text:
        # they could not be echoed, logged or used as a name.
        json.dumps(request, ensure_ascii=False).encode()
    except RecursionError:
        raise _ProtocolError(proto.BAD_FRAME, "JSON nested too deeply") from None
    except UnicodeEncodeError:
        raise _ProtocolError(proto.BAD_FRAME, "a request must be valid Unicode (it holds a "
                                              "lone surrogate escape)") from None
    except ValueError:  # invalid UTF-8 and over-long integers included
        raise _ProtocolError(proto.BAD_FRAME, "invalid JSON") from None
    if not isinstance(request, dict):
        raise _ProtocolError(proto.BAD_FRAME, "a request must be a JSON object")
    rid = request.get("id")
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        raise _ProtocolError(proto.BAD_FRAME, "a request needs an 'id' (number or string)")
    if not isinstance(request.get("op"), str):
        raise _ProtocolError(proto.BAD_FRAME, "a request needs an 'op' (string)")
    return request


def _peer_groups(raw: trio.socket.SocketType) -> list[int]:
    """The peer's supplementary groups (SO_PEERGROUPS, Linux 4.13+)."""
    size = 64
    while size <= 65536:
        try:
            data = raw.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 4
                continue
            return []
        return list(struct.unpack(f"{len(data) // 4}I", data))
    return []


def _refuse(raw: trio.socket.SocketType, code: str, message: str) -> None:
    """A connection we will not serve: a best-effort error frame, closed.
    Cheap: no task, no waiting."""
    _notify_nowait(raw, proto.error(None, code, message))
    raw.close()


def _notify_nowait(raw: trio.socket.SocketType, frame: dict[str, Any]) -> None:
    """Best-effort frame, never waiting (the socket is non-blocking: a full
    buffer or a gone peer just loses the frame)."""
    with contextlib.suppress(OSError):
        os.write(raw.fileno(), proto.encode(frame))


def _client_gone(exc: BaseException) -> bool:
    """Whether ``exc`` only says the client went away (closed, reset, or
    did not read), possibly wrapped in (nested) exception groups by a
    nursery."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_client_gone(e) for e in exc.exceptions)
    return isinstance(exc, trio.BrokenResourceError | trio.ClosedResourceError)


async def _listening(path: str) -> bool:
    """Whether some process accepts connections on ``path`` (a 2 s bounded
    probe).  Cancellable; the probe socket is always closed."""
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with trio.move_on_after(2):
            await probe.connect(path)
            return True
    except OSError:
        pass
    finally:
        probe.close()
    return False


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _publish(tmp: str, path: str, group: int | None) -> tuple[int, int]:
    """chmod 0660 (and chgrp) the freshly bound socket, then give it its
    public name (replacing a stale socket file).  Returns its identity."""
    os.chmod(tmp, 0o660)
    if group is not None:
        os.chown(tmp, -1, group)
    os.replace(tmp, path)
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unlink_if_ours(path: str, inode: tuple[int, int] | None) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if inode == (st.st_dev, st.st_ino):
        _unlink_quietly(path)
