"""DNS for a tunnel: set at bring-up, reverted at teardown.

Three backends, chosen by :func:`select_backend`:

``file``
    Rewrites a ``resolv.conf`` (``/etc/resolv.conf`` by default) with a
    backup of the exact original bytes and mode kept in the state record.
    Tunnels share the file through its one :class:`ResolvConfOwner` (per
    :class:`~tunsup.host.Host`): the file holds the merge of the remaining
    claims (:func:`render_claims`), the original once none is left.
``resolvconf``
    ``resolvconf -a tun.IFACE -m 0 -x`` with the rendered file on stdin, as
    wg-quick does; reverted with ``resolvconf -d tun.IFACE -f``.
``resolved``
    systemd-resolved per-link DNS through ``resolvectl dns/domain/
    default-route``; reverted with ``resolvectl revert IFACE``.

:meth:`DnsBackend.apply` returns a frozen, plain-data state record
(:data:`DnsState`) and reverting needs nothing but that record
(:func:`revert_state`; any backend's ``revert`` accepts any state), so that the
record can be journalled and the change undone after a crash, even when
``auto`` would now pick another backend.

Nothing here blocks the trio thread: file I/O runs in worker threads,
commands through :func:`trio.run_process`, everything under a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import ClassVar, Protocol, TypeAlias

import attrs
import outcome
import trio

from .._bounded import bounded, deadline
from .._errors import HostError
from .._input import read_regular_file_and_mode
from ..config.ifname import is_valid_ifname
from ..config.spec import IPAddress

__all__ = [
    "DEFAULT_RESOLV_CONF",
    "NEW_FILE_MODE",
    "RESOLVED_VARLINK_SOCKET",
    "DnsBackend",
    "DnsError",
    "DnsState",
    "FileBackend",
    "FileDnsState",
    "ResolvClaim",
    "ResolvConfOwner",
    "ResolvConfOwners",
    "ResolvconfBackend",
    "ResolvconfDnsState",
    "ResolvedBackend",
    "ResolvedDnsState",
    "backend_for_state",
    "render_claims",
    "render_resolv_conf",
    "revert_state",
    "select_backend",
]

log = logging.getLogger("tunsup.dns")

DEFAULT_RESOLV_CONF = "/etc/resolv.conf"
#: systemd-resolved's varlink socket; its presence means resolved is running.
#: Read at call time by :func:`select_backend` (tests point it elsewhere).
RESOLVED_VARLINK_SOCKET = "/run/systemd/resolve/io.systemd.Resolve"
#: Mode of a resolv.conf that tunsup creates because none existed.
NEW_FILE_MODE = 0o644

#: ``rename`` over these errors means "cannot replace this path" (a bind
#: mount, as ``ip netns exec`` makes of /etc/resolv.conf): rewrite in place.
_RENAME_REFUSED = frozenset({errno.EBUSY, errno.EXDEV, errno.EPERM})
#: Creating the temporary file failed this way: the directory is not
#: writable, but the file itself may be (a bind mount on a read-only /etc).
_TEMP_REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.EROFS})

_STDERR_LINES = 3


class DnsError(HostError):
    """Setting or reverting DNS failed or timed out."""


# --- state records ------------------------------------------------------------


@attrs.frozen
class FileDnsState:
    """What the file backend changed.

    ``path`` is the real path (symlinks resolved once, at apply time): a
    ``resolv.conf`` that is a symlink has its *target* rewritten and
    restored, and the symlink itself is left as it is.
    """

    path: str
    #: Exact bytes before tunsup wrote the file; None: it did not exist.
    original: bytes | None
    #: Exact bytes tunsup wrote.
    written: bytes
    #: Permission bits of the original (:data:`NEW_FILE_MODE` for a new file).
    mode: int
    #: The interface whose claim this is (see :class:`ResolvConfOwner`);
    #: empty in records of older versions (then reverted on their own).
    ifname: str = ""
    #: Which claim of that interface's stack: 0 the tunnel's own (its
    #: release drops every claim of the interface), n > 0 the n-th change
    #: of its DNS in place (its release goes back to claim n - 1).
    depth: int = 0
    #: The claim was recorded but not written: the file had been changed
    #: by someone else since tunsup wrote it, and is left alone.
    left_alone: bool = attrs.field(default=False, eq=False)


@attrs.frozen
class ResolvconfDnsState:
    """What the resolvconf backend added: interface record ``tun.IFACE``."""

    ifname: str
    record: str


@attrs.frozen
class ResolvedDnsState:
    """The link whose systemd-resolved settings were changed."""

    ifname: str


DnsState: TypeAlias = FileDnsState | ResolvconfDnsState | ResolvedDnsState


class DnsBackend(Protocol):
    """A way of setting a tunnel's DNS servers and search domains."""

    @property
    def name(self) -> str:
        """``"file"``, ``"resolvconf"`` or ``"resolved"``."""
        ...

    async def prepare(
        self,
        ifname: str,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        *,
        timeout: float,
        layer: bool = False,
    ) -> DnsState:
        """What :meth:`revert` will need, computed *before* anything changes
        (for the file backend: the original bytes), so that a crash-safe
        journal can record it ahead of :meth:`apply`.  Changes nothing.
        Cancellable; raises :class:`DnsError` on failure or timeout.
        """
        ...

    async def apply(
        self,
        ifname: str,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        *,
        timeout: float,
        layer: bool = False,
    ) -> DnsState:
        """Set DNS; return what :meth:`revert` needs.  ``layer``: a change
        of the interface's DNS in place, whose revert goes back to the
        servers before it (the file backend; the others replace the
        interface's settings, and the caller re-applies the previous ones).

        On failure, timeout (:class:`DnsError`) or cancellation nothing is
        left applied (or its rollback is under way, see the backends).
        """
        ...

    async def revert(self, state: DnsState, *, timeout: float) -> bool:
        """Undo ``state`` (of any backend; see :func:`revert_state`).

        True: reverted, or nothing was left to revert.  False: deliberately
        left alone (logged as a warning).  Raises :class:`DnsError`.
        Cancellation: a file revert finishes in its abandoned worker thread;
        a command is terminated.
        """
        ...


# --- rendering and validation -------------------------------------------------


def _check_ifname(ifname: str) -> None:
    # The name ends up in a file comment, a resolvconf record name and
    # command lines: tunsup's one rule keeps it to plain characters.
    if not is_valid_ifname(ifname):
        raise ValueError(f"invalid interface name {ifname!r}")


def _check_domain(domain: str) -> None:
    if not 0 < len(domain) <= 254 or any(
        c in "#;" or c.isspace() or not c.isprintable() for c in domain
    ):
        raise ValueError(f"invalid DNS search domain {domain!r}")


def _check_request(ifname: str, servers: Sequence[IPAddress], search: Sequence[str]) -> None:
    _check_ifname(ifname)
    if not servers:
        raise ValueError(f"{ifname}: no DNS servers to set")
    for domain in search:
        _check_domain(domain)


def render_resolv_conf(ifname: str, servers: Sequence[IPAddress], search: Sequence[str]) -> bytes:
    """The ``resolv.conf`` text for a tunnel.

    Routing-only domains (``~example.com``, ``~.``) mean nothing to a plain
    resolver and are left out of the ``search`` line; the line is omitted
    when no search domain remains.  All servers are written (glibc uses
    the first three).  Raises ValueError for an invalid interface name or
    domain (whitespace or ``#``/``;`` would change the file's meaning) or
    an empty server list.
    """
    return render_claims([ResolvClaim(ifname, tuple(servers), tuple(search))])


@attrs.frozen
class ResolvClaim:
    """One tunnel's wish for the shared resolv.conf."""

    ifname: str
    servers: tuple[IPAddress, ...]
    search: tuple[str, ...]


_HEADER = re.compile(rb"# Generated by tunsup for ([^;\n]+); restored when the tunnels? stops?\n")


def render_claims(claims: Sequence[ResolvClaim]) -> bytes:
    """The ``resolv.conf`` text for several tunnels: the merge rule.

    Servers, then search domains, of every claim in the order given (the
    order the tunnels claimed DNS: start order), each written once (the
    first occurrence wins).  The header names the tunnels, so that the file
    says whose it is (and recovery can recognise it).  One claim gives
    exactly the single-tunnel file.  Raises ValueError as
    :func:`render_resolv_conf`.
    """
    if not claims:
        raise ValueError("no DNS claim to render")
    for claim in claims:
        _check_request(claim.ifname, claim.servers, claim.search)
    names = ", ".join(c.ifname for c in claims)
    plural = "s" if len(claims) > 1 else ""
    lines = [f"# Generated by tunsup for {names}; restored when the tunnel{plural} stop"
             + ("" if plural else "s")]
    servers = dict.fromkeys(s for c in claims for s in c.servers)
    lines += [f"nameserver {server}" for server in servers]
    domains = dict.fromkeys(d for c in claims for d in c.search if not d.startswith("~"))
    if domains:
        lines.append("search " + " ".join(domains))
    return ("\n".join(lines) + "\n").encode()


def _header_names(content: bytes | None) -> list[str] | None:
    """The tunnels a tunsup-rendered file names in its header, or None."""
    match = _HEADER.match(content or b"")
    if match is None:
        return None
    return match.group(1).decode(errors="replace").split(", ")


def _describe(ifname: str, servers: Sequence[IPAddress], search: Sequence[str]) -> str:
    text = f"{ifname}: DNS " + ", ".join(map(str, servers))
    if search:
        text += " search " + " ".join(search)
    return text


# --- file backend: synchronous parts (worker threads only) --------------------

#: Serializes every file operation of this module, so that a rollback queued
#: behind an abandoned apply (see :meth:`FileBackend.apply`) runs after it.
_file_lock = threading.Lock()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync(fd: int) -> None:
    os.fsync(fd)


def _replace(src: str, dst: str) -> None:
    os.replace(src, dst)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync(fd)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # some file systems cannot sync directories
            raise
    finally:
        os.close(fd)


#: Largest resolv.conf read (glibc reads 3 nameservers and 6 search
#: domains: a real one is well under a kilobyte).
MAX_RESOLV_CONF = 1 << 20


def _read(path: str) -> tuple[bytes | None, int]:
    """Bytes and permission bits of ``path``; (None, NEW_FILE_MODE) if missing.
    Anything but a regular file of at most :data:`MAX_RESOLV_CONF` bytes
    raises ``OSError`` (never blocks: a FIFO, ``/dev/zero``)."""
    try:
        data, mode = read_regular_file_and_mode(path, MAX_RESOLV_CONF)
    except FileNotFoundError:
        return None, NEW_FILE_MODE
    return data, mode


def _replace_atomically(path: str, data: bytes, mode: int) -> bool:
    """Temp file + fsync + rename + directory fsync.  False: the rename (or
    the temp file) was refused in a way that an in-place rewrite may avoid;
    ``path`` is then untouched."""
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tunsup-", dir=directory)
    except OSError as exc:
        if exc.errno in _TEMP_REFUSED:
            log.debug("%s: cannot create a temporary file beside it (%s)", path, exc.strerror)
            return False
        raise
    try:
        try:
            os.fchmod(fd, mode)
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(path)
                with contextlib.suppress(PermissionError):
                    os.fchown(fd, st.st_uid, st.st_gid)
            _write_all(fd, data)
            _fsync(fd)
        finally:
            os.close(fd)
        try:
            _replace(tmp, path)
        except OSError as exc:
            if exc.errno in _RENAME_REFUSED:
                log.debug("%s: cannot rename over it (%s)", path, exc.strerror)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                return False
            raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _sync_done(path, directory)
    return True


def _sync_done(path: str, directory: str) -> None:
    """Sync ``directory`` after ``path`` was renamed or removed in it.  The
    change is done and visible by then: a failing sync only means it may
    not survive a power loss, so it is logged, not raised (raising would
    tell the caller the file holds what it held before, and the claim
    would be dropped while the file holds its servers)."""
    try:
        _fsync_dir(directory)
    except OSError as exc:
        log.warning("%s: changed, but syncing %s failed (%s): the change may not survive "
                    "a power loss", path, directory, exc.strerror or exc)


def _rewrite_in_place(path: str, data: bytes, previous: bytes | None) -> None:
    """Truncate and rewrite ``path``; on failure put ``previous`` back."""
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)  # fails before truncating
    try:
        try:
            _write_all(fd, data)
            _fsync(fd)
        except OSError as exc:
            if previous is None:
                raise
            try:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
                _write_all(fd, previous)
                _fsync(fd)
            except OSError as exc2:
                raise DnsError(
                    f"{path}: rewriting in place failed ({exc.strerror}) and its previous "
                    f"content could not be put back ({exc2.strerror}); the file may be damaged"
                ) from exc
            raise
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes, mode: int, previous: bytes | None) -> None:
    """Replace the content of ``path`` atomically, or in place where it
    cannot be replaced.  When this raises, ``path`` holds ``previous``."""
    if _replace_atomically(path, data, mode):
        return
    log.debug("%s: rewriting it in place instead (bind mount?)", path)
    _rewrite_in_place(path, data, previous)


def _os_error(path: str, what: str, exc: OSError) -> DnsError:
    return DnsError(f"{what} {path}: {exc.strerror or exc}")


def _revert_file_sync(state: FileDnsState) -> bool:
    """Revert one record on its own (a record of an older version, or one
    whose claim no owner knows): restore the original if the file still
    holds what was written."""
    path = state.path
    try:
        current, _ = _read(path)
        if current == state.original:
            log.debug("%s: already as it was", path)
            return True
        if current != state.written:
            log.warning("leaving %s alone: it changed since tunsup wrote it", path)
            return False
        _put_back(path, state.original, state.mode, current)
        return True
    except OSError as exc:
        raise _os_error(path, "cannot restore", exc) from exc


def _put_back(path: str, original: bytes | None, mode: int, current: bytes | None) -> None:
    if original is None:
        os.unlink(path)
        _sync_done(path, os.path.dirname(path) or ".")
        log.info("removed %s (it did not exist before)", path)
    else:
        _write_file(path, original, mode, current)
        log.info("restored %s", path)


# --- the owner of a shared resolv.conf ----------------------------------------


@attrs.define(eq=False)
class ResolvConfOwner:
    """The one owner of a resolv.conf that several tunnels set DNS in.

    It knows every tunnel's claims (:class:`ResolvClaim`): per interface a
    *stack*, the tunnel's own claim at the bottom and one more on top for
    each in-place change of its DNS (:meth:`claim` with ``layer``), the
    interfaces in the order they first claimed.  The file always holds
    :func:`render_claims` of the top claim of each interface (the merge
    rule).  Releasing a change's record goes back to the claim below it
    (a rolled-back change gives the previous servers back, byte for byte);
    releasing the tunnel's own record drops the whole stack.  The bytes
    and mode found before the first claim (the *original*) are captured
    once and put back, byte for byte, when the last claim is released.
    Every record it returns carries that same original and the claim's
    depth, so whichever records a crash leaves in the journal can restore
    it.

    If someone else rewrites the file while tunnels hold it, the owner
    leaves it alone from then on (saying so once, as a warning) until no
    claim is left; the next claim then captures a new original.

    API (all synchronous file work: call with :data:`_file_lock` held, in a
    worker thread): :meth:`preview`, :meth:`claim`, :meth:`release`; and
    :meth:`readopt` (no I/O) for recovery, which re-registers a dead
    instance's claims before undoing them.
    """

    path: str
    claims: dict[str, list[ResolvClaim]] = attrs.field(factory=dict)
    original: bytes | None = None
    mode: int = NEW_FILE_MODE
    #: Someone else changed the file while claims were held: left alone.
    foreign: bool = False
    #: Claims were re-registered from a dead instance's journal: the file
    #: may also hold the original (a crash before the first write), or an
    #: interface's claim below its top (a crash before a change's write,
    #: or after a release's write but before the journal said so).
    recovered: bool = False
    #: Where the merge order comes from (see :meth:`ResolvConfOwners.set_order`).
    shared: ResolvConfOwners | None = None

    def _ordered(self, claims: Iterable[ResolvClaim]) -> list[ResolvClaim]:
        """``claims`` (given in the order they were made) in merge order:
        configured tunnels in configuration order first, then the others
        in the order they claimed.  Tunnels start concurrently, so the
        order of their claims alone would change from run to run."""
        rank = self.shared.rank if self.shared is not None else {}
        return sorted(claims, key=lambda c: rank.get(c.ifname, len(rank)))

    def _tops(self, claims: dict[str, list[ResolvClaim]] | None = None) -> list[ResolvClaim]:
        """Each interface's top claim, in merge order (:meth:`_ordered`)."""
        return self._ordered(
            [stack[-1] for stack in (self.claims if claims is None else claims).values()])

    def _state(self, claim: ResolvClaim, written: bytes, depth: int) -> FileDnsState:
        return FileDnsState(path=self.path, original=self.original, written=written,
                            mode=self.mode, ifname=claim.ifname, depth=depth,
                            left_alone=self.foreign)

    def _ours(self, current: bytes | None) -> bool:
        """Whether ``current`` is what tunsup wrote for (some of) the claims:
        exactly the merge of the tunnels its header names, all claimed
        (after a recovery, each by its top claim or the one below)."""
        if self.recovered and current == self.original:
            return True
        names = _header_names(current)
        if names is None or not all(n in self.claims for n in names):
            return False
        depth = 2 if self.recovered else 1
        choices = [self.claims[n][-depth:] for n in names]
        return any(current == render_claims(list(pick))
                   for pick in itertools.product(*choices))

    def _reset(self) -> None:
        self.original, self.mode, self.foreign, self.recovered = None, NEW_FILE_MODE, False, False

    def _left_alone(self, why: str) -> None:
        if not self.foreign:
            log.warning("leaving %s alone: it changed since tunsup wrote it (%s)", self.path,
                        why)
        self.foreign = True

    def _with(self, claim: ResolvClaim, layer: bool) -> tuple[dict[str, list[ResolvClaim]], int]:
        """The claims after :meth:`claim` (a copy) and the new claim's depth."""
        claims = {n: list(s) for n, s in self.claims.items()}
        if layer and claim.ifname in claims:
            claims[claim.ifname].append(claim)
        else:
            # The tunnel's own claim (again: it replaces the stack and
            # moves to the end of the order).
            claims.pop(claim.ifname, None)
            claims[claim.ifname] = [claim]
        return claims, len(claims[claim.ifname]) - 1

    def preview(self, claim: ResolvClaim, *, layer: bool = False) -> FileDnsState:
        """What :meth:`claim` would record, reading the original only when
        no claim holds it yet.  Changes nothing."""
        claims, depth = self._with(claim, layer)
        content = render_claims(self._tops(claims))
        if self.claims:
            return self._state(claim, content, depth)
        original, mode = _read(self.path)
        return FileDnsState(path=self.path, original=original, written=content, mode=mode,
                            ifname=claim.ifname, depth=depth)

    def claim(self, claim: ResolvClaim, *, layer: bool = False) -> FileDnsState:
        """Add ``claim`` (with ``layer``: on top of the interface's stack, a
        change in place; else as the tunnel's own, replacing its stack) and
        write the merged file.  If writing fails, the claims are as they
        were and the file holds what it held."""
        claims, depth = self._with(claim, layer)
        content = render_claims(self._tops(claims))
        current, mode = _read(self.path)
        if not self.claims:
            self._reset()
            self.original, self.mode = current, mode
        elif not self.foreign and not self._ours(current):
            self._left_alone(f"{claim.ifname}'s DNS is not added")
        before, self.claims = self.claims, claims
        if self.foreign:
            return self._state(claim, content, depth)
        try:
            if current != content:
                _write_file(self.path, content, self.mode, current)
        except BaseException:
            self.claims = before
            if not self.claims:
                self._reset()
            raise
        return self._state(claim, content, depth)

    def release(self, state: FileDnsState) -> bool:
        """Undo the claim of ``state``: a change's (depth n > 0) goes back to
        the interface's claim n - 1, the tunnel's own (depth 0) drops all of
        its claims.  The file then holds the merge of the claims left, or
        the original once none is left.  True: done (or nothing to do);
        False: the file was left alone (changed by someone else).  A claim
        this owner does not know is reverted on its own (see
        :func:`_revert_file_sync`), unless it is a change whose tunnel's
        own claim is already gone (nothing left to do)."""
        stack = self.claims.get(state.ifname)
        if stack is None:
            return True if state.depth > 0 else _revert_file_sync(state)
        if len(stack) <= state.depth:
            return True  # already back below it
        current, _ = _read(self.path)
        ours = not self.foreign and self._ours(current)
        if state.depth == 0:
            del self.claims[state.ifname]
        else:
            del stack[state.depth:]
        what = "removed" if state.depth == 0 else "change undone"
        try:
            if not ours:
                self._left_alone(f"{state.ifname}'s DNS is not removed")
                log.info("%s: DNS claim of %s released; the file is left as it is",
                         self.path, state.ifname)
                return False
            if self.claims:
                content = render_claims(self._tops())
                if current != content:
                    _write_file(self.path, content, self.mode, current)
                log.info("%s: DNS of %s %s; it holds the DNS of %s", self.path,
                         state.ifname, what, ", ".join(self.claims))
                return True
            if current == self.original:
                log.debug("%s: already as it was", self.path)
            else:
                _put_back(self.path, self.original, self.mode, current)
            return True
        finally:
            if not self.claims:
                self._reset()

    def reorder(self) -> None:
        """Write the file again in the current merge order (a reload
        changed the configuration's order, nothing else).  Nothing to do
        without claims, when the file is left alone, or when it already
        holds that order; a file someone else changed is left alone from
        then on."""
        if not self.claims or self.foreign:
            return
        current, _ = _read(self.path)
        if not self._ours(current):
            self._left_alone("its tunnels' DNS is not reordered")
            return
        content = render_claims(self._tops())
        if current != content:
            _write_file(self.path, content, self.mode, current)
            log.info("%s: DNS of %s, in the configuration's new order", self.path,
                     ", ".join(c.ifname for c in self._tops()))

    def readopt(self, claim: ResolvClaim, state: FileDnsState) -> None:
        """Recovery: register a dead instance's claim (in journal order),
        at its depth, with the original its record carries.  No I/O."""
        if not self.claims:
            self._reset()
            self.original, self.mode = state.original, state.mode
        self.recovered = True
        stack = self.claims.get(claim.ifname)
        if stack is None or state.depth == 0:
            self.claims.pop(claim.ifname, None)
            self.claims[claim.ifname] = [claim]
            return
        del stack[state.depth:]
        stack.append(claim)


@attrs.define(eq=False)
class ResolvConfOwners:
    """The owners of the resolv.conf files of one host, by real path: one
    per :class:`~tunsup.host.Host`, shared by all its tunnels."""

    by_path: dict[str, ResolvConfOwner] = attrs.field(factory=dict)
    #: Position of each configured tunnel (see :meth:`set_order`).
    rank: dict[str, int] = attrs.field(factory=dict)
    #: The order changed since the files were last written in it.
    reordered: bool = False

    def owner(self, path: str) -> ResolvConfOwner:
        """The owner of ``path`` (a real path: symlinks resolved)."""
        return self.by_path.setdefault(path, ResolvConfOwner(path, shared=self))

    def set_order(self, names: Iterable[str]) -> None:
        """The merge order: tunnels ``names`` (the configuration's) first,
        in that order.  Replaced whole (worker threads read it).  Files
        written in another order are rewritten by :meth:`write_order`."""
        rank = {name: i for i, name in enumerate(names)}
        self.reordered = self.reordered or (bool(self.rank) and rank != self.rank)
        self.rank = rank

    async def write_order(self, *, timeout: float) -> None:
        """After :meth:`set_order` changed the order: write each file that
        tunnels hold in the new order (:meth:`ResolvConfOwner.reorder`),
        each in a worker thread within ``timeout``.  Raises
        :class:`DnsError` once every file was tried, naming those that
        failed (they hold the old order; the next call tries them again).
        Cancellation: propagates at once, abandoning the thread (which
        compares contents first: safe whenever it runs)."""
        if not self.reordered:
            return
        errors: list[str] = []
        for owner in list(self.by_path.values()):
            if not owner.claims:
                continue

            def reorder(owner: ResolvConfOwner = owner) -> None:
                with _file_lock, _os_errors(owner.path, "cannot rewrite"):
                    owner.reorder()

            try:
                await bounded(timeout, f"rewriting {owner.path} in the new order", reorder,
                              error=DnsError)
            except DnsError as exc:
                errors.append(str(exc))
        self.reordered = bool(errors)
        if errors:
            raise DnsError("; ".join(errors))


def _os_errors(path: str, what: str) -> contextlib.AbstractContextManager[None]:
    @contextlib.contextmanager
    def wrap() -> Iterator[None]:
        try:
            yield
        except OSError as exc:
            raise _os_error(path, what, exc) from exc
    return wrap()


@attrs.define
class _FileApplyJob:
    """An apply running in a worker thread, and what it did."""

    owner_of: Callable[[], ResolvConfOwner]
    claim: ResolvClaim
    layer: bool = False
    abandoned: bool = False
    state: FileDnsState | None = None
    owner: ResolvConfOwner | None = None

    def run(self) -> FileDnsState | None:
        with _file_lock:
            if self.abandoned:
                return None
            self.owner = owner = self.owner_of()
            with _os_errors(owner.path, "cannot write"):
                self.state = owner.claim(self.claim, layer=self.layer)
            return self.state

    def rollback(self) -> None:
        """Queued behind :meth:`run` once the caller stopped waiting for it."""
        with _file_lock:
            state, self.state = self.state, None
            if state is not None and self.owner is not None:
                log.info("%s: rolling back an abandoned DNS change", state.path)
                self.owner.release(state)

    def abandon(self) -> None:
        self.abandoned = True
        trio.lowlevel.start_thread_soon(self.rollback, _log_rollback, name="tunsup-dns-rollback")


def _log_rollback(result: outcome.Outcome[None]) -> None:
    if isinstance(result, outcome.Error):
        log.warning("rolling back an abandoned DNS change failed: %s", result.error)


@attrs.frozen
class FileBackend:
    """Writes ``path`` (a resolv.conf) through its :class:`ResolvConfOwner`
    (in ``owners``: give every backend of one host the same) and restores
    its exact bytes and mode once no tunnel claims it."""

    path: str = DEFAULT_RESOLV_CONF
    owners: ResolvConfOwners = attrs.field(factory=ResolvConfOwners, eq=False, repr=False)
    name: ClassVar[str] = "file"

    def _owner(self) -> ResolvConfOwner:
        """The owner of the real path (blocking: resolves symlinks)."""
        return self.owners.owner(os.path.realpath(self.path))

    async def prepare(
        self, ifname: str, servers: Sequence[IPAddress], search: Sequence[str], *,
        timeout: float,
        layer: bool = False,
    ) -> FileDnsState:
        """Read the original bytes and mode, unless a claim already holds
        them (off the trio thread, under ``timeout``); see
        :meth:`DnsBackend.prepare`.  Cancellable."""
        claim = ResolvClaim(ifname, tuple(servers), tuple(search))
        render_claims([claim])  # invalid input fails here, before any I/O

        def read() -> FileDnsState:
            with _file_lock:
                owner = self._owner()
                with _os_errors(owner.path, "cannot read"):
                    return owner.preview(claim, layer=layer)

        return await bounded(timeout, f"{ifname}: reading {self.path}", read, error=DnsError)

    async def apply(
        self,
        ifname: str,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        *,
        timeout: float,
        layer: bool = False,
    ) -> FileDnsState:
        """Claim DNS in ``self.path`` (its symlink target, if it is a
        symlink; with ``layer`` on top of the interface's claim, see
        :meth:`ResolvConfOwner.claim`) and write the merged file: temp file, fsync, rename,
        directory fsync; where the rename is refused (EBUSY/EXDEV/EPERM: a
        bind mount), an in-place rewrite.  The original mode (owner where
        possible) is kept, 0644 for a new file.  If the write fails the
        file is intact (or was put back) before :class:`DnsError` is raised.

        Cancellation or timeout: the worker thread cannot be interrupted, so
        it is abandoned and a rollback is queued behind it; once the write
        finishes the claim is released (as :meth:`revert` would).
        Cancelled propagates at once; a timeout raises :class:`DnsError`.
        """
        claim = ResolvClaim(ifname, tuple(servers), tuple(search))
        render_claims([claim])
        job = _FileApplyJob(self._owner, claim, layer)
        try:
            with trio.fail_after(timeout):
                state = await trio.to_thread.run_sync(
                    job.run, abandon_on_cancel=True, thread_name="tunsup-dns"
                )
        except DnsError:
            raise
        except trio.TooSlowError:
            job.abandon()
            raise DnsError(
                f"{ifname}: writing {self.path} timed out after {timeout:g}s; "
                "the change is rolled back in the background"
            ) from None
        except BaseException:
            job.abandon()
            raise
        assert state is not None  # only None when abandoned
        if not state.left_alone:
            log.info("%s via file %s", _describe(ifname, servers, search), state.path)
        return state

    async def revert(self, state: DnsState, *, timeout: float) -> bool:
        """A file record: release its claim (see :meth:`ResolvConfOwner.release`);
        other records: see :func:`revert_state`.  Cancellation or timeout
        abandons the worker thread, which still finishes (it compares
        contents first, so it is safe whenever it runs)."""
        if not isinstance(state, FileDnsState):
            return await revert_state(state, timeout=timeout)

        def release() -> bool:
            with _file_lock, _os_errors(state.path, "cannot restore"):
                return self.owners.owner(state.path).release(state)

        return await bounded(timeout, f"restoring {state.path} (continuing in the background)",
                             release, error=DnsError)

    def readopt(self, ifname: str, servers: Sequence[IPAddress], search: Sequence[str],
                state: FileDnsState) -> None:
        """Recovery: see :meth:`ResolvConfOwner.readopt` (no I/O; the owners
        must be recovery's own, which no thread uses yet)."""
        self.owners.owner(state.path).readopt(
            ResolvClaim(ifname, tuple(servers), tuple(search)), state)


async def _revert_file(state: FileDnsState, timeout: float) -> bool:
    """A record reverted on its own, with no owner (see
    :func:`_revert_file_sync`)."""
    return await FileBackend(state.path).revert(state, timeout=timeout)


# --- commands -----------------------------------------------------------------


async def _run(argv: Sequence[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    """Run a command, capturing its output.  The caller bounds the time; on
    cancellation trio terminates (later kills) the process and waits for it."""
    try:
        return await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    except OSError as exc:
        raise DnsError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc


def _first_lines(data: bytes) -> str:
    lines = [ln.strip() for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    text = " / ".join(lines[:_STDERR_LINES])
    if len(lines) > _STDERR_LINES:
        text += " ..."
    return text


def _failed(argv: Sequence[str], proc: subprocess.CompletedProcess[bytes]) -> DnsError:
    output = _first_lines(proc.stderr) or _first_lines(proc.stdout) or "no output"
    return DnsError(f"{' '.join(argv)} exited with status {proc.returncode}: {output}")


async def _rollback(argv: Sequence[str], timeout: float) -> None:
    """Run a rollback command, shielded from cancellation and bounded by
    ``timeout``; failures are logged, never raised."""
    with trio.move_on_after(timeout, shield=True) as scope:
        try:
            proc = await _run(argv)
        except DnsError as exc:
            log.warning("rollback failed: %s", exc)
            return
        if proc.returncode != 0:
            log.warning("rollback failed: %s", _failed(argv, proc))
        else:
            log.debug("rolled back: %s", " ".join(argv))
    if scope.cancelled_caught:
        log.warning("rollback timed out after %gs: %s", timeout, " ".join(argv))


def _link_exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)  # one ioctl, does not block
    except OSError:
        return False
    return True


# --- resolvconf backend -------------------------------------------------------


@attrs.frozen
class ResolvconfBackend:
    """``resolvconf`` (openresolv or Debian's), as wg-quick uses it."""

    cmd: str = "resolvconf"
    name: ClassVar[str] = "resolvconf"

    async def apply(
        self,
        ifname: str,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        *,
        timeout: float,
        layer: bool = False,
    ) -> ResolvconfDnsState:
        """``resolvconf -a tun.IFACE -m 0 -x`` with the rendered file on stdin.

        A non-zero exit raises :class:`DnsError` with the command's stderr.
        On failure, timeout or cancellation (once the command was started)
        ``resolvconf -d tun.IFACE -f`` runs, shielded and bounded by
        ``timeout``, before the error (or Cancelled) propagates.
        """
        content = render_resolv_conf(ifname, servers, search)
        record = f"tun.{ifname}"
        argv = [self.cmd, "-a", record, "-m", "0", "-x"]
        rollback = False
        try:
            with trio.fail_after(timeout):
                rollback = True
                try:
                    proc = await _run(argv, content)
                except DnsError:
                    rollback = False  # never started
                    raise
                if proc.returncode != 0:
                    raise _failed(argv, proc)
            rollback = False
        except trio.TooSlowError:
            raise DnsError(f"{' '.join(argv)} timed out after {timeout:g}s") from None
        finally:
            if rollback:
                await _rollback([self.cmd, "-d", record, "-f"], timeout)
        log.info("%s via resolvconf (record %s)", _describe(ifname, servers, search), record)
        return ResolvconfDnsState(ifname=ifname, record=record)

    async def revert(self, state: DnsState, *, timeout: float) -> bool:
        """See :func:`revert_state` (this backend's command is used)."""
        return await revert_state(state, timeout=timeout, resolvconf_cmd=self.cmd)

    async def prepare(
        self, ifname: str, servers: Sequence[IPAddress], search: Sequence[str], *,
        timeout: float,
        layer: bool = False,
    ) -> ResolvconfDnsState:
        """See :meth:`DnsBackend.prepare`; nothing to read."""
        _check_request(ifname, servers, search)
        return ResolvconfDnsState(ifname=ifname, record=f"tun.{ifname}")


async def _revert_resolvconf(state: ResolvconfDnsState, cmd: str, timeout: float) -> bool:
    """``resolvconf -d``; on cancellation the command is terminated."""
    argv = [cmd, "-d", state.record, "-f"]
    with deadline(timeout, f"{' '.join(argv)} timed out after {timeout:g}s", DnsError):
        proc = await _run(argv)
    if proc.returncode != 0:
        raise _failed(argv, proc)
    log.info("%s: DNS record %s removed via resolvconf", state.ifname, state.record)
    return True


# --- systemd-resolved backend -------------------------------------------------


@attrs.frozen
class ResolvedBackend:
    """systemd-resolved per-link settings through ``resolvectl``."""

    cmd: str = "resolvectl"
    name: ClassVar[str] = "resolved"

    async def apply(
        self,
        ifname: str,
        servers: Sequence[IPAddress],
        search: Sequence[str],
        *,
        timeout: float,
        layer: bool = False,
    ) -> ResolvedDnsState:
        """``resolvectl dns IFACE S...``, ``resolvectl domain IFACE D...``
        (``~.`` without search domains, so the tunnel's servers answer every
        query) and ``resolvectl default-route IFACE true`` (its failure is
        ignored: old versions lack it).

        If anything after the first command fails or times out, or on
        cancellation once a command was started, ``resolvectl revert IFACE``
        runs, shielded and bounded by ``timeout``, before the error (or
        Cancelled) propagates.
        """
        _check_request(ifname, servers, search)
        dns_argv = [self.cmd, "dns", ifname, *map(str, servers)]
        domain_argv = [self.cmd, "domain", ifname, *(search or ["~."])]
        route_argv = [self.cmd, "default-route", ifname, "true"]
        rollback = False
        try:
            with trio.fail_after(timeout):
                rollback = True
                try:
                    proc = await _run(dns_argv)
                except DnsError:
                    rollback = False  # never started
                    raise
                if proc.returncode != 0:
                    rollback = False  # nothing was set
                    raise _failed(dns_argv, proc)
                proc = await _run(domain_argv)
                if proc.returncode != 0:
                    raise _failed(domain_argv, proc)
                proc = await _run(route_argv)
                if proc.returncode != 0:
                    log.debug("%s: ignored: %s", ifname, _failed(route_argv, proc))
            rollback = False
        except trio.TooSlowError:
            raise DnsError(f"{ifname}: resolvectl timed out after {timeout:g}s") from None
        finally:
            if rollback:
                await _rollback([self.cmd, "revert", ifname], timeout)
        log.info("%s via systemd-resolved", _describe(ifname, servers, search))
        return ResolvedDnsState(ifname=ifname)

    async def prepare(
        self, ifname: str, servers: Sequence[IPAddress], search: Sequence[str], *,
        timeout: float,
        layer: bool = False,
    ) -> ResolvedDnsState:
        """See :meth:`DnsBackend.prepare`; nothing to read."""
        _check_request(ifname, servers, search)
        return ResolvedDnsState(ifname=ifname)

    async def revert(self, state: DnsState, *, timeout: float) -> bool:
        """See :func:`revert_state` (this backend's command is used)."""
        return await revert_state(state, timeout=timeout, resolvectl_cmd=self.cmd)


_GONE_MARKERS = ("no such device", "not found", "unknown interface")


async def _revert_resolved(state: ResolvedDnsState, cmd: str, timeout: float) -> bool:
    """``resolvectl revert``; on cancellation the command is terminated."""
    argv = [cmd, "revert", state.ifname]
    with deadline(timeout, f"{' '.join(argv)} timed out after {timeout:g}s", DnsError):
        proc = await _run(argv)
    if proc.returncode == 0:
        log.info("%s: DNS settings reverted in systemd-resolved", state.ifname)
        return True
    stderr = proc.stderr.decode(errors="replace").lower()
    if any(m in stderr for m in _GONE_MARKERS) or not _link_exists(state.ifname):
        # resolved forgets a link's settings when the link goes away.
        log.debug("%s: link gone, nothing to revert (%s)", state.ifname, _failed(argv, proc))
        return True
    raise _failed(argv, proc)


# --- dispatch and selection ---------------------------------------------------


async def revert_state(
    state: DnsState,
    *,
    timeout: float,
    resolvconf_cmd: str = "resolvconf",
    resolvectl_cmd: str = "resolvectl",
) -> bool:
    """Undo what an apply recorded in ``state``; needs nothing else.

    File: if the file still holds what tunsup wrote, the original bytes and
    mode are put back the same atomic way (or the file is removed if it did
    not exist); if it already holds the original (or is absent and was
    absent), True; if it changed since, it is left alone (warning) and
    False is returned.  resolvconf: ``resolvconf -d tun.IFACE -f``; a
    non-zero exit raises :class:`DnsError`.  resolved: ``resolvectl revert
    IFACE``; a failure once the link is gone counts as reverted (resolved
    drops a vanished link's settings).

    Timeout raises :class:`DnsError`.  Cancellation: a file revert continues
    in its (abandoned) worker thread; a command is terminated.
    """
    if isinstance(state, FileDnsState):
        return await _revert_file(state, timeout)
    if isinstance(state, ResolvconfDnsState):
        return await _revert_resolvconf(state, resolvconf_cmd, timeout)
    if isinstance(state, ResolvedDnsState):
        return await _revert_resolved(state, resolvectl_cmd, timeout)
    raise TypeError(f"not a DNS state record: {state!r}")


def backend_for_state(
    state: DnsState, *, resolvconf_cmd: str = "resolvconf", resolvectl_cmd: str = "resolvectl"
) -> DnsBackend:
    """The backend that produced ``state`` (for recovery and messages)."""
    if isinstance(state, FileDnsState):
        return FileBackend(state.path)
    if isinstance(state, ResolvconfDnsState):
        return ResolvconfBackend(resolvconf_cmd)
    return ResolvedBackend(resolvectl_cmd)


def select_backend(
    kind: str,
    *,
    resolv_conf: str = DEFAULT_RESOLV_CONF,
    resolvconf_cmd: str = "resolvconf",
    resolvectl_cmd: str = "resolvectl",
    resolved_socket: str | None = None,
) -> DnsBackend:
    """The backend for a configured kind: ``auto``, ``resolved``,
    ``resolvconf`` or ``file``.

    An explicit kind is returned as is (a missing command shows at apply).
    ``auto``: ``resolved`` if systemd-resolved runs (its varlink socket,
    ``resolved_socket`` or :data:`RESOLVED_VARLINK_SOCKET`, exists) and
    ``resolvectl_cmd`` is on PATH; else ``resolvconf`` if on PATH; else
    ``file``.  ``none`` (no DNS changes) is the caller's business and, like
    an unknown kind, raises ValueError.
    """
    if kind == "file":
        return FileBackend(resolv_conf)
    if kind == "resolvconf":
        return ResolvconfBackend(resolvconf_cmd)
    if kind == "resolved":
        return ResolvedBackend(resolvectl_cmd)
    if kind == "none":
        raise ValueError("DNS backend 'none' means no backend; the caller skips DNS")
    if kind != "auto":
        raise ValueError(
            f"unknown DNS backend {kind!r} (expected auto, resolved, resolvconf or file)"
        )
    sock = RESOLVED_VARLINK_SOCKET if resolved_socket is None else resolved_socket
    chosen: DnsBackend
    if os.path.exists(sock) and shutil.which(resolvectl_cmd):
        chosen = ResolvedBackend(resolvectl_cmd)
    elif shutil.which(resolvconf_cmd):
        chosen = ResolvconfBackend(resolvconf_cmd)
    else:
        chosen = FileBackend(resolv_conf)
    log.debug("DNS backend auto: %s", chosen.name)
    return chosen
