"""Ask wireguard-go its version while the service is still importing.

A tunnel with its own TUN device needs to know the framing its helper
expects before it can create the device (see
:func:`tunsup.host.tun.detect_header`), and that is a ``wireguard-go
--version`` run: a process and a Go runtime start, 4-5 ms here, waited for
on the path of every cold start.  ``tunsup run`` knows its helpers as soon
as it has read its configuration, ~100 ms before the first tunnel starts
(trio and the engine are imported in between), so it starts those runs
right there, in plain :mod:`subprocess`: they end on the other CPU while
this one imports, and :func:`take` hands the finished process to
``detect_header``, which reads its answer without starting another.

:func:`start` only looks the binary up and spawns it (``Popen`` returns
once the exec is done; an error is ignored: ``detect_header`` asks again
and reports it).  What nobody took (a tunnel with a fixed framing, a start
that failed first, a binary replaced meanwhile) is killed and reaped by
:func:`discard`, which the caller runs once trio has returned.  No trio
here: this module runs before it is imported.

Known limit: the lookup and the exec run on the main thread, not bounded
(``tunsup run``'s check of the configuration already looks every helper up
in PATH there, so a helper on a hung mount held up a start before this
too); SIGKILL ends such a start, and nothing was applied by then.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable

#: A helper binary as it is on disk: (path, device, inode, size, mtime).
Identity = tuple[str, int, int, int, int]


class Started:
    """A ``--version`` run: the process and a pidfd to wait for its exit
    on (readable once it has exited)."""

    __slots__ = ("pidfd", "proc")

    def __init__(self, proc: subprocess.Popen[bytes], pidfd: int) -> None:
        self.proc = proc
        self.pidfd = pidfd


#: ``--version`` runs started and not yet taken, by binary.
_STARTED: dict[Identity, Started] = {}
#: Taken runs that could not be reaped in time (killed, stuck in the
#: kernel): :func:`discard` tries once more.
_LEFT: list[subprocess.Popen[bytes]] = []
#: How long :func:`discard` waits for each killed process to be reaped.
REAP_TIMEOUT = 1.0


def binary_identity(program: str) -> Identity | None:
    """What identifies the file ``program`` runs (found as exec would find
    it), or None when it cannot be found."""
    path = program if "/" in program else shutil.which(program)
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.abspath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def is_wireguard_go(program: str) -> bool:
    """True for the helpers whose framing depends on their release."""
    return os.path.basename(program).startswith("wireguard-go")


def version_argv(program: str) -> list[str]:
    return [program, "--version"]


def version_env() -> dict[str, str]:
    # wireguard-go daemonizes unless told not to (it does not for
    # --version, but a wrapper script might).
    return {**os.environ, "WG_PROCESS_FOREGROUND": "1"}


def start(programs: Iterable[str]) -> None:
    """Start ``--version`` of each wireguard-go binary in ``programs``
    (once per binary), without waiting for any.  Errors are ignored."""
    for program in programs:
        if not is_wireguard_go(program):
            continue
        identity = binary_identity(program)
        if identity is None or identity in _STARTED:
            continue
        try:
            proc = subprocess.Popen(
                version_argv(identity[0]), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL, env=version_env())
        except OSError:
            continue
        assert proc.stdout is not None
        # Read later without blocking, whatever the process does.
        os.set_blocking(proc.stdout.fileno(), False)
        try:
            pidfd = os.pidfd_open(proc.pid)
        except (OSError, AttributeError):  # no pidfds: detect_header asks itself
            _reap(proc)
            if proc.returncode is None:  # stuck in the kernel: try again at the end
                _LEFT.append(proc)
            continue
        _STARTED[identity] = Started(proc, pidfd)


def take(identity: Identity) -> Started | None:
    """The run :func:`start` began for this binary, now the caller's to
    finish (wait for it, read it, close the pidfd, reap it or hand it to
    :func:`reap_later`); None if there is none."""
    return _STARTED.pop(identity, None)


def reap_later(proc: subprocess.Popen[bytes]) -> None:
    """``proc`` (killed) could not be reaped without waiting: :func:`discard`
    reaps it."""
    _LEFT.append(proc)


def read_available(proc: subprocess.Popen[bytes], limit: int = 64 << 10) -> bytes:
    """What ``proc`` wrote to its stdout so far (at most ``limit`` bytes),
    without blocking; closes the pipe."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    chunks: list[bytes] = []
    size = 0
    try:
        while size < limit:
            try:
                chunk = os.read(fd, limit - size)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        proc.stdout.close()
    return b"".join(chunks)


def discard() -> None:
    """Kill and reap every run nobody took (a start that failed before its
    tunnels did, a tunnel set to a fixed framing) or that could not be
    reaped.  Waits up to :data:`REAP_TIMEOUT` for each (one stuck in the
    kernel is left to init): for the end of the process, after trio has
    returned."""
    while _STARTED:
        _, run = _STARTED.popitem()
        os.close(run.pidfd)
        _LEFT.append(run.proc)
    while _LEFT:
        _reap(_LEFT.pop())


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(REAP_TIMEOUT)
    if proc.stdout is not None:
        proc.stdout.close()
