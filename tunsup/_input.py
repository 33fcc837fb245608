"""Reading files: regular files only, never blocking, bounded.

Every path that reads a configuration file (``check``, ``run``, the
service's ``up`` and reload, ``cleanup -c``, the clients' ``-c``) goes
through :func:`read_config_file`, so a FIFO, a device or a huge file gets
the same clear error everywhere instead of a hang or a MemoryError.  The
files tunsup reads that it did not write itself or that others may
replace (the pid file, journals, resolv.conf) go through
:func:`read_regular_file`, the same checks raising ``OSError``.
"""

from __future__ import annotations

import errno
import os
import stat

from ._errors import ConfigError

__all__ = ["MAX_CONFIG_BYTES", "read_config_file", "read_regular_file"]

#: Largest configuration file read (.conf or .toml).  A wg-quick file with
#: 10,000 AllowedIPs lines is about 500 KB; 4 MiB leaves ample room while
#: bounding the memory and time a mistaken path can cost.
MAX_CONFIG_BYTES = 4 * 1024 * 1024


class NotRegularFile(OSError):
    """What :func:`read_regular_file` found is not a regular file."""


class FileTooLarge(OSError):
    """What :func:`read_regular_file` found is larger than its limit."""


def read_config_file(path: str, limit: int = MAX_CONFIG_BYTES) -> bytes:
    """The contents of configuration file ``path``; raises :class:`ConfigError`
    (``FILE: not a regular file``, ``FILE: larger than N bytes``, ``FILE:
    cannot read: ...``): see :func:`read_regular_file`."""
    try:
        return read_regular_file(path, limit)
    except NotRegularFile:
        raise ConfigError(path, None, "not a regular file") from None
    except FileTooLarge:
        raise ConfigError(path, None, f"larger than {limit} bytes") from None
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read: {exc.strerror or exc}") from None


def read_regular_file(path: str, limit: int) -> bytes:
    """The contents of ``path``: :func:`read_regular_file_and_mode`."""
    return read_regular_file_and_mode(path, limit)[0]


def read_regular_file_and_mode(path: str, limit: int) -> tuple[bytes, int]:
    """The contents and permission bits of ``path``, a regular file of at
    most ``limit`` bytes.

    The file is opened with ``O_NONBLOCK`` (opening a FIFO does not wait
    for a writer), and the opened fd is checked with ``fstat``, so what is
    judged is what is read: anything but a regular file raises
    :class:`NotRegularFile`, a file of more than ``limit`` bytes (also one
    that grows while read) :class:`FileTooLarge`; both are ``OSError``, as
    is any error of the open or the reads (``FileNotFoundError``...).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", path)
        if st.st_size > limit:
            raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", path)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise FileTooLarge(errno.EFBIG, f"larger than {limit} bytes", path)
        return b"".join(chunks), stat.S_IMODE(st.st_mode)
    finally:
        os.close(fd)


def read_config_text(path: str, limit: int = MAX_CONFIG_BYTES) -> str:
    """:func:`read_config_file`, decoded as UTF-8; a bad byte is a
    :class:`ConfigError` at its line."""
    data = read_config_file(path, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, "is not valid UTF-8") from None
