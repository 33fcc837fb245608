"""wireguard-go's ``--version`` run started before trio is imported
(:mod:`tunsup._prefetch`) and taken by :func:`tunsup.host.tun.detect_header`:
used, never run twice, bounded, killed and reaped on every path."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest
import trio

from tunsup import _prefetch
from tunsup._errors import HostError
from tunsup.host import tun
from tunsup.testing import netns as _netns

from .conftest import needs_netns
from .test_tun import ask_together, fake_wireguard_go


@pytest.fixture(autouse=True)
def _nothing_left() -> object:
    """Every test ends with no run pending in the module."""
    yield
    leftover = bool(_prefetch._STARTED or _prefetch._LEFT)
    _prefetch.discard()
    assert not leftover, "a --version run was left behind"


def started_proc(program: pathlib.Path) -> subprocess.Popen[bytes]:
    identity = _prefetch.binary_identity(str(program))
    assert identity is not None
    return _prefetch._STARTED[identity].proc


def test_the_run_started_before_trio_gives_the_answer(tmp_path: pathlib.Path) -> None:
    program, runs = fake_wireguard_go(tmp_path, "echo 'wireguard-go v0.0.20220316'")
    _prefetch.start([str(program)])
    proc = started_proc(program)

    async def ask() -> str:
        return await tun.detect_header(str(program))

    assert trio.run(ask) == "pi"
    assert runs.read_text().count("run") == 1  # taken, not run again
    assert proc.returncode == 0  # reaped
    assert proc.stdout is not None and proc.stdout.closed
    assert trio.run(ask) == "pi"  # remembered
    assert runs.read_text().count("run") == 1


def test_a_failed_early_run_is_not_remembered(tmp_path: pathlib.Path) -> None:
    """As with a run of detect_header's own: exit status 1 answers "none"
    this time, and the next start asks again."""
    program, runs = fake_wireguard_go(tmp_path, "exit 1")
    _prefetch.start([str(program)])

    async def ask() -> str:
        return await tun.detect_header(str(program))

    assert trio.run(ask) == "none"
    assert trio.run(ask) == "none"
    assert runs.read_text().count("run") == 2


def test_an_early_run_that_never_answers_is_bounded_killed_and_reaped(
        tmp_path: pathlib.Path) -> None:
    program, _ = fake_wireguard_go(tmp_path, "exec sleep 60")
    _prefetch.start([str(program)])
    proc = started_proc(program)

    async def ask() -> str:
        return await tun.detect_header(str(program), timeout=0.3)

    with pytest.raises(HostError, match=r"--version: no answer within 0\.3 s"):
        trio.run(ask)
    assert proc.returncode == -signal.SIGKILL
    assert not tun._ASKING


def test_a_start_cancelled_while_the_early_run_runs_kills_and_reaps_it(
        tmp_path: pathlib.Path) -> None:
    program, _ = fake_wireguard_go(tmp_path, "exec sleep 60")
    _prefetch.start([str(program)])
    proc = started_proc(program)

    async def main() -> None:
        with trio.move_on_after(0.2) as scope:
            await tun.detect_header(str(program), timeout=30)
        assert scope.cancelled_caught

    trio.run(main)
    assert proc.returncode == -signal.SIGKILL
    assert not tun._ASKING


def test_tunnels_starting_together_share_the_early_run(tmp_path: pathlib.Path) -> None:
    program, runs = fake_wireguard_go(tmp_path, "sleep 0.2; echo 'wireguard-go v0.0.20250522'")
    _prefetch.start([str(program)])
    assert ask_together(program, 5) == ["none"] * 5
    assert runs.read_text().count("run") == 1


def test_only_wireguard_go_binaries_that_exist_are_asked(tmp_path: pathlib.Path) -> None:
    program, _ = fake_wireguard_go(tmp_path, "echo 'wireguard-go v0.0.20220316'")
    other_runs = tmp_path / "other-runs"
    other = tmp_path / "boringtun"
    other.write_text(f"#!/bin/sh\necho run >> {other_runs}\n")
    other.chmod(0o755)
    _prefetch.start([str(other), str(tmp_path / "missing" / "wireguard-go"),
                     str(program), str(program)])
    assert list(_prefetch._STARTED) == [_prefetch.binary_identity(str(program))]  # once
    proc = started_proc(program)
    _prefetch.discard()
    assert proc.returncode is not None
    assert not other_runs.exists()


def test_discard_kills_and_reaps_what_nobody_took(tmp_path: pathlib.Path) -> None:
    program, _ = fake_wireguard_go(tmp_path, "exec sleep 60")
    _prefetch.start([str(program)])
    proc = started_proc(program)
    _prefetch.discard()
    assert proc.returncode == -signal.SIGKILL
    assert not _prefetch._STARTED


@needs_netns
def test_run_kills_an_early_run_that_never_answers(tmp_path: pathlib.Path,
                                                   netns: object) -> None:
    """``tunsup run`` whose wireguard-go never answers ``--version``: the
    start fails after the bound and nothing of the run is left (the early
    process is killed, not left sleeping after tunsup exited)."""
    assert callable(netns)
    ns = netns("pre")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    pidfile = tmp_path / "helper.pid"
    helper = bindir / "wireguard-go"
    helper.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 60\n")
    helper.chmod(0o755)
    conf = tmp_path / "tpre0.conf"
    conf.write_text("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"
                    "Address = 10.77.0.1/32\n\n[Peer]\n"
                    "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n"
                    "AllowedIPs = 10.77.1.0/24\n")
    conf.chmod(0o600)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    res = subprocess.run(
        _netns.ns_exec_argv(ns, [sys.executable, "-m", "tunsup", "run", str(conf),
                                 "--dns", "none", "--state-dir", str(tmp_path / "state"),
                                 "--runtime-dir", str(tmp_path / "run")]),
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode != 0
    assert "--version: no answer within" in res.stderr
    pid = int(pidfile.read_text())
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), f"the --version run (pid {pid}) is still {state}"
