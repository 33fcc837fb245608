"""One log entry as one human line, without the logging machinery: the
client commands (``logs``, ``stop``) print the service's entries with it and
must start fast, so this module imports only :mod:`time`."""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


def format_log(entry: dict[str, Any]) -> str:
    """A log entry as one human line: ``HH:MM:SS.mmm LEVEL   source: message``
    (the service's stderr format)."""
    ts = float(entry.get("ts") or 0.0)
    stamp = time.strftime("%H:%M:%S", time.localtime(ts))
    millis = int((ts - int(ts)) * 1000)
    level = f"{entry.get('level', '')!s:<7}"
    return f"{stamp}.{millis:03d} {level} {entry.get('logger', '')}: {entry.get('msg', '')}"
