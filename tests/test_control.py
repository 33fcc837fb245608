"""The control server against a fake ops object: protocol, abuse, limits,
log streams.  Real unix sockets, in-process; no network namespace needed."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from tunsup._log import LogHub
from tunsup.control import client
from tunsup.control import protocol as proto
from tunsup.control.server import ControlServer, ControlSettings, OpError

from ._peer import exchange_as


class FakeOps:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def status(self) -> dict[str, Any]:
        self.calls.append("status")
        return {"tunnels": [], "service": {"state": "running"}}

    async def up(self, config: str) -> dict[str, Any]:
        self.calls.append(f"up {config}")
        if config.endswith("slow.conf"):
            await trio.sleep_forever()
        raise OpError(proto.CONFIG, f"{config}:3: bad key")

    async def down(self, name: str) -> dict[str, Any]:
        self.calls.append(f"down {name}")
        raise OpError(proto.NOT_FOUND, f"no tunnel named {name!r} is running")

    async def reload(self) -> dict[str, Any]:
        return {"started": []}


@pytest.fixture
def sockdir() -> Iterator[str]:
    """A short directory other users may traverse (for the uid tests)."""
    path = tempfile.mkdtemp(prefix="tsctl", dir="/tmp")
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def serving(sockdir: str, hub: LogHub | None = None,
                  **settings: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(os.path.join(sockdir, "control.sock"), FakeOps(),
                           hub or LogHub(), ControlSettings(**settings))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        yield server
        nursery.cancel_scope.cancel()


class Client:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = b""

    @classmethod
    async def connect(cls, path: str) -> Client:
        return cls(await trio.open_unix_socket(path))

    async def send(self, data: bytes | dict[str, Any]) -> None:
        await self.stream.send_all(proto.encode(data) if isinstance(data, dict) else data)

    async def frame(self) -> dict[str, Any] | None:
        """The next frame, None at EOF.  Bounded: a missing answer fails the
        test after 10 s.  Cancellable (buffered bytes are kept)."""
        with trio.fail_after(10):
            while b"\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        frame: dict[str, Any] = json.loads(line)
        return frame

    async def request(self, op: str, rid: int = 1, **args: Any) -> dict[str, Any]:
        await self.send({"id": rid, "op": op, **args})
        frame = await self.frame()
        assert frame is not None
        return frame

    async def aclose(self) -> None:
        await self.stream.aclose()


def run(fn: Any, *args: Any) -> None:
    trio.run(fn, *args)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def at_least(self, level: int) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def control_log() -> Iterator[_Records]:
    """What the control server logs (whatever the logging set-up of
    earlier tests left behind)."""
    logger = logging.getLogger("tunsup.control")
    handler = _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_ops_answer_and_op_errors_keep_the_connection(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            assert (await c.request("ping", 7))["result"]["pong"] is True
            frame = await c.request("status", "s1")
            assert frame == {"id": "s1", "ok": True,
                             "result": {"tunnels": [], "service": {"state": "running"}}}
            frame = await c.request("down", 2, name="wg9")
            assert frame["ok"] is False and frame["error"]["code"] == proto.NOT_FOUND
            frame = await c.request("up", 3, config="relative.conf")
            assert frame["error"]["code"] == proto.BAD_ARGS
            frame = await c.request("up", 4, config="/etc/wg/x.conf")
            assert frame["error"] == {"code": proto.CONFIG, "message": "/etc/wg/x.conf:3: bad key"}
            assert (await c.request("ping", 5))["ok"] is True  # still open
            await c.aclose()

    run(main)


@pytest.mark.parametrize(("payload", "code", "rid"), [
    (b"hello there\n", proto.BAD_FRAME, None),
    (b"\xff\xfe\x00garbage\n", proto.BAD_FRAME, None),
    (b"[1, 2]\n", proto.BAD_FRAME, None),
    (b'{"op": "ping"}\n', proto.BAD_FRAME, None),
    (b'{"id": true, "op": "ping"}\n', proto.BAD_FRAME, None),
    (b'{"id": 1, "op": 5}\n', proto.BAD_FRAME, None),
    (b'{"id": 9, "op": "format-disk"}\n', proto.UNKNOWN_OP, 9),
    # Hostile frames (issue 10 item 13): each must get an error frame, not
    # a bare EOF and a traceback in the log.
    (b'{"id": 1, "op": "ping", "x": ' + b"[" * 30000 + b"]" * 30000 + b"}\n",
     proto.BAD_FRAME, None),
    (b"[" * 60000 + b"\n", proto.BAD_FRAME, None),
    (b'{"id": "\\ud800", "op": "ping"}\n', proto.BAD_FRAME, None),
    (b'{"id": 1, "op": "down", "name": "wg\\udfff"}\n', proto.BAD_FRAME, None),
    (b'{"id": 1' + b"0" * 5000 + b', "op": "ping"}\n', proto.BAD_FRAME, None),
    (b'{"id": 1e999, "op": "ping"}\n', proto.BAD_FRAME, None),
    (b'{"id": NaN, "op": "ping"}\n', proto.BAD_FRAME, None),
    (b'"just a string"\n', proto.BAD_FRAME, None),
    (b"null\n", proto.BAD_FRAME, None),
    (b'{"id": 1, "op": "ping"\xc3\x28}\n', proto.BAD_FRAME, None),
])
def test_protocol_errors_get_an_error_frame_and_a_close(sockdir: str, payload: bytes, code: str,
                                                        rid: object,
                                                        control_log: _Records) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            await c.send(payload + b'{"id": 2, "op": "ping"}\n')
            frame = await c.frame()
            assert frame is not None and frame["ok"] is False
            assert frame["error"]["code"] == code and frame["id"] == rid
            assert await c.frame() is None  # closed; the ping after it is not answered
            other = await Client.connect(server.path)
            assert (await other.request("ping"))["ok"] is True
            assert server.ops.calls == []  # type: ignore[attr-defined]

    run(main)
    assert control_log.at_least(logging.WARNING) == []


def test_a_huge_id_that_parses_is_echoed(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            rid = int("9" * 4000)
            assert (await c.request("ping", rid))["id"] == rid
            frame = await c.request("logs", 2, backlog=10**4000)
            assert frame["ok"] is True

    run(main)


def test_an_op_that_raises_unexpectedly_still_gets_an_answer(sockdir: str) -> None:
    class Broken(FakeOps):
        async def status(self) -> dict[str, Any]:
            raise RuntimeError("a bug")

    async def main() -> None:
        server = ControlServer(os.path.join(sockdir, "control.sock"), Broken(), LogHub())
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            c = await Client.connect(server.path)
            frame = await c.request("status", 1)
            assert frame["error"] == {"code": proto.INTERNAL,
                                      "message": "internal error: a bug"}
            assert (await c.request("ping", 2))["ok"] is True
            nursery.cancel_scope.cancel()

    run(main)


@pytest.mark.parametrize("with_newline", [False, True])
def test_an_oversized_frame_is_refused(sockdir: str, with_newline: bool) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            big = b'{"id": 1, "op": "ping", "pad": "' + b"x" * ControlSettings().max_request + b'"}'
            async with trio.open_nursery() as nursery:
                # The server answers before the client has sent it all.
                async def send() -> None:
                    with contextlib.suppress(trio.BrokenResourceError):
                        await c.send(big + (b"\n" if with_newline else b""))

                nursery.start_soon(send)
                frame = await c.frame()
            assert frame is not None and frame["error"]["code"] == proto.TOO_LARGE
            assert await c.frame() is None
            other = await Client.connect(server.path)
            assert (await other.request("ping"))["ok"] is True

    run(main)


def test_a_frame_of_exactly_the_limit_is_accepted(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            head = b'{"id": 1, "op": "ping", "pad": "'
            tail = b'"}\n'
            pad = b"x" * (ControlSettings().max_request - len(head) - len(tail))
            c = await Client.connect(server.path)
            await c.send(head + pad + tail)
            frame = await c.frame()
            assert frame is not None and frame["ok"] is True

    run(main)


def test_a_half_written_frame_blocks_no_one_and_is_closed_when_idle(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, idle_timeout=0.5) as server:
            stuck = await Client.connect(server.path)
            await stuck.send(b'{"id": 1, "op": "sta')
            for rid in range(5):
                other = await Client.connect(server.path)
                assert (await other.request("status", rid))["ok"] is True
                await other.aclose()
            frame = await stuck.frame()  # the idle timeout fires
            assert frame is not None and frame["error"]["code"] == proto.IDLE
            assert "inside a frame" in frame["error"]["message"]
            assert await stuck.frame() is None

    run(main)


def test_fifty_concurrent_clients(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            clients = [await Client.connect(server.path) for _ in range(50)]
            for i, c in enumerate(clients):
                await c.send({"id": i, "op": "status"})
            answers = [await c.frame() for c in clients]
            assert [a["id"] for a in answers if a and a["ok"]] == list(range(50))
            assert server.connections == 50
            for c in clients:
                await c.aclose()

    run(main)


def test_connections_beyond_the_limit_are_refused_when_none_is_idle(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, max_connections=2) as server:
            kept = [await Client.connect(server.path) for _ in range(2)]
            for c in kept:  # busy: following the log
                assert (await c.request("logs", backlog=0, follow=True))["ok"] is True
            extra = await Client.connect(server.path)
            frame = await extra.frame()
            assert frame is not None and frame["error"]["code"] == proto.BUSY
            assert await extra.frame() is None
            await kept[0].aclose()
            with trio.fail_after(5):
                while server.connections != 1:
                    await trio.testing.wait_all_tasks_blocked()
            again = await Client.connect(server.path)
            assert (await again.request("ping"))["ok"] is True

    run(main)


def test_a_full_server_evicts_the_connection_idle_longest(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, max_connections=3) as server:
            follower = await Client.connect(server.path)
            assert (await follower.request("logs", backlog=0, follow=True))["ok"] is True
            first = await Client.connect(server.path)
            await first.send(b'{"id": 1, "op": "sta')  # half a frame counts as idle
            second = await Client.connect(server.path)
            await trio.testing.wait_all_tasks_blocked()
            assert server.connections == 3
            # A new request evicts the idle one idle longest, not the follower.
            c = await Client.connect(server.path)
            assert (await c.request("status", 5))["ok"] is True
            evicted = await first.frame()
            assert evicted is not None and evicted["error"]["code"] == proto.BUSY
            assert "idle longest" in evicted["error"]["message"]
            assert await first.frame() is None
            # Next in line: `second` (`c` became idle after its answer, later).
            again = await Client.connect(server.path)
            assert (await again.request("ping", 6))["ok"] is True
            assert (await second.frame() or {})["error"]["code"] == proto.BUSY
            assert (await c.request("ping", 7))["ok"] is True  # still served
            assert server.connections == 3

    run(main)


def test_five_hundred_idle_connections_lock_no_one_out(sockdir: str) -> None:
    """Issue 10 item 14: a leaking script's 500 idle connections; the real
    client's ``status`` still gets its answer (timing: scripts/bench_idle_connections.py)."""
    async def main() -> None:
        async with serving(sockdir) as server:
            idle = [await trio.open_unix_socket(server.path) for _ in range(500)]
            await trio.testing.wait_all_tasks_blocked()
            assert server.connections == server.settings.max_connections
            code = await trio.to_thread.run_sync(client.status, sockdir)
            assert code == client.OK
            c = await Client.connect(server.path)
            assert (await c.request("ping"))["ok"] is True
            for sock in idle:
                await sock.aclose()

    run(main)


def test_an_op_that_does_not_finish_gets_a_timeout_answer(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir, change_timeout=0.2) as server:
            c = await Client.connect(server.path)
            frame = await c.request("up", 1, config="/x/slow.conf")
            assert frame["error"]["code"] == proto.TIMEOUT
            assert (await c.request("ping", 2))["ok"] is True

    run(main)


def _entry(msg: str) -> dict[str, Any]:
    return {"seq": 0, "ts": 0.0, "level": "INFO", "logger": "tunsup", "tunnel": None, "msg": msg}


def test_logs_backlog_and_follow_until_the_exit_event(sockdir: str) -> None:
    hub = LogHub(capacity=3)
    for i in range(5):
        hub.publish(_entry(f"old {i}"))

    async def main() -> None:
        async with serving(sockdir, hub) as server:
            c = await Client.connect(server.path)
            frame = await c.request("logs", 1, backlog=10)
            assert frame["result"] == {"backlog": 3, "follow": False}
            got = [await c.frame() for _ in range(3)]
            assert [g["log"]["msg"] for g in got if g] == ["old 2", "old 3", "old 4"]

            f = await Client.connect(server.path)
            frame = await f.request("logs", 2, backlog=1, follow=True)
            assert frame["result"] == {"backlog": 1, "follow": True}
            assert (await f.frame()) == {"log": {**_entry("old 4"), "seq": 5}}
            hub.publish(_entry("from the trio thread"))
            await trio.to_thread.run_sync(hub.publish, _entry("from a worker thread"))
            assert [(await f.frame() or {})["log"]["msg"] for _ in range(2)] == [
                "from the trio thread", "from a worker thread"]
            assert hub.subscribers == 1
            await server.finish({"type": "exit", "code": 0, "complete": True, "failures": []})
            assert (await f.frame()) == {"event": {"type": "exit", "code": 0, "complete": True,
                                                   "failures": []}}
            assert await f.frame() is None
            assert hub.subscribers == 0
            # A subscriber arriving while the service exits gets the event at once.
            late = await Client.connect(server.path)
            frame = await late.request("logs", 3, backlog=0, follow=True)
            assert frame["result"] == {"backlog": 0, "follow": True}
            assert (await late.frame() or {}).get("event", {}).get("complete") is True
            assert await late.frame() is None

    run(main)


@pytest.mark.parametrize("as_json", [True, False])
def test_logs_follow_ends_with_the_exit_in_the_chosen_format(
        sockdir: str, as_json: bool, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 10 item 21: with ``--json`` every line ``logs -f`` prints is
    JSON, the closing exit line included."""
    hub = LogHub()
    hub.publish(_entry("before"))
    event = {"type": "exit", "code": 0, "complete": True, "failures": []}

    async def main() -> None:
        async with serving(sockdir, hub) as server:
            async with trio.open_nursery() as nursery:
                codes: list[int] = []

                async def follow() -> None:
                    codes.append(await trio.to_thread.run_sync(
                        lambda: client.logs(sockdir, lines=1, follow=True, as_json=as_json)))

                nursery.start_soon(follow)
                with trio.fail_after(10):
                    while hub.subscribers != 1:  # the client has subscribed
                        await trio.sleep(0.01)
                hub.publish(_entry("live"))
                await server.finish(event)
            assert codes == [client.OK]

    run(main)
    lines = capsys.readouterr().out.splitlines()
    if as_json:
        parsed = [json.loads(line) for line in lines]
        assert [p["msg"] for p in parsed] == ["before", "live", "tunsup exited with code 0"]
        assert parsed[-1]["event"] == event
    else:
        assert lines[-1] == "-- tunsup exited with code 0 --"
        assert [line.split(": ", 1)[1] for line in lines[:-1]] == ["before", "live"]


def test_logs_without_lines_returns_at_once(sockdir: str) -> None:
    """Found from outside: ``logs -n 0`` waited 10 s for a line that never
    comes, then said the service did not answer (exit 4)."""
    hub = LogHub()
    hub.publish(_entry("before"))

    async def main() -> None:
        async with serving(sockdir, hub):
            with trio.fail_after(5):
                code = await trio.to_thread.run_sync(lambda: client.logs(sockdir, lines=0))
            assert code == client.OK

    run(main)


def test_a_follower_that_does_not_read_is_dropped(sockdir: str) -> None:
    """Its queue stays bounded (what does not fit is skipped), and once a
    frame cannot be sent within the send timeout it is dropped."""
    hub = LogHub()

    async def main() -> None:
        async with serving(sockdir, hub, follow_buffer=8, send_timeout=0.3) as server:
            lazy = await Client.connect(server.path)
            await lazy.send({"id": 1, "op": "logs", "backlog": 0, "follow": True})
            with trio.fail_after(5):
                while hub.subscribers != 1:
                    await trio.testing.wait_all_tasks_blocked()
            follower = next(iter(server._followers))
            with trio.fail_after(10):
                i = 0
                while hub.subscribers:
                    hub.publish(_entry(f"{i:05d} " + "x" * 2000))
                    i += 1
                    if i % 64 == 0:
                        await trio.sleep(0.01)
            assert follower.skipped > 0
            other = await Client.connect(server.path)
            assert (await other.request("ping"))["ok"] is True

    run(main)


def test_a_burst_is_skipped_not_fatal_and_the_exit_event_always_comes(sockdir: str) -> None:
    """Found from outside: a PreDown hook printing 5,000 lines at a stop
    filled every follower's queue before it could send, so the follower
    was dropped: ``tunsup stop`` then exited 3 ("exited without reporting
    how its teardown ended") after a complete teardown, and ``logs -f``
    ended as if the service had closed it.  Now the lines that do not fit
    are counted and said where they were, and the exit event comes after
    the rest of the queue."""
    hub = LogHub()
    event = {"type": "exit", "code": 0, "complete": True, "failures": []}

    async def main() -> None:
        async with serving(sockdir, hub, follow_buffer=8) as server:
            c = await Client.connect(server.path)
            frame = await c.request("logs", 1, backlog=0, follow=True)
            assert frame["result"] == {"backlog": 0, "follow": True}
            for i in range(100):  # in one go: the server's task cannot send meanwhile
                hub.publish(_entry(f"line {i}"))
            await server.finish(event)
            frames = []
            while (got := await c.frame()) is not None:
                frames.append(got)
            lines = [f["log"]["msg"] for f in frames if "log" in f]
            # The queue's 8, and one more if the server's task was waiting
            # on the queue (handed over directly).
            assert len(lines) in (8, 9) and lines == [f"line {i}" for i in range(len(lines))]
            assert frames[len(lines):] == [{"skipped": 100 - len(lines)}, {"event": event}], \
                frames[len(lines):]

    run(main)


def test_a_follower_that_goes_away_is_no_error(sockdir: str, control_log: _Records) -> None:
    """The server's send fails (the client shut its reading side) while the
    stream runs: the connection ends quietly (a debug line), nothing at
    ERROR, no traceback."""
    hub = LogHub()

    async def main() -> None:
        async with serving(sockdir, hub) as server:
            f = await Client.connect(server.path)
            assert (await f.request("logs", 1, backlog=0, follow=True))["ok"] is True
            f.stream.socket.shutdown(socket.SHUT_RD)
            with trio.fail_after(5):
                while hub.subscribers:
                    hub.publish(_entry("to a reader that is gone"))
                    await trio.testing.wait_all_tasks_blocked()
                while server.connections:
                    await trio.testing.wait_all_tasks_blocked()
            other = await Client.connect(server.path)
            assert (await other.request("ping"))["ok"] is True

    run(main)
    assert control_log.at_least(logging.WARNING) == []
    assert not any(r.exc_info for r in control_log.records)


def test_logs_rejects_bad_arguments(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            for args in ({"backlog": -1}, {"backlog": "x"}, {"follow": "yes"}):
                frame = await c.request("logs", 1, **args)
                assert frame["error"]["code"] == proto.BAD_ARGS

    run(main)


def test_socket_mode_group_and_removal(sockdir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the socket")

    async def main() -> None:
        path = os.path.join(sockdir, "control.sock")
        async with serving(sockdir, group=65534):
            st = os.stat(path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o660
            assert (st.st_uid, st.st_gid) == (0, 65534)
            assert sorted(os.listdir(sockdir)) == ["control.sock"]
        assert not os.path.exists(path)

    run(main)


def test_a_second_server_on_the_same_path_is_refused(sockdir: str) -> None:
    async def main() -> None:
        async with serving(sockdir) as first:
            second = ControlServer(first.path, FakeOps(), LogHub())
            with pytest.raises(OSError, match="another process serves"):
                await second.serve()
            c = await Client.connect(first.path)
            assert (await c.request("ping"))["ok"] is True

    run(main)


def test_a_stale_socket_file_is_replaced(sockdir: str) -> None:
    path = os.path.join(sockdir, "control.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays; nobody listens

    async def main() -> None:
        async with serving(sockdir) as server:
            c = await Client.connect(server.path)
            assert (await c.request("ping"))["ok"] is True

    run(main)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uid")


@needs_root
def test_peer_credentials(sockdir: str) -> None:
    """A non-root peer: kept out by the file mode (0660); let in by a
    loosened mode it gets the server's refusal; as a member of the
    configured group it is served."""
    ping = b'{"id": 1, "op": "ping"}\n'

    async def main() -> None:
        async with serving(sockdir) as server:
            denied = await trio.to_thread.run_sync(exchange_as, 65534, 65534, server.path, ping)
            assert denied == {"error": "PermissionError"}
            os.chmod(server.path, 0o666)  # a mistake on the file system ...
            refused = await trio.to_thread.run_sync(exchange_as, 65534, 65534, server.path, ping)
            frame = json.loads(str(refused["reply"]))
            assert frame["error"]["code"] == proto.FORBIDDEN  # ... the server still refuses
            assert "uid 65534" in frame["error"]["message"]
            c = await Client.connect(server.path)
            assert (await c.request("ping"))["ok"] is True
        async with serving(sockdir, group=65534) as server:
            served = await trio.to_thread.run_sync(exchange_as, 65534, 65534, server.path, ping)
            assert json.loads(str(served["reply"]))["result"]["pong"] is True
            # A supplementary group counts too (SO_PEERGROUPS).
            os.chmod(server.path, 0o666)
            other = await trio.to_thread.run_sync(
                lambda: exchange_as(65533, 100, server.path, ping, groups=[65534]))
            assert json.loads(str(other["reply"]))["result"]["pong"] is True
            # Group members may not name a wg-quick file: its hooks run as root.
            up = b'{"id": 2, "op": "up", "config": "/etc/wg/x.conf"}\n'
            refused = await trio.to_thread.run_sync(exchange_as, 65534, 65534, server.path, up)
            frame = json.loads(str(refused["reply"]))
            assert frame["id"] == 2 and frame["error"]["code"] == proto.FORBIDDEN
            assert server.ops.calls == []  # type: ignore[attr-defined]
            down = b'{"id": 3, "op": "down", "name": "wg0"}\n'
            answered = await trio.to_thread.run_sync(exchange_as, 65534, 65534, server.path,
                                                     down)
            assert json.loads(str(answered["reply"]))["error"]["code"] == proto.NOT_FOUND

    run(main)


def test_serve_fails_early_for_a_path_too_long(tmp_path: Path) -> None:
    path = str(tmp_path / ("x" * 120) / "control.sock")

    async def main() -> None:
        server = ControlServer(path, FakeOps(), LogHub())
        with pytest.raises(OSError, match="too long"):
            await server.serve()

    run(main)


# The client's frame codec: json's C scanner and encoder used directly (no
# `import json`, which loads re and enum); it must read and write every
# frame exactly as json.loads / json.dumps do.
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), _JSON, max_size=5))
def test_frame_codec_writes_and_reads_as_json_does(frame: dict[str, Any]) -> None:
    try:
        expected = json.dumps(frame, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:  # a lone surrogate: sent \u-escaped
        expected = json.dumps(frame, separators=(",", ":")).encode()
    encoded = proto.encode(frame)
    assert encoded == expected + b"\n"
    assert proto.decode(encoded) == json.loads(encoded) == frame


@pytest.mark.parametrize("text", [
    b'{"a":1}', b'  {"a": [1, 2.5e3, -0, true, null]} \r\n', b'"x"', b"NaN", b"-Infinity",
    b'{"s":"\\u00e9\\ud800"}', b'{"a":1,}', b"{", b"", b"  ", b'{"a":1}x', b"[1,]", b"\xff",
    b'"\\q"', b"01", b"{'a':1}", b"1 2"])
def test_frame_decoder_accepts_and_refuses_what_json_loads_does(text: bytes) -> None:
    try:
        expected: object = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            proto.decode(text)
        return
    assert repr(proto.decode(text)) == repr(expected)


def test_frame_encoder_refuses_what_json_dumps_refuses() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        proto.encode({"a": object()})
    looped: dict[str, Any] = {}
    looped["self"] = looped
    with pytest.raises(ValueError, match="Circular"):
        proto.encode(looped)


def test_at_the_exit_a_long_queue_gives_way_to_the_event(sockdir: str) -> None:
    """Found by an independent review: the exit event waited behind up to
    follow_buffer queued entries, and finish() waits only finish_timeout
    for them: a client printing slowly (a terminal over SSH) after a burst
    got no event, and ``stop`` exited 3 after a complete teardown.  At the
    exit the last FINAL_ENTRIES queued go, the older ones are counted."""
    from tunsup.control.server import FINAL_ENTRIES

    hub = LogHub()
    event = {"type": "exit", "code": 0, "complete": True, "failures": []}

    async def main() -> None:
        async with serving(sockdir, hub, follow_buffer=1000) as server:
            c = await Client.connect(server.path)
            assert (await c.request("logs", 1, backlog=0, follow=True))["result"]["follow"]
            for i in range(600):  # in one go: queued, nothing sent yet
                hub.publish(_entry(f"line {i}"))
            await server.finish(event)
            frames = []
            while (got := await c.frame()) is not None:
                frames.append(got)
            assert frames == [{"skipped": 600 - FINAL_ENTRIES},
                              *({"log": {**_entry(f"line {i}"), "seq": i + 1}}
                                for i in range(600 - FINAL_ENTRIES, 600)),
                              {"event": event}], frames[:3]

    run(main)


@needs_root
def test_the_group_cannot_take_every_connection_with_log_subscriptions(sockdir: str) -> None:
    """Found from outside: a member of the group holding 128 ``logs -f``
    (never idle, so never evicted) locked everyone out, root included:
    ``status`` got no answer and ``stop`` exited 3 after a complete
    teardown.  The group's subscriptions are capped (``max_group_followers``,
    here 1); root's are not."""
    follow = b'{"id": 1, "op": "logs", "backlog": 0, "follow": true}\n'

    def hold_as_member(path: str) -> tuple[int, int, str]:
        """A forked member that subscribes, writes the answer's first line
        to a pipe and holds the stream until its other pipe closes:
        (pid, that pipe's write end, the line)."""
        out_r, out_w = os.pipe()
        in_r, in_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child
            try:
                os.close(out_r)
                os.close(in_w)
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.connect(path)
                sock.sendall(follow)
                os.write(out_w, sock.recv(65536).split(b"\n")[0] + b"\n")
                os.read(in_r, 1)  # until the test closes it
            finally:
                os._exit(0)
        os.close(out_w)
        os.close(in_r)
        with os.fdopen(out_r) as reader:
            return pid, in_w, reader.readline()

    async def main() -> None:
        async with serving(sockdir, group=65534, max_group_followers=1) as server:
            c = await Client.connect(server.path)  # root's: not counted
            assert (await c.request("logs", 1, backlog=0, follow=True))["result"]["follow"]
            pid, release, line = await trio.to_thread.run_sync(hold_as_member, server.path)
            try:
                assert json.loads(line)["result"]["follow"] is True, line
                reply = await trio.to_thread.run_sync(
                    exchange_as, 65534, 65534, server.path, follow)
                refused = json.loads(str(reply["reply"]).splitlines()[0])
                assert refused["error"]["code"] == proto.BUSY, refused
                assert "too many log subscriptions of the group (1)" in \
                    refused["error"]["message"]
                # Root still gets another, and an answer.
                d = await Client.connect(server.path)
                assert (await d.request("logs", 2, backlog=0, follow=True))["result"]["follow"]
                assert (await (await Client.connect(server.path)).request("ping", 3))["ok"]
            finally:
                os.close(release)
                await trio.to_thread.run_sync(os.waitpid, pid, 0)

    run(main)


@pytest.mark.parametrize(("usec", "interval"), [
    ("1", 0.01), ("20000", 0.01), ("200000", 0.1), ("0", None), ("x", None)])
def test_the_watchdog_interval_has_a_floor(monkeypatch: pytest.MonkeyPatch, usec: str,
                                           interval: float | None) -> None:
    """Found from outside: WATCHDOG_USEC=1 made the service ping 22,000
    times a second, its event loop at 100 % CPU."""
    from tunsup.host import sdnotify

    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert sdnotify.watchdog_interval() == interval
