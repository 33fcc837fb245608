"""Logging set-up: lines go to stderr from a dedicated thread, and into a
bounded ring buffer that live subscribers can follow.

The trio thread only puts records on a queue; a listener thread does the
writing, so a stalled stderr consumer can never block the event loop (and
with it SIGTERM handling and teardown).

Every record also becomes a small dict (an *entry*: ``seq``, ``ts``,
``level``, ``logger``, ``tunnel``, ``msg``) kept in :data:`HUB`, a ring of
the last :data:`RING_SIZE` entries.  Subscribers (the control plane's
``logs`` and ``stop`` streams) register a callback that gets every new
entry, in order, from the thread that logged it; callbacks must not block
and must not log.  Records logged through a tunnel's logger (its helper's
output and hooks included) are tagged with the tunnel's name.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

from ._logformat import format_log as format_log

#: How many recent entries ``tunsup logs`` can show.
RING_SIZE = 1000

Entry = dict[str, Any]
Subscriber = Callable[[Entry], None]

_listener: _Writer | None = None
_handler: logging.Handler | None = None


def _short_name(name: str) -> str:
    # "tunsup.wg0" -> "wg0", "tunsup" -> "tunsup", "tunsup.dns" -> "dns"
    return name.split(".", 1)[1] if name.startswith("tunsup.") else name


def entry_from_record(record: logging.LogRecord) -> Entry:
    """The entry (JSON-safe dict) of a record; ``seq`` is set by the hub."""
    msg = record.getMessage()
    if record.exc_info:
        msg += "\n" + logging.Formatter().formatException(record.exc_info)
    return {
        "seq": 0,
        "ts": record.created,
        "level": record.levelname,
        "logger": _short_name(record.name),
        "tunnel": getattr(record, "tunnel", None),
        "msg": msg,
    }


class LogHub:
    """A ring of recent entries plus live subscribers.  Thread-safe."""

    def __init__(self, capacity: int = RING_SIZE) -> None:
        # Re-entrant: a subscriber callback that (wrongly) logs must not
        # deadlock the thread that logged.
        self._lock = threading.RLock()
        self._ring: collections.deque[Entry] = collections.deque(maxlen=capacity)
        self._subscribers: dict[int, Subscriber] = {}
        self._next_id = 0
        self._seq = 0

    def publish(self, entry: Entry) -> None:
        """Number ``entry``, keep it, and hand it to every subscriber."""
        with self._lock:
            self._seq += 1
            entry["seq"] = self._seq
            self._ring.append(entry)
            for callback in list(self._subscribers.values()):
                # A broken subscriber must not break logging.
                with contextlib.suppress(Exception):
                    callback(entry)

    def recent(self, n: int) -> list[Entry]:
        """The last ``n`` entries, oldest first."""
        with self._lock:
            return list(self._ring)[-n:] if n > 0 else []

    def subscribe(self, callback: Subscriber, backlog: int = 0) -> tuple[list[Entry], Callable[[],
                                                                                       None]]:
        """The last ``backlog`` entries and, atomically with them, a
        subscription: every later entry goes to ``callback`` (no gap, no
        duplicate).  Returns (backlog entries, unsubscribe function)."""
        with self._lock:
            key = self._next_id
            self._next_id += 1
            self._subscribers[key] = callback
            past = list(self._ring)[-backlog:] if backlog > 0 else []

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers.pop(key, None)

        return past, unsubscribe

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


#: The process's hub, fed once :func:`setup_logging` has run.
HUB = LogHub()


def _human_line(entry: Entry) -> str:
    return format_log(entry)


def _json_line(entry: Entry) -> str:
    """One JSON object per line (``run --json-logs``)."""
    return json.dumps({k: v for k, v in entry.items() if k != "seq"}, ensure_ascii=False)


class _Handler(logging.Handler):
    """Each record becomes its entry once, on the thread that logged it:
    published to the hub (if any) and queued for the writer thread, which
    formats and writes it.  (A handler each for the hub and the queue
    built the entry twice and copied the record: ~90 us of the trio
    thread per line, 8 lines per tunnel that starts.)"""

    def __init__(self, q: queue.SimpleQueue[Entry | None], hub: LogHub | None) -> None:
        super().__init__()
        self.queue = q
        self.hub = hub

    def emit(self, record: logging.LogRecord) -> None:
        try:
            entry = entry_from_record(record)
            if self.hub is not None:
                self.hub.publish(entry)
            self.queue.put_nowait(entry)
        except Exception:
            self.handleError(record)


class _Writer:
    """The thread that formats and writes queued entries (what
    ``QueueListener`` would do with records)."""

    def __init__(self, q: queue.SimpleQueue[Entry | None], stream: TextIO,
                 line: Callable[[Entry], str]) -> None:
        self._queue = q
        self._stream = stream
        self._line = line
        self._thread = threading.Thread(target=self._run, name="tunsup-log", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            try:
                self._stream.write(self._line(entry) + "\n")
                self._stream.flush()
            except Exception:
                pass  # stderr is gone: nobody is left to tell

    def stop(self) -> None:
        """Write what is queued, then end the thread (blocks until then)."""
        self._queue.put_nowait(None)
        self._thread.join()


class _TunnelTag(logging.Filter):
    def __init__(self, tunnel: str) -> None:
        super().__init__()
        self.tunnel = tunnel

    def filter(self, record: logging.LogRecord) -> bool:
        record.tunnel = self.tunnel
        return True


def tag_tunnel(logger: logging.Logger, tunnel: str) -> None:
    """Tag every record logged through ``logger`` with ``tunnel``
    (idempotent)."""
    if not any(isinstance(f, _TunnelTag) for f in logger.filters):
        logger.addFilter(_TunnelTag(tunnel))


def setup_logging(*, debug: bool = False, json_lines: bool = False,
                  hub: LogHub | None = HUB) -> None:
    """Route the ``tunsup`` loggers to stderr through a writer thread, and
    into ``hub``."""
    global _listener, _handler
    stop_logging()
    q: queue.SimpleQueue[Entry | None] = queue.SimpleQueue()
    _listener = _Writer(q, sys.stderr, _json_line if json_lines else _human_line)
    _listener.start()
    root = logging.getLogger("tunsup")
    _handler = _Handler(q, hub)
    root.handlers[:] = [_handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def stop_logging() -> None:
    """Flush and stop the writer thread (at exit)."""
    global _listener, _handler
    if _handler is not None:
        root = logging.getLogger("tunsup")
        if _handler in root.handlers:
            # Records logged after this go nowhere (not to Python's
            # last-resort stderr handler either), as before the set-up.
            root.handlers[:] = [logging.NullHandler()]
        _handler = None
    if _listener is not None:
        _listener.stop()
        _listener = None
