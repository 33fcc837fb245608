"""`tunsup demo`, run as a user would: it passes, and it leaves nothing
behind — also when interrupted half-way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tunsup.testing import netns as _netns

from .conftest import needs_wireguard

pytestmark = [needs_wireguard, pytest.mark.netns]


def leftovers(pid: int) -> list[str]:
    tag = f"{pid % 100000}"
    found = [ns for ns in _netns.list_namespaces() if ns.startswith(f"tsdemo-{tag}-")]
    sockets = os.listdir("/var/run/wireguard") if os.path.isdir("/var/run/wireguard") else []
    found += [s for s in sockets if s.startswith(f"tsd{tag}")]
    return found


def test_demo_passes_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "tunsup", "demo"], capture_output=True,
                          text=True, timeout=120, check=False, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 received" in proc.stdout
    assert "identical; no process left" in proc.stdout


@pytest.mark.parametrize("stage", ["3. starting", "5. status", "6. stopping"])
def test_interrupted_demo_removes_everything(stage: str) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tunsup", "demo"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(stage):
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)  # a second one must not abort clean-up
            break
    rest = proc.stdout.read()
    code = proc.wait(60)
    output = "".join(seen) + rest
    assert code in (130, 0), output  # 0 only if it finished before the signal landed
    assert leftovers(proc.pid) == [], output
