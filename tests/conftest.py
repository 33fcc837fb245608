"""Shared fixtures: scratch namespaces and the leak check.

Every test runs under ``no_leaks``: after it, no new network namespace, no
new link in the root namespace, no new wireguard-go process (zombies
excepted: PID 1 here does not reap orphans) and no new UAPI socket may exist.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, settings

from tunsup.testing import FakeHost, uapi_dir
from tunsup.testing import netns as _netns

_counter = itertools.count()

# In a fresh checkout (CI) Hypothesis builds its Unicode tables the first time
# a text strategy runs (~1 s); its too_slow health check then fails whichever
# test comes first, though input generation itself is not slow.
settings.register_profile("tunsup", suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("tunsup")


def _can_use_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 is not installed"
    probe = f"tsprobe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"cannot create network namespaces: {res.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


NETNS_UNAVAILABLE = _can_use_netns()
WG_GO_MISSING = shutil.which("wireguard-go") is None

needs_netns = pytest.mark.skipif(NETNS_UNAVAILABLE is not None, reason=str(NETNS_UNAVAILABLE))
needs_wireguard = pytest.mark.skipif(
    NETNS_UNAVAILABLE is not None or WG_GO_MISSING,
    reason=str(NETNS_UNAVAILABLE or "wireguard-go is not installed"),
)


#: The worst trio step each ``tunsup run`` of the integration tests logged at
#: exit: (milliseconds, task, test).  Summarised at the end of the session.
WORST_STEPS: list[tuple[float, str, str]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if WORST_STEPS:
        ms, task, test = max(WORST_STEPS)
        terminalreporter.write_line(
            f"blocking guard: worst trio step over {len(WORST_STEPS)} tunsup run(s): "
            f"{ms:.1f} ms (task {task}, in {test})")


#: In every name a test creates, so that the leak check only looks at this
#: run's objects (another test run may be going on at the same time).
TAG = f"{os.getpid() % 10000}"


def unique(prefix: str) -> str:
    """A short name unique to this test run (interface names: <= 15 chars)."""
    return f"{prefix}{TAG}x{next(_counter)}"


def _ours(names: set[str]) -> set[str]:
    return {n for n in names if f"{TAG}x" in n}


def _wireguard_go_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index(b"(") + 1 : stat.rindex(b")")]
        state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
        if comm.startswith(b"wireguard-go") and state != b"Z":
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if f"{TAG}x" in cmdline:
                pids.add(int(entry))
    return pids


def _uapi_sockets() -> set[str]:
    try:
        return set(os.listdir("/var/run/wireguard"))
    except FileNotFoundError:
        return set()


def _root_links() -> set[str]:
    if shutil.which("ip") is None:
        return set()
    return set(_netns.ip("-o", "link", "show").split("\n"))


def _state() -> tuple[set[str], set[int], set[str], set[str]]:
    return (
        _ours(set(_netns.list_namespaces())),
        _wireguard_go_pids(),
        _ours(_uapi_sockets()),
        _ours({line.split(":")[1].strip() for line in _root_links() if line}),
    )


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = _state()
    yield
    after = _state()
    leaks = []
    for label, b, a in zip(("namespaces", "wireguard-go pids", "UAPI sockets", "root links"),
                           before, after, strict=True):
        new = a - b
        if new:
            leaks.append(f"{label}: {sorted(new)}")
    if leaks:
        # Clean up so one leak does not cascade into every later test.
        for ns in after[0] - before[0]:
            _netns.delete_namespace(ns)
        for pid in after[1] - before[1]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        pytest.fail("test left things behind: " + "; ".join(leaks))


@pytest.fixture
def netns() -> Iterator[Callable[[str], str]]:
    """Factory of scratch namespaces, all deleted after the test."""
    created: list[str] = []

    def make(prefix: str = "tst") -> str:
        name = unique(f"{prefix}-")
        _netns.create_namespace(name)
        created.append(name)
        return name

    try:
        yield make
    finally:
        for name in reversed(created):
            _netns.delete_namespace(name)


@pytest.fixture(autouse=True)
def _restore_tunsup_logging() -> Iterator[None]:
    """Tests that run the CLI in-process set up tunsup's log writer (which
    stops propagation to the root logger); undo that so that later tests'
    ``caplog`` still sees tunsup's records."""
    import logging

    logger = logging.getLogger("tunsup")
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    from tunsup._log import stop_logging

    stop_logging()
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture
def fake() -> Iterator[FakeHost]:
    """An in-memory host (tunsup.testing.FakeHost) with its own short
    UAPI socket directory."""
    with uapi_dir() as path:
        yield FakeHost(path)
