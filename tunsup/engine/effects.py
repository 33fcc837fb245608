"""Host changes as plain records with inverses.

Each effect is a frozen attrs value (so that it can be logged and, later,
journaled) with three coroutines:

* ``apply(ctx)`` makes the change and returns the *record* to push on the
  undo stack — often a refined copy saying what was really created (a
  route that already existed is not ours and is never removed);
* ``undo(ctx)`` reverses a record; it is idempotent: what is already gone
  is fine;
* ``abort(ctx)`` cleans up after an ``apply`` that failed or was
  cancelled half-way (by default the same as ``undo``); crash recovery also
  uses it for an intent whose outcome was never recorded;
* ``prepare(ctx)`` (optional) computes, before anything changes, what undo
  will need (the original resolv.conf bytes), so the intent recorded in the
  crash-safe journal is enough to undo a half-applied change.

Timeouts: every host operation below carries its own timeout (see the
adapters); ``undo_timeout`` bounds a whole undo step.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import typing
from collections.abc import Sequence
from typing import ClassVar

import attrs
import trio

from .._bounded import bounded
from .._errors import HostError
from ..config.spec import IPAddress, IPInterface, IPNetwork
from ..host import UNREACHABLE, HelperHandle, PolicyRule
from ..host.dns import DnsBackend, DnsError, DnsState, FileBackend, FileDnsState

# The base types live beside the stack that runs them (no import cycle);
# re-exported here for the effect modules and their users.
from .undo import LAST_CHANCE
from .undo import Effect as Effect
from .undo import EffectContext as EffectContext
from .undo import Handover as Handover
from .undo import HookRecorder as HookRecorder
from .undo import Log as Log
from .undo import OnHook as OnHook

#: Bound on reading a process's details from /proc.
PROC_TIMEOUT = 5.0


def _share(timeout: float, after: int) -> float:
    """The time one of several sequential waits may take: ``timeout``, but
    leaving :data:`~tunsup.engine.undo.LAST_CHANCE` for each of the ``after``
    waits that follow (at least an equal share) before the deadline."""
    from .undo import LAST_CHANCE

    left = trio.current_effective_deadline() - trio.current_time()
    if left == math.inf:
        return timeout
    # The margin lets the wait's own timeout (which names what hung) fire
    # before the caller's deadline, and leaves time to kill and reap.
    share = max(left - LAST_CHANCE * after, left / (after + 1)) - 0.1
    return max(0.0, min(timeout, share))


def expand_hook(command: str, ifname: str) -> str:
    """wg-quick's ``%i`` substitution."""
    return command.replace("%i", ifname)


@attrs.frozen
class Hooks(Effect):
    """A pair of hook lists: ``up`` runs on apply, ``down`` on undo.

    Bring-up pushes (PreUp, PostDown) first and (PostUp, PreDown) last, so
    the exact-reverse undo gives wg-quick's order.  A failed ``up`` list
    does not run its ``down`` list.
    """

    ifname: str
    up_name: str
    up: tuple[str, ...]
    down_name: str
    down: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.up_name}/{self.down_name} hooks of {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        for index, command in enumerate(self.up):
            await self._run(ctx, "up", index, command, ctx.hook_timeout)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        """Run every down hook, in order, whatever the earlier ones did.
        Each gets ``hook_timeout``, but never so much of the step's budget
        that the hooks after it get less than a last chance (a hung
        PreDown must not keep the next one from running)."""
        failed = []
        for index, command in enumerate(self.down):
            timeout = _share(ctx.hook_timeout, len(self.down) - index - 1)
            try:
                await self._run(ctx, "down", index, command, timeout)
            except HostError as exc:
                ctx.log.error("%s hook failed: %s", self.down_name, exc)
                failed.append(str(exc))
        if failed:
            raise HostError(f"{len(failed)} {self.down_name} hook(s) failed: {failed[0]}")

    async def _run(self, ctx: EffectContext, phase: str, index: int, command: str,
                   timeout: float) -> None:
        on_hook = ctx.on_hook

        async def started(pid: int, start_time: int | None) -> None:
            if on_hook is not None:
                await on_hook(self, phase, index, pid, start_time)

        await ctx.host.run_hook(expand_hook(command, self.ifname), _as_logger(ctx.log),
                                timeout, started=started)

    async def abort(self, ctx: EffectContext) -> None:
        pass

    def undo_timeout(self, ctx: EffectContext) -> float:
        return ctx.hook_timeout * max(1, len(self.down)) + 1


@attrs.frozen
class StartHelper(Effect):
    """Start the data-plane helper; its record is a :class:`HelperRunning`.

    With ``pass_tun`` the helper gets the tunnel's owned TUN device (see
    :class:`CreateTun`) as an inherited fd named by ``WG_TUN_FD``.  Every
    helper gets ``WG_PROCESS_FOREGROUND=1`` (wireguard-go must not fork).
    """

    gone_on_reboot: ClassVar[bool] = True
    link_neutral: ClassVar[bool] = True

    ifname: str
    argv: tuple[str, ...]
    pass_tun: bool = False

    def describe(self) -> str:
        return f"helper {' '.join(self.argv)}"

    async def apply(self, ctx: EffectContext) -> Effect:
        env = {**ctx.host.env, "WG_PROCESS_FOREGROUND": "1"}
        pass_fds: tuple[int, ...] = ()
        if self.pass_tun:
            fd = ctx.tun_fds.get(self.ifname)
            if fd is None:
                raise HostError(f"no TUN device of {self.ifname} to hand to the helper")
            env["WG_TUN_FD"] = str(fd)
            pass_fds = (fd,)
        spawned: list[HelperHandle] = []
        try:
            # A failed start stops what it spawned; a stop waiting for
            # that gives it no more than what is left of its budget.
            handle = await ctx.host.start_helper(ctx.nursery, self.argv, log=_as_logger(ctx.log),
                                                 env=env, pass_fds=pass_fds,
                                                 on_spawn=spawned.append,
                                                 reaper=ctx.host.reaper,
                                                 abort_within=ctx.stop_budget,
                                                 stop_noted=ctx.stop_noted)
        except BaseException:
            # start_helper stopped what it spawned, unless the process is
            # stuck in the kernel: then abort must say it is still running.
            for helper in spawned:
                if not helper.exited.is_set():
                    ctx.unreaped[self.ifname] = helper
            raise
        ctx.helpers[handle.pid] = handle
        ctx.log.info("started helper %s (pid %d)", self.argv[0], handle.pid)
        return HelperRunning(self.ifname, self.argv, handle.pid, handle.start_time)

    async def abort(self, ctx: EffectContext) -> None:
        # Live: start_helper either returns a running helper or stops what
        # it spawned before raising; one it had to SIGKILL may leave its
        # UAPI socket file.  Recovery: the instance may have died between
        # the spawn and its record; find the helper by its exact command
        # line, started after the dead instance itself.
        stuck = ctx.unreaped.pop(self.ifname, None)
        if stuck is not None and not stuck.exited.is_set():
            # Its UAPI socket is live: leave it.  The intent stays in the
            # journal, so `cleanup` tries again once the process can die.
            raise HostError(f"helper {self.argv[0]} (pid {stuck.pid}) is still running: "
                            "it did not exit after SIGKILL")
        if not ctx.recovering or ctx.instance_start is None:
            await _remove_stale_socket(ctx, self.ifname)
            return
        from ..host.process import find_processes, terminate_foreign

        for pid, start in await bounded(PROC_TIMEOUT, "looking for unrecorded helpers",
                                        find_processes, self.argv, ctx.instance_start):
            ctx.log.info("stopping unrecorded helper %s (pid %d)", self.argv[0], pid)
            if not await terminate_foreign(pid, start, grace=ctx.stop_grace):
                raise HostError(f"helper pid {pid} did not exit after SIGKILL")
        await _remove_stale_socket(ctx, self.ifname)


@attrs.frozen
class HelperRunning(Effect):
    """A helper process, identified by pid *and* start time."""

    gone_on_reboot: ClassVar[bool] = True
    link_neutral: ClassVar[bool] = True

    ifname: str
    argv: tuple[str, ...]
    pid: int
    start_time: int | None

    def describe(self) -> str:
        return f"helper {self.argv[0]} (pid {self.pid})"

    async def apply(self, ctx: EffectContext) -> Effect:
        return self

    async def undo(self, ctx: EffectContext) -> None:
        handle = ctx.helpers.get(self.pid)
        if handle is None:
            await self._undo_foreign(ctx)
            return
        # Keep a second of the step's budget for SIGKILL and the reap: past
        # the stop deadline the grace shrinks to nothing.
        left = trio.current_effective_deadline() - trio.current_time()
        grace = max(0.0, min(ctx.stop_grace, left - 1.0))
        reaped = await handle.stop(grace)
        if not reaped:
            handle.close()
            raise HostError(f"helper pid {self.pid} could not be reaped after SIGKILL")
        ctx.helpers.pop(self.pid, None)
        ctx.log.info("helper pid %d stopped: %s", self.pid, handle.describe_exit())
        await _remove_stale_socket(ctx, self.ifname)

    async def _undo_foreign(self, ctx: EffectContext) -> None:
        """Recovery: the helper is not our child.  It is signalled only if
        its pid still has the recorded start time (never a reused pid)."""
        from ..host.process import terminate_foreign
        from ..pidfile import process_start_time

        start = await bounded(PROC_TIMEOUT, f"reading the start time of pid {self.pid}",
                              process_start_time, self.pid)
        if start is None or self.start_time is None or start != self.start_time:
            ctx.log.info("helper pid %d is gone%s", self.pid,
                         "" if start is None else " (pid reused by another process: left alone)")
        else:
            left = trio.current_effective_deadline() - trio.current_time()
            grace = max(0.0, min(ctx.stop_grace, left - 1.0))
            if not await terminate_foreign(self.pid, start, grace=grace):
                raise HostError(f"helper pid {self.pid} did not exit after SIGKILL")
            ctx.log.info("orphaned helper pid %d stopped", self.pid)
        await _remove_stale_socket(ctx, self.ifname)

    def undo_timeout(self, ctx: EffectContext) -> float:
        return ctx.stop_grace + 6.0


async def _remove_stale_socket(ctx: EffectContext, ifname: str) -> None:
    """A killed helper leaves its UAPI socket file behind.  The directory is
    shared by every namespace, so the file is removed only when nobody
    listens on it any more (another namespace's wireguard-go may use the
    same name).  Bounded (2 s); cancellable."""
    from ..host.uapi import socket_path

    path = socket_path(ifname, ctx.host.uapi_dir)
    # Set when the wait below gives up: a late thread must not remove a
    # socket a new helper may have created meanwhile.
    gave_up = threading.Event()

    def unlink_if_socket() -> bool:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode) and not gave_up.is_set():
                os.unlink(path)
                return True
        except FileNotFoundError:
            pass
        return False

    with trio.move_on_after(2):
        try:
            stream = await trio.open_unix_socket(path)
        except ConnectionRefusedError:
            pass  # a socket file nobody listens on: stale
        except OSError:
            return  # no file (the usual case: the helper removed it), or not ours to judge
        else:
            stream.socket.close()  # someone listens: not stale
            return
        if await bounded(2, f"removing {path}", unlink_if_socket, gave_up=gave_up):
            ctx.log.info("removed stale UAPI socket %s", path)


@attrs.frozen
class CreateTun(Effect):
    """tunsup creates the tunnel's TUN device itself (persistent, so that it
    outlives any one helper); its record is an :class:`OwnedTun`.  The open
    fd is kept in the context for the helpers, never in a record."""

    gone_on_reboot: ClassVar[bool] = True

    name: str
    #: Packets on the fd carry the packet-information header (no IFF_NO_PI).
    packet_info: bool = False

    def describe(self) -> str:
        return f"TUN device {self.name}"

    async def apply(self, ctx: EffectContext) -> Effect:
        device = await ctx.host.create_tun(self.name, packet_info=self.packet_info)
        # No checkpoint from here on: the fd is known to the context as soon
        # as it exists, and the record is pushed right after.
        ctx.tun_fds[self.name] = device.fd
        ctx.log.info("TUN device %s created (persistent, owned by tunsup; %s)", self.name,
                     "packet-information header" if self.packet_info else "IFF_NO_PI")
        return OwnedTun(self.name, device.index)

    async def abort(self, ctx: EffectContext) -> None:
        # create_tun is all or nothing (it rolls back when cancelled); only
        # an fd already known to the context can be left to clean up.
        # Recovery: the instance may have died between creating the
        # persistent device and recording it; the bring-up had checked that
        # no link of that name existed, so one that exists now is ours.
        if ctx.recovering or self.name in ctx.tun_fds:
            index = await ctx.host.net.link_index(self.name)
            await OwnedTun(self.name, index or 0).undo(ctx)


@attrs.frozen
class OwnedTun(Effect):
    """A persistent TUN device tunsup created.  Undo sets it down, deletes
    it (unless already gone) and closes tunsup's fd on it."""

    gone_on_reboot: ClassVar[bool] = True

    name: str
    index: int

    def describe(self) -> str:
        return f"TUN device {self.name}"

    async def apply(self, ctx: EffectContext) -> Effect:
        return self

    def deletes_link(self) -> int | None:
        return self.index or None

    async def undo(self, ctx: EffectContext) -> None:
        fd = ctx.tun_fds.pop(self.name, None)
        closed = True
        try:
            if self.index and await ctx.host.net.link_name(self.index) == self.name:
                await _down_and_delete(ctx, self.index, self.name)
            else:
                ctx.log.debug("TUN device %s already gone", self.name)
        finally:
            if fd is not None:
                closed = await _close_tun_anyway(ctx, fd)
        if not closed:
            raise HostError(f"closing TUN fd {fd} did not finish in time "
                            "(it may complete in the background)")

    async def abort(self, ctx: EffectContext) -> None:
        pass


#: How long a teardown whose deadline has passed still waits for the close
#: of a TUN fd to start and finish (it finishes in its abandoned thread).
TUN_CLOSE_GRACE = 2.0


async def _close_tun_anyway(ctx: EffectContext, fd: int) -> bool:
    """Close ``fd``, even when the undo step's deadline has passed (a link
    deletion that hung): the fd is no longer in ``ctx.tun_fds``, so nothing
    else would close it, and an open fd keeps the device attached for the
    life of the service (a later start of the tunnel could not take it).
    Shielded, within what is left of the step's budget, but at least
    :data:`TUN_CLOSE_GRACE`; past it the close may still happen in its
    abandoned thread.  False when it did not finish in that time; the
    host's close raises :class:`HostError` past its own bound (5 s) or
    when the close fails."""
    bound = max(trio.current_effective_deadline() - trio.current_time(), TUN_CLOSE_GRACE)
    with trio.CancelScope(shield=True):
        with trio.move_on_after(bound) as waited:
            await ctx.host.close_tun(fd)
        if waited.cancelled_caught:
            ctx.log.warning("closing TUN fd %d did not finish within %.3g s", fd, bound)
            return False
    return True


async def _down_and_delete(ctx: EffectContext, index: int, name: str) -> None:
    """Set link ``index`` down (a failure is logged, not fatal), then delete
    it; both only while the index still names ``name``.  Cancellation: see
    the netlink worker (a call already running completes first)."""
    try:
        await ctx.host.net.set_link_up(index, False, name=name)
    except HostError as exc:
        ctx.log.warning("setting %s down failed (deleting it anyway): %s", name, exc)
    if await ctx.host.net.delete_link(index, name):
        ctx.log.info("link %s set down and deleted", name)
    else:
        ctx.log.info("link %s already gone", name)


@attrs.frozen
class HelperGeneration(Effect):
    """The helper and what depends on it, kept on a nested effect stack.

    The tunnel applies the helper, the wait for its UAPI socket and its
    configuration (in helper-created-TUN mode also the link and everything
    on it) to an :class:`~tunsup.engine.undo.EffectStack` held in
    ``ctx.generations``; this record stands for it on the tunnel's stack.
    When the helper dies, supervision unwinds that stack and applies a new
    generation to a fresh one, while the records around this one (the owned
    TUN below it, addresses and routes above it) stay in place.  Undo
    unwinds whatever generation is current.
    """

    gone_on_reboot: ClassVar[bool] = True

    ifname: str

    def describe(self) -> str:
        return f"helper generation of {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        return self

    async def undo(self, ctx: EffectContext) -> None:
        """Unwind the current generation within what is left of this step's
        budget.  The nested unwind is shielded like any other: cancellation
        does not interrupt it."""
        stack = ctx.generations.pop(self.ifname, None)
        if stack is None:
            return
        left = trio.current_effective_deadline() - trio.current_time()
        report = await stack.unwind(max(left, 0.0))
        if not report.complete:
            raise HostError("; ".join(report.failures))

    async def abort(self, ctx: EffectContext) -> None:
        pass

    def undo_timeout(self, ctx: EffectContext) -> float:

        stack = ctx.generations.get(self.ifname)
        records = stack.records if stack is not None else ()
        return sum(r.undo_timeout(ctx) + LAST_CHANCE for r in records) + LAST_CHANCE


@attrs.frozen
class Link(Effect):
    """A link tunsup owns (created by its helper or by tunsup).

    Undo sets it down, then deletes it: sockets bound to it get
    ENETUNREACH at once instead of breaking silently.  A failing "down" is
    logged, never fatal.  Bringing the link up has no inverse of its own;
    this one covers it, right before the delete.
    """

    gone_on_reboot: ClassVar[bool] = True

    name: str
    index: int

    def describe(self) -> str:
        return f"link {self.name}"

    async def apply(self, ctx: EffectContext) -> Effect:
        found = await ctx.host.net.link_name(self.index)
        if found != self.name:
            raise HostError(f"link {self.name} (#{self.index}) is not there")
        return self

    def deletes_link(self) -> int | None:
        return self.index

    async def undo(self, ctx: EffectContext) -> None:
        await _down_and_delete(ctx, self.index, self.name)

    # abort = undo: apply only adopts the link the helper created (the
    # bring-up checked that no link of that name existed before); if the
    # outcome was not recorded, undo's name check keeps it safe.


@attrs.frozen
class ConfigureWireguard(Effect):
    """Configure the device over UAPI.  The request holds key material, so
    it is kept out of ``repr`` and out of the pushed record."""

    gone_on_reboot: ClassVar[bool] = True
    #: It lives in the helper (a tunnel started alone configures it while
    #: the link is configured: its records sit among the link's).
    link_neutral: ClassVar[bool] = True

    ifname: str
    #: Key material: never in repr, never journaled (metadata "secret").
    request: bytes = attrs.field(default=b"", repr=False, metadata={"secret": True})
    timeout: float = 10.0

    def describe(self) -> str:
        return f"WireGuard configuration of {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        from ..host.uapi import socket_path, uapi_set

        await uapi_set(socket_path(self.ifname, ctx.host.uapi_dir), self.request,
                       timeout=self.timeout)
        return WireguardConfigured(self.ifname)

    async def abort(self, ctx: EffectContext) -> None:
        pass


@attrs.frozen
class WireguardConfigured(Effect):
    """Nothing to undo: the configuration lives in the helper, which stops."""

    gone_on_reboot: ClassVar[bool] = True
    link_neutral: ClassVar[bool] = True

    ifname: str

    def describe(self) -> str:
        return f"WireGuard configuration of {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        return self

    async def undo(self, ctx: EffectContext) -> None:
        pass


@attrs.frozen
class Address(Effect):
    gone_on_reboot: ClassVar[bool] = True
    ifname: str
    index: int
    address: IPInterface
    #: False when the address was already there: then it is never removed.
    owned: bool = True

    def describe(self) -> str:
        return f"address {self.address} on {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        created = await ctx.host.net.add_address(self.index, self.address)
        if not created:
            ctx.log.warning("address %s already on %s; leaving it alone", self.address,
                            self.ifname)
        else:
            ctx.log.info("address %s added", self.address)
        return attrs.evolve(self, owned=created)

    def goes_with_link(self) -> int | None:
        return self.index

    async def undo(self, ctx: EffectContext) -> None:
        if self.owned:
            await ctx.host.net.delete_address(self.index, self.address)


@attrs.frozen
class Mtu(Effect):
    gone_on_reboot: ClassVar[bool] = True
    ifname: str
    index: int
    mtu: int

    def describe(self) -> str:
        return f"MTU {self.mtu} on {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        await ctx.host.net.set_mtu(self.index, self.mtu)
        ctx.log.info("MTU %d set", self.mtu)
        return self

    def goes_with_link(self) -> int | None:
        return self.index

    async def undo(self, ctx: EffectContext) -> None:
        pass  # the link it was set on is deleted by the Link effect

    async def abort(self, ctx: EffectContext) -> None:
        pass


@attrs.frozen
class LinkUp(Effect):
    gone_on_reboot: ClassVar[bool] = True
    ifname: str
    index: int

    def describe(self) -> str:
        return f"{self.ifname} up"

    async def apply(self, ctx: EffectContext) -> Effect:
        await ctx.host.net.set_link_up(self.index, True)
        ctx.log.info("link %s up", self.ifname)
        return self

    def goes_with_link(self) -> int | None:
        return self.index

    async def undo(self, ctx: EffectContext) -> None:
        pass  # see Link: down happens right before the delete

    async def abort(self, ctx: EffectContext) -> None:
        pass


@attrs.frozen
class Routes(Effect):
    """Routes through the tunnel, installed and removed in bulk."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    index: int
    table: int
    prefixes: tuple[IPNetwork, ...]

    def describe(self) -> str:
        return f"{len(self.prefixes)} route(s) via {self.ifname} in table {self.table}"

    async def apply(self, ctx: EffectContext) -> Effect:
        started = trio.current_time()
        result = await ctx.host.net.add_routes(self.index, self.prefixes, table=self.table)
        elapsed = trio.current_time() - started
        for net in result.existed:
            ctx.log.warning("route %s already exists in table %d; not ours, left alone",
                            net, self.table)
        ctx.log.info("%d route(s) added to table %d in %.1f ms", len(result.added), self.table,
                     elapsed * 1000)
        return attrs.evolve(self, prefixes=tuple(result.added))

    def goes_with_link(self) -> int | None:
        return self.index

    async def undo(self, ctx: EffectContext) -> None:
        if not self.prefixes:
            return
        started = trio.current_time()
        n = await ctx.host.net.delete_routes(self.index, self.prefixes, table=self.table)
        ctx.log.info("%d route(s) removed in %.1f ms", n,
                     (trio.current_time() - started) * 1000)

    def undo_timeout(self, ctx: EffectContext) -> float:
        return 60.0


@attrs.frozen
class Dns(Effect):
    """A tunnel's DNS servers and search domains.

    With ``layered`` it is an in-place change of a running tunnel's DNS,
    on top of the claim it replaces (``previous_servers`` and
    ``previous_search``): its undo gives those back (the file backend pops
    the claim; the others set the previous values again), and the undo of
    the tunnel's own record then restores the original.
    """

    ifname: str
    backend: str
    servers: tuple[IPAddress, ...]
    search: tuple[str, ...]
    timeout: float = 10.0
    #: Set on the pushed record: what the backend needs to revert.
    state: DnsState | None = None
    layered: bool = False
    previous_servers: tuple[IPAddress, ...] = ()
    previous_search: tuple[str, ...] = ()

    def describe(self) -> str:
        what = "DNS change" if self.layered else "DNS"
        return f"{what} of {self.ifname} ({self.backend})"

    async def _backend(self, ctx: EffectContext) -> DnsBackend:
        # "auto" looks at the machine (files, PATH): off the trio thread.
        backend = await bounded(self.timeout, f"choosing the {self.backend} DNS backend",
                                ctx.host.dns_backend, self.backend, error=DnsError)
        return _shared(backend, ctx)

    async def prepare(self, ctx: EffectContext) -> Effect:
        backend = await self._backend(ctx)
        state = await backend.prepare(self.ifname, self.servers, self.search,
                                      timeout=self.timeout, layer=self.layered)
        return attrs.evolve(self, backend=backend.name, state=state)

    async def apply(self, ctx: EffectContext) -> Effect:
        backend = await self._backend(ctx)
        state = await backend.apply(self.ifname, self.servers, self.search, timeout=self.timeout,
                                    layer=self.layered)
        what = " ".join(map(str, [*self.servers, *self.search]))
        if isinstance(state, FileDnsState) and state.left_alone:
            # Recorded all the same: once the file is tunsup's again (never
            # overwritten by it), the claims say what it must hold.
            ctx.log.warning("DNS not %s: %s was changed by someone else since tunsup wrote "
                            "it, and is left alone (%s not added)",
                            "changed" if self.layered else "set", state.path, what)
        else:
            ctx.log.info("DNS %s via %s: %s", "changed" if self.layered else "set",
                         backend.name, what)
        # Record the backend actually used: "auto" could pick another one
        # at undo time if the machine changed meanwhile.
        return attrs.evolve(self, backend=backend.name, state=state)

    async def undo(self, ctx: EffectContext) -> None:
        if self.state is None:
            return
        if isinstance(self.state, FileDnsState):
            # The record says which file: its owner releases this claim.
            backend: DnsBackend = FileBackend(self.state.path, owners=ctx.host.dns_owners)
        else:
            backend = await self._backend(ctx)
            if self.layered:
                # These backends hold one setting per interface: the change
                # is undone by setting the previous servers again (after a
                # crash the tunnel's own record then removes them).
                if not ctx.recovering:
                    await backend.apply(self.ifname, self.previous_servers,
                                        self.previous_search, timeout=self.timeout)
                    ctx.log.info("DNS change undone")
                return
        if await backend.revert(self.state, timeout=self.timeout):
            ctx.log.info("DNS change undone" if self.layered else "DNS restored")

    async def abort(self, ctx: EffectContext) -> None:
        # Live: a backend's apply leaves the original in place when it fails.
        # Recovery: the prepared state says what would have been written;
        # revert restores only if the file holds exactly that.
        if ctx.recovering:
            await self.undo(ctx)

    def adopted(self, ctx: EffectContext) -> None:
        if isinstance(self.state, FileDnsState) and self.state.ifname:
            FileBackend(self.state.path, owners=ctx.host.dns_owners).readopt(
                self.ifname, self.servers, self.search, self.state)


def _shared(backend: DnsBackend, ctx: EffectContext) -> DnsBackend:
    """The file backend goes through the host's one owner of its file."""
    if isinstance(backend, FileBackend):
        return attrs.evolve(backend, owners=ctx.host.dns_owners)
    return backend


def _as_logger(log: Log) -> logging.Logger:
    return log if isinstance(log, logging.Logger) else log.logger


def select_routes(
    prefixes: Sequence[IPNetwork], existing: Sequence[IPNetwork]
) -> tuple[IPNetwork, ...]:
    """The prefixes that need a route, as wg-quick decides: every AllowedIPs
    prefix once, except those already covered by a route through the tunnel
    (``existing``: the prefix routes of its addresses).

    Narrower prefixes covered by a wider one *of the list* are kept: a
    route on another link between the two lengths would otherwise win.
    """
    covering = [span(c) for c in existing]
    seen: set[tuple[int, int, int]] = set()
    chosen: list[IPNetwork] = []
    for net in prefixes:
        key = span(net)  # equal spans (one version): equal networks
        if key in seen:
            continue
        seen.add(key)
        version, first, last = key
        for v, lo, hi in covering:
            if v == version and lo <= first and last <= hi:
                break  # net.subnet_of(c), in integers
        else:
            chosen.append(net)
    return tuple(chosen)


def span(net: IPNetwork) -> tuple[int, int, int]:
    """``(version, first address, last address)`` of ``net`` as integers:
    ``a.subnet_of(b)`` is ``b.first <= a.first and a.last <= b.last`` for
    one version, without ipaddress's per-call checks and objects."""
    first = int(net.network_address)
    return net.version, first, first | ((1 << (net.max_prefixlen - net.prefixlen)) - 1)


@attrs.frozen
class Rule(Effect):
    """A policy rule (full-tunnel routing)."""

    gone_on_reboot: ClassVar[bool] = True

    #: The rules that lead to a full tunnel's table (and its kill switch).
    protects: ClassVar[bool] = True

    ifname: str
    rule: PolicyRule
    #: False when an identical rule already existed: never removed then.
    owned: bool = True

    def describe(self) -> str:
        return f"rule {self.rule}"

    async def apply(self, ctx: EffectContext) -> Effect:
        created = await ctx.host.net.add_rule(self.rule)
        if created:
            ctx.log.info("added %s", self.rule)
        else:
            ctx.log.warning("%s already exists; not ours, left alone", self.rule)
        return attrs.evolve(self, owned=created)

    async def undo(self, ctx: EffectContext) -> None:
        if self.owned and await ctx.host.net.delete_rule(self.rule):
            ctx.log.info("removed %s", self.rule)


@attrs.frozen
class Sysctl(Effect):
    """A ``net.*`` sysctl, put back at undo if tunsup changed it and nobody
    changed it since."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    key: str
    value: str
    #: The value before; None when tunsup did not change it.
    previous: str | None = None

    def describe(self) -> str:
        return f"sysctl {self.key}={self.value}"

    async def prepare(self, ctx: EffectContext) -> Effect:
        current = await ctx.host.net.read_sysctl(self.key)
        return attrs.evolve(self, previous=None if current == self.value else current)

    async def apply(self, ctx: EffectContext) -> Effect:
        if self.previous is not None:
            await ctx.host.net.write_sysctl(self.key, self.value)
            ctx.log.info("sysctl %s=%s (was %s)", self.key, self.value, self.previous)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        if self.previous is None:
            return
        current = await ctx.host.net.read_sysctl(self.key)
        if current == self.previous:
            return  # never changed (a crash before the write), or already back
        if current != self.value:
            ctx.log.warning("leaving %s=%s alone: it changed since tunsup set it",
                            self.key, current)
            return
        await ctx.host.net.write_sysctl(self.key, self.previous)
        ctx.log.info("sysctl %s restored to %s", self.key, self.previous)


#: Metric of the kill switch's fail-closed routes: worse than any real one.
KILL_SWITCH_METRIC = 0xFFFFFFF0


@attrs.frozen
class KillSwitch(Effect):
    """``unreachable`` routes, at the worst metric, for everything the
    tunnel carries.  While the tunnel's own routes exist they win; when the
    tunnel link disappears (helper killed, tunsup killed) these remain, so
    traffic fails instead of leaving through another interface.  They are
    not tied to any link: they outlive tunsup until ``cleanup`` or a stop.
    Routes that already exist are owned only when an adopted kill switch
    (of a dead instance, for this tunnel) hands them over.
    """

    gone_on_reboot: ClassVar[bool] = True

    protects: ClassVar[bool] = True

    ifname: str
    table: int
    prefixes: tuple[IPNetwork, ...]

    #: The metric of its unreachable routes.
    metric: typing.ClassVar[int] = KILL_SWITCH_METRIC
    what: typing.ClassVar[str] = "kill switch"

    def describe(self) -> str:
        return f"{self.what} of {self.ifname} ({len(self.prefixes)} unreachable route(s), " \
               f"table {self.table})"

    async def apply(self, ctx: EffectContext) -> Effect:
        result = await ctx.host.net.add_routes(UNREACHABLE, self.prefixes, table=self.table,
                                               metric=self.metric)
        taken: tuple[IPNetwork, ...] = ()
        if ctx.adopted is not None and result.existed:
            # The dead instance's kill switch: it never went away, and now
            # this record owns those routes (no gap between the two).
            taken = ctx.adopted.take_routes(self.ifname, self.table, result.existed,
                                            self.metric)
        ctx.log.info("%s: %d unreachable route(s) in table %d%s", self.what, len(result.added),
                     self.table, f", {len(taken)} taken over" if taken else "")
        return attrs.evolve(self, prefixes=(*result.added, *taken))

    async def undo(self, ctx: EffectContext) -> None:
        if self.prefixes:
            await ctx.host.net.delete_routes(UNREACHABLE, self.prefixes, table=self.table,
                                             metric=self.metric)
            ctx.log.info("%s removed (%d route(s))", self.what, len(self.prefixes))

    def undo_timeout(self, ctx: EffectContext) -> float:
        return 60.0


#: Metric of the routes that hold a tunnel's prefixes while it is rebuilt:
#: better than the kill switch's (so the two never collide), worse than any
#: real route (so the new tunnel's routes win as soon as they exist).
HOLD_METRIC = KILL_SWITCH_METRIC - 1


@attrs.frozen
class HeldRoutes(KillSwitch):
    """``unreachable`` routes that hold a tunnel's prefixes while it is
    rebuilt (make-before-break): between the old tunnel's teardown and the
    new one's routes, its traffic fails instead of leaving another way."""

    metric: typing.ClassVar[int] = HOLD_METRIC
    what: typing.ClassVar[str] = "hold"
    #: Not a protection the user asked for: recovery removes a hold a dead
    #: instance left (a tunnel without the kill switch must not stay
    #: blackholed after a crash) ...
    protects: typing.ClassVar[bool] = False
    #: ... unless the tunnel it holds has the kill switch: between the old
    #: tunnel's kill switch and the new one's, the hold is all there is.
    kill_switch: bool = False

    def protection(self) -> bool:
        return self.kill_switch


@attrs.frozen
class HeldRule(Rule):
    """A rule that holds a full tunnel's traffic while it is rebuilt: the
    copy of one of its rules for unmarked packets only (``fwmark 0``), at
    the same priority, so that once the old tunnel's rules are gone its
    traffic still finds the tunnel's table (held by :class:`HeldRoutes`)
    instead of the main table's default route, while the helpers' own
    (marked) packets pass.  Never identical to a tunnel's own rule."""

    #: Not a protection the user asked for: see :class:`HeldRoutes`,
    #: unless the tunnel it holds has the kill switch.
    protects: ClassVar[bool] = False
    kill_switch: bool = False

    def protection(self) -> bool:
        return self.kill_switch

    def describe(self) -> str:
        return f"hold {self.rule}"


# --- in-place changes (reload) ------------------------------------------------
#
# A reload pushes these on the running tunnel's stack, above what the
# bring-up pushed.  Each one's undo puts back the value it replaced, so the
# unwind of a stop (or of a crash recovery) walks the tunnel back through
# every reload to the bring-up's records, which then restore the host.


async def _link_is(ctx: EffectContext, index: int, name: str) -> bool:
    return await ctx.host.net.link_name(index) == name


@attrs.frozen
class WireguardChanged(Effect):
    """An in-place change of the running helper's WireGuard configuration:
    a ``set=1`` request with only what differs (peers removed, added or
    changed, keys, listen port, fwmark).  Undo sends the inverse request,
    so that a failed reload rolls back.  Once the reload succeeded its
    record is *settled* (dropped from the stack, marked undone in the
    journal): the configuration lives in the helper, which a stop ends.
    Both requests hold key material: never in repr, never journaled."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    summary: str
    request: bytes = attrs.field(default=b"", repr=False, metadata={"secret": True})
    undo_request: bytes = attrs.field(default=b"", repr=False, metadata={"secret": True})
    timeout: float = 10.0

    def describe(self) -> str:
        return f"WireGuard change of {self.ifname} ({self.summary})"

    async def apply(self, ctx: EffectContext) -> Effect:
        from ..host.uapi import socket_path, uapi_set

        await uapi_set(socket_path(self.ifname, ctx.host.uapi_dir), self.request,
                       timeout=self.timeout)
        ctx.log.info("WireGuard configuration changed in place: %s", self.summary)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        # Recovery: the helper that holds the change is stopped anyway (and
        # the journal never holds the request).
        if ctx.recovering or not self.undo_request:
            return
        from ..host.uapi import socket_path, uapi_set

        await uapi_set(socket_path(self.ifname, ctx.host.uapi_dir), self.undo_request,
                       timeout=self.timeout)
        ctx.log.info("WireGuard change undone: %s", self.summary)


@attrs.frozen
class RoutesRemoved(Effect):
    """Routes removed in place (after their replacements were added); undo
    adds them back while their link (or, for ``unreachable`` routes, the
    table) is still there: a link that is gone took them with it."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    index: int
    table: int
    prefixes: tuple[IPNetwork, ...]
    metric: int | None = None

    def describe(self) -> str:
        return f"removal of {len(self.prefixes)} route(s) via {self.ifname} in table {self.table}"

    async def apply(self, ctx: EffectContext) -> Effect:
        n = await ctx.host.net.delete_routes(self.index, self.prefixes, table=self.table,
                                             metric=self.metric)
        ctx.log.info("%d route(s) removed from table %d", n, self.table)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        if not self.prefixes:
            return
        if self.index != UNREACHABLE and not await _link_is(ctx, self.index, self.ifname):
            return
        await ctx.host.net.add_routes(self.index, self.prefixes, table=self.table,
                                      metric=self.metric)
        ctx.log.info("%d route(s) put back in table %d", len(self.prefixes), self.table)

    def undo_timeout(self, ctx: EffectContext) -> float:
        return 60.0


@attrs.frozen
class AddressRemoved(Effect):
    """An address tunsup had added, removed in place; undo adds it back
    while the link is there."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    index: int
    address: IPInterface

    def describe(self) -> str:
        return f"removal of address {self.address} from {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        await ctx.host.net.delete_address(self.index, self.address)
        ctx.log.info("address %s removed", self.address)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        if await _link_is(ctx, self.index, self.ifname):
            await ctx.host.net.add_address(self.index, self.address)
            ctx.log.info("address %s put back", self.address)


@attrs.frozen
class MtuChanged(Effect):
    """The MTU replaced in place (``old`` -> ``new``); undo sets ``old``
    back while the link is there."""

    gone_on_reboot: ClassVar[bool] = True

    ifname: str
    index: int
    old: int
    new: int

    def describe(self) -> str:
        return f"MTU {self.old} -> {self.new} on {self.ifname}"

    async def apply(self, ctx: EffectContext) -> Effect:
        await ctx.host.net.set_mtu(self.index, self.new)
        ctx.log.info("MTU changed in place: %d -> %d", self.old, self.new)
        return self

    async def undo(self, ctx: EffectContext) -> None:
        if await _link_is(ctx, self.index, self.ifname):
            await ctx.host.net.set_mtu(self.index, self.old)
