"""What the service should run: the supervisor TOML file plus the wg-quick
files named on the command line, read again on every reload.

Synchronous and trio-free: ``run`` validates everything with it before its
event loop starts (:func:`prepare`, which ``check`` runs too, so the two
never disagree); the service calls it from a worker thread on SIGHUP and
for ``tunsup up``.  Every problem is a :class:`ConfigError` (all problems
found, as a :class:`~tunsup._errors.ConfigErrors`).
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import ConfigError, config_errors
from .conflicts import Tenant, find_conflicts
from .spec import TunnelSpec
from .toml import (
    SupervisorConfig,
    TunnelEntry,
    apply_overrides,
    config_for_confs,
    load_supervisor_config,
)
from .wgquick import load_conf


@attrs.frozen
class Loaded:
    """A validated configuration and the parsed wg-quick file of each tunnel."""

    config: SupervisorConfig
    #: Parallel to ``config.tunnels``.
    specs: tuple[TunnelSpec, ...]

    def entries(self) -> list[tuple[TunnelSpec, TunnelEntry]]:
        return list(zip(self.specs, self.config.tunnels, strict=True))


@attrs.frozen
class ConfigSource:
    """Where the configuration comes from; :meth:`load` reads it (again)."""

    #: wg-quick files from the command line (made absolute on load).
    confs: tuple[str, ...] = ()
    #: The supervisor TOML file, if any.
    toml: str | None = None
    #: Command-line values that override the file's (see ``apply_overrides``).
    overrides: Mapping[str, Any] = attrs.field(factory=dict)

    def load(self) -> Loaded:
        """Read and validate everything; raises :class:`ConfigError` with
        every problem found (each wg-quick file is checked even when another
        one is bad)."""
        extra = config_for_confs(self.confs)
        if self.toml:
            cfg = load_supervisor_config(self.toml)
            taken = {t.name: t.config for t in cfg.tunnels}
            for entry in extra.tunnels:
                if entry.name in taken:
                    raise ConfigError(entry.config, None, f"interface {entry.name} is already "
                                      f"defined by {taken[entry.name]}")
            cfg = attrs.evolve(cfg, tunnels=cfg.tunnels + extra.tunnels)
        else:
            cfg = extra
        cfg = apply_overrides(cfg, **self.overrides)
        errors: list[ConfigError] = []
        specs: list[TunnelSpec] = []
        found: dict[str, bool] = {}
        for entry in cfg.tunnels:
            try:
                specs.append(load_conf(entry.config))
                check_helper(entry, found)
            except ConfigError as exc:
                errors.append(exc)
        if not errors:
            # Claims on what the host has once (ports, names, tables).
            errors = find_conflicts([Tenant(spec, entry.allow_overlap)
                                     for spec, entry in zip(specs, cfg.tunnels, strict=True)])
        error = config_errors(errors)
        if error is not None:
            raise error
        return Loaded(cfg, tuple(specs))

    def load_one(self, conf: str, current: SupervisorConfig) -> tuple[TunnelSpec, TunnelEntry]:
        """The tunnel of wg-quick file ``conf`` (``tunsup up``): its
        ``[[tunnel]]`` settings if ``current`` lists that file, else the
        defaults.  Raises :class:`ConfigError`."""
        path = os.path.abspath(conf)
        entry = next((e for e in current.tunnels if e.config == path), None)
        if entry is None:
            entry = config_for_confs([path]).tunnels[0]
        spec = load_conf(path)
        check_helper(entry)
        return spec, entry


@attrs.frozen
class Prepared:
    """What ``run`` starts from: the loaded configuration and the control
    socket's group id."""

    loaded: Loaded
    group: int | None


def prepare(source: ConfigSource) -> Prepared:
    """Every validation ``run`` makes before touching the host; ``tunsup
    check`` runs exactly this.  Reads files and the group and user databases
    and looks up helpers in PATH, nothing else.  Raises :class:`ConfigError`."""
    where = source.toml or (source.confs[0] if source.confs else "tunsup")
    loaded = source.load()
    cfg = loaded.config
    errors: list[ConfigError] = []
    if not cfg.tunnels:
        errors.append(ConfigError(where, None, "defines no [[tunnel]] (and no CONF.conf "
                                               "was given)"))
    group: int | None = None
    try:
        group = control_group(cfg, source.toml)
    except ConfigError as exc:
        errors.append(exc)
    resolv_dir = os.path.dirname(os.path.abspath(cfg.dns.resolv_conf))
    if cfg.dns.backend == "file" and not os.path.isdir(resolv_dir):
        errors.append(ConfigError(where, None, f"[dns] resolv_conf {cfg.dns.resolv_conf}: "
                                               f"its directory does not exist"))
    elif cfg.dns.backend == "file":
        problem = _not_a_resolv_conf(cfg.dns.resolv_conf)
        if problem is not None:
            errors.append(ConfigError(where, None,
                                      f"[dns] resolv_conf {cfg.dns.resolv_conf}: {problem}"))
    for spec, _ in loaded.entries():
        errors.extend(_missing_zones(spec))
    for key, directory in (("state_dir", cfg.state_dir), ("runtime_dir", cfg.runtime_dir)):
        if os.path.exists(directory) and not os.path.isdir(directory):
            errors.append(ConfigError(where, None, f"{key} {directory}: not a directory"))
    error = config_errors(errors)
    if error is not None:
        raise error
    return Prepared(loaded, group)


def _missing_zones(spec: TunnelSpec) -> list[ConfigError]:
    """Endpoints with a zone (``[fe80::1%eth0]:51820``) naming no network
    interface of this host (wireguard-go would refuse them with a bare
    EINVAL)."""
    errors = []
    for peer in spec.peers:
        host = peer.endpoint.host if peer.endpoint is not None else ""
        zone = host.partition("%")[2]
        if zone and not zone.isdigit():
            try:
                socket.if_nametoindex(zone)
            except OSError:
                errors.append(ConfigError(spec.source, peer.endpoint_line or peer.line,
                                          f"Endpoint {peer.endpoint}: no network interface "
                                          f"{zone!r} here"))
    return errors


def _not_a_resolv_conf(path: str) -> str | None:
    """Why ``path`` cannot be the file DNS backend's resolv.conf (a FIFO,
    a device, a directory...), or None (also when it does not exist yet:
    it is created).  A stat only: nothing is opened."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    return None


def check_helper(entry: TunnelEntry, found: dict[str, bool] | None = None) -> None:
    """Raise :class:`ConfigError` when the tunnel's helper is not in PATH.
    ``found``: answers so far, by program (50 tunnels with one helper
    searched PATH 50 times: ~30 ms of every start)."""
    program = entry.helper[0]
    known = found if found is not None else {}
    if program not in known:
        known[program] = shutil.which(program) is not None
    if known[program]:
        return
    if "/" in program:  # a path: PATH is not searched
        problem = ("is not an executable file" if os.path.exists(program)
                   else "does not exist")
        raise ConfigError(entry.config, None, f"helper {program!r} {problem}")
    raise ConfigError(entry.config, None, f"helper {program!r} not found in PATH "
                      "(install it: apt-get install wireguard-go)")



def control_group(cfg: SupervisorConfig, where: str | None) -> int | None:
    """The gid of ``[control] group`` (a name or an id); raises
    :class:`ConfigError` for a group name this machine does not know."""
    group = cfg.control.group
    if group is None or isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(where or "[control]", None,
                          f"[control] group {group!r} does not exist on this machine") from None
