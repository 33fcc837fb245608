"""The ``tunsup run`` driver's waits (tunsup.testing.service_process) stay
bounded whatever an interrupted ``Popen`` call left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tunsup.testing.service_process import reap


def test_reap_does_not_need_popens_lock() -> None:
    """A KeyboardInterrupt between ``Popen`` taking its wait lock and the
    ``try`` that releases it leaves the lock held (an interrupted demo hung
    so, for ever, in ``wait()``); ``reap`` still sees the exit."""
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    assert proc._waitpid_lock.acquire(False)  # type: ignore[attr-defined]
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.2)  # what the driver used (and wait() blocks for ever)
        started = time.monotonic()
        assert reap(proc, 30) == 3
        assert time.monotonic() - started < 20
    finally:
        proc._waitpid_lock.release()  # type: ignore[attr-defined]
    assert proc.returncode == 3
    assert proc.poll() == 3  # Popen agrees, and does not wait again


def test_reap_is_bounded_while_the_process_runs() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert reap(proc, 0) is None
        assert reap(proc, 0.05) is None
    finally:
        proc.kill()
    assert reap(proc, 30) == -signal.SIGKILL


def test_reap_of_a_child_reaped_elsewhere() -> None:
    """``delete_namespace`` reaps the children it kills: then the code is
    unknown and counts as 0, as Popen counts it."""
    proc = subprocess.Popen(["true"])
    os.waitpid(proc.pid, 0)
    assert reap(proc, 5) == 0


def test_reap_never_takes_another_process_for_the_child() -> None:
    """Reaped elsewhere, the child's pid may already be another process's:
    ``reap`` says exited (so ``stop`` signals nobody), not "running"."""
    proc = subprocess.Popen(["true"])
    os.waitpid(proc.pid, 0)
    # A live process that is not our child (its parent shell has exited).
    spawner = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True)
    stranger = int(spawner.stdout)
    try:
        proc.pid = stranger  # as if the pid had been reused
        assert reap(proc, 0) == 0
        assert os.path.exists(f"/proc/{stranger}")  # and it was left alone
    finally:
        os.kill(stranger, signal.SIGKILL)
