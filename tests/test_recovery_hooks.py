"""Crash recovery and the hooks of a dead instance (issue 10, items 19, 20).

The dead instance is a real process (tests/_hook_instance.py) running real
hooks through the journaled effect stack; it is SIGKILLed mid-teardown, or
ends with its teardown incomplete, and recovery runs on its journal.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio

from tunsup.engine.journal import read_journal
from tunsup.engine.recovery import RecoveryReport, recover
from tunsup.testing import netns as _netns

from ._hook_instance import hooks_only_host
from .conftest import needs_netns

ROOT = Path(__file__).resolve().parent.parent


def alive(pid: int) -> bool:
    """``pid`` runs (a zombie has ended: nobody reaps orphans here)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] not in (b"Z", b"X")


@contextlib.contextmanager
def killed_afterwards(pids: Callable[[], list[int]]) -> Iterator[None]:
    """With a defect back, a test fails instead of leaving hooks running."""
    try:
        yield
    finally:
        for pid in pids():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll for a state another process reaches (no event to wait on)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def hooks_recorded(state: Path, n: int) -> Callable[[], bool]:
    """``n`` hook processes are durable in the journal.  (A hook is
    journaled just after its spawn: killed before that, its instance leaves
    it unrecorded; the tests kill only once it is recorded.)"""
    def check() -> bool:
        journals = list(state.glob("journal-*.log"))
        return len(journals) == 1 and sum(
            len(step.hooks) for step in read_journal(str(journals[0])).steps) >= n
    return check


def instance(state: Path, stop_timeout: float, pre_down: str,
             post_down: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "tests._hook_instance", str(state),
                             str(stop_timeout), pre_down, post_down],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def recover_now(state: Path, *, timeout: float = 30, drop: bool = False) -> RecoveryReport:
    return trio.run(lambda: recover(str(state), hooks_only_host(), timeout=timeout,
                                    drop=drop, out=lambda line: None))


def pids_in(marks: Path) -> list[int]:
    if not marks.exists():
        return []
    return [int(w) for w in re.findall(r"PreDown (\d+)", marks.read_text())]


def test_recovery_ends_the_dead_instances_hook_before_running_it_again(tmp_path: Path) -> None:
    """``stop --force``: the service is SIGKILLed while its PreDown runs; the
    hook, in its own session, survives it.  Recovery must end it before it
    runs that PreDown again (then the PostDown)."""
    state, marks, first = tmp_path / "state", tmp_path / "marks", tmp_path / "first"
    # The first run parks (as a hung PreDown would); the second reports
    # whether the first is still running meanwhile.
    pre_down = (f"echo PreDown $$ >> {marks}; "
                f"[ -e {first} ] || {{ echo $$ > {first}; exec sleep 1000; }}; "
                f"grep -q '^State:.*[RSD]' /proc/$(cat {first})/status 2>/dev/null "
                f"&& echo CONCURRENT >> {marks}; true")
    post_down = f"echo PostDown >> {marks}"
    with killed_afterwards(lambda: pids_in(marks)):
        proc = instance(state, 60, pre_down, post_down)
        try:
            wait_for(lambda: first.exists() and first.read_text().strip() != "",
                     "the PreDown hook")
            wait_for(hooks_recorded(state, 1), "the hook's journal record")
        finally:
            proc.kill()
            proc.communicate()
        (hook,) = pids_in(marks)
        assert alive(hook), "precondition: the hook outlives its instance"

        report = recover_now(state)

        assert not alive(hook), "the dead instance's hook was left running"
        lines = marks.read_text().split("\n")
        assert "CONCURRENT" not in lines, "the same PreDown ran twice at once"
        assert [ln.split()[0] for ln in lines if ln] == ["PreDown", "PreDown", "PostDown"]
        assert report.complete, report.failures
        assert list(state.glob("journal-*")) == []


def test_a_recovery_killed_mid_hook_is_no_different_from_a_killed_service(
        tmp_path: Path) -> None:
    """The hook that recovery itself runs is journaled too: when recovery is
    killed while it runs the PreDown again, the next recovery ends that
    hook before running the PreDown once more."""
    state, marks = tmp_path / "state", tmp_path / "marks"
    first, second = tmp_path / "first", tmp_path / "second"
    pre_down = (f"echo PreDown $$ >> {marks}; "
                f"[ -e {first} ] || {{ echo $$ > {first}; exec sleep 1000; }}; "
                f"[ -e {second} ] || {{ echo $$ > {second}; exec sleep 1000; }}; "
                f"for f in {first} {second}; do grep -q '^State:.*[RSD]' "
                f"/proc/$(cat $f)/status 2>/dev/null && echo CONCURRENT >> {marks}; done; true")

    def parked(path: Path) -> Callable[[], bool]:
        return lambda: path.exists() and path.read_text().strip() != ""

    with killed_afterwards(lambda: pids_in(marks)):
        dead = instance(state, 60, pre_down, f"echo PostDown >> {marks}")
        try:
            wait_for(parked(first), "the service's PreDown")
            wait_for(hooks_recorded(state, 1), "the hook's journal record")
        finally:
            dead.kill()
            dead.communicate()
        cleanup = subprocess.Popen([sys.executable, "-m", "tests._hook_instance", "recover",
                                    str(state)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        try:
            wait_for(parked(second), "the PreDown run by the first recovery")
            wait_for(hooks_recorded(state, 2), "the hook's journal record")
        finally:
            cleanup.kill()
            cleanup.communicate()
        hook = int(second.read_text())
        assert alive(hook), "precondition: the hook outlives the recovery that ran it"

        report = recover_now(state)

        lines = marks.read_text().split("\n")
        assert "CONCURRENT" not in lines, "the same PreDown ran twice at once"
        assert not alive(hook)
        assert [ln.split()[0] for ln in lines if ln] == ["PreDown"] * 3 + ["PostDown"]
        assert report.complete, report.failures


def test_a_pre_down_the_teardown_went_past_is_never_run_again_and_drop_forgets_it(
        tmp_path: Path) -> None:
    """A hung PreDown timed out at stop (exit 3), the rest was undone
    (PostDown ran).  Recovery must not run that PreDown again — not once,
    not on any later cleanup — and ``drop`` forgets it."""
    state, marks = tmp_path / "state", tmp_path / "marks"
    pre_down = f"echo PreDown $$ >> {marks}; exec sleep 1000"
    with killed_afterwards(lambda: pids_in(marks)):
        proc = instance(state, 1, pre_down, f"echo PostDown >> {marks}")
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 3, out
        assert [ln.split()[0] for ln in marks.read_text().split("\n") if ln] == \
            ["PreDown", "PostDown"]

        for _ in range(2):  # the first cleanup, and every later one
            report = recover_now(state)
            assert [ln.split()[0] for ln in marks.read_text().split("\n") if ln] == \
                ["PreDown", "PostDown"], "a PreDown ran after its PostDown"
            assert len(report.failures) == 1 and "out of order" in report.failures[0]
            assert len(list(state.glob("journal-*"))) == 1  # kept: not undone

        report = recover_now(state, drop=True)
        assert report.complete
        assert [d.split(": ", 1)[1] for d in report.dropped] == ["PostUp/PreDown hooks of tsh0"]
        assert list(state.glob("journal-*")) == []
        assert recover_now(state).recovered == ()
        assert [ln.split()[0] for ln in marks.read_text().split("\n") if ln] == \
            ["PreDown", "PostDown"]


@needs_netns
def test_cleanup_bounds_a_hung_hook_by_the_configured_stop_timeout(
        netns: Callable[[str], str], tmp_path: Path) -> None:
    """Killed during a PreDown that always hangs: ``tunsup cleanup -c``
    runs it again (in order) but within the TOML's ``stop_timeout``, not a
    fixed 60 s; it stays recorded (exit 3), and is then never run again
    out of order: its PostDown ran meanwhile."""
    ns = netns("tsr")
    state, marks = tmp_path / "state", tmp_path / "marks"
    toml = tmp_path / "tunsup.toml"
    toml.write_text(f'state_dir = "{state}"\nstop_timeout = 2\n')
    with killed_afterwards(lambda: pids_in(marks)):
        proc = instance(state, 60, f"echo PreDown $$ >> {marks}; exec sleep 1000",
                        f"echo PostDown >> {marks}")
        try:
            wait_for(lambda: len(pids_in(marks)) == 1, "the PreDown hook")
            wait_for(hooks_recorded(state, 1), "the hook's journal record")
        finally:
            proc.kill()
            proc.communicate()

        def cleanup() -> subprocess.CompletedProcess[str]:
            argv = [sys.executable, "-m", "tunsup", "cleanup", "-c", str(toml)]
            return subprocess.run(_netns.ns_exec_argv(ns, argv), cwd=ROOT, capture_output=True,
                                  text=True, timeout=120, check=False)

        result = cleanup()
        assert result.returncode == 3, result.stdout + result.stderr
        bound = re.search(r"hook 'echo PreDown .*' did not finish within ([\d.]+) s",
                          result.stderr)
        assert bound is not None, result.stderr
        assert float(bound.group(1)) <= 2, "recovery ignored the configured stop_timeout"
        assert "cleanup --drop" in result.stderr
        assert [ln.split()[0] for ln in marks.read_text().split("\n") if ln] == \
            ["PreDown", "PreDown", "PostDown"]

        again = cleanup()
        assert again.returncode == 3 and "out of order" in again.stderr
        assert len(pids_in(marks)) == 2, "a PreDown ran again after its PostDown"

        dropped = subprocess.run(
            _netns.ns_exec_argv(ns, [sys.executable, "-m", "tunsup", "cleanup", "-c", str(toml),
                                     "--drop"]),
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
        assert dropped.returncode == 0, dropped.stdout + dropped.stderr
        assert "dropped (not undone, no longer tracked): PostUp/PreDown hooks of tsh0" \
            in dropped.stdout
        assert list(state.glob("journal-*")) == []
    for pid in pids_in(marks):
        assert not alive(pid)


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNSUP_CRASH_AT", raising=False)
