"""The trio-free client and the pid file, without a service."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tunsup import pidfile
from tunsup._errors import ExitCode, StatusCode
from tunsup.cli import main
from tunsup.control import client


def test_client_commands_import_neither_trio_nor_pyroute2(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from tunsup.cli import main\n"
        f"for argv in (['status', '--runtime-dir', {str(tmp_path)!r}],\n"
        f"             ['stop', '--runtime-dir', {str(tmp_path)!r}],\n"
        f"             ['logs', '--runtime-dir', {str(tmp_path)!r}],\n"
        f"             ['down', 'x', '--runtime-dir', {str(tmp_path)!r}]):\n"
        "    main(argv)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('trio', 'pyroute2', 'attrs', 'cattrs'))\n"
        "print('IMPORTED', bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parent.parent).stdout
    assert "IMPORTED []" in out


def test_exit_codes_have_one_source() -> None:
    """The client's short names are the members defined in tunsup._errors
    (issue 11), never numbers of their own."""
    names = {"OK": ExitCode.OK, "FAILED": ExitCode.FAILURE, "USAGE": ExitCode.USAGE,
             "INCOMPLETE": ExitCode.TEARDOWN_INCOMPLETE, "UNKNOWN": ExitCode.UNKNOWN,
             "NOT_RUNNING": ExitCode.NOT_RUNNING, "STATUS_DEAD": StatusCode.DEAD,
             "STATUS_NOT_RUNNING": StatusCode.NOT_RUNNING,
             "STATUS_UNKNOWN": StatusCode.UNKNOWN}
    for name, member in names.items():
        assert getattr(client, name) is member, name
    numbers = {name for name, value in vars(client).items()
               if name.isupper() and type(value) is int}
    assert numbers == set()


def test_exit_codes_behave_as_int_enum_members() -> None:
    """The exit codes are built without importing enum (client start-up
    time) but read as IntEnum members do: ints equal to and hashing as
    their values, with their name, one object each, shown as IntEnum
    shows them."""
    import enum

    class Reference(enum.IntEnum):
        TEARDOWN_INCOMPLETE = 3

    code = ExitCode.TEARDOWN_INCOMPLETE
    ref = Reference.TEARDOWN_INCOMPLETE
    assert code == 3 and hash(code) == hash(3) and isinstance(code, int)
    assert isinstance(code, ExitCode) and ExitCode.TEARDOWN_INCOMPLETE is code
    assert (code.name, code.value) == (ref.name, ref.value)
    assert (str(code), f"{code}", f"{code:>3}", int(code)) == (str(ref), f"{ref}", f"{ref:>3}", 3)
    assert repr(code) == repr(ref).replace("Reference", "ExitCode")
    assert {c: c.name for c in (StatusCode.RUNNING, StatusCode.DEAD)} == {0: "RUNNING",
                                                                         1: "DEAD"}
    assert ExitCode(3) is code and StatusCode(1) is StatusCode.DEAD  # lookup by value
    with pytest.raises(ValueError, match="5 is not a valid ExitCode"):
        ExitCode(5)
    import copy
    import pickle

    assert copy.deepcopy(code) is code and pickle.loads(pickle.dumps(code)) is code
    values = [v for k, v in vars(ExitCode).items() if k.isupper()]
    assert sorted(values) == [0, 1, 2, 3, 4, 7]
    assert all(type(v) is ExitCode for v in values)


def test_pid_file_round_trip_and_liveness(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    me = pidfile.write(run)
    assert me.pid == os.getpid()
    assert pidfile.read(run) == me and pidfile.running(run) == me
    assert pidfile.write(run) == me  # rewriting our own is fine
    assert oct(os.stat(pidfile.pid_path(run)).st_mode & 0o777) == "0o644"
    pidfile.remove(run, pidfile.ProcessId(me.pid, me.start_time + 1))
    assert pidfile.read(run) == me  # not removed: another owner
    pidfile.remove(run, me)
    assert pidfile.read(run) is None


def test_pid_file_of_a_live_other_process_refuses_a_second_writer(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    os.makedirs(run)
    parent = os.getppid()
    start = pidfile.process_start_time(parent)
    assert start is not None
    Path(pidfile.pid_path(run)).write_text(f"{parent} {start}\n")
    with pytest.raises(FileExistsError, match=f"pid {parent}"):
        pidfile.write(run)
    # A recycled pid (same pid, other start time) is not the service.
    Path(pidfile.pid_path(run)).write_text(f"{parent} {start + 12345}\n")
    assert pidfile.running(run) is None
    assert pidfile.write(run).pid == os.getpid()


@pytest.mark.parametrize("content", ["", "garbage\n", "12\n", "x y\n"])
def test_unreadable_pid_files_mean_no_service(tmp_path: Path, content: str) -> None:
    Path(pidfile.pid_path(str(tmp_path))).write_text(content)
    assert pidfile.read(str(tmp_path)) is None


def test_stop_never_signals_a_process_whose_start_time_differs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The pid file names *this* test process with a wrong start time (pid
    reuse): stop must say "not running" and must not signal it."""
    me = pidfile.myself()
    Path(pidfile.pid_path(str(tmp_path))).write_text(f"{me.pid} {me.start_time - 1}\n")
    assert main(["stop", "--runtime-dir", str(tmp_path), "--timeout", "1"]) == 0
    said = capsys.readouterr().out
    assert "is not running" in said and "which is gone or another process now" in said
    # status says so too (found from outside: it said the pid "is gone").
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 1
    assert f"pid {me.pid} is gone, or another process now" in capsys.readouterr().out


def test_stop_and_status_without_a_service(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stop", "--runtime-dir", str(tmp_path)]) == 0
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 3
    assert main(["up", "/x/wg0.conf", "--runtime-dir", str(tmp_path)]) == 7
    assert main(["down", "wg0", "--runtime-dir", str(tmp_path)]) == 7
    # A pid file left by a process that is gone: LSB 1 ("dead, pid file exists").
    Path(pidfile.pid_path(str(tmp_path))).write_text("999999999 1\n")
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 1
    assert "did not exit cleanly" in capsys.readouterr().out
    assert main(["stop", "--runtime-dir", str(tmp_path)]) == 0


def test_runtime_dir_comes_from_the_flag_then_the_toml_then_the_default(tmp_path: Path) -> None:
    toml = tmp_path / "t.toml"
    toml.write_text('runtime_dir = "/tmp/elsewhere"\n')
    assert client.runtime_dir_of("/given", str(toml)) == "/given"
    assert client.runtime_dir_of(None, str(toml)) == "/tmp/elsewhere"
    assert client.runtime_dir_of(None, None) == "/run/tunsup"
    toml.write_text("[dns]\n")
    assert client.runtime_dir_of(None, str(toml)) == "/run/tunsup"
    toml.write_text("runtime_dir = \n")
    with pytest.raises(SystemExit) as info:
        client.runtime_dir_of(None, str(toml))
    assert info.value.code == 2


def test_human_formats() -> None:
    assert client._duration(None) == "-"
    assert client._duration(0.25) == "250ms"
    assert client._duration(59) == "59s"
    assert client._duration(61) == "1m01s"
    assert client._duration(3 * 3600 + 120) == "3h02m"
    assert client._duration(2 * 86400 + 3600) == "2d01h"
    assert client._bytes(10) == "10 B"
    assert client._bytes(2048) == "2.0 KiB"
    assert client._bytes(5 * 1024**3) == "5.0 GiB"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "1e400", "3000000"])
def test_stop_rejects_a_bad_timeout(tmp_path: Path, timeout: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    """NaN and infinity got past the check and crashed the wait (after the
    service was signalled): found from outside."""
    assert main(["stop", "--runtime-dir", str(tmp_path), "--timeout", timeout]) == 2
    assert "--timeout must be a number of seconds above 0 and at most 1000000" in \
        capsys.readouterr().err


def test_logs_rejects_a_negative_count(tmp_path: Path) -> None:
    assert main(["logs", "--runtime-dir", str(tmp_path), "-n", "-1"]) == 2
