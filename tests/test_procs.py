"""Child processes of the real host adapters: helpers and hooks.

Real subprocesses (``sleep``, ``bash``) stand in for wireguard-go and for
users' hook commands; nothing here touches the network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tunsup.engine.effects import EffectContext, Hooks, StartHelper
from tunsup.engine.undo import EffectStack
from tunsup.host import Host, hooks
from tunsup.host import process as helpers
from tunsup.host._pump import MAX_LINE, pump_lines
from tunsup.testing import FakeNet

log = logging.getLogger("tunsup.test")


def real_processes(uapi_dir: str) -> Host:
    """Real helper and hook processes; no network (nothing here uses it)."""
    return Host(net=FakeNet(), start_helper=helpers.start_helper, run_hook=hooks.run_hook,
                dns_backend=lambda kind: None, uapi_dir=uapi_dir)  # type: ignore[arg-type,return-value]


def gone(pid: int) -> bool:
    """No process (not even a zombie) has ``pid``: it was reaped."""
    return not os.path.exists(f"/proc/{pid}")


@contextlib.contextmanager
def killed_afterwards(pids: list[int]) -> Iterator[None]:
    """With the defect back, a test must fail, not leave a process behind."""
    try:
        yield
    finally:
        for pid in pids:
            if not gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)


# --- issue 10, item 1: a cancel that lands during a helper's spawn ------------


def test_a_cancel_landing_during_the_spawn_stops_and_reaps_the_helper(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    spawned: list[int] = []
    real_open_process = trio.lowlevel.open_process
    scope = trio.CancelScope()

    async def spawn_then_cancel(*args: Any, **kwargs: Any) -> trio.Process:
        # The stop arrives while the spawn runs: the first checkpoint after
        # it is where the Cancelled is delivered.
        proc = await real_open_process(*args, **kwargs)
        spawned.append(proc.pid)
        scope.cancel()
        return proc

    monkeypatch.setattr(trio.lowlevel, "open_process", spawn_then_cancel)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ctx = EffectContext(host=real_processes(str(tmp_path)), log=log, nursery=nursery)
            stack = EffectStack(ctx, log=log)
            with killed_afterwards(spawned):
                with scope:
                    await stack.apply(StartHelper("tsx0", ("sleep", "1000")))
                assert scope.cancelled_caught
                assert stack.records == () and ctx.helpers == {}
                assert len(spawned) == 1
                assert gone(spawned[0]), "the helper was left running (or unreaped)"

    trio.run(main)


# --- issue 10, item 2: a hook timeout must not skip the other down hooks -------


def run_down_hooks(tmp_path: Path, pre_down: tuple[str, ...], post_down: tuple[str, ...], *,
                   hook_timeout: float, stop_timeout: float) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ctx = EffectContext(host=real_processes(str(tmp_path)), log=log, nursery=nursery,
                                hook_timeout=hook_timeout)
            stack = EffectStack(ctx, log=log)
            stack.adopt([Hooks("tsx0", "PreUp", (), "PostDown", post_down),
                         Hooks("tsx0", "PostUp", (), "PreDown", pre_down)])
            report = await stack.unwind(stop_timeout)
            assert not report.complete
            assert [type(r) for r in report.remaining] == [Hooks]

    trio.run(main)


def test_a_hook_timeout_still_runs_the_later_down_hooks_and_names_the_hook(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    marks = tmp_path / "marks"
    run_down_hooks(tmp_path, ("sleep 1000", f"echo PreDown2 >> {marks}"),
                   (f"echo PostDown >> {marks}",), hook_timeout=0.5, stop_timeout=30)
    assert marks.read_text().split() == ["PreDown2", "PostDown"]
    assert "PreDown hook failed: hook 'sleep 1000' did not finish within 0.5 s" in caplog.text
    assert "Exceptions from Trio nursery" not in caplog.text


def test_a_hung_pre_down_leaves_the_next_one_its_chance_within_the_stop_bound(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # hook_timeout (60 s) is longer than the whole stop budget: the first
    # PreDown may not take all of it.
    marks = tmp_path / "marks"
    run_down_hooks(tmp_path, ("sleep 1000", f"echo PreDown2 >> {marks}"),
                   (f"echo PostDown >> {marks}",), hook_timeout=60, stop_timeout=2)
    assert marks.read_text().split() == ["PreDown2", "PostDown"]
    assert "hook 'sleep 1000' did not finish within" in caplog.text


# --- issue 10, item 8: one bounded, linear output pump --------------------------


class Chunks(trio.abc.ReceiveStream):
    """A pipe that delivers the given chunks, then EOF."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = list(chunks)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._chunks.pop(0) if self._chunks else b""

    async def aclose(self) -> None:
        pass


#: Non-empty chunks (an empty read is EOF), rich in newlines.
CHUNK = st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"x", b"\n"))


@given(st.lists(CHUNK, max_size=12), st.integers(min_value=1, max_value=16))
def test_the_pump_cuts_lines_as_a_split_of_the_whole_output_would(
        chunks: list[bytes], cap: int) -> None:
    got: list[tuple[bytes, bool]] = []
    trio.run(lambda: pump_lines(Chunks(chunks), lambda raw, cut: got.append((raw, cut)),
                                max_line=cap))
    lines = b"".join(chunks).split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # output ending in a newline has no unfinished last line
    assert got == [(line[:cap], len(line) > cap) for line in lines]


HUGE = 8_000_000  # bytes of one line without a newline


def huge_line_command() -> str:
    return f"head -c {HUGE} /dev/zero | tr '\\0' x; echo; echo after-the-huge-line"


def peak_memory(run: Any) -> int:
    """Peak of Python allocations while ``run`` runs under trio."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        trio.run(run)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_hook_writing_a_huge_line_costs_bounded_memory(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunsup")
    peak = peak_memory(lambda: hooks.run_hook(huge_line_command(), log, 30))
    assert peak < 2_000_000, f"the pump held {peak} bytes for one {HUGE}-byte line"
    assert f"line truncated: longer than {MAX_LINE} bytes" in caplog.text
    assert "[hook] after-the-huge-line" in caplog.text


def test_a_helper_writing_a_huge_line_costs_bounded_memory(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunsup")
    pids: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            helper = await helpers.start_helper(nursery, ["bash", "-c", huge_line_command()],
                                                log=log)
            pids.append(helper.pid)
            with trio.fail_after(30):
                await helper.exited.wait()
            assert await helper.stop(1.0)

    with killed_afterwards(pids):
        peak = peak_memory(main)
    assert peak < 2_000_000, f"the pump held {peak} bytes for one {HUGE}-byte line"
    assert f"line truncated: longer than {MAX_LINE} bytes" in caplog.text
    assert "[bash out] after-the-huge-line" in caplog.text


def test_a_hook_cancelled_while_it_runs_is_killed_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """A stop (or a start given up) while a hook runs: its process group is
    killed, and the log says the hook was interrupted, not just nothing."""
    log = logging.getLogger("tunsup.test.hook")
    seen: list[int] = []

    async def main() -> None:
        with trio.CancelScope() as scope:
            async def started(pid: int, start_time: int) -> None:
                seen.append(pid)
                scope.cancel()

            await hooks.run_hook("sleep 30", log, 30, started=started)

    with caplog.at_level(logging.INFO, logger="tunsup.test.hook"):
        trio.run(main)
    assert seen
    with pytest.raises(ProcessLookupError):
        os.kill(seen[0], 0)
    assert "hook 'sleep 30' interrupted: its process group was killed" in caplog.messages
