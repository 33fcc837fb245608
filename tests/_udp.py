"""A 1 kHz UDP stream and its counters, for the leak tests (run inside a
scratch namespace with ``ip netns exec``).

``send HOST PORT LOG``: one datagram per millisecond to HOST:PORT, each
carrying its sequence number; LOG gets ``seq monotonic ok|errno`` per
datagram (flushed each time).  ``count PORT LOG``: every datagram received
on 0.0.0.0:PORT is logged as its sequence number.  Both run until SIGTERM.
CLOCK_MONOTONIC is one clock for every namespace, so the test can cut the
logs into the windows of its steps.
"""

from __future__ import annotations

import signal
import socket
import sys
import time


def _stop(*_: object) -> None:
    raise SystemExit(0)


def send(host: str, port: int, log_path: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with open(log_path, "w", buffering=1) as log:
        seq = 0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            try:
                sock.sendto(seq.to_bytes(8, "big"), (host, port))
                outcome = "ok"
            except OSError as exc:
                outcome = str(exc.errno)
            log.write(f"{seq} {now:.6f} {outcome}\n")
            seq += 1
            next_at += 0.001
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_at = time.monotonic()


def count(port: int, log_path: str) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", port))
    with open(log_path, "w", buffering=1) as log:
        log.write("ready\n")
        while True:
            data = sock.recv(64)
            log.write(f"{int.from_bytes(data[:8], 'big')}\n")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop)
    if sys.argv[1] == "send":
        send(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        count(int(sys.argv[2]), sys.argv[3])
