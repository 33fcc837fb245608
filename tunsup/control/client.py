"""Client commands: ``tunsup status | stop | up | down | logs``.

They talk to a running service over its control socket
(``runtime_dir/control.sock``, see :mod:`tunsup.control.protocol`) and import
neither trio nor pyroute2 — only the standard library and the trio-free
:mod:`tunsup.control.protocol` and :mod:`tunsup.pidfile` — so that ``status``
answers in tens of milliseconds.  Every wait is bounded.

``stop`` finds the service through its pid file (pid *and* start time
verified), opens a pidfd on it (so the signal and the wait can only ever
reach that process), subscribes to its log stream, sends SIGTERM through
the pidfd, prints the teardown as it happens, and waits on the pidfd and the
socket with ``poll``.  The service sends an exit event saying whether
teardown completed just before it exits.
"""

from __future__ import annotations

# _socket, not socket: the wrapper module builds its enums and imports
# selectors at start (milliseconds of every client command), and a blocking
# AF_UNIX stream needs none of it.  signal (enums too) only for ``stop``;
# json (which loads re and enum) only to print JSON: frames are read with
# protocol.decode; contextlib (collections, functools) only for ``stop --force``.
import _socket
import os
import select
import sys
import time

from .. import pidfile
from .._errors import ExitCode, StatusCode
from .._logformat import format_log
from .._paths import DEFAULT_RUNTIME_DIR
from . import protocol as proto

# Annotations only (``typing`` and ``collections.abc`` cost a client start
# several milliseconds).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

# Short names for the exit codes, all defined in tunsup._errors.
OK = ExitCode.OK
FAILED = ExitCode.FAILURE
USAGE = ExitCode.USAGE
INCOMPLETE = ExitCode.TEARDOWN_INCOMPLETE
UNKNOWN = ExitCode.UNKNOWN
NOT_RUNNING = ExitCode.NOT_RUNNING
STATUS_DEAD = StatusCode.DEAD
STATUS_NOT_RUNNING = StatusCode.NOT_RUNNING
STATUS_UNKNOWN = StatusCode.UNKNOWN

_CODE_EXIT = {
    proto.CONFIG: USAGE,
    proto.BAD_ARGS: USAGE,
    proto.INCOMPLETE: INCOMPLETE,
    proto.FORBIDDEN: UNKNOWN,
}


class NotRunning(Exception):
    """No service answers on the control socket."""


class ControlError(Exception):
    """The service answered with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class _Trace:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __call__(self, direction: str, data: object) -> None:
        if self.enabled:
            print(f"tunsup: control {direction} {data}", file=sys.stderr, flush=True)


def runtime_dir_of(runtime_dir: str | None, config: str | None) -> str:
    """``--runtime-dir``, else the TOML file's ``runtime_dir``, else the
    default.  The TOML is read with ``tomllib`` only (fast); ``tunsup check``
    validates it fully."""
    if runtime_dir:
        return runtime_dir
    if config:
        import tomllib

        from .._errors import ConfigError
        from .._input import read_config_file

        try:
            value = tomllib.loads(read_config_file(config).decode()).get("runtime_dir")
        except ConfigError as exc:
            raise SystemExit(_usage(str(exc))) from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(_usage(f"cannot read {config}: {exc}")) from None
        if isinstance(value, str) and value:
            # Relative to the TOML file's directory, as for the service.
            return os.path.join(os.path.dirname(os.path.abspath(config)), value)
    return DEFAULT_RUNTIME_DIR


def _usage(message: str) -> int:
    print(f"tunsup: {message}", file=sys.stderr)
    return USAGE


class Connection:
    """One control connection (blocking socket with deadlines)."""

    def __init__(self, runtime_dir: str, *, timeout: float = 5.0, debug: bool = False) -> None:
        self.path = proto.socket_path(runtime_dir)
        self.trace = _Trace(debug)
        self._buf = bytearray()
        self._next_id = 1
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(self.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self.sock.close()
            raise NotRunning(f"{self.path}: {exc.strerror}") from None
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, op: str, **args: Any) -> int:
        rid = self._next_id
        self._next_id += 1
        frame = {"id": rid, "op": op, **args}
        self.trace("->", frame)
        self.sock.sendall(proto.encode(frame))
        return rid

    def frames(self, deadline: float) -> Iterator[dict[str, Any]]:
        """Frames as they arrive, until EOF; raises TimeoutError at
        ``deadline`` (monotonic; ``inf``: wait as long as it takes)."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                frame = proto.decode(line)
                self.trace("<-", line.decode(errors="replace"))
                if not isinstance(frame, dict):
                    raise ValueError("the service sent a frame that is not an object")
                yield frame
                continue
            if len(self._buf) > proto.MAX_RESPONSE:
                raise ValueError("the service sent an oversized frame")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from the service in time")
            self.sock.settimeout(None if remaining == float("inf") else remaining)
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise TimeoutError("no answer from the service in time") from None
            if not chunk:
                return
            self._buf += chunk

    def response(self, rid: int, deadline: float,
                 on_log: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """The result of request ``rid``; raises ControlError on an error
        answer, ConnectionError on EOF before it."""
        for frame in self.frames(deadline):
            if "log" in frame:
                if on_log is not None:
                    on_log(frame["log"])
                continue
            if frame.get("ok") is False:
                err = frame.get("error") or {}
                raise ControlError(str(err.get("code")), str(err.get("message")))
            if frame.get("id") == rid and frame.get("ok") is True:
                result = frame.get("result")
                return result if isinstance(result, dict) else {}
        raise ConnectionError("the service closed the connection")

    def request(self, op: str, *, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
        rid = self.send(op, **args)
        return self.response(rid, time.monotonic() + timeout)


# ----------------------------------------------------------------- helpers


def _dumps(value: object, **options: Any) -> str:
    """``json.dumps``, imported only when JSON is printed (``--json``)."""
    import json

    return json.dumps(value, **options)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f}s" if seconds >= 1 else f"{seconds * 1000:.0f}ms"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _connect_or_report(runtime_dir: str, debug: bool, timeout: float,
                       command: str) -> Connection | int:
    try:
        return Connection(runtime_dir, timeout=timeout, debug=debug)
    except NotRunning:
        print(f"tunsup {command}: tunsup is not running (no service on "
              f"{proto.socket_path(runtime_dir)})", file=sys.stderr)
        return NOT_RUNNING
    except PermissionError:
        print(f"tunsup {command}: permission denied on {proto.socket_path(runtime_dir)} "
              "(root or the [control] group only)", file=sys.stderr)
        return UNKNOWN
    except OSError as exc:
        print(f"tunsup {command}: cannot connect to {proto.socket_path(runtime_dir)}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        return UNKNOWN


def _error_exit(command: str, exc: Exception) -> int:
    if isinstance(exc, ControlError):
        print(f"tunsup {command}: {exc.message}", file=sys.stderr)
        return _CODE_EXIT.get(exc.code, FAILED)
    if isinstance(exc, TimeoutError):
        print(f"tunsup {command}: the service did not answer in time", file=sys.stderr)
        return UNKNOWN
    print(f"tunsup {command}: {exc}", file=sys.stderr)
    return FAILED


# ----------------------------------------------------------------- status


def status(runtime_dir: str, *, as_json: bool = False, debug: bool = False) -> int:
    """LSB exit codes: 0 running, 1 dead with a pid file left, 3 not
    running, 4 unknown (no permission, no answer)."""
    try:
        conn = Connection(runtime_dir, timeout=5.0, debug=debug)
    except NotRunning:
        return _not_running_status(runtime_dir, as_json)
    except PermissionError:
        print(f"tunsup status: permission denied on {proto.socket_path(runtime_dir)} "
              "(root or the [control] group only)", file=sys.stderr)
        return STATUS_UNKNOWN
    except OSError as exc:
        print(f"tunsup status: {exc.strerror or exc}", file=sys.stderr)
        return STATUS_UNKNOWN
    with conn:
        try:
            result = conn.request("status", timeout=15.0)
        except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
            if isinstance(exc, ConnectionError):
                return _not_running_status(runtime_dir, as_json)
            _error_exit("status", exc)
            return STATUS_UNKNOWN
    if as_json:
        print(_dumps({"running": True, **result}, indent=2))
    else:
        _print_status(result)
    return StatusCode.RUNNING


def _not_running_status(runtime_dir: str, as_json: bool) -> int:
    owner = pidfile.read(runtime_dir)
    if owner is not None and owner.alive():
        message = (f"tunsup (pid {owner.pid}) runs but does not answer on "
                   f"{proto.socket_path(runtime_dir)}")
        code = STATUS_UNKNOWN
    elif owner is not None:
        message = (f"tunsup is not running, but its pid file remains (pid {owner.pid} is "
                   "gone, or another process now): it did not exit cleanly; 'tunsup "
                   "cleanup' undoes what it left")
        code = STATUS_DEAD
    else:
        message = "tunsup is not running"
        code = STATUS_NOT_RUNNING
    if as_json:
        print(_dumps({"running": False, "message": message}, indent=2))
    else:
        print(message)
    return code


def _print_status(result: dict[str, Any]) -> None:
    service = result.get("service", {})
    tunnels = result.get("tunnels", [])
    print(f"tunsup {service.get('state', '?')} (pid {service.get('pid')}, up "
          f"{_duration(service.get('uptime'))}): {len(tunnels)} tunnel(s)")
    if not tunnels:
        return
    rows = [("TUNNEL", "STATE", "HELPER", "UPTIME", "RESTARTS", "PEERS", "ROUTES", "PROBE")]
    for t in tunnels:
        rows.append((str(t.get("name")), str(t.get("state")), str(t.get("helper_pid") or "-"),
                     _duration(t.get("uptime")), str(t.get("restarts", 0)),
                     str(len(t.get("peers") or [])), str(t.get("routes", "-")),
                     _probe(t.get("last_probe"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for index, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if index == 0:
            continue
        t = tunnels[index - 1]
        if t.get("degraded_reason"):
            print(f"    degraded: {t['degraded_reason']}")
        if t.get("failure"):
            print(f"    failed: {t['failure']}")
        if t.get("peers_error"):
            print(f"    peers: unavailable ({t['peers_error']})")
        for p in t.get("peers") or []:
            age = p.get("last_handshake_age")
            handshake = "never" if age is None else f"{_duration(age)} ago"
            key = str(p.get("public_key", ""))
            print(f"    peer {key[:10]}…  endpoint {p.get('endpoint') or '-'}  "
                  f"handshake {handshake}  rx {_bytes(int(p.get('rx_bytes', 0)))}  "
                  f"tx {_bytes(int(p.get('tx_bytes', 0)))}")


def _probe(probe: Any) -> str:
    """The PROBE cell: how the last probe of the helper went, and when."""
    if not isinstance(probe, dict):
        return "-"
    outcome = "ok" if probe.get("ok") else "failed"
    age = probe.get("age")
    return outcome if age is None else f"{outcome} {_duration(age)} ago"


# ----------------------------------------------------------------- up / down


def up(runtime_dir: str, conf: str, *, debug: bool = False, timeout: float = 330.0) -> int:
    """Exit 0 up (or already up with this configuration), 1 failed (host
    restored), 2 bad file, 3 failed and teardown incomplete, 7 no service."""
    conn = _connect_or_report(runtime_dir, debug, 5.0, "up")
    if isinstance(conn, int):
        return conn
    with conn:
        try:
            result = conn.request("up", timeout=timeout, config=os.path.abspath(conf))
        except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
            return _error_exit("up", exc)
    took = result.get("took")
    if result.get("started"):
        print(f"tunnel {result.get('name')} up" + (f" in {took * 1000:.0f} ms" if took else ""))
    elif result.get("changed"):
        print(f"tunnel {result.get('name')} changed in place: {result['changed']}")
    elif result.get("rebuilt"):
        print(f"tunnel {result.get('name')} rebuilt: {result['rebuilt']}")
    else:
        print(f"tunnel {result.get('name')} already up with this configuration")
    return OK


def down(runtime_dir: str, name: str, *, debug: bool = False, timeout: float = 330.0) -> int:
    """Exit 0 down, 1 no such tunnel, 3 teardown incomplete, 7 no service."""
    conn = _connect_or_report(runtime_dir, debug, 5.0, "down")
    if isinstance(conn, int):
        return conn
    with conn:
        try:
            result = conn.request("down", timeout=timeout, name=name)
        except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
            return _error_exit("down", exc)
    took = result.get("took")
    print(f"tunnel {name} down" + (f" in {took * 1000:.0f} ms" if took else "") +
          "; host restored")
    return OK


def reload(runtime_dir: str, *, debug: bool = False, timeout: float = 330.0) -> int:
    """Exit 0 done, 1 a tunnel failed to start or change (its changes
    undone: host as before), 3 one's undo was incomplete, 7 no service."""
    conn = _connect_or_report(runtime_dir, debug, 5.0, "reload")
    if isinstance(conn, int):
        return conn
    with conn:
        try:
            result = conn.request("reload", timeout=timeout)
        except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
            return _error_exit("reload", exc)
    for key in ("started", "stopped", "restarted", "unchanged"):
        if result.get(key):
            print(f"{key}: {', '.join(result[key])}")
    for name, what in (result.get("changed") or {}).items():
        print(f"changed in place: {name}: {what}")
    for name, why in (result.get("rebuilt") or {}).items():
        print(f"rebuilt: {name}: {why}")
    for warning in result.get("warnings") or []:
        print(f"tunsup reload: warning: {warning}", file=sys.stderr)
    failed = result.get("failed") or {}
    incomplete = set(result.get("incomplete") or ())
    for name, why in failed.items():
        print(f"failed: {name}: {why}", file=sys.stderr)
    for name in sorted(incomplete):
        print(f"INCOMPLETE: {name}: not everything could be undone; the host is not as "
              "before (leftovers recorded for 'tunsup cleanup')", file=sys.stderr)
    # As the stop: 3 when the host could not be restored, else 1.
    return INCOMPLETE if incomplete else FAILED if failed else OK


# ----------------------------------------------------------------- logs


def logs(runtime_dir: str, *, lines: int = 100, follow: bool = False, as_json: bool = False,
         debug: bool = False) -> int:
    conn = _connect_or_report(runtime_dir, debug, 5.0, "logs")
    if isinstance(conn, int):
        return conn
    show = _log_printer(as_json)
    with conn:
        try:
            rid = conn.send("logs", backlog=lines, follow=follow)
            result = conn.response(rid, time.monotonic() + 10.0)
            count = int(result.get("backlog", 0))
            if not follow:
                if count <= 0:  # nothing comes: no frame to wait for
                    return OK
                for frame in conn.frames(time.monotonic() + 10.0):
                    if "log" in frame:
                        show(frame["log"])
                        count -= 1
                        if count <= 0:
                            break
                return OK
            for frame in conn.frames(float("inf")):
                if "log" in frame:
                    show(frame["log"])
                elif "skipped" in frame:
                    _show_skipped(as_json, frame["skipped"])
                elif "event" in frame:
                    event = frame["event"]
                    _log_end(as_json, f"tunsup exited with code {event.get('code')}", event)
                    return OK
            _log_end(as_json, "the service closed the log stream", {"type": "closed"})
            return OK
        except KeyboardInterrupt:
            return OK
        except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
            return _error_exit("logs", exc)


def _log_end(as_json: bool, message: str, event: dict[str, Any]) -> None:
    """The last line of ``logs -f``: how the stream ended.  With ``--json``
    it is JSON too (every line is): ``{"event": {...}, "msg": "..."}``."""
    if as_json:
        print(_dumps({"event": event, "msg": message}, ensure_ascii=False), flush=True)
    else:
        print(f"-- {message} --", flush=True)


def _show_skipped(as_json: bool, count: object) -> None:
    """The service skipped ``count`` entries of this stream (it fell behind
    a burst): said where they were.  ``tunsup logs`` shows the ones still
    in the service's ring."""
    message = f"{count} log line(s) skipped: this client fell behind"
    if as_json:
        print(_dumps({"skipped": count, "msg": message}, ensure_ascii=False), flush=True)
    else:
        print(f"-- {message} --", flush=True)


def _log_printer(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def show(entry: dict[str, Any]) -> None:
        if as_json:
            print(_dumps(entry, ensure_ascii=False), flush=True)
        else:
            print(format_log(entry), flush=True)

    return show


# ----------------------------------------------------------------- stop


def stop(runtime_dir: str, *, timeout: float = 90.0, force: bool = False,
         cleanup: Callable[[], int] | None = None, debug: bool = False) -> int:
    """Stop the service and stream its teardown.

    Exit 0 when it stopped and reported a complete teardown (or was not
    running), 3 when teardown left something (or it exited without saying),
    4 when it is still running after ``timeout`` seconds (or cannot be
    signalled).  With ``force``, a service still running at the timeout is
    SIGKILLed and ``cleanup`` (crash recovery) runs; without a ``cleanup``
    that is said and the exit code is 3."""
    owner = pidfile.read(runtime_dir)
    if owner is None:
        print("tunsup is not running")
        return OK
    try:
        pidfd = os.pidfd_open(owner.pid)
    except ProcessLookupError:
        pidfd = -1
    # Checked after the pidfd is open: if the start time matches now, the
    # pidfd refers to the service and nothing else, whatever happens next.
    if pidfd < 0 or not owner.alive():
        if pidfd >= 0:
            os.close(pidfd)
        print(f"tunsup is not running (its pid file names pid {owner.pid}, which is gone "
              "or another process now; "
              "if it crashed, 'tunsup cleanup' undoes what it left)")
        return OK
    try:
        return _stop(runtime_dir, owner, pidfd, timeout, force, cleanup, debug)
    finally:
        os.close(pidfd)


def _subscribe(runtime_dir: str, debug: bool, deadline: float) -> Connection | None:
    """A connection subscribed to the live log, or None (said why)."""
    try:
        conn = Connection(runtime_dir, timeout=max(0.1, deadline - time.monotonic()),
                          debug=debug)
    except (NotRunning, OSError) as exc:
        print(f"(no live log: cannot connect to the control socket: {exc})", file=sys.stderr)
        return None
    try:
        rid = conn.send("logs", backlog=0, follow=True)
        conn.response(rid, deadline)
    except (ControlError, TimeoutError, ConnectionError, ValueError, OSError) as exc:
        print(f"(no live log: {exc})", file=sys.stderr)
        conn.close()
        return None
    return conn


def _stop(runtime_dir: str, owner: pidfile.ProcessId, pidfd: int, timeout: float,
          force: bool, cleanup: Callable[[], int] | None, debug: bool) -> int:
    started = time.monotonic()
    deadline = started + timeout
    conn = _subscribe(runtime_dir, debug, min(deadline, started + 5.0))
    print(f"stopping tunsup (pid {owner.pid})", flush=True)
    import signal

    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
    except ProcessLookupError:
        pass
    except PermissionError:
        print(f"tunsup stop: not permitted to signal pid {owner.pid} (run as root)",
              file=sys.stderr)
        if conn is not None:
            conn.close()
        return UNKNOWN
    event, exited = _watch(conn, pidfd, deadline)
    took = time.monotonic() - started
    if not exited:
        print(f"tunsup (pid {owner.pid}) is still running after {timeout:g} s", flush=True)
        if not force:
            print("its teardown goes on; 'tunsup stop --force' kills it and cleans up",
                  file=sys.stderr)
            return UNKNOWN
        return _force(owner, pidfd, cleanup)
    if event is None:
        print(f"tunsup exited after {took:.2f} s without reporting how its teardown ended; "
              "'tunsup cleanup' undoes anything left", flush=True)
        return INCOMPLETE
    if event.get("complete"):
        print(f"tunsup stopped in {took:.2f} s: teardown complete, host restored "
              f"(exit code {event.get('code')})", flush=True)
        return OK
    print(f"tunsup stopped in {took:.2f} s: teardown INCOMPLETE (exit code "
          f"{event.get('code')}):", flush=True)
    for failure in event.get("failures") or []:
        print(f"  - {failure}", flush=True)
    return INCOMPLETE


def _watch(conn: Connection | None, pidfd: int,
           deadline: float) -> tuple[dict[str, Any] | None, bool]:
    """Print streamed log lines until the process exits (pidfd readable)
    and its stream ends, or until ``deadline``.  Returns (the exit event if
    one came, whether the process exited)."""
    show = _log_printer(False)
    event: dict[str, Any] | None = None
    exited = False
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    buf = bytearray()
    if conn is not None:
        conn.sock.setblocking(False)
        buf += conn._buf
        poller.register(conn.sock.fileno(), select.POLLIN)
    #: After the exit, the stream's last bytes get this long to arrive.
    drain_until: float | None = None

    def handle(frames: Iterator[dict[str, Any]]) -> None:
        nonlocal event
        for frame in frames:
            if "log" in frame:
                show(frame["log"])
            elif "skipped" in frame:
                _show_skipped(False, frame["skipped"])
            elif "event" in frame and frame["event"].get("type") == "exit":
                event = frame["event"]

    if conn is not None:
        handle(_split_frames(buf, conn.trace))  # what came with the subscription's answer
    while True:
        frames_done = conn is None
        if exited and frames_done:
            break
        now = time.monotonic()
        limit = deadline if drain_until is None else min(deadline, drain_until)
        if now >= limit:
            break
        for fd, _mask in poller.poll(max(1, int((limit - now) * 1000))):
            if fd == pidfd:
                exited = True
                drain_until = time.monotonic() + 2.0
                poller.unregister(pidfd)
            elif conn is not None:
                eof = _read_available(conn, buf)
                handle(_split_frames(buf, conn.trace))
                if eof:
                    poller.unregister(conn.sock.fileno())
                    conn.close()
                    conn = None
    if conn is not None:
        conn.close()
    return event, exited


def _read_available(conn: Connection, buf: bytearray) -> bool:
    """Append what the socket has; True at EOF (or a broken connection)."""
    while True:
        try:
            chunk = conn.sock.recv(1 << 20)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not chunk:
            return True
        buf += chunk
        if len(buf) > proto.MAX_RESPONSE:
            return True


def _split_frames(buf: bytearray, trace: _Trace) -> Iterator[dict[str, Any]]:
    while (end := buf.find(b"\n")) >= 0:
        line = bytes(buf[:end])
        del buf[: end + 1]
        trace("<-", line.decode(errors="replace"))
        try:
            frame = proto.decode(line)
        except ValueError:
            continue
        if isinstance(frame, dict):
            yield frame


def _force(owner: pidfile.ProcessId, pidfd: int, cleanup: Callable[[], int] | None) -> int:
    print(f"sending SIGKILL to pid {owner.pid}", flush=True)
    import contextlib
    import signal

    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    if not select.select([pidfd], [], [], 10.0)[0]:
        print(f"tunsup stop: pid {owner.pid} survived SIGKILL for 10 s", file=sys.stderr)
        return UNKNOWN
    if cleanup is None:
        print("killed. Crash recovery ('tunsup cleanup') is not available in this version: "
              "the tunnels' links, routes, DNS settings and helper processes may remain",
              flush=True)
        return INCOMPLETE
    print("killed; running crash recovery ('tunsup cleanup')", flush=True)
    return OK if cleanup() == OK else INCOMPLETE
