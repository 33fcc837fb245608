"""The run-time settings records, one per concern, with their defaults.

These records are the single source of every default: the TOML loader
(:mod:`.toml`) takes its defaults from them, ``tunsup run`` builds them from
the loaded file, and the engine and control server run on them.  Pure data
(attrs only), so every layer may import them.
"""

from __future__ import annotations

import socket
import typing
from typing import Literal, TypeAlias

import attrs

#: Field metadata key: the ``[[tunnel]]`` key of a field whose TOML name
#: differs from its attribute name.
TOML_KEY = "tunsup.toml_key"

DnsBackend: TypeAlias = Literal["auto", "resolved", "resolvconf", "file", "none"]
DNS_BACKENDS: tuple[DnsBackend, ...] = typing.get_args(DnsBackend)
#: Who creates the TUN device: tunsup ("owned", handed to the helper as a
#: fd), the helper itself ("helper"), or "auto": owned for wireguard-go.
TunMode: TypeAlias = Literal["auto", "owned", "helper"]
TUN_MODES: tuple[TunMode, ...] = typing.get_args(TunMode)
#: Framing of an owned TUN's fd: "pi" (packet-information header), "none"
#: (IFF_NO_PI), or "auto": asked of wireguard-go (by release), else "none".
TunHeader: TypeAlias = Literal["auto", "pi", "none"]
TUN_HEADERS: tuple[TunHeader, ...] = typing.get_args(TunHeader)
#: What ``run`` does once no tunnel is left running after failures.
OnFailure: TypeAlias = Literal["exit", "keep-running"]
ON_FAILURE: tuple[OnFailure, ...] = typing.get_args(OnFailure)
LanMode: TypeAlias = Literal["direct", "tunnel"]
LAN_MODES: tuple[LanMode, ...] = typing.get_args(LanMode)
#: How many tunnels the supervisor starts (and tears down) at once: enough
#: to overlap their waits (helper start-up, journal fsyncs, the kernel's
#: link deletions, grouped when asked for together), few enough to keep
#: threads, file descriptors and the netlink queue bounded.  Measured
#: with 50 tunnels (2 vCPUs, load ~10, 3 runs each; medians): READY 2.16 /
#: 1.98 / 1.60 / 1.29 s and stop 1.12 / 0.98 / 0.59 / 0.53 s at 8 / 16 /
#: 32 / 50; with 100 tunnels stop 2.0-2.4 / 1.4-1.5 / 0.6-0.9 s at 16 / 64
#: / 100 (READY 2.2-3.3 s, within noise above 32).
DEFAULT_MAX_PARALLEL = 64


@attrs.frozen
class RestartPolicy:
    """When and how often a helper that died is started again.

    Up to ``max_restarts`` failures within any ``window`` seconds are
    followed by a restart; one more gives up (``max_restarts = 0``: never
    restart).  The delay before restart *n* (counted from 0 since the last
    reset) is drawn from ``[d/2, d]`` with ``d = min(backoff_max,
    backoff_initial * 2**n)`` ("equal jitter": tunnels that die together do
    not restart in lockstep, and the delay still grows).  Once a helper has
    been healthy for ``reset_after`` seconds, the next delay starts from
    ``backoff_initial`` again.
    """

    max_restarts: int = attrs.field(default=5, metadata={TOML_KEY: "restart_max"})
    window: float = attrs.field(default=60.0, metadata={TOML_KEY: "restart_window"})
    backoff_initial: float = attrs.field(default=0.2, metadata={TOML_KEY: "backoff_initial"})
    backoff_max: float = attrs.field(default=30.0, metadata={TOML_KEY: "backoff_max"})
    reset_after: float = attrs.field(default=30.0, metadata={TOML_KEY: "backoff_reset"})


@attrs.frozen
class TunnelOptions:
    """Per-tunnel run-time settings (defaults are the documented ones)."""

    helper: tuple[str, ...] = ("wireguard-go", "-f")
    stop_grace: float = 2.0
    start_timeout: float = 10.0
    stop_timeout: float = 30.0
    dns_backend: DnsBackend = "auto"
    resolve_timeout: float = 10.0
    hook_timeout: float = 60.0
    kill_switch: bool = False
    lan: LanMode = "direct"
    #: Its AllowedIPs may overlap another tunnel's in the same routing table
    #: when that one allows it too (see :mod:`tunsup.config.conflicts`).
    allow_overlap: bool = False
    #: Seconds between re-resolutions of hostname endpoints; 0: never.
    resolve_interval: float = 60.0
    #: "owned": tunsup creates a persistent TUN and hands it to the helper
    #: (``WG_TUN_FD``); "helper": the helper creates its own.
    tun_mode: Literal["owned", "helper"] = "owned"
    #: Framing of the owned TUN's fd: "pi", "none", or "auto" (asks
    #: wireguard-go its release; see :func:`tunsup.host.tun.detect_header`).
    tun_header: TunHeader = "auto"
    probe_interval: float = 5.0
    probe_timeout: float = 1.0
    restart: RestartPolicy = attrs.field(factory=RestartPolicy)


@attrs.frozen
class ControlSettings:
    """How the control server treats connections; ``[control]`` sets some."""

    #: Group allowed besides root (and the service's own uid); None: root only.
    group: int | None = None
    #: Seconds without a complete request before a connection is closed.
    idle_timeout: float = 30.0
    #: Bound on ping, status and logs requests.
    request_timeout: float = 10.0
    #: Bound on up, down and reload requests (the op itself continues).
    change_timeout: float = 300.0
    #: Bound on sending one frame to a client.
    send_timeout: float = 10.0
    #: Connections served at once.  When full, a new connection evicts the
    #: one idle longest (waiting for a request); when none is idle it is
    #: refused with a ``busy`` frame.
    max_connections: int = 128
    #: Pending connections the kernel queues before we accept them (capped
    #: by net.core.somaxconn).
    listen_backlog: int = socket.SOMAXCONN
    #: Largest request frame, in bytes (larger ones get ``too-large``).
    max_request: int = 64 * 1024
    #: Entries a log subscriber may lag behind; past it entries are skipped
    #: (it is told how many where they were), not queued.
    follow_buffer: int = 4096
    #: Log subscriptions (``logs -f``) of members of the group at once: the
    #: rest of ``max_connections`` stays free for requests and for root's
    #: own (``tunsup stop`` follows the teardown).  Past it a member's new
    #: subscription is refused (``busy``).
    max_group_followers: int = 32
    #: Bound on delivering the exit event to subscribers.
    finish_timeout: float = 2.0
