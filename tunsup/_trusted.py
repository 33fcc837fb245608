"""Reading a file of code tunsup trusts as it trusts its own ``.pyc``
files (the attrs code cache, the module bundle).  Imports only what the
interpreter's start has imported already: it is read before the modules
the bundle serves."""

from __future__ import annotations

import os
import stat


def open_trusted(path: str, limit: int) -> tuple[int, int]:
    """An fd of ``path`` and its size, if it is a regular file of at most
    ``limit`` bytes, owned by root or this user and writable by nobody
    else; OSError otherwise.  Opened without blocking, so that a FIFO or a
    device left at the path cannot hold up a start."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            raise OSError(f"{path}: not a regular file of at most {limit} bytes")
        # Code is run from it: only as trusted as its writers (as a .pyc).
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise OSError(f"{path}: writable by others than root and this user")
    except BaseException:
        os.close(fd)
        raise
    return fd, st.st_size


def read_trusted(path: str, limit: int) -> bytes:
    """The bytes of ``path``, checked as :func:`open_trusted` says."""
    fd, size = open_trusted(path, limit)
    try:
        chunks = []
        left = size + 1  # a file that grew meanwhile is refused
        while left > 0 and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise OSError(f"{path}: changed while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def remove_other_tags(path: str, pattern: str) -> None:
    """Remove the files beside ``path`` named by ``pattern`` (with
    ``{tag}`` in it) for another tag than ``path``'s own: those of other
    interpreters or versions, which each upgrade would leave behind."""
    directory, keep = os.path.split(path)
    prefix, suffix = pattern.split("{tag}")
    for name in os.listdir(directory):
        if name != keep and name.startswith(prefix) and name.endswith(suffix):
            try:  # noqa: SIM105 (contextlib: an import this module avoids)
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
