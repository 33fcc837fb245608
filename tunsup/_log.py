"""Logging set-up: lines go to stderr from a dedicated thread.

The trio thread only puts records on a queue; a listener thread does the
writing, so a stalled stderr consumer can never block the event loop (and
with it SIGTERM handling and teardown).
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import time

_listener: logging.handlers.QueueListener | None = None


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        # "tunsup.wg0" -> "wg0", "tunsup" -> "tunsup", "tunsup.dns" -> "dns"
        short = name.split(".", 1)[1] if name.startswith("tunsup.") else name
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        level = f"{record.levelname:<7}"
        line = f"{stamp}.{int(record.msecs):03d} {level} {short}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def setup_logging(*, debug: bool = False) -> None:
    """Route the ``tunsup`` loggers to stderr through a writer thread."""
    global _listener
    stop_logging()
    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(_Formatter())
    _listener = logging.handlers.QueueListener(q, stream, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger("tunsup")
    root.handlers[:] = [logging.handlers.QueueHandler(q)]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False


def stop_logging() -> None:
    """Flush and stop the writer thread (at exit)."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
