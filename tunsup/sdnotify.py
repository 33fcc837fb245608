"""systemd's notify protocol (``sd_notify``), without libsystemd.

A no-op unless ``NOTIFY_SOCKET`` is set.  Sends are non-blocking: a full
queue on systemd's side drops the message rather than stalling the caller.
"""

from __future__ import annotations

import contextlib
import os
import socket


def notify(*lines: str) -> bool:
    """Send ``KEY=VALUE`` lines (e.g. ``READY=1``); True if sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    payload = "\n".join(lines).encode()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock,
        contextlib.suppress(OSError),
    ):
        sock.sendto(payload, socket.MSG_DONTWAIT, address)
        return True
    return False
