"""trio's import without the ``ldconfig -p`` it runs: ~2 ms of a cold start.

trio names its worker threads with ``pthread_setname_np``.  To find that
function, ``trio._core._thread_cache`` calls
``ctypes.util.find_library("pthread")`` when it is imported, and on Linux
that runs ``/sbin/ldconfig -p``: a process (fork, exec, the whole library
cache printed and searched with a regular expression), 1.7-2.2 ms on a
2-vCPU machine, every ``tunsup run``.  Since glibc 2.34 the pthread
functions live in libc itself (``libpthread.so.0`` is an empty stub kept
for old binaries), so the answer is known without asking anyone:
``libc.so.6``, which every Python process on such a system has loaded.

:func:`pthread_from_libc` gives that answer while trio is imported, on such
a glibc only.  Elsewhere (musl, an older glibc, no ``confstr``) it changes
nothing and ``find_library`` runs as it always did.  Any other name, and
any call after the ``with`` block, goes to the real ``find_library``.
"""

from __future__ import annotations

import contextlib
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The first glibc whose libc holds the pthread functions.
MERGED = (2, 34)
#: What ``find_library("pthread")`` is answered with there.
LIBC = "libc.so.6"


def glibc_version() -> tuple[int, int] | None:
    """``(major, minor)`` of the C library if it is glibc, else None."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):  # no such name here: not glibc
        return None
    if not text:
        return None
    name, _, version = text.partition(" ")
    parts = version.split(".")
    if name != "glibc" or len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        return None
    return int(parts[0]), int(parts[1])


#: The blocks open now, and what they replaced ``find_library`` with and
#: will put back once the last of them ends (in whatever order they end).
_open = 0
_swap: tuple[Callable[[str], str | None], Callable[[str], str | None]] | None = None


@contextlib.contextmanager
def pthread_from_libc() -> Iterator[None]:
    """Within the block, ``ctypes.util.find_library("pthread")`` answers
    :data:`LIBC` at once on glibc >= 2.34; nothing changes elsewhere.  The
    real function is put back when the last block open ends (unless
    someone replaced it since).  Meant for the main thread at a start:
    another thread asking meanwhile gets the same answer, which is right
    on such a glibc."""
    global _open, _swap
    version = glibc_version()
    if version is None or version < MERGED:
        yield
        return
    import ctypes.util

    if _open == 0:
        real = ctypes.util.find_library

        def find_library(name: str) -> str | None:
            return LIBC if name == "pthread" else real(name)

        ctypes.util.find_library = find_library
        _swap = (find_library, real)
    _open += 1
    try:
        yield
    finally:
        _open -= 1
        if _open == 0 and _swap is not None:
            ours, original = _swap
            _swap = None
            if ctypes.util.find_library is ours:
                ctypes.util.find_library = original  # type: ignore[assignment]
