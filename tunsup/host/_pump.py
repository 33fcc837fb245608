"""The one output-line pump of child processes (helpers and hooks).

A child's stdout/stderr is read in chunks and cut into lines for the log.
Two promises hold whatever the child writes:

* **bounded memory**: at most :data:`MAX_LINE` bytes of a line are kept; a
  longer line is logged cut at that length (saying so) and the rest of it,
  up to the next newline, is read and dropped;
* **linear time**: every byte read is looked at a constant number of times
  (only the new chunk is searched for newlines, never what is buffered).
"""

from __future__ import annotations

from collections.abc import Callable

import trio

#: Longest line kept, in bytes (16 KiB: far above any real log line of
#: wireguard-go or a hook, small enough that a runaway child costs nothing).
MAX_LINE = 16 * 1024
#: Bytes asked for per read.
CHUNK = 65536

#: ``emit(line, truncated)``: one line without its newline; ``truncated``
#: when it was longer than the cap and only its first bytes are given.
Emit = Callable[[bytes, bool], None]


async def pump_lines(stream: trio.abc.ReceiveStream, emit: Emit, *,
                     max_line: int = MAX_LINE) -> None:
    """Read ``stream`` to its end, calling ``emit`` for every line.

    A line over ``max_line`` bytes is emitted once, cut, as soon as the cap
    is reached (a child that never writes a newline is still logged); the
    rest of that line is dropped.  A closed or broken stream ends the pump
    like EOF.  Cancellation: at every read; what is buffered is dropped.
    """
    line = bytearray()
    skipping = False  # inside an over-long line whose head was emitted
    try:
        while chunk := await stream.receive_some(CHUNK):
            start = 0
            while start < len(chunk):
                end = chunk.find(b"\n", start)
                stop = len(chunk) if end < 0 else end
                if not skipping:
                    room = max_line - len(line)
                    line += chunk[start:min(stop, start + room)]
                    if stop - start > room:
                        emit(bytes(line), True)
                        line.clear()
                        skipping = True
                if end < 0:
                    break
                if not skipping:
                    emit(bytes(line), False)
                line.clear()
                skipping = False
                start = end + 1
    except (trio.ClosedResourceError, trio.BrokenResourceError):
        pass
    if line:
        emit(bytes(line), False)


def truncation_note(max_line: int = MAX_LINE) -> str:
    """What a log line says after a line cut by :func:`pump_lines`."""
    return f" [line truncated: longer than {max_line} bytes, the rest was dropped]"
