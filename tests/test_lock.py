"""The instance lock's message names the process holding a state lock,
found in /proc/locks (a state directory has no pid file to read)."""

from __future__ import annotations

import fcntl
import os
import pathlib
import subprocess
import sys

import pytest

from tunsup.engine import lock


def test_a_held_state_lock_names_its_holder(tmp_path: pathlib.Path) -> None:
    # A child holds the lock (flock: until it exits); it says when it has it.
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(tmp_path / lock.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "locked\n"
        with pytest.raises(lock.LockHeld) as held:
            lock.lock_state(str(tmp_path))
        assert f"pid {child.pid} already runs with this state" in str(held.value)
    finally:
        child.communicate("", timeout=30)
    # Released with its holder: taken now, and nobody is named.
    fd = lock.lock_state(str(tmp_path))
    os.close(fd)


def test_an_unheld_lock_has_no_holder(tmp_path: pathlib.Path) -> None:
    fd = os.open(tmp_path / "free", os.O_RDWR | os.O_CREAT)
    try:
        assert lock.lock_holder(fd) is None
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert lock.lock_holder(fd) == os.getpid()
    finally:
        os.close(fd)
