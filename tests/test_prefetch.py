"""wireguard-go's ``--version`` run started before trio is imported
(:mod:`tunsup._prefetch`) and taken by :func:`tunsup.host.tun.detect_header`:
used, never run twice, bounded, killed and reaped on every path."""

from __future__ import annotations

import datetime
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import trio

from tunsup import _prefetch
from tunsup._errors import HostError
from tunsup.host import tun
from tunsup.testing import netns as _netns
from tunsup.testing.service_process import ServiceProcess, ready_then_stopped

from .conftest import needs_netns
from .test_tun import ask_together, fake_wireguard_go


def children() -> set[int]:
    """This process's children, running or not yet reaped."""
    me = os.getpid()
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == me:
                found.add(int(entry))
    return found


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _nothing_left() -> Iterator[None]:
    """Every test ends with no run pending in the module, no child process
    (running or a zombie) and no fd it did not start with."""
    kids, fds = children(), open_fds()
    yield
    leftover = bool(_prefetch._STARTED or _prefetch._LEFT)
    _prefetch.discard()
    assert not leftover, "a --version run was left behind"
    assert children() <= kids, "a child process was left behind"
    assert open_fds() <= fds, "an fd was left open"


def started_proc(program: pathlib.Path) -> subprocess.Popen[bytes]:
    identity = _prefetch.binary_identity(str(program))
    assert identity is not None
    return _prefetch._STARTED[identity].proc


def prefetched(tmp_path: pathlib.Path, body: str
               ) -> tuple[pathlib.Path, pathlib.Path, subprocess.Popen[bytes]]:
    """A fake ``wireguard-go`` running ``body`` (see ``fake_wireguard_go``),
    its ``--version`` started as ``tunsup run`` starts it, and that process."""
    program, runs = fake_wireguard_go(tmp_path, body)
    _prefetch.start([str(program)])
    return program, runs, started_proc(program)


def test_the_run_started_before_trio_gives_the_answer(tmp_path: pathlib.Path) -> None:
    program, runs, proc = prefetched(tmp_path, "echo 'wireguard-go v0.0.20220316'")

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
    program, runs, _ = prefetched(tmp_path, "exit 1")

    async def ask() -> str:
        return await tun.detect_header(str(program))

    assert trio.run(ask) == "none"
    assert trio.run(ask) == "none"
    assert runs.read_text().count("run") == 2


def test_an_early_run_that_never_answers_is_bounded_killed_and_reaped(
        tmp_path: pathlib.Path) -> None:
    program, _, proc = prefetched(tmp_path, "exec sleep 60")

    async def ask() -> str:
        return await tun.detect_header(str(program), timeout=0.3)

    with pytest.raises(HostError, match=r"--version: no answer within 0\.3 s"):
        trio.run(ask)
    assert proc.returncode == -signal.SIGKILL
    assert not tun._ASKING


def test_a_start_cancelled_while_the_early_run_runs_kills_and_reaps_it(
        tmp_path: pathlib.Path) -> None:
    program, _, proc = prefetched(tmp_path, "exec sleep 60")

    async def main() -> None:
        with trio.move_on_after(0.2) as scope:
            await tun.detect_header(str(program), timeout=30)
        assert scope.cancelled_caught

    trio.run(main)
    assert proc.returncode == -signal.SIGKILL
    assert not tun._ASKING


def test_tunnels_starting_together_share_the_early_run(tmp_path: pathlib.Path) -> None:
    program, runs, _ = prefetched(tmp_path, "sleep 0.2; echo 'wireguard-go v0.0.20250522'")
    assert ask_together(program, 5) == ["none"] * 5
    assert runs.read_text().count("run") == 1


def test_a_grandchild_holding_its_stdout_does_not_hold_up_the_answer(
        tmp_path: pathlib.Path) -> None:
    """The run has exited; something it started still holds its stdout
    open.  The answer is read without waiting for that one (a blocking read
    would wait for its end on the trio thread)."""
    pidfile = tmp_path / "grandchild.pid"
    program, _, _ = prefetched(  # it is there to take
        tmp_path, f"sleep 60 & echo $! > {pidfile}; echo 'wireguard-go v0.0.20220316'")

    async def ask() -> str:
        return await tun.detect_header(str(program))

    began = time.monotonic()
    try:
        assert trio.run(ask) == "pi"
        assert time.monotonic() - began < 30  # a blocking read: 60 s
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


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
    _, _, proc = prefetched(tmp_path, "exec sleep 60")
    _prefetch.discard()
    assert proc.returncode == -signal.SIGKILL
    assert not _prefetch._STARTED


CONF = ("[Interface]\nPrivateKey = yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=\n"
        "Address = 10.77.0.1/32\n\n[Peer]\n"
        "PublicKey = xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=\n"
        "AllowedIPs = 10.77.1.0/24\n")


def helper_in_path(tmp_path: pathlib.Path, body: str) -> dict[str, str]:
    """An environment whose PATH finds a ``wireguard-go`` running ``body``."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    helper = bindir / "wireguard-go"
    helper.write_text(f"#!/bin/sh\n{body}\n")
    helper.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}


def write_conf(tmp_path: pathlib.Path, name: str) -> pathlib.Path:
    conf = tmp_path / f"{name}.conf"
    conf.write_text(CONF)
    conf.chmod(0o600)
    return conf


def run_args(tmp_path: pathlib.Path, conf: pathlib.Path) -> list[str]:
    return [str(conf), "--dns", "none", "--state-dir", str(tmp_path / "state"),
            "--runtime-dir", str(tmp_path / "run")]


def assert_not_running(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return
    assert state == "Z", f"the --version run (pid {pid}) is still {state}"


@needs_netns
def test_run_asks_wireguard_go_before_its_first_tunnel_starts(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """``tunsup run`` asks its helper's version once, before the first
    tunnel starts (while it imports), not on the way to the tunnel's TUN."""
    asked = tmp_path / "asked"
    real = shutil.which("wireguard-go")
    assert real is not None
    env = helper_in_path(tmp_path, f'[ "$1" = --version ] && date +%s.%N >> {asked}\n'
                                   f'exec {real} "$@"')
    ns = netns("pre")
    svc = ServiceProcess(ns, run_args(tmp_path, write_conf(tmp_path, "tpre1")),
                         str(tmp_path), "pre", env=env)
    output = ready_then_stopped(svc)
    times = [float(t) for t in asked.read_text().split()]
    assert len(times) == 1, "wireguard-go --version ran more than once"
    line = next(ln for ln in output.splitlines() if "starting tunnel tpre1" in ln)
    clock = datetime.datetime.strptime(line[:12], "%H:%M:%S.%f").time()
    started = datetime.datetime.combine(datetime.date.fromtimestamp(times[0]), clock).timestamp()
    assert times[0] < started, "--version was asked only once the tunnel started"


@needs_netns
def test_run_that_fails_before_its_tunnels_kills_the_early_run(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """A ``run`` that ends before any tunnel took the answer (here: its
    control socket cannot be created) kills and reaps the ``--version``
    run it started, even one that never answers."""
    pidfile = tmp_path / "helper.pid"
    env = helper_in_path(tmp_path, f"echo $$ > {pidfile}\nexec sleep 60")
    blocker = tmp_path / "run" / "control.sock"
    blocker.mkdir(parents=True)
    (blocker / "in-the-way").write_text("")
    ns = netns("pre")
    res = subprocess.run(
        _netns.ns_exec_argv(ns, [sys.executable, "-m", "tunsup", "run",
                                 *run_args(tmp_path, write_conf(tmp_path, "tpre2"))]),
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode == 2, res.stderr
    assert "cannot create the control socket" in res.stderr
    assert_not_running(int(pidfile.read_text()))


@needs_netns
def test_run_kills_an_early_run_that_never_answers(
        tmp_path: pathlib.Path, netns: Callable[[str], str]) -> None:
    """``tunsup run`` whose wireguard-go never answers ``--version``: the
    start fails after the bound and nothing of the run is left (the early
    process is killed, not left sleeping after tunsup exited)."""
    pidfile = tmp_path / "helper.pid"
    env = helper_in_path(tmp_path, f"echo $$ > {pidfile}\nexec sleep 60")
    ns = netns("pre")
    res = subprocess.run(
        _netns.ns_exec_argv(ns, [sys.executable, "-m", "tunsup", "run",
                                 *run_args(tmp_path, write_conf(tmp_path, "tpre0"))]),
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert res.returncode != 0
    assert "--version: no answer within" in res.stderr
    assert_not_running(int(pidfile.read_text()))
