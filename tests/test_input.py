"""Bad input files: what ``check``, ``run`` and ``cleanup`` say and do.

Issue 10 items 9 (FIFOs, devices, huge files), 11 (paths in a TOML, a
cleanup pointed at nothing), 12 (``check`` runs ``run``'s validation), 18
(the documented examples load) and 23 (every error, in file order).  The
``run`` commands here should all fail validation before anything touches
the host; in case one does not, each runs in a scratch namespace, with
interface names unique to this test run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import unique
from tunsup._errors import ConfigError, ConfigErrors
from tunsup._input import MAX_CONFIG_BYTES, read_config_file
from tunsup.config import toml as config_module
from tunsup.config.keys import Key
from tunsup.config.sources import ConfigSource, prepare
from tunsup.config.toml import from_dict, load_supervisor_config
from tunsup.config.wgquick import load_conf, parse_conf

REPO = Path(__file__).resolve().parent.parent
#: Bound on a CLI call in these tests: a hang (the defect) fails, not blocks.
CLI_TIMEOUT = 60

PRIVATE = Key(bytes(range(32))).to_base64()
PEERS = [Key(bytes(range(i, i + 32))).to_base64() for i in (32, 64, 96)]

GOOD_CONF = f"""\
[Interface]
PrivateKey = {PRIVATE}
Address = 10.9.0.1/24

[Peer]
PublicKey = {PEERS[0]}
AllowedIPs = 10.9.0.2/32
"""


def tunsup(*args: str, cwd: Path | None = None,
           ns: str | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["ip", "netns", "exec", ns] if ns else []
    return subprocess.run([*prefix, sys.executable, "-m", "tunsup", *args], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT, cwd=cwd, check=False)


def run(tmp_path: Path, ns: str, *args: str, dns: bool = True) -> subprocess.CompletedProcess[str]:
    """``tunsup run`` in namespace ``ns``, its state and DNS file under ``tmp_path``."""
    options = ["--state-dir", str(tmp_path / "state"), "--runtime-dir", str(tmp_path / "rt")]
    if dns:
        options += ["--dns", "file", "--resolv-conf", str(tmp_path / "resolv.conf")]
    return tunsup("run", *args, *options, ns=ns)


def conf_name() -> str:
    return unique("tin") + ".conf"


# ----------------------------------------------------------------- item 9: what is read


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / conf_name()
    os.mkfifo(path)
    return path


@pytest.fixture
def zero(tmp_path: Path) -> Path:
    path = tmp_path / conf_name()
    path.symlink_to("/dev/zero")
    return path


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    path = tmp_path / conf_name()
    path.write_bytes(GOOD_CONF.encode() + b"#" * MAX_CONFIG_BYTES)
    return path


@pytest.mark.parametrize(("which", "message"), [
    ("fifo", "not a regular file"),
    ("zero", "not a regular file"),
    ("huge", f"larger than {MAX_CONFIG_BYTES} bytes"),
])
def test_check_and_run_refuse_special_and_huge_files(
    request: pytest.FixtureRequest, tmp_path: Path, netns: Callable[[str], str], which: str,
    message: str,
) -> None:
    path: Path = request.getfixturevalue(which)
    checked = tunsup("check", str(path))
    assert (checked.returncode, checked.stderr) == (2, f"{path}: {message}\n")
    ran = run(tmp_path, netns("tin"), str(path))
    assert (ran.returncode, ran.stderr) == (2, f"tunsup: {path}: {message}\n")
    # The same through a TOML naming it, and for the TOML itself.
    toml = tmp_path / "t.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{path.name}"\n')
    checked = tunsup("check", str(toml))
    assert (checked.returncode, checked.stderr) == (2, f"{path}: {message}\n")
    os.replace(path, tmp_path / "x.toml")
    moved = tmp_path / "x.toml"
    for argv in (["check", str(moved)], ["cleanup", "-c", str(moved), "--dry-run"],
                 ["status", "-c", str(moved)]):
        result = tunsup(*argv)
        assert result.returncode == 2, (argv, result)
        assert f"{moved}: {message}" in result.stderr, (argv, result)


def test_read_config_file_bounds(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    assert read_config_file(str(path), limit=100) == b"x" * 100
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: larger than 99 bytes$"):
        read_config_file(str(path), limit=99)
    with pytest.raises(ConfigError, match="not a regular file"):
        read_config_file(str(tmp_path))
    with pytest.raises(ConfigError, match="cannot read: No such file or directory"):
        read_config_file(str(tmp_path / "missing"))


@pytest.mark.parametrize("what", ["fifo", "zero", "directory", "huge"])
def test_files_others_may_replace_are_read_bounded_and_never_block(
        tmp_path: Path, what: str) -> None:
    """Found from outside: the pid file, a journal and resolv.conf were read
    with a plain open() and read(): a FIFO put in their place hung every
    client (and ``run``, deaf to SIGTERM in the open), /dev/zero grew a
    client to gigabytes.  Each is now unreadable at once (the pid file:
    no service; a journal: "cannot read"; resolv.conf: a DNS error), in a
    subprocess bounded by CLI_TIMEOUT so that a hang fails."""
    target = tmp_path / "target"
    if what == "fifo":
        os.mkfifo(target)
    elif what == "zero":
        target.symlink_to("/dev/zero")
    elif what == "directory":
        target.mkdir()
    else:
        target.write_bytes(b"1 2\n" + b"#" * (257 << 20))
    runtime, state = tmp_path / "run", tmp_path / "state"
    runtime.mkdir()
    state.mkdir()
    (runtime / "tunsup.pid").symlink_to(target)
    journal = state / "journal-4000000-1.log"
    journal.symlink_to(target)
    script = textwrap.dedent(f"""
        import sys, trio
        from tunsup import pidfile
        from tunsup.engine.journal import read_journal
        from tunsup.host.dns import FileBackend, DnsError
        assert pidfile.read({str(runtime)!r}) is None
        read = read_journal({str(journal)!r})
        assert read.steps == () and "cannot read" in read.damaged[0][1], read
        try:
            trio.run(lambda: FileBackend({str(target)!r}).apply(
                "wgx", ("10.0.0.53",), (), timeout=5))
        except DnsError as exc:
            print("dns:", exc)
        else:
            sys.exit("resolv.conf: no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT)
    assert done.returncode == 0, done.stderr
    reason = "larger than" if what == "huge" else "not a regular file"
    assert reason in done.stdout, done.stdout


@pytest.mark.parametrize("what", ["fifo", "zero", "directory"])
def test_check_refuses_a_resolv_conf_that_is_no_regular_file(tmp_path: Path, what: str) -> None:
    """It passed ``check``; ``run`` then hung in its read (a FIFO), grew
    without bound (/dev/zero) or failed after changing the host."""
    target = tmp_path / "resolv"
    if what == "fifo":
        os.mkfifo(target)
    elif what == "zero":
        target.symlink_to("/dev/zero")
    else:
        target.mkdir()
    conf = tmp_path / conf_name()
    conf.write_text(GOOD_CONF)
    toml = tmp_path / "t.toml"
    toml.write_text(f'[dns]\nbackend = "file"\nresolv_conf = "{target}"\n'
                    f'[[tunnel]]\nconfig = "{conf.name}"\n')
    checked = tunsup("check", str(toml))
    assert (checked.returncode, checked.stderr) == (
        2, f"{toml}: [dns] resolv_conf {target}: not a regular file\n")


def test_a_large_real_config_is_accepted(tmp_path: Path) -> None:
    """10,000 AllowedIPs lines (about 300 KB) stay far below the cap."""
    lines = [f"AllowedIPs = 10.{i // 256}.{i % 256}.0/24" for i in range(10_000)]
    path = tmp_path / "big.conf"
    path.write_text(GOOD_CONF + "\n".join(lines) + "\n")
    assert len(load_conf(path).allowed_ips) == 10_001


# ------------------------------------------------------- item 11: paths in a TOML


def test_relative_paths_in_a_toml_are_relative_to_its_directory(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    toml = etc / "tunsup.toml"
    toml.write_text(textwrap.dedent("""\
        state_dir = "state"
        runtime_dir = "../run"
        [dns]
        resolv_conf = "resolv.conf"
        [[tunnel]]
        config = "wg0.conf"
        helper = ["bin/my-helper", "-f"]
        [[tunnel]]
        config = "wg1.conf"
        helper = ["wireguard-go", "-f"]
        """))
    cfg = load_supervisor_config(toml)
    assert cfg.state_dir == str(etc / "state")
    assert cfg.runtime_dir == str(tmp_path / "run")
    assert cfg.dns.resolv_conf == str(etc / "resolv.conf")
    assert [t.config for t in cfg.tunnels] == [str(etc / "wg0.conf"), str(etc / "wg1.conf")]
    assert [t.helper[0] for t in cfg.tunnels] == [str(etc / "bin/my-helper"), "wireguard-go"]


def test_cleanup_finds_a_relative_state_dir_from_anywhere(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    (etc / "state").mkdir(parents=True)
    toml = etc / "tunsup.toml"
    toml.write_text('state_dir = "state"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = tunsup("cleanup", "-c", str(toml), "--dry-run", cwd=elsewhere)
    assert result.returncode == 0, result
    assert "does not exist" not in result.stdout + result.stderr


@pytest.mark.parametrize("how", ["--state-dir", "-c"])
def test_cleanup_pointed_at_nothing_fails(tmp_path: Path, how: str) -> None:
    missing = tmp_path / "no-state"
    toml = tmp_path / "t.toml"
    toml.write_text(f'state_dir = "{missing.name}"\n')
    result = tunsup("cleanup", how, str(missing if how == "--state-dir" else toml))
    assert result.returncode == 2, result
    assert f"state directory {missing} " in result.stderr
    assert "does not exist: nothing was cleaned up" in result.stderr
    assert "nothing to clean up" not in result.stdout


# ------------------------------------------------------ item 12: check runs run's checks


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Name -> (the files, the message ``run`` gives); each passed ``check`` before."""
    plain = tmp_path / unique("tin")
    plain.write_text(GOOD_CONF)
    dot = tmp_path / ".conf"
    dot.write_text(GOOD_CONF)
    conf = conf_name()
    (tmp_path / conf).write_text(GOOD_CONF)
    group = tmp_path / "group.toml"
    group.write_text(f'[control]\ngroup = "no-such-group-here"\n[[tunnel]]\nconfig = "{conf}"\n')
    empty = tmp_path / "empty.toml"
    empty.write_text("stop_timeout = 5\n")
    helper = tmp_path / "helper.toml"
    helper.write_text(f'[[tunnel]]\nconfig = "{conf}"\nhelper = ["no-such-helper-here"]\n')
    resolv = tmp_path / "resolv.toml"
    resolv.write_text('[dns]\nbackend = "file"\nresolv_conf = "/no/such/dir/resolv.conf"\n'
                      f'[[tunnel]]\nconfig = "{conf}"\n')
    return {
        "no .conf suffix": ([str(plain)], "must be a path ending in '.conf'"),
        "named .conf": ([str(dot)], "names interface ''"),
        "unknown group": ([str(group)], "group 'no-such-group-here' does not exist"),
        "no tunnel": ([str(empty)], "defines no [[tunnel]]"),
        "no helper": ([str(helper)], "helper 'no-such-helper-here' not found in PATH"),
        "no resolv.conf dir": ([str(resolv)], "its directory does not exist"),
    }


CASES = ["no .conf suffix", "named .conf", "unknown group", "no tunnel", "no helper",
         "no resolv.conf dir"]


@pytest.mark.parametrize("name", CASES)
def test_check_refuses_what_run_refuses(
    tmp_path: Path, netns: Callable[[str], str], name: str
) -> None:
    files, message = bad_inputs(tmp_path)[name]
    checked = tunsup("check", *files)
    assert checked.returncode == 2 and message in checked.stderr, checked
    args = ["-c", files[0]] if files[0].endswith(".toml") else files
    # The command line's DNS settings would replace the bad one.
    ran = run(tmp_path, netns("tin"), *args, dns=name != "no resolv.conf dir")
    assert ran.returncode == 2 and message in ran.stderr, ran


def test_prepare_is_what_check_runs(tmp_path: Path) -> None:
    conf = tmp_path / "wg5.conf"
    conf.write_text(GOOD_CONF)
    prepared = prepare(ConfigSource(confs=(str(conf),)))
    assert prepared.loaded.specs[0].name == "wg5"
    assert tunsup("check", str(conf)).returncode == 0


# --------------------------------------------------------- item 18: examples load


def toml_examples() -> list[tuple[str, str]]:
    """(where, text) of every TOML example in config.py's docstring and the README."""
    examples: list[tuple[str, str]] = []
    doc = config_module.__doc__ or ""
    for m in re.finditer(r"::\n\n((?:    .*\n|\n)+)", doc):
        examples.append(("tunsup/config.py docstring", textwrap.dedent(m[1])))
    readme = (REPO / "README.md").read_text()
    for m in re.finditer(r"```toml\n(.*?)```", readme, re.S):
        line = readme.count("\n", 0, m.start()) + 1
        examples.append((f"README.md:{line}", m[1]))
    return examples


def test_there_are_toml_examples() -> None:
    wheres = [where for where, _ in toml_examples()]
    assert "tunsup/config.py docstring" in wheres
    assert any(w.startswith("README.md") for w in wheres)


@pytest.mark.parametrize(("where", "text"), toml_examples(), ids=lambda v: str(v)[:30])
def test_toml_examples_load(tmp_path: Path, where: str, text: str) -> None:
    path = tmp_path / "example.toml"
    path.write_text(text)
    try:
        load_supervisor_config(path)
    except ConfigError as exc:
        pytest.fail(f"the TOML example in {where} does not load: {exc}")


# ------------------------------------------------- item 23: every error, in file order


def test_every_error_of_a_wgquick_file_in_file_order() -> None:
    text = textwrap.dedent(f"""\
        [Interface]
        PrivateKey = {PRIVATE}
        Address = 10.0.0.1/33
        ListenPort = 70000
        [Peer]
        AllowedIPs = 10.0.0.2/32
        Endpoint = nowhere
        [Peer]
        PublicKey = {PEERS[1]}
        Bogus = 1
        """)
    with pytest.raises(ConfigErrors) as info:
        parse_conf(text, "/x/wg0.conf")
    assert [(e.line, e.message.split(" ")[0]) for e in info.value.errors] == [
        (3, "Address"), (4, "ListenPort"), (5, "[Peer]"), (7, "Endpoint"), (10, "unknown"),
    ]
    assert str(info.value).splitlines()[0].startswith("/x/wg0.conf:3: Address")


def test_many_errors_are_capped() -> None:
    text = "[Interface]\n" + "Nope = 1\n" * 30
    with pytest.raises(ConfigErrors) as info:
        parse_conf(text, "/x/wg0.conf")
    lines = str(info.value).splitlines()
    assert len(lines) == 21
    assert lines[0] == "/x/wg0.conf:2: unknown key 'Nope' in [Interface]"
    assert lines[-1] == "and 10 more error(s)"


def test_every_error_of_a_toml_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(textwrap.dedent("""\
        stop_timeout = -1
        on_failure = "never"
        [dns]
        backend = "carrier-pigeon"
        [[tunnel]]
        config = "wg0.conf"
        restart_max = -1
        probe_timeout = 0
        colour = "red"
        """))
    with pytest.raises(ConfigErrors) as info:
        load_supervisor_config(path)
    assert [e.line for e in info.value.errors] == [1, 2, 4, 7, 8, 9]


def test_check_reports_every_error_of_every_file(tmp_path: Path) -> None:
    a = tmp_path / "a.conf"
    a.write_text("[Interface]\nNope = 1\nMTU = 1\n")
    b = tmp_path / "b.conf"
    b.write_text("[Interface]\nListenPort = x\n")
    result = tunsup("check", str(a), str(b))
    assert result.returncode == 2
    assert [line.split(": ")[0] for line in result.stderr.splitlines()] == [
        f"{a}:2", f"{a}:3", f"{b}:2",
    ]


def test_endpoint_line_is_kept_for_messages() -> None:
    text = GOOD_CONF + "PersistentKeepalive = 5\nEndpoint = vpn.example.com:51820\n"
    spec = parse_conf(text, "/x/wg0.conf")
    assert (spec.peers[0].line, spec.peers[0].endpoint_line) == (5, 9)


def test_one_error_is_a_plain_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"stop_timeout": -1}, "/x/t.toml")
    assert not isinstance(info.value, ConfigErrors)


# ------------------------------------------------- one interface-name rule everywhere

NAMES = ["wg0", "a", "x" * 15, "wg_0=+.-", "A.b", "...", "x" * 16, "", ".", "..", "wg 0",
         "wg/0", "wg:0", "wg\t0", "wg\n0", "wgé", "wg\x00", "wg@0", "wg%0"]


@pytest.mark.parametrize("name", NAMES, ids=repr)
def test_every_part_applies_the_one_interface_name_rule(name: str) -> None:
    from tunsup.config.ifname import is_valid_ifname
    from tunsup.host import dns, uapi
    from tunsup.host.tun import create_tun_sync

    valid = is_valid_ifname(name)
    # wg-quick's rule, and the kernel refuses "." and "..".
    rule = bool(re.fullmatch(r"[a-zA-Z0-9_=+.-]{1,15}", name)) and name not in (".", "..")
    assert valid == rule

    def accepts(check: Callable[[], object]) -> bool:
        try:
            check()
        except (ValueError, ConfigError):
            return False
        return True

    if "/" not in name:  # in a path, "/" separates directories
        assert accepts(lambda: parse_conf("[Interface]\n", f"/x/{name}.conf")) == valid
        assert accepts(lambda: from_dict({"tunnel": [{"config": f"/x/{name}.conf"}]},
                                         "/x/t")) == valid
    assert accepts(lambda: uapi.socket_path(name)) == valid
    assert accepts(lambda: dns._check_ifname(name)) == valid
    if not valid:  # a valid one would create a device
        from tunsup._errors import HostError

        with pytest.raises(HostError, match="invalid interface name"):
            create_tun_sync(name)


def test_a_huge_value_is_quoted_by_its_start(tmp_path: Path) -> None:
    """Found from outside: a 4 MiB value was quoted whole (a 16 MB message:
    ``up`` and ``reload`` failed on an oversized frame, and every reload
    put 16 MB more in the service's log ring).  A long value is quoted by
    its start, and any message is cut at ConfigError.MAX_MESSAGE."""
    value = "." * (MAX_CONFIG_BYTES - 200)
    conf = tmp_path / conf_name()
    conf.write_text(GOOD_CONF.replace("[Interface]\n", f"[Interface]\nMTU = {value}\n", 1))
    checked = tunsup("check", str(conf))
    assert checked.returncode == 2
    assert f"'{'.' * 256}'... ({len(value)} characters)" in checked.stderr
    assert len(checked.stderr) < 500, len(checked.stderr)
    toml = tmp_path / "t.toml"
    toml.write_text(f'[[tunnel]]\nconfig = "{conf.name}"\n{"k" * 100_000} = 1\n')
    checked = tunsup("check", str(toml))
    assert checked.returncode == 2 and "unknown key" in checked.stderr
    assert "(cut: " in checked.stderr and len(checked.stderr) < 3000, len(checked.stderr)


def test_clearer_messages_for_paths_and_a_toml_with_a_bom(tmp_path: Path) -> None:
    """Found from outside: a helper given by a path that is no executable
    was "not found in PATH"; a state or runtime directory that is a file
    gave "cannot lock X: File exists"; a TOML starting with a byte order
    mark was "invalid TOML" (a wg-quick file with one is accepted)."""
    conf = tmp_path / conf_name()
    conf.write_text(GOOD_CONF)
    plain = tmp_path / "plain"
    plain.write_text("x")
    toml = tmp_path / "t.toml"
    toml.write_bytes(b"\xef\xbb\xbf" + f'[[tunnel]]\nconfig = "{conf.name}"\n'
                     f'helper = ["{plain}"]\n'.encode())
    checked = tunsup("check", str(toml))
    assert (checked.returncode, checked.stderr) == (
        2, f"{conf}: helper '{plain}' is not an executable file\n")
    toml.write_bytes(b"\xef\xbb\xbf" + f'state_dir = "{plain}"\n[[tunnel]]\n'
                     f'config = "{conf.name}"\n'.encode())
    checked = tunsup("check", str(toml))
    assert (checked.returncode, checked.stderr) == (
        2, f"{toml}: state_dir {plain}: not a directory\n")


def test_check_refuses_an_endpoint_zone_naming_no_interface(tmp_path: Path) -> None:
    conf = tmp_path / conf_name()
    conf.write_text(GOOD_CONF.replace("[Peer]\n", "[Peer]\nEndpoint = [fe80::1%nosuch0]:51820\n",
                                      1))
    line = conf.read_text().splitlines().index("Endpoint = [fe80::1%nosuch0]:51820") + 1
    checked = tunsup("check", str(conf))
    assert (checked.returncode, checked.stderr) == (
        2, f"{conf}:{line}: Endpoint [fe80::1%nosuch0]:51820: no network interface "
           "'nosuch0' here\n")
    conf.write_text(conf.read_text().replace("%nosuch0", "%lo"))
    assert tunsup("check", str(conf)).returncode == 0


def test_a_pid_file_of_a_live_service_without_its_lock_is_said_so(
        tmp_path: Path, netns: Callable[[str], str]) -> None:
    """Found from outside: with the runtime directory's lock file removed
    (a tmpfiles cleaner) and a live service's pid file there, a second
    ``run`` said "cannot lock None: None"."""
    from tunsup import pidfile

    runtime = tmp_path / "rt"
    runtime.mkdir()
    me = pidfile.myself()  # alive: this test
    (runtime / "tunsup.pid").write_text(f"{me.pid} {me.start_time}\n")
    conf = tmp_path / conf_name()
    conf.write_text(GOOD_CONF)
    ran = run(tmp_path, netns("tin"), str(conf))
    assert (ran.returncode, ran.stderr) == (
        2, f"tunsup run: tunsup (pid {me.pid}) already runs with runtime directory "
           f"{runtime}\n")


def test_cleanup_of_a_read_only_state_directory(tmp_path: Path) -> None:
    """Found from outside: both printed an OSError traceback (the lock file
    cannot be created).  A dry run reads what it can; a cleanup says it
    cleaned up nothing (exit 3).  In a mount namespace of its own."""
    state = tmp_path / "state"
    state.mkdir()
    argv = [sys.executable, "-m", "tunsup", "cleanup", "--state-dir", str(state),
            "--runtime-dir", str(tmp_path / "rt")]
    script = (f"mount -t tmpfs -o ro,size=64k tmpfs {state} && "
              f"{' '.join(argv)} --dry-run; echo dry=$?; {' '.join(argv)}; echo real=$?")
    done = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                          capture_output=True, text=True, timeout=CLI_TIMEOUT, cwd=REPO)
    assert "Traceback" not in done.stderr, done.stderr
    assert "dry=0" in done.stdout, done.stdout + done.stderr
    assert "real=3" in done.stdout, done.stdout + done.stderr
    assert f"tunsup cleanup: cannot lock {state}: Read-only file system; nothing was " \
           "cleaned up" in done.stderr, done.stderr
