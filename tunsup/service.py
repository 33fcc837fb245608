"""The service: a :class:`Supervisor` with its control plane.

:func:`run_service` starts the control server (which outlives the tunnels'
teardown, so that ``tunsup stop`` sees every line of it and learns how it
ended), the systemd watchdog pings, and the supervisor; when the
supervisor returns it sends the exit event to every log subscriber, then
closes the socket.

:class:`ServiceOps` is the object the control server calls: one method per
op, each translating a request into a supervisor call and its outcome into
a result or an :class:`OpError`.  The control server knows nothing of the
engine beyond this object.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from typing import Any

import attrs
import trio
from trio_util import periodic

from . import __version__
from ._bounded import bounded
from ._errors import ConfigError, ExitCode, HostError, config_errors
from ._log import LogHub
from .config.conflicts import Tenant, find_conflicts
from .config.settings import OnFailure
from .config.sources import ConfigSource, Loaded
from .config.spec import TunnelSpec
from .config.toml import SupervisorConfig
from .control import protocol as proto
from .control.server import ControlServer, ControlSettings, OpError
from .engine.journal import Journal, JournalObserver
from .engine.supervisor import (
    CONFIG,
    AlreadyRunning,
    Change,
    ChangeFailed,
    NoSuchTunnel,
    Slot,
    StartFailed,
    Stopping,
    Supervisor,
)
from .engine.tunnel import Tunnel, TunnelOptions
from .host import Host, sdnotify
from .host.uapi import UapiError, socket_path, uapi_get

log = logging.getLogger("tunsup")

#: Bound on asking one helper for its peers' counters during ``status``.
UAPI_STATUS_TIMEOUT = 1.0
#: Bound on reading configuration files in a worker thread.
LOAD_TIMEOUT = 10.0


class ServiceOps:
    """Answers the control ops with a running :class:`Supervisor`."""

    def __init__(self, supervisor: Supervisor, source: ConfigSource, loaded: Loaded) -> None:
        self.supervisor = supervisor
        self.source = source
        self.loaded = loaded

    async def _load(self, fn: Any, *args: Any) -> Any:
        """Run a (synchronous) configuration loader in a worker thread,
        bounded by LOAD_TIMEOUT; ConfigError becomes an OpError.
        Cancellable: the thread is abandoned (it only reads files)."""
        try:
            return await bounded(LOAD_TIMEOUT, "reading the configuration", fn, *args)
        except (ConfigError, HostError) as exc:
            raise OpError(proto.CONFIG, str(exc)) from None

    async def status(self) -> dict[str, Any]:
        """The service and every tunnel; peers' counters come from one
        bounded UAPI ``get`` per tunnel, all at once.  Cancellable."""
        sup = self.supervisor
        now = time.time()
        slots = sup.slots()
        tunnels = [_tunnel_status(slot, now) for slot in slots]
        async with trio.open_nursery() as nursery:
            for slot, entry in zip(slots, tunnels, strict=True):
                if slot.up_since is not None:
                    nursery.start_soon(self._peers, slot.tunnel, entry, now)
        # Failed while up (on_failure = "keep-running", or others remain):
        # shown until replaced or taken down, with why they failed.
        tunnels += [_tunnel_status(slot, now, ended=True) for slot in sup.failed()]
        return {
            "service": {
                "pid": os.getpid(),
                "state": sup.phase,
                "uptime": None if sup.started_at is None else now - sup.started_at,
                "version": __version__,
            },
            "tunnels": tunnels,
        }

    async def _peers(self, tunnel: Tunnel, entry: dict[str, Any], now: float) -> None:
        """Fill ``entry``'s peers from one UAPI ``get``, bounded by
        UAPI_STATUS_TIMEOUT (a stopped helper costs that, never a hang).
        Cancellable."""
        path = socket_path(tunnel.name, tunnel.host.uapi_dir)
        try:
            device = await uapi_get(path, timeout=UAPI_STATUS_TIMEOUT, prefixes=False)
        except UapiError as exc:
            entry["peers_error"] = str(exc)
            return
        entry["listen_port"] = device.listen_port
        entry["peers"] = [
            {
                "public_key": peer.public_key.to_base64(),
                "endpoint": peer.endpoint,
                "last_handshake": peer.last_handshake,
                "last_handshake_age": (None if peer.last_handshake is None
                                       else max(0.0, now - peer.last_handshake)),
                "rx_bytes": peer.rx_bytes,
                "tx_bytes": peer.tx_bytes,
                "allowed_ips": peer.allowed_ip_count,
                "persistent_keepalive": peer.persistent_keepalive,
            }
            for peer in device.peers
        ]

    async def up(self, config: str) -> dict[str, Any]:
        """Start the tunnel of wg-quick file ``config``; answers once it is
        up.  A tunnel of that name that runs with another configuration is
        changed to this one (in place where possible: see
        :meth:`Supervisor.add`).  Cancelling abandons the wait, not the
        start."""
        spec, entry = await self._load(self.source.load_one, config, self.loaded.config)
        options = self.loaded.config.tunnel_options(entry)
        try:
            tunnel, started = await self.supervisor.add(spec, options)
        except AlreadyRunning as exc:
            raise OpError(proto.CONFLICT, str(exc)) from None
        except ConfigError as exc:  # it conflicts with a running tunnel
            raise OpError(proto.CONFIG, str(exc)) from None
        except ChangeFailed as exc:
            raise OpError(proto.FAILED if exc.restored else proto.INCOMPLETE, str(exc)) from None
        except StartFailed as exc:
            report = exc.tunnel.report
            if report is not None and not report.complete:
                raise OpError(proto.INCOMPLETE, f"{exc}; teardown incomplete: "
                                                f"{'; '.join(report.failures)}") from None
            raise OpError(proto.FAILED, f"{exc} (what it applied was undone)") from None
        except Stopping as exc:
            raise OpError(proto.STOPPING, str(exc)) from None
        if isinstance(started, Change):
            return {"name": tunnel.name, "started": False, "changed": started.in_place,
                    "rebuilt": started.rebuilt, "took": tunnel.timings.get("up")}
        return {"name": tunnel.name, "started": started, "took": tunnel.timings.get("up")}

    async def down(self, name: str) -> dict[str, Any]:
        """Stop tunnel ``name`` and answer once its teardown ended.
        Cancelling abandons the wait, never the teardown."""
        try:
            tunnel = await self.supervisor.remove(name)
        except NoSuchTunnel as exc:
            raise OpError(proto.NOT_FOUND, str(exc)) from None
        except Stopping as exc:
            raise OpError(proto.STOPPING, str(exc)) from None
        report = tunnel.report
        if report is not None and not report.complete:
            raise OpError(proto.INCOMPLETE, "teardown incomplete: " + "; ".join(report.failures))
        return {"name": name, "took": tunnel.timings.get("down"),
                "undone": 0 if report is None else len(report.undone)}

    async def reload(self) -> dict[str, Any]:
        """Read the configuration again and converge to it (SIGHUP does the
        same).  A bad file changes nothing.  A failure is logged (whoever
        asked) and raised as OpError; warnings are logged and returned
        under ``warnings``.  Cancelling abandons the wait."""
        try:
            return await self._reload()
        except OpError as exc:
            log.error("reload failed, the running configuration is kept: %s", exc.message)
            raise

    async def _reload(self) -> dict[str, Any]:
        """The reload itself.  Cancelling abandons the wait."""
        loaded: Loaded = await self._load(self.source.load)
        warnings = _fixed_settings_changed(self.loaded.config, loaded.config)
        for warning in warnings:
            log.warning("reload: %s", warning)
        plans = [(spec, loaded.config.tunnel_options(entry)) for spec, entry in loaded.entries()]
        # The new configuration among itself was checked on load; against
        # the tunnels started by `up` that it leaves running:
        kept = [Tenant(s.tunnel.spec, s.tunnel.options.allow_overlap)
                for s in self.supervisor.slots()
                if s.origin != CONFIG and s.tunnel.name not in {p.name for p, _ in plans}]
        error = config_errors(find_conflicts(
            [Tenant(spec, options.allow_overlap) for spec, options in plans], kept))
        if error is not None:
            raise OpError(proto.CONFIG, str(error))
        self.supervisor.max_parallel = loaded.config.max_parallel
        try:
            result = await self.supervisor.converge(plans)
        except Stopping as exc:
            raise OpError(proto.STOPPING, str(exc)) from None
        self.loaded = loaded
        log.info("reloaded: %d started, %d stopped, %d restarted, %d unchanged, %d failed, "
                 "%d changed in place", len(result.started), len(result.stopped),
                 len(result.restarted), len(result.unchanged), len(result.failed),
                 len(result.changed))
        for name, what in result.changed:
            log.info("reload: tunnel %s changed in place: %s", name, what)
        for name, why in result.rebuilt:
            log.info("reload: tunnel %s rebuilt: %s", name, why)
        for name, why in result.failed:
            log.error("reload: tunnel %s did not start or change%s: %s", name,
                      "; its undo was INCOMPLETE (leftovers recorded for 'tunsup cleanup')"
                      if name in result.incomplete else "", why)
        out = attrs.asdict(result)
        out["failed"] = dict(result.failed)
        out["changed"] = dict(result.changed)
        out["rebuilt"] = dict(result.rebuilt)
        out["incomplete"] = list(result.incomplete)
        out["warnings"] = warnings
        return out

    async def reload_on_signal(self) -> None:
        """The SIGHUP reload: a failure is logged (by :meth:`reload`).
        A stop cancels it."""
        with contextlib.suppress(OpError):
            await self.reload()


def _fixed_settings_changed(old: SupervisorConfig, new: SupervisorConfig) -> list[str]:
    """A warning for each changed setting that only a restart applies."""
    fixed = {
        "state_dir": (old.state_dir, new.state_dir),
        "runtime_dir": (old.runtime_dir, new.runtime_dir),
        "[dns] resolv_conf": (old.dns.resolv_conf, new.dns.resolv_conf),
        "[control]": (old.control, new.control),
    }
    return [f"a change of {what} takes effect only after a restart"
            for what, (before, after) in fixed.items() if before != after]


def _tunnel_status(slot: Slot, now: float, *, ended: bool = False) -> dict[str, Any]:
    """One tunnel's entry (its peers are filled in by ``_peers``);
    ``ended``: it failed and was torn down."""
    tunnel = slot.tunnel
    status = tunnel.status
    probe = status.last_probe
    return {
        "name": tunnel.name,
        "state": "starting" if status.state == "new" else status.state,
        "interface": tunnel.name,
        "source": tunnel.spec.source,
        "origin": slot.origin,
        "helper_pid": status.helper_pid,
        "uptime": None if slot.up_since is None or ended else now - slot.up_since,
        "restarts": status.restarts,
        "routes": status.routes,
        "degraded_reason": status.degraded_reason,
        "failure": status.failure,
        "last_probe": None if probe is None else {
            "at": probe.at,
            "age": max(0.0, now - probe.at),
            "took": probe.took,
            "ok": probe.ok,
            "error": probe.error,
        },
        "peers": [],
        "peers_error": None,
    }


async def _watchdog(interval: float) -> None:
    """``WATCHDOG=1`` every ``interval`` seconds, from the event loop: when
    the loop is wedged, the pings stop and systemd acts.  Runs until
    cancelled."""
    async for _ in periodic(interval):
        sdnotify.notify("WATCHDOG=1")


def exit_event(supervisor: Supervisor, code: ExitCode) -> dict[str, Any]:
    failures = supervisor.teardown_failures
    return {"type": "exit", "code": int(code),
            "complete": code != ExitCode.TEARDOWN_INCOMPLETE, "failures": failures}


async def _collector_back_when_ready(supervisor: Supervisor) -> None:
    """Once the initial tunnels are up: collect what their bring-up left
    (one collection, instead of the ~60 young-generation ones and the
    older ones it set off while every tunnel was starting: 20-35 ms of a
    50-tunnel start under load), put the rest out of the collector's
    sight like the start's objects, and let the collector run again.
    Cancellable (a stop before the tunnels are up: the process is ending)."""
    await supervisor.ready.wait()
    gc.collect()
    gc.freeze()
    gc.enable()


async def run_service(
    tunnels: list[Tunnel],
    host: Host,
    *,
    source: ConfigSource,
    loaded: Loaded,
    hub: LogHub,
    settings: ControlSettings,
    journal: Journal | None = None,
    on_failure: OnFailure = "exit",
    collector_paused: bool = False,
) -> ExitCode:
    """Run ``tunnels`` as a service with its control socket until stopped.

    ``collector_paused``: the caller paused the cyclic garbage collector
    for the start; it runs again once the tunnels are up (see
    :func:`_collector_back_when_ready`).

    Returns the supervisor's exit code, or USAGE when the control socket
    cannot be created (nothing was applied then).  Cancellation acts like a
    stop (the supervisor's contract)."""
    def make_tunnel(spec: TunnelSpec, options: TunnelOptions) -> Tunnel:
        # Tunnels started by `up` or a reload are journaled like the others.
        observer = JournalObserver(journal, spec.name) if journal is not None else None
        return Tunnel(spec, host, options, observer=observer)

    ops: ServiceOps
    supervisor = Supervisor(tunnels, host, persistent=True,
                            reload=lambda: ops.reload_on_signal(), make_tunnel=make_tunnel,
                            journal=journal, on_failure=on_failure,
                            recovery_timeout=loaded.config.stop_timeout,
                            max_parallel=loaded.config.max_parallel)
    ops = ServiceOps(supervisor, source, loaded)
    path = proto.socket_path(loaded.config.runtime_dir)
    server = ControlServer(path, ops, hub, settings)
    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(server.serve)
        except OSError as exc:
            log.error("cannot create the control socket %s: %s", path, exc.strerror or exc)
            with trio.CancelScope(shield=True):
                await host.net.close()
            return ExitCode.USAGE
        interval = sdnotify.watchdog_interval()
        if interval is not None:
            nursery.start_soon(_watchdog, interval)
        if collector_paused:
            nursery.start_soon(_collector_back_when_ready, supervisor)
        code = await supervisor.run()
        await server.finish(exit_event(supervisor, code))
        nursery.cancel_scope.cancel()
    return code
