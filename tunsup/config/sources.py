"""What the service should run: the supervisor TOML file plus the wg-quick
files named on the command line, read again on every reload.

Synchronous and trio-free: ``run`` validates everything with it before its
event loop starts; the service calls it from a worker thread on SIGHUP and
for ``tunsup up``.  Every problem is a :class:`ConfigError`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import attrs

from .._errors import ConfigError
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
        """Read and validate everything; raises :class:`ConfigError`."""
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
        specs = tuple(load_conf(entry.config) for entry in cfg.tunnels)
        for entry in cfg.tunnels:
            check_helper(entry)
        return Loaded(cfg, specs)

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


def check_helper(entry: TunnelEntry) -> None:
    if shutil.which(entry.helper[0]) is None:
        raise ConfigError(entry.config, None, f"helper {entry.helper[0]!r} not found in PATH "
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
