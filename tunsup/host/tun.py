"""A TUN device owned by tunsup, handed to the helper as a file descriptor.

When the helper creates its own TUN, the device dies with it: a crashed
helper takes the interface, its addresses and routes along, and until it is
restarted traffic meant for the tunnel follows whatever route is left (a
default route through the LAN).  Here tunsup creates the device itself and
makes it persistent, so the interface and everything on it outlive any one
helper; wireguard-go attaches to it through ``WG_TUN_FD``.

Framing: with ``IFF_NO_PI`` every read and write on the fd is a bare IP
packet; without it each carries a 4-byte packet-information header.  The
helper must agree: wireguard-go up to 0.0.20230223 expects the header on a
handed-over fd, later versions expect none.  :func:`detect_header` asks
wireguard-go its version to choose.

The device is created in a worker thread (``open``, ``TUNSETIFF``,
``TUNSETPERSIST``, then ``O_NONBLOCK``; every ioctl off the trio thread).
The fd is never registered with trio: tunsup does not read it, it only
keeps it open for the next helper.  While no helper reads it, packets
routed to the device are queued on it by the kernel (and dropped once the
queue is full), never sent anywhere else.

Adapters know nothing of tunnels: this module only makes and closes devices.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import struct
import subprocess
import threading
from typing import Literal, TypeAlias

import attrs
import trio

from .. import _prefetch
from .._bounded import bounded, deadline
from .._errors import HostError
from ..config.ifname import is_valid_ifname

__all__ = [
    "TunDevice",
    "TunHeader",
    "close_tun",
    "create_tun",
    "create_tun_sync",
    "detect_header",
    "header_for_version",
]

#: "pi": each packet carries the 4-byte packet-information header;
#: "none": bare IP packets (``IFF_NO_PI``).
TunHeader: TypeAlias = Literal["pi", "none"]

TUN_PATH = "/dev/net/tun"

# <linux/if_tun.h>
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
#: Fail with EBUSY if a device of that name exists (never adopt someone's).
IFF_TUN_EXCL = 0x8000

#: struct ifreq: 16-byte name, 16-bit flags, padding to 40 bytes.
_IFREQ = struct.Struct("16sH22x")

DEFAULT_TIMEOUT = 5.0
#: How long a killed ``--version`` run is waited for before it is left to be reaped later.
_KILL_GRACE = 1.0


@attrs.frozen
class TunDevice:
    """A TUN device this process created and holds open."""

    name: str
    index: int
    fd: int


def create_tun_sync(name: str, *, packet_info: bool = False,
                    tun_path: str = TUN_PATH) -> TunDevice:
    """Create persistent TUN device ``name`` (blocking: call it in a thread).

    Steps: open ``/dev/net/tun`` (close-on-exec), ``TUNSETIFF`` with
    ``IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL`` (without ``IFF_NO_PI`` when
    ``packet_info``; an existing device of that name is an error, never
    adopted), ``TUNSETPERSIST``, then ``O_NONBLOCK``.
    All or nothing: on any failure the device is made non-persistent and the
    fd closed, so nothing is left.  Raises :class:`HostError`.
    """
    raw = name.encode()
    if not is_valid_ifname(name):
        raise HostError(f"invalid interface name {name!r}")
    try:
        fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise HostError(f"cannot open {tun_path}: {exc.strerror or exc}") from None
    persistent = False
    try:
        flags = IFF_TUN | IFF_TUN_EXCL | (0 if packet_info else IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw, flags))
        fcntl.ioctl(fd, TUNSETPERSIST, 1)
        persistent = True
        os.set_blocking(fd, False)
        index = socket.if_nametoindex(name)
    except OSError as exc:
        if persistent:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, TUNSETPERSIST, 0)
        os.close(fd)
        raise HostError(f"cannot create TUN device {name}: {exc.strerror or exc}") from None
    return TunDevice(name, index, fd)


class _CreateJob:
    """Creation in a worker thread that its caller may abandon.

    A device finished after the caller gave up is rolled back by the thread
    itself; one finished just before (its result already on the way to a
    caller that was cancelled meanwhile) is handed back by :meth:`abandon`
    for the caller to roll back.  Either way a timeout or a cancellation
    never leaves a device nobody knows about.
    """

    def __init__(self, name: str, packet_info: bool, tun_path: str) -> None:
        self.name = name
        self.packet_info = packet_info
        self.tun_path = tun_path
        self._lock = threading.Lock()
        self._abandoned = False
        self._device: TunDevice | None = None

    def run(self) -> TunDevice | None:
        device = create_tun_sync(self.name, packet_info=self.packet_info,
                                 tun_path=self.tun_path)
        with self._lock:
            if not self._abandoned:
                self._device = device
                return device
        _rollback(device.fd)
        return None

    def abandon(self) -> TunDevice | None:
        with self._lock:
            self._abandoned = True
            device, self._device = self._device, None
        return device


def _rollback(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.ioctl(fd, TUNSETPERSIST, 0)
    os.close(fd)


async def create_tun(
    name: str, *, packet_info: bool = False, timeout: float = DEFAULT_TIMEOUT,
    tun_path: str = TUN_PATH,
) -> TunDevice:
    """Create persistent TUN device ``name`` off the trio thread (see
    :func:`create_tun_sync`).

    Raises :class:`HostError` on failure or after ``timeout`` seconds.
    Cancellation: propagates at once; the worker thread is abandoned and,
    should it still create the device, removes it again.
    """
    job = _CreateJob(name, packet_info, tun_path)
    try:
        with trio.fail_after(timeout):
            device = await trio.to_thread.run_sync(job.run, abandon_on_cancel=True,
                                                   thread_name="tunsup-tun")
    except BaseException as exc:
        late = job.abandon()
        if late is not None:
            # Blocking ioctl + close: in a throwaway thread, not on this one.
            threading.Thread(target=_rollback, args=(late.fd,), name="tunsup-tun",
                             daemon=True).start()
        if isinstance(exc, trio.TooSlowError):
            raise HostError(
                f"creating TUN device {name} timed out after {timeout:g} s") from None
        raise
    assert device is not None  # None only when abandoned
    return device


async def close_tun(fd: int, *, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Close a TUN fd off the trio thread (closing the last fd of a device
    takes the kernel's rtnl lock).  Raises :class:`HostError` after
    ``timeout``.  Cancellation: propagates at once; the close still happens
    in the abandoned thread."""
    try:
        await bounded(timeout, f"closing TUN fd {fd}", os.close, fd)
    except OSError as exc:
        raise HostError(f"closing TUN fd {fd}: {exc.strerror or exc}") from None


#: wireguard-go releases up to this date read and write a handed-over TUN fd
#: with the packet-information header; later ones (vectorized I/O, virtio
#: headers) expect IFF_NO_PI.
_LAST_PI_RELEASE = 20230223
_WG_GO_VERSION = re.compile(r"\bv?0\.0\.(\d{8})\b")


def header_for_version(text: str) -> TunHeader | None:
    """The framing a wireguard-go of ``--version`` output ``text`` expects
    on a handed-over fd; None when the version is not recognised."""
    m = _WG_GO_VERSION.search(text)
    if m is None:
        return None
    return "pi" if int(m.group(1)) <= _LAST_PI_RELEASE else "none"


#: :func:`detect_header`'s answers for the life of the process, per helper
#: binary as it is on disk (see :func:`tunsup._prefetch.binary_identity`).
#: A helper replaced by an upgrade is asked again.
_HEADERS: dict[_prefetch.Identity, TunHeader] = {}
#: Binaries being asked right now, and the event set once that ended:
#: tunnels starting together (up to max_parallel at once) wait for one answer instead of
#: each running ``--version`` (a process and a Go runtime start each).
_ASKING: dict[_prefetch.Identity, trio.Event] = {}


async def detect_header(program: str, *, timeout: float = DEFAULT_TIMEOUT) -> TunHeader:
    """The framing helper ``program`` expects on a TUN fd it is handed.

    For wireguard-go, runs ``program --version`` (bounded by ``timeout``)
    and decides by release, once per binary (see :data:`_HEADERS`: every
    ``tunsup up`` used to start a process for this); any other program, or a
    version not recognised, gets ``"none"`` (``IFF_NO_PI``, what current
    helpers expect).  Raises :class:`HostError` if wireguard-go cannot be
    run or gives no answer within ``timeout``.  ``tunsup run`` starts that
    run before it imports trio (:mod:`tunsup._prefetch`); its answer is
    taken here.  Cancellable (the process is killed).
    """
    if not _prefetch.is_wireguard_go(program):
        return "none"
    identity = await bounded(timeout, f"find {program}", _prefetch.binary_identity, program)
    if identity is None:
        return await _ask_version(program, None, timeout)
    with deadline(timeout, f"{program} --version: no answer within {timeout:g} s"):
        # Another start asking the same binary: wait for its answer (if it
        # got none, one of the waiters asks in turn).
        while identity not in _HEADERS and (asking := _ASKING.get(identity)) is not None:
            await asking.wait()
    if identity in _HEADERS:
        return _HEADERS[identity]
    _ASKING[identity] = done = trio.Event()
    try:
        started = _prefetch.take(identity)
        if started is not None:
            return await _prefetched_answer(started, program, identity, timeout)
        return await _ask_version(program, identity, timeout)
    finally:
        del _ASKING[identity]
        done.set()


async def _prefetched_answer(started: _prefetch.Started, program: str,
                             identity: _prefetch.Identity, timeout: float) -> TunHeader:
    """The answer of a ``--version`` run started before trio (usually over
    by now), as :func:`_ask_version` gives it.  Waits for its exit on its
    pidfd, bounded by ``timeout`` (then :class:`HostError`); killed on
    timeout or cancellation; reaped (or, stuck in the kernel, left to
    :func:`tunsup._prefetch.discard`) and its fds closed either way."""
    proc, pidfd = started.proc, started.pidfd
    try:
        with deadline(timeout, f"{program} --version: no answer within {timeout:g} s"):
            await trio.lowlevel.wait_readable(pidfd)
    finally:
        if proc.poll() is None:
            proc.kill()
            # SIGKILLed: gone at once, unless stuck in the kernel.
            with trio.CancelScope(shield=True), trio.move_on_after(_KILL_GRACE):
                await trio.lowlevel.wait_readable(pidfd)
            if proc.poll() is None:
                _prefetch.reap_later(proc)
        trio.lowlevel.notify_closing(pidfd)
        os.close(pidfd)
        output = _prefetch.read_available(proc)
    header: TunHeader = header_for_version(output.decode("utf-8", "replace")) or "none"
    if proc.returncode == 0:
        _HEADERS[identity] = header
    return header


async def _ask_version(program: str, identity: _prefetch.Identity | None,
                       timeout: float) -> TunHeader:
    """Run ``program --version`` (bounded by ``timeout``) and remember the
    answer for ``identity``.  Cancellable (the process is killed)."""
    try:
        with deadline(timeout, f"{program} --version: no answer within {timeout:g} s"):
            done = await trio.run_process(
                _prefetch.version_argv(program), capture_stdout=True,
                stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=False,
                env=_prefetch.version_env())
    except OSError as exc:
        raise HostError(f"cannot run {program} --version: {exc.strerror or exc}") from None
    header: TunHeader = header_for_version(done.stdout.decode("utf-8", "replace")) or "none"
    if identity is not None and done.returncode == 0:
        _HEADERS[identity] = header
    return header
