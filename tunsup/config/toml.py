"""The supervisor configuration (``tunsup run -c tunsup.toml``).

Example::

    state_dir = "/var/lib/tunsup"      # optional
    runtime_dir = "/run/tunsup"        # optional
    stop_timeout = 30.0                # optional: bound on the whole teardown, seconds
    on_failure = "exit"                # optional: "exit" | "keep-running" once no tunnel is left
    max_parallel = 64                  # optional: tunnels started (or stopped) at once

    [dns]
    backend = "auto"                   # auto | resolved | resolvconf | file | none
    resolv_conf = "/etc/resolv.conf"   # used by the file backend

    [control]
    group = "tunsup"                   # optional: group allowed on the control socket
    idle_timeout = 30.0                # optional: close a control connection idle this long
    request_timeout = 10.0             # optional: bound on status/logs requests

    [[tunnel]]
    config = "wg0.conf"                # relative to this file's directory
    helper = ["wireguard-go", "-f"]    # optional; the interface name is appended
    tun = "auto"                       # optional: "owned" | "helper" | "auto"
    tun_header = "auto"                # optional: "pi" | "none" | "auto" (owned TUN framing)
    stop_grace = 2.0                   # optional: helper SIGTERM -> SIGKILL, seconds
    start_timeout = 10.0               # optional: bound on the helper becoming ready
    probe_interval = 5.0               # optional: seconds between UAPI probes
    probe_timeout = 1.0                # optional: a probe slower than this degrades the tunnel
    restart_max = 5                    # optional: helper restarts allowed within restart_window
    restart_window = 60.0              # optional: seconds
    backoff_initial = 0.2              # optional: first restart delay, seconds (doubles)
    backoff_max = 30.0                 # optional: cap on the restart delay, seconds
    backoff_reset = 30.0               # optional: healthy seconds that reset the backoff

Relative paths in a file (``state_dir``, ``runtime_dir``, ``resolv_conf``,
a tunnel's ``config``, a helper given as a relative path with a ``/``) are
resolved against the directory of the TOML file, never the current
directory: ``run``, ``cleanup -c`` and ``status -c`` find the same places
from anywhere.

The models are frozen attrs classes that validate themselves, so a value of
these types is valid however it was made.  One private cattrs converter maps
TOML documents to models and back.  Every problem in a file is reported as a
:class:`~tunsup._errors.ConfigError` (``FILE:LINE: message``) naming the
offending key and the line where it appears (several problems: a
:class:`~tunsup._errors.ConfigErrors`, in file order); no traceback or
exception group escapes :func:`load_supervisor_config` or :func:`from_dict`.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias

import attrs

from .._errors import ConfigError, config_errors
from .._input import read_config_text
from .._paths import DEFAULT_RESOLV_CONF, DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR
from .ifname import IFNAME_RULE, is_valid_ifname
from .settings import (
    DEFAULT_MAX_PARALLEL,
    DNS_BACKENDS,
    LAN_MODES,
    ON_FAILURE,
    TOML_KEY,
    TUN_HEADERS,
    TUN_MODES,
    ControlSettings,
    DnsBackend,
    LanMode,
    OnFailure,
    RestartPolicy,
    TunHeader,
    TunMode,
    TunnelOptions,
)

# cattrs (and tomllib, difflib) only once a TOML document is read or written:
# ``run wg0.conf`` builds its configuration from the records alone, and the
# converter's generated functions cost a cold start tens of milliseconds.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import cattrs

__all__ = [
    "DEFAULT_RESOLV_CONF",
    "DEFAULT_RUNTIME_DIR",
    "DEFAULT_STATE_DIR",
    "DNS_BACKENDS",
    "ON_FAILURE",
    "TUN_HEADERS",
    "TUN_MODES",
    "ControlConfig",
    "DnsBackend",
    "DnsSettings",
    "OnFailure",
    "SupervisorConfig",
    "TunHeader",
    "TunMode",
    "TunnelEntry",
    "apply_overrides",
    "config_for_confs",
    "from_dict",
    "load_supervisor_config",
    "to_dict",
]

#: Every default comes from the run-time records (one source of truth).
_TUNNEL = TunnelOptions()
_RESTART = RestartPolicy()
_CONTROL = ControlSettings()



#: A location in a document: table keys and array indexes, e.g. ``("tunnel", 1, "config")``.
_Path: TypeAlias = tuple["str | int", ...]


class _Invalid(ValueError):
    """A value broke a rule; raised by the models' validators and the converter's hooks.

    ``where`` is the location of the value relative to the object being built
    (attribute names of that object, then indexes/keys); ``requirement`` reads
    after the key's name ("must be a number > 0").
    """

    def __init__(self, where: _Path, requirement: str) -> None:
        self.where = where
        self.requirement = requirement
        name = ".".join(str(p) for p in where)
        super().__init__(f"{name} {requirement}" if name else requirement)


# --------------------------------------------------------------------------- validators


def _number(*, strict: bool) -> Callable[[object, attrs.Attribute[float], object], None]:
    """A finite number ``> 0`` (strict) or ``>= 0``; booleans are not numbers."""
    bound = "> 0" if strict else ">= 0"

    def check(_inst: object, attribute: attrs.Attribute[float], value: object) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value < 0
            or (strict and value == 0)
        ):
            raise _Invalid((attribute.name,), f"must be a number {bound}")

    return check


def _check_count(_inst: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Invalid((attribute.name,), "must be an integer >= 0")


def _check_positive_count(_inst: object, attribute: attrs.Attribute[int], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _Invalid((attribute.name,), "must be an integer >= 1")


def _check_backoff_max(inst: object, attribute: attrs.Attribute[float], value: object) -> None:
    _number(strict=True)(inst, attribute, value)
    initial = getattr(inst, "backoff_initial", 0.0)
    assert isinstance(value, int | float)
    if value < initial:
        raise _Invalid((attribute.name,), f"must be >= backoff_initial ({initial:g})")


def _one_of(allowed: tuple[str, ...]) -> Callable[[object, attrs.Attribute[str], object], None]:
    def check(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
        if value not in allowed:
            raise _Invalid((attribute.name,), "must be one of " + ", ".join(map(repr, allowed)))

    return check


def _check_path(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value or "\0" in value:
        raise _Invalid((attribute.name,), "must be a non-empty path")


def _check_backend(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in DNS_BACKENDS:
        allowed = ", ".join(repr(b) for b in DNS_BACKENDS)
        raise _Invalid((attribute.name,), f"must be one of {allowed}")


def _check_bool(_inst: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise _Invalid((attribute.name,), "must be true or false")


def _check_lan(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    if value not in LAN_MODES:
        allowed = ", ".join(repr(m) for m in LAN_MODES)
        raise _Invalid((attribute.name,), f"must be one of {allowed}")
def _check_group(
    _inst: object, attribute: attrs.Attribute[str | int | None], value: object
) -> None:
    if value is None:
        return
    if isinstance(value, str) and value and value.strip() == value and "\0" not in value:
        return
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32 - 1:
        return
    raise _Invalid((attribute.name,), "must be a group name or a numeric group id")


def _check_argv(_inst: object, attribute: attrs.Attribute[tuple[str, ...]], value: object) -> None:
    if (
        not isinstance(value, tuple)
        or not value
        or not all(isinstance(a, str) and a and "\0" not in a for a in value)
    ):
        raise _Invalid((attribute.name,), "must be a non-empty array of non-empty strings")


def _check_conf(_inst: object, attribute: attrs.Attribute[str], value: object) -> None:
    _check_path(_inst, attribute, value)
    assert isinstance(value, str)
    base = os.path.basename(value)
    if not base.endswith(".conf"):
        raise _Invalid((attribute.name,), "must be a path ending in '.conf'")
    stem = base[: -len(".conf")]
    if not is_valid_ifname(stem):
        raise _Invalid(
            (attribute.name,),
            f"names interface {stem!r} (the file stem), which must be {IFNAME_RULE}",
        )
    if not os.path.isabs(value):
        raise _Invalid((attribute.name,), "must be an absolute path")


def _check_tunnels(
    _inst: object, attribute: attrs.Attribute[tuple[TunnelEntry, ...]], value: object
) -> None:
    if not isinstance(value, tuple) or not all(isinstance(t, TunnelEntry) for t in value):
        raise _Invalid((attribute.name,), "must be a tuple of TunnelEntry")
    seen: dict[str, int] = {}
    for index, tunnel in enumerate(value):
        first = seen.setdefault(tunnel.name, index)
        if first != index:
            raise _Invalid(
                (attribute.name, index, "config"),
                f"gives interface name {tunnel.name!r} again"
                f" (already used by [[tunnel]] #{first + 1})",
            )


# --------------------------------------------------------------------------- models


@attrs.frozen(kw_only=True)
class DnsSettings:
    """The ``[dns]`` table."""

    backend: DnsBackend = attrs.field(default=_TUNNEL.dns_backend, validator=_check_backend)
    #: The file rewritten by the ``file`` backend (tests point it elsewhere).
    resolv_conf: str = attrs.field(default=DEFAULT_RESOLV_CONF, validator=_check_path)


@attrs.frozen(kw_only=True)
class ControlConfig:
    """The ``[control]`` table: the control socket ``runtime_dir/control.sock``."""

    #: Group (name or id) whose members may use the control socket besides
    #: root; the socket file gets this group and mode 0660.
    group: str | int | None = attrs.field(default=None, validator=_check_group)
    #: Seconds a connection may stay without a complete request.
    idle_timeout: float = attrs.field(default=_CONTROL.idle_timeout, validator=_number(strict=True))
    #: Bound, in seconds, on answering ``status`` and ``logs``.
    request_timeout: float = attrs.field(
        default=_CONTROL.request_timeout, validator=_number(strict=True)
    )

    def settings(self, group: int | None) -> ControlSettings:
        """The control server's settings, ``group`` resolved to a gid."""
        return attrs.evolve(_CONTROL, group=group, idle_timeout=self.idle_timeout,
                            request_timeout=self.request_timeout)


@attrs.frozen
class TunnelEntry:
    """One ``[[tunnel]]``: a wg-quick file and how to run its helper."""

    #: Absolute path of the wg-quick ``.conf`` file; its stem is the interface name.
    config: str = attrs.field(validator=_check_conf)
    #: Helper argv; the interface name is appended.
    helper: tuple[str, ...] = attrs.field(default=_TUNNEL.helper, validator=_check_argv)
    #: Seconds between the helper's SIGTERM and SIGKILL.
    stop_grace: float = attrs.field(default=_TUNNEL.stop_grace, validator=_number(strict=False))
    #: Bound, in seconds, on the helper becoming ready (its UAPI socket appearing).
    start_timeout: float = attrs.field(
        default=_TUNNEL.start_timeout, validator=_number(strict=True)
    )
    #: Fail closed: while the tunnel is configured (and after a crash, until
    #: cleanup), its traffic is dropped rather than sent outside it.
    kill_switch: bool = attrs.field(default=_TUNNEL.kill_switch, validator=_check_bool)
    #: Its AllowedIPs may overlap those of another tunnel that allows it too,
    #: in the same routing table (refused otherwise: see config.conflicts).
    allow_overlap: bool = attrs.field(default=_TUNNEL.allow_overlap, validator=_check_bool)
    #: Directly connected networks: keep them reachable directly ("direct"),
    #: or send them through the tunnel too ("tunnel").
    lan: LanMode = attrs.field(default=_TUNNEL.lan, validator=_check_lan)
    #: Seconds between re-resolutions of hostname endpoints; 0 disables.
    resolve_interval: float = attrs.field(
        default=_TUNNEL.resolve_interval, validator=_number(strict=False)
    )
    #: Who creates the TUN device (see :data:`TunMode`).
    tun: TunMode = attrs.field(default="auto", validator=_one_of(TUN_MODES))
    #: Framing of the owned TUN fd (see :data:`TunHeader`).
    tun_header: TunHeader = attrs.field(default=_TUNNEL.tun_header, validator=_one_of(TUN_HEADERS))
    #: Seconds between two probes of the helper over UAPI.
    probe_interval: float = attrs.field(
        default=_TUNNEL.probe_interval, validator=_number(strict=True)
    )
    #: Deadline of one probe; a slower answer marks the tunnel degraded.
    probe_timeout: float = attrs.field(
        default=_TUNNEL.probe_timeout, validator=_number(strict=True)
    )
    #: Helper restarts allowed within ``restart_window``; one more failure fails the tunnel.
    restart_max: int = attrs.field(default=_RESTART.max_restarts, validator=_check_count)
    restart_window: float = attrs.field(
        default=_RESTART.window, validator=_number(strict=True)
    )
    #: First restart delay, seconds; it doubles with each restart (with jitter).
    backoff_initial: float = attrs.field(
        default=_RESTART.backoff_initial, validator=_number(strict=False)
    )
    backoff_max: float = attrs.field(default=_RESTART.backoff_max, validator=_check_backoff_max)
    #: Seconds a helper must stay healthy for the backoff to start over.
    backoff_reset: float = attrs.field(
        default=_RESTART.reset_after, validator=_number(strict=True)
    )

    @property
    def name(self) -> str:
        """The interface name: the stem of the ``.conf`` file."""
        return os.path.basename(self.config)[: -len(".conf")]

    @property
    def tun_mode(self) -> Literal["owned", "helper"]:
        """``tun`` with "auto" resolved: owned for wireguard-go, else the helper's own."""
        if self.tun != "auto":
            return self.tun
        return "owned" if os.path.basename(self.helper[0]).startswith("wireguard-go") else "helper"

    def options(self, *, stop_timeout: float, dns_backend: DnsBackend) -> TunnelOptions:
        """This tunnel's run-time settings (``stop_timeout`` and
        ``dns_backend`` are service-wide).  Fields are matched by name, the
        restart policy's by their :data:`TOML_KEY`."""
        restart = RestartPolicy(**{
            f.name: getattr(self, f.metadata[TOML_KEY]) for f in attrs.fields(RestartPolicy)
        })
        same = {f.name: getattr(self, f.name) for f in attrs.fields(TunnelOptions)
                if f.name in _ENTRY_OPTION_NAMES}
        return TunnelOptions(**same, stop_timeout=stop_timeout, dns_backend=dns_backend,
                             restart=restart)


#: Settings a ``[[tunnel]]`` gives under the same name as :class:`TunnelOptions`
#: (``tun_mode`` is the property that resolves ``tun``).
_ENTRY_OPTION_NAMES = frozenset(
    {f.name for f in attrs.fields(TunnelEntry)} | {"tun_mode"}
) & {f.name for f in attrs.fields(TunnelOptions)}


@attrs.frozen(kw_only=True)
class SupervisorConfig:
    """The whole supervisor configuration."""

    state_dir: str = attrs.field(default=DEFAULT_STATE_DIR, validator=_check_path)
    runtime_dir: str = attrs.field(default=DEFAULT_RUNTIME_DIR, validator=_check_path)
    #: Overall bound, in seconds, on teardown.
    stop_timeout: float = attrs.field(default=_TUNNEL.stop_timeout, validator=_number(strict=True))
    #: Once no tunnel is left running after failures: exit (1) or keep running.
    on_failure: OnFailure = attrs.field(default="exit", validator=_one_of(ON_FAILURE))
    #: How many tunnels start (and, at a stop, tear down) at once.
    max_parallel: int = attrs.field(default=DEFAULT_MAX_PARALLEL,
                                    validator=_check_positive_count)
    dns: DnsSettings = attrs.field(factory=DnsSettings)
    control: ControlConfig = attrs.field(factory=ControlConfig)
    #: ``[[tunnel]]`` entries, in file order; interface names are unique.
    tunnels: tuple[TunnelEntry, ...] = attrs.field(default=(), validator=_check_tunnels)

    def tunnel_options(self, entry: TunnelEntry) -> TunnelOptions:
        """The run-time settings of one of :attr:`tunnels`."""
        return entry.options(stop_timeout=self.stop_timeout, dns_backend=self.dns.backend)


#: Attribute name -> TOML key, where they differ.
_TOML_NAMES: dict[object, dict[str, str]] = {SupervisorConfig: {"tunnels": "tunnel"}}


def _toml_name(cls: object, attribute: str) -> str:
    return _TOML_NAMES.get(cls, {}).get(attribute, attribute)


# --------------------------------------------------------------------------- converter



def _passthrough(value: Any, _type: Any) -> Any:
    """Leave a scalar as it is: the models' validators judge it (no coercion)."""
    return value


def _structure_float(value: Any, _type: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _structure_argv(value: Any, _type: Any) -> Any:
    return tuple(value) if isinstance(value, list | tuple) else value


def _table_hook(
    conv: cattrs.Converter, cls: type[Any], what: str,
    inner: Callable[[Any, Any], Any] | None = None,
) -> Callable[[Any, Any], Any]:
    """Structure a table into ``cls``.  cattrs stops before the validators
    when a key or a nested table is bad, and attrs at the first validator
    that fails; then every validator that can run is run, so that all bad
    values of the table are reported at once."""
    import cattrs
    from cattrs.gen import make_dict_structure_fn

    build: Callable[[Any, Any], Any] = inner or make_dict_structure_fn(cls, conv)

    def structure(value: Any, type_: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Invalid((), f"must be {what}")
        try:
            return build(value, type_)
        except cattrs.ClassValidationError as group:
            # A bare _Invalid is the constructor's first failing validator:
            # it comes back with all the others.
            kept = [e for e in group.exceptions
                    if not (isinstance(e, _Invalid) and not getattr(e, "__notes__", None))]
            errors = [*kept, *_validator_errors(conv, cls, value)]
            if not errors:
                raise
            raise cattrs.ClassValidationError(group.message, errors, cls) from None
        except _Invalid as first:
            errors = _validator_errors(conv, cls, value) or [first]
            raise cattrs.ClassValidationError(f"invalid {cls.__name__}", errors, cls) from None

    return structure


def _validator_errors(conv: cattrs.Converter, cls: type[Any],
                      table: Mapping[str, Any]) -> list[Exception]:
    """Every validator failure of ``cls`` built from ``table``; a value that
    does not even structure (reported by cattrs) is not validated."""
    fields = attrs.fields(attrs.resolve_types(cls))
    values: dict[str, Any] = {}
    broken: set[str] = set()
    for field in fields:
        key = _toml_name(cls, field.name)
        if key in table:
            try:
                values[field.name] = conv.structure(table[key], field.type)
            except Exception:
                broken.add(field.name)
                values[field.name] = None
        elif field.default is attrs.NOTHING:  # missing: cattrs reports it
            broken.add(field.name)
            values[field.name] = None
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            values[field.name] = field.default.factory()
        else:
            values[field.name] = field.default
    instance = types.SimpleNamespace(**values)  # what validators that compare fields read
    errors: list[Exception] = []
    for field in fields:
        if field.validator is not None and field.name not in broken:
            try:
                field.validator(instance, field, values[field.name])
            except _Invalid as exc:
                errors.append(exc)
    return errors


_CONVERTER: cattrs.Converter | None = None


def _converter() -> cattrs.Converter:
    """The TOML converter, built on first use (a race of two threads builds
    it twice, harmlessly: both are equal)."""
    global _CONVERTER
    if _CONVERTER is None:
        _CONVERTER = _build_converter()
    return _CONVERTER


def _build_converter() -> cattrs.Converter:
    import cattrs
    from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(str, _passthrough)
    conv.register_structure_hook(int, _passthrough)
    conv.register_structure_hook(float, _structure_float)
    conv.register_structure_hook_func(
        lambda t: t in (DnsBackend, TunMode, TunHeader, OnFailure, LanMode), _passthrough
    )
    conv.register_structure_hook(bool, _passthrough)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], _structure_argv)
    conv.register_structure_hook_func(lambda t: t == (str | int | None), _passthrough)
    conv.register_structure_hook(DnsSettings, _table_hook(conv, DnsSettings, "a table"))
    conv.register_structure_hook(ControlConfig, _table_hook(conv, ControlConfig, "a table"))
    conv.register_unstructure_hook(
        ControlConfig,
        make_dict_unstructure_fn(ControlConfig, conv, group=override(omit_if_default=True)),
    )
    conv.register_structure_hook(TunnelEntry, _table_hook(conv, TunnelEntry, "a table"))
    structure_items = conv.get_structure_hook(tuple[TunnelEntry, ...])

    def structure_tunnels(value: Any, type_: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _Invalid((), "must be an array of tables ([[tunnel]])")
        return structure_items(value, type_)

    conv.register_structure_hook_func(lambda t: t == tuple[TunnelEntry, ...], structure_tunnels)
    conv.register_structure_hook(
        SupervisorConfig,
        _table_hook(
            conv,
            SupervisorConfig,
            "a table",
            make_dict_structure_fn(SupervisorConfig, conv, tunnels=override(rename="tunnel")),
        ),
    )
    conv.register_unstructure_hook(
        SupervisorConfig,
        make_dict_unstructure_fn(SupervisorConfig, conv, tunnels=override(rename="tunnel")),
    )
    return conv


# --------------------------------------------------------------------------- public API


def to_dict(cfg: SupervisorConfig) -> dict[str, Any]:
    """The TOML document of ``cfg``: only dicts, lists, strings, integers and
    floats (JSON-safe)."""
    result: dict[str, Any] = _converter().unstructure(cfg)
    return result


def from_dict(d: Mapping[str, Any], path: str | os.PathLike[str]) -> SupervisorConfig:
    """Build a config from a parsed TOML document.

    ``path`` names the file in messages; relative ``config`` entries are
    resolved against its directory.  Raises :class:`ConfigError` (without a
    line number).
    """
    return _from_document(d, os.fspath(path), None)


def load_supervisor_config(path: str | os.PathLike[str]) -> SupervisorConfig:
    """Read, parse and validate a supervisor TOML file; raises :class:`ConfigError`."""
    where = os.fspath(path)
    # A byte order mark, as some editors write (wg-quick files may have one too).
    text = read_config_text(where).removeprefix("\ufeff")
    import tomllib

    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line, message = _describe_toml_error(str(exc), text)
        raise ConfigError(where, line, message) from None
    except RecursionError:
        raise ConfigError(where, None, "invalid TOML: nested too deeply") from None
    return _from_document(document, where, text)


def apply_overrides(
    cfg: SupervisorConfig,
    *,
    state_dir: str | None = None,
    runtime_dir: str | None = None,
    dns_backend: DnsBackend | None = None,
    resolv_conf: str | None = None,
) -> SupervisorConfig:
    """``cfg`` with the given command-line values in place of the file's.

    ``None`` leaves a value as it is.  An invalid value raises ``ValueError``.
    """
    changes: dict[str, Any] = {}
    if state_dir is not None:
        changes["state_dir"] = state_dir
    if runtime_dir is not None:
        changes["runtime_dir"] = runtime_dir
    dns_changes: dict[str, Any] = {}
    if dns_backend is not None:
        dns_changes["backend"] = dns_backend
    if resolv_conf is not None:
        dns_changes["resolv_conf"] = resolv_conf
    if dns_changes:
        changes["dns"] = attrs.evolve(cfg.dns, **dns_changes)
    return attrs.evolve(cfg, **changes) if changes else cfg


def config_for_confs(
    conf_paths: Iterable[str | os.PathLike[str]],
    *,
    state_dir: str | None = None,
    runtime_dir: str | None = None,
    dns_backend: DnsBackend | None = None,
    resolv_conf: str | None = None,
) -> SupervisorConfig:
    """A default config running one tunnel per wg-quick file (``tunsup run A.conf B.conf``).

    Relative paths are made absolute against the working directory.  A bad
    path raises :class:`ConfigError` naming it.
    """
    tunnels: list[TunnelEntry] = []
    names: dict[str, str] = {}
    for conf in conf_paths:
        given = os.fspath(conf)
        try:
            tunnel = TunnelEntry(config=os.path.abspath(given) if given else given)
        except _Invalid as exc:
            raise ConfigError(given, None, f"tunnel file {exc.requirement}") from None
        if tunnel.name in names:
            raise ConfigError(
                given,
                None,
                f"interface name {tunnel.name!r} is already used by {names[tunnel.name]}",
            )
        names[tunnel.name] = given
        tunnels.append(tunnel)
    cfg = SupervisorConfig(tunnels=tuple(tunnels))
    return apply_overrides(
        cfg,
        state_dir=state_dir,
        runtime_dir=runtime_dir,
        dns_backend=dns_backend,
        resolv_conf=resolv_conf,
    )


# --------------------------------------------------------------------------- structuring


def _from_document(d: object, path: str, text: str | None) -> SupervisorConfig:
    if not isinstance(d, Mapping):
        raise ConfigError(path, None, "the document must be a table")
    document = _resolve_paths(d, os.path.dirname(os.path.abspath(path)))
    try:
        result: SupervisorConfig = _converter().structure(document, SupervisorConfig)
    except Exception as exc:
        locator = _TomlLocator(text) if text is not None else None
        found = [
            ConfigError(path, locator.line_of(located) if locator else None, message)
            for located, message in _explain(exc, document)
        ]
        error = config_errors(sorted(found, key=lambda e: e.line or 0))
        assert error is not None
        raise error from None
    return result


def _absolute(value: object, base: str) -> object:
    """``value`` made absolute against ``base`` if it is a relative path."""
    if isinstance(value, str) and value and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base, value))
    return value


def _resolve_paths(d: Mapping[str, Any], base: str) -> dict[str, Any]:
    """A copy of ``d`` whose relative paths are absolute against ``base``, the
    TOML file's directory: ``state_dir``, ``runtime_dir``, ``[dns]
    resolv_conf``, each ``[[tunnel]] config``, and a helper program given as
    a relative path (one with a ``/``; a bare name is looked up in PATH)."""
    document = dict(d)
    for key in ("state_dir", "runtime_dir"):
        if key in document:
            document[key] = _absolute(document[key], base)
    dns = document.get("dns")
    if isinstance(dns, Mapping) and "resolv_conf" in dns:
        document["dns"] = {**dns, "resolv_conf": _absolute(dns["resolv_conf"], base)}
    tunnels = document.get("tunnel")
    if isinstance(tunnels, list):
        resolved: list[Any] = []
        for entry in tunnels:
            if isinstance(entry, Mapping):
                entry = dict(entry)
                if "config" in entry:
                    entry["config"] = _absolute(entry["config"], base)
                helper = entry.get("helper")
                if isinstance(helper, list) and helper and isinstance(helper[0], str) \
                        and "/" in helper[0]:
                    entry["helper"] = [_absolute(helper[0], base), *helper[1:]]
            resolved.append(entry)
        document["tunnel"] = resolved
    return document


def _leaves(
    exc: BaseException, path: _Path, owner: object
) -> Iterable[tuple[BaseException, _Path, object]]:
    """Every leaf error of ``exc`` with its location and the class being built there."""
    import cattrs
    from cattrs.errors import AttributeValidationNote, IterableValidationNote

    if not (isinstance(exc, BaseExceptionGroup) and exc.exceptions):
        yield exc, path, owner
        return
    if isinstance(exc, cattrs.ClassValidationError):
        owner = exc.cl
    for child in exc.exceptions:
        where = path
        for note in getattr(child, "__notes__", ()):
            if isinstance(note, AttributeValidationNote):
                where = (*path, _toml_name(owner, note.name))
                break
            if isinstance(note, IterableValidationNote):
                where = (*path, note.index)
                break
        yield from _leaves(child, where, owner)


def _explain(exc: BaseException, document: Mapping[str, Any]) -> list[tuple[_Path, str]]:
    """The location (for the line lookup) and message of every leaf error of ``exc``."""
    return [
        found
        for leaf, path, owner in _leaves(exc, (), SupervisorConfig)
        for found in _explain_leaf(leaf, list(path), owner, document)
    ]


def _explain_leaf(
    exc: BaseException, path: list[str | int], owner: object, document: Mapping[str, Any]
) -> list[tuple[_Path, str]]:
    import difflib

    from cattrs.errors import ForbiddenExtraKeysError

    if isinstance(exc, ForbiddenExtraKeysError):
        here = tuple(path)
        table = _lookup(document, here)
        extra = [k for k in table if k in exc.extra_fields] if isinstance(table, Mapping) else []
        allowed = [_toml_name(exc.cl, a.name) for a in attrs.fields(exc.cl)]
        found: list[tuple[_Path, str]] = []
        for key in extra or sorted(exc.extra_fields):
            message = f"unknown key {key!r}"
            if here:
                message += f" in {_table_label(here)}"
            close = difflib.get_close_matches(key, allowed, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
            found.append(((*here, key), message))
        return found
    return [_explain_value(exc, path, owner)]


def _explain_value(exc: BaseException, path: list[str | int], owner: object) -> tuple[_Path, str]:
    if isinstance(exc, _Invalid):
        where = list(exc.where)
        if where and isinstance(where[0], str):
            # Validators name attributes of the class under construction.
            where[0] = _toml_name(owner, where[0])
        full = (*path, *where)
        return full, f"{_label(full)} {exc.requirement}"
    if isinstance(exc, KeyError) and path:
        # A required key is missing; ``path`` ends with it.
        *table, key = path
        return tuple(table), f"{_context(tuple(table))}missing required key {key!r}"
    full = tuple(path)
    return full, f"{_label(full)} is invalid ({type(exc).__name__}: {exc})"


def _lookup(document: Any, path: _Path) -> Any:
    for part in path:
        try:
            document = document[part]
        except (KeyError, IndexError, TypeError):
            return None
    return document


def _table_label(path: _Path) -> str:
    """``[dns]``, ``[[tunnel]] #2``, ``[a.b]``."""
    if path and isinstance(path[-1], int):
        names = ".".join(str(p) for p in path[:-1] if isinstance(p, str))
        return f"[[{names}]] #{path[-1] + 1}"
    return "[" + ".".join(str(p) for p in path) + "]"


def _context(table: _Path) -> str:
    return f"{_table_label(table)}: " if table else ""


def _label(path: _Path) -> str:
    """How to name the value at ``path`` at the start of a message."""
    if not path:
        return "the document"
    if isinstance(path[-1], int):
        return _table_label(path)
    return f"{_context(path[:-1])}{path[-1]}"


# Patterns, not compiled ones: only a TOML error needs them, and ``re``
# compiles (and caches) them then; at import they cost every start ~0.7 ms.
_TOML_POSITION = r"^(?P<what>.*?)\s*\(at line (?P<line>\d+), column (?P<col>\d+)\)$"
_STRING = r"'([^'\\]*)'"
_KEY_TUPLE = r"\((?:'[^'\\]*',\s*)+(?:'[^'\\]*')?\)"
_TOML_AT_END = r"^(?P<what>.*?)\s*\(at end of document\)$"


def _describe_toml_error(message: str, text: str) -> tuple[int | None, str]:
    """Line and clean message of a ``TOMLDecodeError``."""

    def clean(what: str) -> str:
        if len(what) > 1 and what[0].isupper() and what[1].islower():
            what = what[0].lower() + what[1:]
        # tomllib names keys as Python tuples: ('tunnel', 'sub') -> 'tunnel.sub'
        what = re.sub(_KEY_TUPLE, lambda m: repr(".".join(re.findall(_STRING, m[0]))), what)
        return f"invalid TOML: {what}"

    if m := re.match(_TOML_POSITION, message):
        return int(m["line"]), f"{clean(m['what'])} (column {m['col']})"
    if m := re.match(_TOML_AT_END, message):
        last_line = max(1, len(text.split("\n")) - (1 if text.endswith("\n") else 0))
        return last_line, f"{clean(m['what'])} (at end of file)"
    return None, clean(message)


# --------------------------------------------------------------------------- locator


class _TomlLocator:
    """Finds the line where a key or table of a (valid) TOML text is defined.

    tomllib keeps no positions, so this scans the text: table headers (with a
    counter per array of tables), ``key = value`` lines with bare, quoted or
    dotted keys, and values only far enough to skip strings, comments and
    multi-line arrays.  Keys inside inline tables are not indexed; a lookup
    falls back to the nearest enclosing key or table that is.
    """

    _BARE = re.compile(r"[A-Za-z0-9_-]+")

    def __init__(self, text: str) -> None:
        self._text = text
        self._newlines = [i for i, c in enumerate(text) if c == "\n"]
        self._lines: dict[_Path, int] = {}
        self._arrays: dict[_Path, int] = {}
        with contextlib.suppress(IndexError, ValueError):  # not valid TOML: keep what we found
            self._scan()

    def line_of(self, path: _Path) -> int | None:
        """The line defining ``path``, or the nearest enclosing definition; ``None`` at top."""
        while path:
            if path in self._lines:
                return self._lines[path]
            path = path[:-1]
        return None

    def _line_at(self, pos: int) -> int:
        return bisect.bisect_left(self._newlines, pos) + 1

    def _record(self, path: _Path, pos: int) -> None:
        self._lines.setdefault(path, self._line_at(pos))

    def _scan(self) -> None:
        text = self._text
        table: _Path = ()
        i = 0
        while i < len(text):
            c = text[i]
            if c in " \t\r\n":
                i += 1
            elif c == "#":
                i = self._end_of_line(i)
            elif c == "[":
                start = i
                is_array = text.startswith("[[", i)
                parts, i = self._key(i + (2 if is_array else 1))
                i = text.index("]]" if is_array else "]", i) + (2 if is_array else 1)
                if is_array:
                    parent = self._doc_path(parts[:-1])
                    array = (*parent, parts[-1])
                    index = self._arrays.get(array, 0)
                    self._arrays[array] = index + 1
                    table = (*array, index)
                    self._record(array, start)
                else:
                    table = self._doc_path(parts)
                self._record(table, start)
            else:
                start = i
                parts, i = self._key(i)
                for n in range(1, len(parts) + 1):
                    self._record((*table, *parts[:n]), start)
                i = self._skip_value(text.index("=", i) + 1)

    def _doc_path(self, parts: Sequence[str]) -> _Path:
        """Header key parts -> document path (arrays of tables resolve to their last element)."""
        path: _Path = ()
        for part in parts:
            path = (*path, part)
            if path in self._arrays:
                path = (*path, self._arrays[path] - 1)
        return path

    def _end_of_line(self, i: int) -> int:
        end = self._text.find("\n", i)
        return len(self._text) if end < 0 else end

    def _key(self, i: int) -> tuple[list[str], int]:
        """Parse a (dotted) key at ``i``; return its parts and the position after it."""
        import tomllib

        text = self._text
        parts: list[str] = []
        while True:
            while text[i] in " \t":
                i += 1
            if text[i] == '"':
                end = self._basic_string_end(i)
                token = text[i:end]
                try:
                    parts.append(tomllib.loads(f"k = {token}")["k"])
                except tomllib.TOMLDecodeError:
                    parts.append(token[1:-1])
                i = end
            elif text[i] == "'":
                end = text.index("'", i + 1)
                parts.append(text[i + 1 : end])
                i = end + 1
            else:
                m = self._BARE.match(text, i)
                if m is None:
                    raise ValueError("not a key")
                parts.append(m.group())
                i = m.end()
            while i < len(text) and text[i] in " \t":
                i += 1
            if i < len(text) and text[i] == ".":
                i += 1
                continue
            return parts, i

    def _basic_string_end(self, i: int) -> int:
        """Position after the single-line basic string starting at ``i``."""
        text = self._text
        i += 1
        while text[i] != '"':
            i += 2 if text[i] == "\\" else 1
        return i + 1

    def _skip_value(self, i: int) -> int:
        """Skip a value starting at ``i``; return the position after its line ends."""
        text = self._text
        depth = 0
        while i < len(text):
            c = text[i]
            if text.startswith('"""', i) or text.startswith("'''", i):
                quote = text[i : i + 3]
                i += 3
                while not text.startswith(quote, i):
                    i += 2 if quote == '"""' and text[i] == "\\" else 1
                    if i >= len(text):
                        raise ValueError("unterminated string")
                i += 3
                while i < len(text) and text[i] == quote[0]:  # up to two quotes end the content
                    i += 1
            elif c == '"':
                i = self._basic_string_end(i)
            elif c == "'":
                i = text.index("'", i + 1) + 1
            elif c == "#":
                i = self._end_of_line(i)
            elif c in "[{":
                depth += 1
                i += 1
            elif c in "]}":
                depth -= 1
                i += 1
            elif c == "\n" and depth <= 0:
                return i + 1
            else:
                i += 1
        return i
