"""Talk to a unix socket as another user, from a forked child.

SO_PEERCRED records who connected, so the test needs a process that really
runs as that uid.  The child only makes system calls (setgroups, setgid,
setuid, connect, send, recv) and reports through a pipe; the parent reaps
it.  Blocking: call it from a test thread, not a trio thread.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence


def exchange_as(uid: int, gid: int, path: str, payload: bytes, *,
                groups: Sequence[int] = (), timeout: float = 10.0) -> dict[str, object]:
    """Connect to ``path`` as ``uid``/``gid``, send ``payload``, read one
    line (or until EOF).  Returns ``{"error": errno name}`` when the connect fails, else
    ``{"reply": text}``."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(read_fd)
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            result: dict[str, object]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except OSError as exc:
                result = {"error": type(exc).__name__}
            else:
                sock.sendall(payload)
                data = b""
                while b"\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                result = {"reply": data.decode(errors="replace")}
            os.write(write_fd, json.dumps(result).encode())
        except BaseException as exc:
            os.write(write_fd, json.dumps({"child_failed": repr(exc)}).encode())
            code = 1
        finally:
            os._exit(code)
    os.close(write_fd)
    try:
        data = b""
        while chunk := os.read(read_fd, 65536):
            data += chunk
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    return dict(json.loads(data))
