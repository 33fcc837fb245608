"""Tests of the supervisor TOML configuration (``tunsup.config.toml``)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunsup._errors import ConfigError
from tunsup._paths import DEFAULT_RUNTIME_DIR, DEFAULT_STATE_DIR
from tunsup.config.settings import ControlSettings, RestartPolicy, TunnelOptions
from tunsup.config.toml import (
    DNS_BACKENDS,
    ON_FAILURE,
    TUN_HEADERS,
    TUN_MODES,
    DnsSettings,
    SupervisorConfig,
    TunnelEntry,
    _TomlLocator,
    apply_overrides,
    config_for_confs,
    from_dict,
    load_supervisor_config,
    to_dict,
)

FULL_EXAMPLE = """\
state_dir = "/srv/tunsup/state"      # optional
runtime_dir = "/srv/tunsup/run"      # optional
stop_timeout = 12.5
on_failure = "keep-running"

[dns]
backend = "file"
resolv_conf = "/tmp/test-resolv.conf"

[[tunnel]]
config = "wg0.conf"
helper = ["wireguard-go", "-f"]
stop_grace = 2.0
start_timeout = 10.0

[[tunnel]]
config = "sub/../peers/wg1.conf"
helper = [
    "/usr/local/bin/boringtun",   # a comment inside the array
    "--foreground",
]
stop_grace = 0
start_timeout = 3
tun = "helper"
probe_interval = 10
probe_timeout = 0.5
restart_max = 0
restart_window = 120
backoff_initial = 0
backoff_max = 1.5
backoff_reset = 300

[[tunnel]]
config = "/etc/wireguard/wg2.conf"
"""


def write(tmp_path: Path, text: str, name: str = "tunsup.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> ConfigError:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_supervisor_config(path)
    assert str(info.value).startswith(f"{path}:")
    assert info.value.path == str(path)
    return info.value


# ----------------------------------------------------------------------------- loading


def test_full_example(tmp_path: Path) -> None:
    path = write(tmp_path, FULL_EXAMPLE)
    cfg = load_supervisor_config(path)
    assert cfg == SupervisorConfig(
        state_dir="/srv/tunsup/state",
        runtime_dir="/srv/tunsup/run",
        stop_timeout=12.5,
        on_failure="keep-running",
        dns=DnsSettings(backend="file", resolv_conf="/tmp/test-resolv.conf"),
        tunnels=(
            TunnelEntry(config=str(tmp_path / "wg0.conf")),
            TunnelEntry(
                config=str(tmp_path / "peers" / "wg1.conf"),
                helper=("/usr/local/bin/boringtun", "--foreground"),
                stop_grace=0.0,
                start_timeout=3.0,
                tun="helper",
                probe_interval=10.0,
                probe_timeout=0.5,
                restart_max=0,
                restart_window=120.0,
                backoff_initial=0.0,
                backoff_max=1.5,
                backoff_reset=300.0,
            ),
            TunnelEntry(config="/etc/wireguard/wg2.conf"),
        ),
    )
    assert [t.name for t in cfg.tunnels] == ["wg0", "wg1", "wg2"]
    assert all(os.path.isabs(t.config) for t in cfg.tunnels)
    assert type(cfg.tunnels[1].start_timeout) is float
    assert type(cfg.tunnels[1].helper) is tuple
    assert type(cfg.tunnels[1].probe_interval) is float
    assert type(cfg.tunnels[1].restart_max) is int
    assert [t.tun_mode for t in cfg.tunnels] == ["owned", "helper", "owned"]


def test_relative_toml_path_resolves_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc").mkdir()
    write(tmp_path / "etc", '[[tunnel]]\nconfig = "wg0.conf"\n')
    monkeypatch.chdir(tmp_path)
    cfg = load_supervisor_config(os.path.join("etc", "tunsup.toml"))
    assert cfg.tunnels[0].config == str(tmp_path / "etc" / "wg0.conf")


def test_defaults(tmp_path: Path) -> None:
    cfg = load_supervisor_config(write(tmp_path, "# nothing here\n"))
    assert cfg == SupervisorConfig()
    assert cfg.state_dir == DEFAULT_STATE_DIR == "/var/lib/tunsup"
    assert cfg.runtime_dir == DEFAULT_RUNTIME_DIR == "/run/tunsup"
    assert cfg.stop_timeout == 30.0
    assert cfg.dns == DnsSettings(backend="auto", resolv_conf="/etc/resolv.conf")
    assert cfg.tunnels == ()

    cfg = load_supervisor_config(write(tmp_path, '[dns]\n[[tunnel]]\nconfig = "/x/wg0.conf"\n'))
    (tunnel,) = cfg.tunnels
    assert tunnel == TunnelEntry(
        config="/x/wg0.conf", helper=TunnelOptions().helper, stop_grace=2.0, start_timeout=10.0,
        tun="auto", tun_header="auto", probe_interval=5.0, probe_timeout=1.0, restart_max=5,
        restart_window=60.0, backoff_initial=0.2, backoff_max=30.0, backoff_reset=30.0,
    )
    assert TunnelOptions().helper == ("wireguard-go", "-f")
    assert cfg.on_failure == "exit"
    # The file's defaults are the run-time records' defaults.
    assert cfg.tunnel_options(tunnel) == TunnelOptions()
    assert cfg.control.settings(None) == ControlSettings()
    # "auto": tunsup owns the TUN for wireguard-go, not for other helpers.
    assert tunnel.tun_mode == "owned"
    assert TunnelEntry(config="/x/wg0.conf", helper=("/opt/wg/wireguard-go",)).tun_mode == "owned"
    assert TunnelEntry(config="/x/wg0.conf", helper=("boringtun",)).tun_mode == "helper"
    assert TunnelEntry(config="/x/wg0.conf", helper=("boringtun",), tun="owned").tun_mode == (
        "owned")


def test_quoted_and_dotted_keys(tmp_path: Path) -> None:
    text = '"state_dir" = "/a"\ndns.backend = "none"\n[[tunnel]]\n\'config\' = "/x/wg0.conf"\n'
    cfg = load_supervisor_config(write(tmp_path, text))
    assert cfg.state_dir == "/a"
    assert cfg.dns.backend == "none"
    assert cfg.tunnels[0].config == "/x/wg0.conf"


# ----------------------------------------------------------------------------- errors

TUNNELS_2 = '[[tunnel]]\nconfig = "a.conf"\n\n[[tunnel]]\nconfig = "b.conf"\n'

ERROR_CASES = [
    pytest.param(
        '[dns]\nbackend = "auto"\n  backnd = "file"  # typo\n',
        3,
        "unknown key 'backnd' in [dns]; did you mean 'backend'?",
        id="unknown-key-dns",
    ),
    pytest.param(
        TUNNELS_2 + "# comment\nstart_timeout = 3\nstop_grase = 1\n",
        8,
        "unknown key 'stop_grase' in [[tunnel]] #2; did you mean 'stop_grace'?",
        id="unknown-key-second-tunnel",
    ),
    pytest.param(
        'stat_dir = "/x"\n',
        1,
        "unknown key 'stat_dir'; did you mean 'state_dir'?",
        id="unknown-key-top",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nflavour = "x"\n',
        3,
        "unknown key 'flavour' in [[tunnel]] #1",
        id="unknown-key-no-suggestion",
    ),
    pytest.param(
        "\n[dns]\n[dns.extra]\nx = 1\n",
        3,
        "unknown key 'extra' in [dns]",
        id="unknown-subtable",
    ),
    pytest.param(
        'dns.backnd = "file"\n',
        1,
        "unknown key 'backnd' in [dns]; did you mean 'backend'?",
        id="unknown-dotted-key",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\n\n[[tunnel]]\nhelper = ["x"]\n',
        4,
        "[[tunnel]] #2: missing required key 'config'",
        id="missing-config",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nstop_grace = -0.5\n',
        3,
        "[[tunnel]] #1: stop_grace must be a number >= 0",
        id="negative-grace",
    ),
    pytest.param(
        TUNNELS_2 + 'stop_grace = "2"\n',
        6,
        "[[tunnel]] #2: stop_grace must be a number >= 0",
        id="string-grace",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nstart_timeout = 0\n',
        3,
        "[[tunnel]] #1: start_timeout must be a number > 0",
        id="zero-start-timeout",
    ),
    pytest.param("stop_timeout = inf\n", 1, "stop_timeout must be a number > 0", id="inf"),
    pytest.param("stop_timeout = nan\n", 1, "stop_timeout must be a number > 0", id="nan"),
    pytest.param("stop_timeout = true\n", 1, "stop_timeout must be a number > 0", id="bool"),
    pytest.param(
        '\n\n[dns]\nbackend = "systemd"\n',
        4,
        "[dns]: backend must be one of 'auto', 'resolved', 'resolvconf', 'file', 'none'",
        id="bad-backend",
    ),
    pytest.param(
        "[dns]\nresolv_conf = 5\n",
        2,
        "[dns]: resolv_conf must be a non-empty path",
        id="path-wrong-type",
    ),
    pytest.param('runtime_dir = ""\n', 1, "runtime_dir must be a non-empty path", id="empty-path"),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nhelper = []\n',
        3,
        "[[tunnel]] #1: helper must be a non-empty array of non-empty strings",
        id="empty-helper",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nhelper = "wireguard-go"\n',
        3,
        "[[tunnel]] #1: helper must be a non-empty array of non-empty strings",
        id="helper-string",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nhelper = [\n  "wireguard-go",\n  "",\n]\n',
        3,
        "[[tunnel]] #1: helper must be a non-empty array of non-empty strings",
        id="helper-empty-arg",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "wg0.txt"\n',
        2,
        "[[tunnel]] #1: config must be a path ending in '.conf'",
        id="not-conf",
    ),
    pytest.param(
        "[[tunnel]]\nconfig = 7\n",
        2,
        "[[tunnel]] #1: config must be a non-empty path",
        id="config-wrong-type",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "this-name-is-too-long.conf"\n',
        2,
        "[[tunnel]] #1: config names interface 'this-name-is-too-long' (the file stem),"
        " which must be 1 to 15 characters of letters, digits and _ = + . - (not '.' or '..')",
        id="bad-interface-name",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a/wg0.conf"\n[[tunnel]]\nconfig = "b/wg1.conf"\n'
        '[[tunnel]]\nhelper = ["x"]\nconfig = "/c/wg0.conf"\n',
        7,
        "[[tunnel]] #3: config gives interface name 'wg0' again (already used by [[tunnel]] #1)",
        id="duplicate-interface",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\ntun = "mine"\n',
        3,
        "[[tunnel]] #1: tun must be one of 'auto', 'owned', 'helper'",
        id="bad-tun-mode",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\ntun_header = true\n',
        3,
        "[[tunnel]] #1: tun_header must be one of 'auto', 'pi', 'none'",
        id="bad-tun-header",
    ),
    pytest.param(
        'on_failure = "restart"\n',
        1,
        "on_failure must be one of 'exit', 'keep-running'",
        id="bad-on-failure",
    ),
    pytest.param(
        'max_parallel = 0\n',
        1,
        "max_parallel must be an integer >= 1",
        id="zero-max-parallel",
    ),
    pytest.param(
        'max_parallel = 2.5\n',
        1,
        "max_parallel must be an integer >= 1",
        id="fractional-max-parallel",
    ),
    pytest.param(
        TUNNELS_2 + "probe_interval = 0\n",
        6,
        "[[tunnel]] #2: probe_interval must be a number > 0",
        id="zero-probe-interval",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nprobe_timeout = -1\n',
        3,
        "[[tunnel]] #1: probe_timeout must be a number > 0",
        id="negative-probe-timeout",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_max = 2.5\n',
        3,
        "[[tunnel]] #1: restart_max must be an integer >= 0",
        id="fractional-restart-max",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_max = "3"\n',
        3,
        "[[tunnel]] #1: restart_max must be an integer >= 0",
        id="string-restart-max",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_max = -1\n',
        3,
        "[[tunnel]] #1: restart_max must be an integer >= 0",
        id="negative-restart-max",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_max = false\n',
        3,
        "[[tunnel]] #1: restart_max must be an integer >= 0",
        id="bool-restart-max",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_window = 0\n',
        3,
        "[[tunnel]] #1: restart_window must be a number > 0",
        id="zero-restart-window",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nbackoff_initial = 5\n\nbackoff_max = 2\n',
        5,
        "[[tunnel]] #1: backoff_max must be >= backoff_initial (5)",
        id="backoff-max-below-initial",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nbackoff_initial = 50\n',
        1,  # backoff_max is not in the file: its table is named
        "[[tunnel]] #1: backoff_max must be >= backoff_initial (50)",
        id="backoff-initial-above-default-max",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nbackoff_reset = inf\n',
        3,
        "[[tunnel]] #1: backoff_reset must be a number > 0",
        id="inf-backoff-reset",
    ),
    pytest.param(
        '[[tunnel]]\nconfig = "a.conf"\nrestart_mx = 1\n',
        3,
        "unknown key 'restart_mx' in [[tunnel]] #1; did you mean 'restart_max'?",
        id="misspelt-restart-max",
    ),
    pytest.param(
        '[tunnel]\nconfig = "a.conf"\n',
        1,
        "tunnel must be an array of tables ([[tunnel]])",
        id="tunnel-not-array",
    ),
    pytest.param("tunnel = [1]\n", 1, "[[tunnel]] #1 must be a table", id="tunnel-item-not-table"),
    pytest.param('\ndns = "auto"\n', 2, "dns must be a table", id="dns-not-table"),
    pytest.param(
        "a = 1\nb = \n",
        2,
        "invalid TOML: invalid value (column 5)",
        id="syntax-error",
    ),
    pytest.param(
        "[dns]\nbackend = 'auto'\n[dns]\n",
        3,
        "invalid TOML: cannot declare 'dns' twice (column 5)",
        id="syntax-duplicate-table",
    ),
    pytest.param(
        "helper = [1,\n",
        1,
        "invalid TOML: invalid value (at end of file)",
        id="syntax-error-at-end",
    ),
]


@pytest.mark.parametrize(("text", "line", "message"), ERROR_CASES)
def test_error_messages(tmp_path: Path, text: str, line: int, message: str) -> None:
    error = error_of(tmp_path, text)
    assert (error.line, error.message) == (line, message)
    assert str(error) == f"{tmp_path / 'tunsup.toml'}:{line}: {message}"
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_unknown_key_in_second_tunnel_among_many(tmp_path: Path) -> None:
    text = (
        "# header comment\n"  # 1
        "stop_timeout = 5\n"  # 2
        "[[tunnel]]\n"  # 3
        'config = "wg0.conf"\n'  # 4
        "stop_grace = 1  # fine here\n"  # 5
        "[[tunnel]]\n"  # 6
        'config = "wg1.conf"\n'  # 7
        'note = """\n'  # 8   unknown, but defined before the multi-line string ends
        "stop_grace = 3\n"  # 9   (inside the string: not a key)
        '"""\n'  # 10
        "[[tunnel]]\n"  # 11
        'config = "wg2.conf"\n'  # 12
    )
    error = error_of(tmp_path, text)
    assert (error.line, error.message) == (8, "unknown key 'note' in [[tunnel]] #2")


def test_first_unknown_key_in_file_order(tmp_path: Path) -> None:
    error = error_of(tmp_path, "[dns]\nzeta = 1\nalpha = 2\n")
    assert (error.line, error.message) == (2, "unknown key 'zeta' in [dns]")


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        load_supervisor_config(missing)
    assert info.value.line is None
    assert str(info.value) == f"{missing}: cannot read: No such file or directory"

    with pytest.raises(ConfigError) as info:
        load_supervisor_config(tmp_path)
    assert info.value.line is None
    assert str(info.value) == f"{tmp_path}: not a regular file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "tunsup.toml"
    path.write_bytes(b'state_dir = "/a"\nruntime_dir = "/\xff"\n')
    with pytest.raises(ConfigError) as info:
        load_supervisor_config(path)
    assert (info.value.line, info.value.message) == (2, "is not valid UTF-8")


def test_from_dict_errors_have_no_line() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"dns": {"backnd": "x"}}, "cfg.toml")
    assert str(info.value) == "cfg.toml: unknown key 'backnd' in [dns]; did you mean 'backend'?"
    with pytest.raises(ConfigError) as info:
        from_dict({"tunnel": [{"config": "/a/wg0.conf"}, {}]}, "cfg.toml")
    assert str(info.value) == "cfg.toml: [[tunnel]] #2: missing required key 'config'"
    with pytest.raises(ConfigError) as info:
        from_dict([], "cfg.toml")  # type: ignore[arg-type]
    assert str(info.value) == "cfg.toml: the document must be a table"


@settings(suppress_health_check=[HealthCheck.too_slow])  # a cold first run can be slow
@given(
    st.dictionaries(
        st.sampled_from(["state_dir", "stop_timeout", "dns", "tunnel", "junk"]),
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats()
        | st.text(max_size=5)
        | st.lists(st.dictionaries(st.sampled_from(["config", "helper", "x"]), st.text()))
        | st.dictionaries(st.sampled_from(["backend", "resolv_conf", "y"]), st.integers()),
    )
)
def test_from_dict_only_raises_config_error(document: dict[str, object]) -> None:
    try:
        from_dict(document, "/etc/tunsup.toml")
    except ConfigError as exc:
        assert exc.line is None
        assert "Traceback" not in exc.message
        assert "\n" not in exc.message


# ----------------------------------------------------------------------------- locator


def test_locator_positions() -> None:
    text = (
        "a = 1\n"  # 1
        "b = [\n"  # 2
        '  "[[tunnel]]",  # not a header\n'  # 3
        "  'x = 2',\n"  # 4
        "]\n"  # 5
        "c = '''\n"  # 6
        "[dns]\n"  # 7
        "'''\n"  # 8
        "[ dns ]  # spaced header\n"  # 9
        '"quoted.key" = 1\n'  # 10
        "[[ tunnel ]]\n"  # 11
        "config = 'a'\n"  # 12
        "[[tunnel]]\n"  # 13
        "[tunnel.sub]\n"  # 14
        "d.e = 1\n"  # 15
    )
    loc = _TomlLocator(text)
    assert loc.line_of(("a",)) == 1
    assert loc.line_of(("b",)) == 2
    assert loc.line_of(("c",)) == 6
    assert loc.line_of(("dns",)) == 9
    assert loc.line_of(("dns", "quoted.key")) == 10
    assert loc.line_of(("dns", "missing")) == 9
    assert loc.line_of(("tunnel",)) == 11
    assert loc.line_of(("tunnel", 0)) == 11
    assert loc.line_of(("tunnel", 0, "config")) == 12
    assert loc.line_of(("tunnel", 1)) == 13
    assert loc.line_of(("tunnel", 1, "sub")) == 14
    assert loc.line_of(("tunnel", 1, "sub", "d", "e")) == 15
    assert loc.line_of(("nothing",)) is None


# ----------------------------------------------------------------------------- round trip

names = st.from_regex(r"[A-Za-z0-9_=+.-]{1,15}", fullmatch=True).filter(
    lambda n: n not in (".", "..")
)
paths = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), min_size=1, max_size=20
)
#: Relative paths in a document are relative to its file: a model's own are absolute.
abs_paths = paths.map(lambda p: "/" + p)
positive = st.floats(min_value=0, exclude_min=True, allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, allow_nan=False, allow_infinity=False)


@st.composite
def supervisor_configs(draw: st.DrawFn) -> SupervisorConfig:
    stems = draw(st.lists(names, unique=True, max_size=4))
    tunnels = tuple(
        TunnelEntry(
            config="/" + draw(paths).strip("/") + "/" + stem + ".conf",
            helper=(draw(abs_paths), *draw(st.lists(paths, max_size=2))),
            stop_grace=draw(non_negative),
            start_timeout=draw(positive),
            tun=draw(st.sampled_from(TUN_MODES)),
            tun_header=draw(st.sampled_from(TUN_HEADERS)),
            probe_interval=draw(positive),
            probe_timeout=draw(positive),
            restart_max=draw(st.integers(min_value=0, max_value=2**40)),
            restart_window=draw(positive),
            backoff_initial=(initial := draw(non_negative)),
            backoff_max=draw(st.floats(min_value=max(initial, 1e-300), allow_nan=False,
                                       allow_infinity=False)),
            backoff_reset=draw(positive),
        )
        for stem in stems
    )
    return SupervisorConfig(
        state_dir=draw(abs_paths),
        runtime_dir=draw(abs_paths),
        stop_timeout=draw(positive),
        on_failure=draw(st.sampled_from(ON_FAILURE)),
        max_parallel=draw(st.integers(1, 1000)),
        dns=DnsSettings(backend=draw(st.sampled_from(DNS_BACKENDS)), resolv_conf=draw(abs_paths)),
        tunnels=tunnels,
    )


@given(supervisor_configs())
def test_round_trip(cfg: SupervisorConfig) -> None:
    document = to_dict(cfg)
    assert from_dict(document, "/anywhere/tunsup.toml") == cfg
    # JSON-safe: only dicts, lists, strings, integers and finite floats.
    assert from_dict(json.loads(json.dumps(document, allow_nan=False)), "x.toml") == cfg


def test_to_dict_shape() -> None:
    cfg = SupervisorConfig(tunnels=(TunnelEntry(config="/etc/wg/wg0.conf"),))
    assert to_dict(cfg) == {
        "state_dir": "/var/lib/tunsup",
        "runtime_dir": "/run/tunsup",
        "stop_timeout": 30.0,
        "on_failure": "exit",
        "max_parallel": 64,
        "dns": {"backend": "auto", "resolv_conf": "/etc/resolv.conf"},
        "control": {"idle_timeout": 30.0, "request_timeout": 10.0},
        "tunnel": [
            {
                "config": "/etc/wg/wg0.conf",
                "helper": ["wireguard-go", "-f"],
                "stop_grace": 2.0,
                "start_timeout": 10.0,
                "kill_switch": False,
                "allow_overlap": False,
                "lan": "direct",
                "resolve_interval": 60.0,
                "tun": "auto",
                "tun_header": "auto",
                "probe_interval": 5.0,
                "probe_timeout": 1.0,
                "restart_max": 5,
                "restart_window": 60.0,
                "backoff_initial": 0.2,
                "backoff_max": 30.0,
                "backoff_reset": 30.0,
            }
        ],
    }


@pytest.mark.parametrize(("line", "message"), [
    ("kill_switch = \"yes\"", "kill_switch must be true or false"),
    ("kill_switch = 1", "kill_switch must be true or false"),
    ("lan = \"lan\"", "lan must be one of 'direct', 'tunnel'"),
    ("resolve_interval = -1", "resolve_interval must be a number >= 0"),
])
def test_full_tunnel_options_are_validated(tmp_path: Path, line: str, message: str) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "wg0.conf"\n{line}\n')
    with pytest.raises(ConfigError) as info:
        load_supervisor_config(toml)
    assert str(info.value).startswith(f"{toml}:3: ")
    assert message in str(info.value)


def test_full_tunnel_options_load(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('[[tunnel]]\nconfig = "wg0.conf"\nkill_switch = true\nlan = "tunnel"\n'
                    "resolve_interval = 0\n")
    (entry,) = load_supervisor_config(toml).tunnels
    assert (entry.kill_switch, entry.lan, entry.resolve_interval) == (True, "tunnel", 0.0)


# ----------------------------------------------------------------------------- models


def test_models_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="must be an absolute path"):
        TunnelEntry(config="wg0.conf")
    with pytest.raises(ValueError, match="stop_grace must be a number >= 0"):
        TunnelEntry(config="/a/wg0.conf", stop_grace=-1.0)
    with pytest.raises(ValueError, match="start_timeout must be a number > 0"):
        TunnelEntry(config="/a/wg0.conf", start_timeout=math.inf)
    with pytest.raises(ValueError, match="backend must be one of"):
        DnsSettings(backend="bogus")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backoff_max must be >= backoff_initial"):
        TunnelEntry(config="/a/wg0.conf", backoff_initial=2.0, backoff_max=1.0)
    with pytest.raises(ValueError, match="restart_max must be an integer >= 0"):
        TunnelEntry(config="/a/wg0.conf", restart_max=True)
    with pytest.raises(ValueError, match="on_failure must be one of"):
        SupervisorConfig(on_failure="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="gives interface name 'wg0' again"):
        SupervisorConfig(
            tunnels=(TunnelEntry(config="/a/wg0.conf"), TunnelEntry(config="/b/wg0.conf"))
        )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        SupervisorConfig().state_dir = "/x"  # type: ignore[misc]


# ----------------------------------------------------------------------------- overrides


def test_apply_overrides(tmp_path: Path) -> None:
    cfg = load_supervisor_config(write(tmp_path, FULL_EXAMPLE))
    assert apply_overrides(cfg) is cfg
    changed = apply_overrides(
        cfg,
        state_dir="/tmp/state",
        runtime_dir="/tmp/run",
        dns_backend="none",
        resolv_conf="/tmp/resolv",
    )
    assert changed == attrs.evolve(
        cfg,
        state_dir="/tmp/state",
        runtime_dir="/tmp/run",
        dns=DnsSettings(backend="none", resolv_conf="/tmp/resolv"),
    )
    only_dns = apply_overrides(cfg, dns_backend="resolved")
    assert only_dns.dns == DnsSettings(backend="resolved", resolv_conf="/tmp/test-resolv.conf")
    assert only_dns.state_dir == cfg.state_dir
    assert only_dns.tunnels == cfg.tunnels
    with pytest.raises(ValueError, match="state_dir must be a non-empty path"):
        apply_overrides(cfg, state_dir="")


def test_config_for_confs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config_for_confs(["wg0.conf", tmp_path / "x" / "wg1.conf"])
    assert cfg == SupervisorConfig(
        tunnels=(
            TunnelEntry(config=str(tmp_path / "wg0.conf")),
            TunnelEntry(config=str(tmp_path / "x" / "wg1.conf")),
        )
    )
    cfg = config_for_confs(["/a/wg0.conf"], state_dir="/s", dns_backend="file", resolv_conf="/r")
    assert cfg == SupervisorConfig(
        state_dir="/s",
        dns=DnsSettings(backend="file", resolv_conf="/r"),
        tunnels=(TunnelEntry(config="/a/wg0.conf"),),
    )
    assert config_for_confs([]) == SupervisorConfig()


def test_config_for_confs_errors() -> None:
    with pytest.raises(ConfigError) as info:
        config_for_confs(["/a/wg0.conf", "/b/wg0.conf"])
    assert str(info.value) == "/b/wg0.conf: interface name 'wg0' is already used by /a/wg0.conf"
    with pytest.raises(ConfigError) as info:
        config_for_confs(["/a/wg0.txt"])
    assert str(info.value) == "/a/wg0.txt: tunnel file must be a path ending in '.conf'"
    with pytest.raises(ConfigError) as info:
        config_for_confs([""])
    assert str(info.value) == ": tunnel file must be a non-empty path"


def test_every_tunnel_key_reaches_the_run_time_options(tmp_path: Path) -> None:
    """Each ``[[tunnel]]`` key (restart keys under their TOML names) and the
    service-wide ``stop_timeout``/``[dns] backend`` land in TunnelOptions."""
    cfg = load_supervisor_config(write(tmp_path, (
        'stop_timeout = 7.0\n[dns]\nbackend = "none"\n'
        '[control]\nidle_timeout = 3.0\nrequest_timeout = 4.0\n'
        '[[tunnel]]\nconfig = "/x/wg0.conf"\nhelper = ["boringtun", "-f"]\n'
        'stop_grace = 1.5\nstart_timeout = 2.5\nkill_switch = true\nlan = "tunnel"\n'
        'resolve_interval = 9.0\ntun = "owned"\ntun_header = "pi"\n'
        'probe_interval = 3.0\nprobe_timeout = 0.5\nrestart_max = 2\n'
        'restart_window = 11.0\nbackoff_initial = 0.3\nbackoff_max = 4.0\n'
        'backoff_reset = 12.0\n'
    )))
    (tunnel,) = cfg.tunnels
    assert cfg.tunnel_options(tunnel) == TunnelOptions(
        helper=("boringtun", "-f"), stop_grace=1.5, start_timeout=2.5, stop_timeout=7.0,
        dns_backend="none", kill_switch=True, lan="tunnel", resolve_interval=9.0,
        tun_mode="owned", tun_header="pi", probe_interval=3.0, probe_timeout=0.5,
        restart=RestartPolicy(max_restarts=2, window=11.0, backoff_initial=0.3,
                              backoff_max=4.0, reset_after=12.0),
    )
    assert cfg.control.settings(5) == ControlSettings(group=5, idle_timeout=3.0,
                                                      request_timeout=4.0)
