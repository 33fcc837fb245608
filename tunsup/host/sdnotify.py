"""systemd's notify protocol (``sd_notify``), without libsystemd.

A no-op unless ``NOTIFY_SOCKET`` is set.  Sends are non-blocking: a full
queue on systemd's side drops the message rather than stalling the caller.
The service sends ``READY=1`` once every tunnel is up, ``STATUS=`` lines,
``STOPPING=1``, and ``WATCHDOG=1`` every :func:`watchdog_interval` seconds
from a task of its event loop (so a wedged loop stops the pings).
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


#: Shortest time between two ``WATCHDOG=1`` pings, in seconds.
MIN_WATCHDOG_INTERVAL = 0.01


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings: half of ``WATCHDOG_USEC``, when
    systemd asks this process for them (``WATCHDOG_PID`` unset or ours)."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not os.environ.get("NOTIFY_SOCKET"):
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    # A floor: WATCHDOG_USEC=1 must not make the event loop spin (22,000
    # pings a second were seen); systemd's own granularity is coarser.
    return max(value / 2e6, MIN_WATCHDOG_INTERVAL) if value > 0 else None
