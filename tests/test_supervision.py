"""Supervision under faults, against the in-memory host of ``fakehost``:
restart policy, restarts through helper generations, crash loops, stops
during a backoff, probes against a UAPI server that never answers, wedged
helpers.  Everything runs under ``MockClock(autojump_threshold=0)``: time
only passes when every task waits, so timings are exact and cost nothing.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import random
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunsup import ExitCode
from tunsup.config.sources import ConfigSource, Loaded
from tunsup.config.spec import IPNetwork, TunnelSpec
from tunsup.config.toml import SupervisorConfig
from tunsup.engine.restart import RestartPolicy, RestartTracker
from tunsup.engine.supervisor import Stopping, Supervisor
from tunsup.engine.tunnel import TRANSITIONS, Tunnel, TunnelOptions, TunnelState
from tunsup.engine.undo import LAST_CHANCE
from tunsup.host.dns import FileBackend, ResolvClaim, render_claims
from tunsup.service import ServiceOps
from tunsup.testing import Behaviour, FakeHost, spec, uapi_dir
from tunsup.testing.fakehost import Fault


def options(**changes: Any) -> TunnelOptions:
    settings: dict[str, Any] = {
        "helper": ("fake-wg",), "tun_header": "none", "stop_grace": 2.0,
        "restart": RestartPolicy(backoff_initial=0.2, backoff_max=5.0)}
    return TunnelOptions(**{**settings, **changes})


Driver = Callable[[Supervisor, list[Tunnel]], Awaitable[None]]


@attrs.define
class Outcome:
    code: ExitCode
    #: Mock seconds from the driver's return (usually a stop) to run's
    #: return; 0 when run returned first (the tunnel failed).
    stop_took: float
    tunnels: list[Tunnel]


#: Virtual seconds after which a supervisor test has hung.
HANG_LIMIT = 10_000.0


def run_supervisor(fake: FakeHost, opts: list[TunnelOptions], driver: Driver, *,
                   on_failure: str = "exit", posts: tuple[str, ...] = (),
                   allowed: tuple[IPNetwork, ...] | None = None) -> Outcome:
    """Run a supervisor over tunnels wgt0, wgt1 ... with ``opts`` (and the
    peer's ``allowed`` IPs); call ``driver`` once it is ready; return when
    ``run`` returns."""

    def make_spec(name: str) -> TunnelSpec:
        made = spec(name, post_up=posts)
        if allowed is None:
            return made
        return attrs.evolve(made, peers=tuple(attrs.evolve(p, allowed_ips=allowed)
                                              for p in made.peers))

    async def main() -> Outcome:
        tunnels = [Tunnel(make_spec(f"wgt{i}"), fake.host, o)
                   for i, o in enumerate(opts)]
        sup = Supervisor(tunnels, fake.host, handle_signals=False,
                         on_failure=on_failure)  # type: ignore[arg-type]
        result: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def runner() -> None:
                result["code"] = await sup.run()
                result["ended"] = trio.current_time()
                nursery.cancel_scope.cancel()

            nursery.start_soon(runner)
            await sup.ready.wait()
            await driver(sup, tunnels)
            result["driver_done"] = trio.current_time()
            await trio.sleep_forever()
        ended = result["ended"]
        return Outcome(result["code"], ended - result.get("driver_done", ended), tunnels)

    async def bounded_main() -> Outcome:
        # A virtual deadline: were a probe to lose its timeout, every task
        # would wait on a socket with no deadline left, and the MockClock
        # would never jump: the test would hang in real time.  With this
        # one the clock jumps to it and the test fails.
        with trio.fail_after(HANG_LIMIT):
            return await main()

    outcome: Outcome = trio.run(bounded_main, clock=trio.testing.MockClock(autojump_threshold=0))
    return outcome


def assert_host_restored(fake: FakeHost) -> None:
    assert fake.net.links == {}, fake.net.links
    assert fake.tun_fds == set(), "a TUN fd was left open"
    assert fake.alive == set(), "a helper was left running"
    assert all(h.exited.is_set() for h in fake.started)


async def stop(sup: Supervisor, tunnels: list[Tunnel]) -> None:
    sup.stop("test")


# ------------------------------------------------------------------ the policy


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=100, window=1e9, backoff_initial=0.5,
                                           backoff_max=4.0), random.Random(1))
    bases = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    for i, base in enumerate(bases):
        delay = tracker.failure(float(i))
        assert delay is not None and base / 2 <= delay <= base
    # Jitter: delays differ between trackers with different seeds.
    other = RestartTracker(tracker.policy, random.Random(2))
    assert other.failure(0.0) != RestartTracker(tracker.policy, random.Random(1)).failure(0.0)


def test_limit_counts_failures_within_the_window() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=2, window=10.0), random.Random(0))
    assert tracker.failure(0.0) is not None
    assert tracker.failure(1.0) is not None
    assert tracker.failure(2.0) is None  # third failure within 10 s
    tracker = RestartTracker(RestartPolicy(max_restarts=2, window=10.0), random.Random(0))
    assert tracker.failure(0.0) is not None
    assert tracker.failure(1.0) is not None
    assert tracker.failure(10.5) is not None  # the first one has left the window
    assert tracker.failures_in_window(10.5) == 2


def test_no_restarts_and_zero_backoff() -> None:
    assert RestartTracker(RestartPolicy(max_restarts=0)).failure(0.0) is None
    tracker = RestartTracker(RestartPolicy(backoff_initial=0.0, backoff_max=1.0))
    assert tracker.failure(0.0) == 0.0


def test_reset_starts_the_backoff_over() -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=100, window=1.0, backoff_initial=1.0,
                                           backoff_max=64.0), random.Random(3))
    for i in range(5):
        tracker.failure(float(i * 10))
    assert tracker.base_delay(tracker.attempt) == 32.0
    tracker.reset()
    delay = tracker.failure(100.0)
    assert delay is not None and 0.5 <= delay <= 1.0


def test_huge_attempt_counts_do_not_overflow() -> None:
    tracker = RestartTracker(RestartPolicy(backoff_initial=0.001, backoff_max=3600.0))
    assert tracker.base_delay(10**6) == 3600.0


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.floats(0, 1000, allow_nan=False), max_size=30),
       max_restarts=st.integers(0, 6), window=st.floats(0.1, 100))
def test_policy_never_allows_more_than_max_restarts_per_window(
        times: list[float], max_restarts: int, window: float) -> None:
    tracker = RestartTracker(RestartPolicy(max_restarts=max_restarts, window=window,
                                           backoff_initial=0.1, backoff_max=10.0))
    allowed: list[float] = []
    for now in sorted(times):
        delay = tracker.failure(now)
        if delay is None:
            break  # the tunnel has failed: no more restarts
        assert 0.05 <= delay <= 10.0
        allowed.append(now)
        assert sum(1 for t in allowed if now - window < t <= now) <= max_restarts


def test_backoff_sleep_is_exact_under_the_mock_clock(fake: FakeHost) -> None:
    """A restart happens after the backoff, not before and not later."""
    policy = RestartPolicy(max_restarts=5, backoff_initial=8.0, backoff_max=8.0)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        died = trio.current_time()
        fake.current.die(-9)
        await tunnels[0].wait_state(TunnelState.RESTARTING)
        await tunnels[0].wait_state(TunnelState.UP)
        gap = fake.current.started_at - died
        assert 4.0 <= gap <= 8.0  # equal jitter: [d/2, d]
        sup.stop()

    out = run_supervisor(fake, [options(restart=policy)], driver)
    assert out.code == ExitCode.OK


# --------------------------------------------------------------- state table


def test_transition_table_reaches_an_end_from_every_state() -> None:
    ends = {TunnelState.STOPPED, TunnelState.FAILED}
    for state in TunnelState:
        seen, todo = {state}, [state]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & ends, state
    assert TunnelState.DEGRADED in TRANSITIONS[TunnelState.UP]
    assert TunnelState.UP in TRANSITIONS[TunnelState.DEGRADED]


# ------------------------------------------------------------------- restarts


def test_owned_tun_is_handed_over_and_everything_is_undone(fake: FakeHost) -> None:
    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        helper = fake.current
        link = fake.net.by_name("wgt0")
        assert link is not None and link.persistent and link.up and link.mtu == 1420
        assert helper.env["WG_TUN_FD"] == str(helper.pass_fds[0])
        assert helper.env["WG_PROCESS_FOREGROUND"] == "1"
        assert helper.pass_fds[0] in fake.tun_fds
        await tunnels[0].next_probe()
        status = tunnels[0].status
        assert (status.state, status.tun_mode, status.restarts) == ("up", "owned", 0)
        assert status.last_probe is not None and status.last_probe.ok
        assert status.last_probe.peers[0].rx_bytes == 100
        sup.stop()

    out = run_supervisor(fake, [options()], driver)
    assert out.code == ExitCode.OK
    assert out.tunnels[0].state is TunnelState.STOPPED
    assert_host_restored(fake)


def test_owned_tun_survives_a_helper_restart(fake: FakeHost) -> None:
    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        link = fake.net.by_name("wgt0")
        assert link is not None
        before = attrs.asdict(link)
        first = fake.current
        first.die(-9, "killed")
        await tunnels[0].wait_state(TunnelState.RESTARTING)
        # During the restart the interface, its addresses and routes stay.
        assert fake.net.links[link.index] is link and attrs.asdict(link) == before
        await tunnels[0].wait_state(TunnelState.UP)
        assert fake.current is not first and not first.signals  # reaped, not signalled
        assert fake.net.deleted == []
        assert attrs.asdict(link) == before
        assert tunnels[0].status.restarts == 1
        assert tunnels[0].helper_pid == fake.current.pid
        # The new helper got the configuration again.
        assert fake.requests.count("set=1") == 2
        sup.stop()

    out = run_supervisor(fake, [options()], driver)
    assert out.code == ExitCode.OK
    assert_host_restored(fake)


def test_helper_mode_restart_rebuilds_the_link_and_reruns_its_hooks(fake: FakeHost) -> None:
    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        old = fake.net.by_name("wgt0")
        assert old is not None and not old.persistent
        fake.current.die(2)
        await tunnels[0].wait_state(TunnelState.RESTARTING)
        await tunnels[0].wait_state(TunnelState.UP)
        new = fake.net.by_name("wgt0")
        assert new is not None and new.index != old.index
        assert {str(a) for a in new.addresses} == {"10.9.0.1/24"}
        assert new.up and new.mtu == 1420
        assert {str(n) for _, n in new.routes} == {"198.51.100.0/24"}
        assert "WG_TUN_FD" not in fake.current.env
        sup.stop()

    out = run_supervisor(fake, [options(tun_mode="helper")], driver, posts=("echo up",))
    assert out.code == ExitCode.OK
    # PostUp/PreDown belong to the helper's generation in this mode.
    assert fake.hooks == ["echo up", "echo down", "echo up", "echo down"]
    assert_host_restored(fake)


def test_crash_loop_is_bounded_then_the_tunnel_fails_and_run_exits_1(
        fake: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    fake.default = Behaviour.CRASH
    fake.plan = [Behaviour.OK]
    policy = RestartPolicy(max_restarts=3, window=60.0, backoff_initial=0.5, backoff_max=10.0)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.current.die(1, "ERROR: lost it")
        await trio.sleep_forever()  # run returns by itself

    caplog.set_level(logging.INFO, logger="tunsup")
    out = run_supervisor(fake, [options(restart=policy)], driver)
    assert out.code == ExitCode.FAILURE
    assert len(fake.started) == 1 + 3  # the first one, then exactly 3 restarts
    tunnel = out.tunnels[0]
    assert tunnel.state is TunnelState.FAILED
    assert "helper failed 4 times within 60 s (restart_max = 3)" in str(tunnel.failure)
    assert tunnel.report is not None and tunnel.report.complete
    text = caplog.text
    assert "exited with status 1; last output: ERROR: lost it" in text
    assert text.count("restart failed: helper fake-wg") == 3
    assert "exited with status 1; last output: ERROR: boom" in text
    assert "no tunnel is left: exiting" in text
    assert_host_restored(fake)


def test_an_owned_tun_deleted_from_outside_fails_the_tunnel_at_once(fake: FakeHost) -> None:
    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        link = fake.net.by_name("wgt0")
        assert link is not None
        del fake.net.links[link.index]  # ip link del, behind tunsup's back
        fake.current.die(1, "ERROR: TUN closed")
        await trio.sleep_forever()

    out = run_supervisor(fake, [options()], driver)
    assert out.code == ExitCode.FAILURE
    assert len(fake.started) == 1  # no pointless restarts
    assert "TUN device wgt0 was deleted" in str(out.tunnels[0].failure)
    assert_host_restored(fake)


def test_stop_during_a_backoff_returns_at_once_and_cleanly(fake: FakeHost) -> None:
    policy = RestartPolicy(backoff_initial=600.0, backoff_max=600.0)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.current.die(-9)
        await tunnels[0].wait_state(TunnelState.RESTARTING)
        await trio.sleep(10)  # well inside the 300..600 s backoff
        sup.stop()

    wall = time.monotonic()
    out = run_supervisor(fake, [options(restart=policy)], driver)
    assert out.code == ExitCode.OK
    assert out.stop_took == 0.0  # not one mock second: nothing waited
    assert time.monotonic() - wall < 5
    assert len(fake.started) == 1  # no restart happened
    assert_host_restored(fake)


def test_backoff_resets_after_the_helper_was_healthy(fake: FakeHost) -> None:
    policy = RestartPolicy(max_restarts=10, window=1000.0, backoff_initial=4.0,
                           backoff_max=64.0, reset_after=30.0)
    gaps: list[float] = []

    async def crash_and_wait(tunnel: Tunnel) -> None:
        died = trio.current_time()
        fake.current.die(-9)
        await tunnel.wait_state(TunnelState.RESTARTING)
        await tunnel.wait_state(TunnelState.UP)
        gaps.append(fake.current.started_at - died)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        await crash_and_wait(tunnels[0])   # base 4
        await crash_and_wait(tunnels[0])   # base 8: not healthy long enough
        await trio.sleep(31)
        await crash_and_wait(tunnels[0])   # healthy 31 s: base 4 again
        sup.stop()

    out = run_supervisor(fake, [options(restart=policy)], driver)
    assert out.code == ExitCode.OK
    assert 2 <= gaps[0] <= 4 and 4 <= gaps[1] <= 8 and 2 <= gaps[2] <= 4, gaps
    assert_host_restored(fake)


def test_a_failed_tunnel_leaves_the_others_running(fake: FakeHost) -> None:
    no_restarts = RestartPolicy(max_restarts=0)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        victim = next(h for h in fake.started if h.ifname == "wgt0")
        victim.die(1)
        await tunnels[0].wait_state(TunnelState.FAILED)
        assert fake.net.by_name("wgt0") is None
        assert tunnels[1].state is TunnelState.UP and fake.net.by_name("wgt1") is not None
        sup.stop()

    out = run_supervisor(fake, [options(restart=no_restarts), options()], driver)
    assert out.code == ExitCode.FAILURE  # one tunnel failed, host restored
    assert out.tunnels[1].state is TunnelState.STOPPED
    assert_host_restored(fake)


def test_status_op_shows_degraded_reason_last_probe_failure_and_installed_routes(
        fake: FakeHost) -> None:
    """Issue 10 item 16, through the service's status op: the degraded
    reason and last probe of an up tunnel; a tunnel that failed while up
    stays listed (state failed, why, no routes) until ``remove`` clears it;
    ROUTES counts what was installed, not the AllowedIPs."""
    fake.plan = [Behaviour.OK, Behaviour.MUTE]  # wgt0 answers, wgt1 never does

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        ops = ServiceOps(sup, ConfigSource(), Loaded(SupervisorConfig(), ()))
        await tunnels[1].wait_state(TunnelState.DEGRADED)
        await tunnels[0].next_probe()
        fake.started[0].die(1)
        await tunnels[0].wait_state(TunnelState.FAILED)
        await trio.testing.wait_all_tasks_blocked()  # the supervisor saw it end
        entries = {t["name"]: t for t in (await ops.status())["tunnels"]}
        assert list(entries) == ["wgt1", "wgt0"]  # running ones first
        failed, degraded = entries["wgt0"], entries["wgt1"]
        assert failed["state"] == "failed" and failed["uptime"] is None
        assert "restart_max = 0" in failed["failure"] and failed["routes"] == 0
        assert failed["last_probe"]["ok"] is True
        assert degraded["state"] == "degraded" and degraded["failure"] is None
        assert "did not answer within 1s" in degraded["degraded_reason"]
        assert degraded["last_probe"]["ok"] is False
        assert degraded["last_probe"]["error"] == degraded["degraded_reason"]
        # 10.9.0.0/24 is the address's own network, already routed: 1 of 2.
        assert degraded["routes"] == 1
        assert (await sup.remove("wgt0")) is tunnels[0]
        assert [t["name"] for t in (await ops.status())["tunnels"]] == ["wgt1"]
        sup.stop()

    two_prefixes = (ipaddress.ip_network("10.9.0.0/24"), ipaddress.ip_network("198.51.100.0/24"))
    out = run_supervisor(fake, [options(restart=RestartPolicy(max_restarts=0)), options()],
                         driver, on_failure="keep-running", allowed=two_prefixes)
    assert out.code == ExitCode.FAILURE
    assert_host_restored(fake)


def test_down_while_stopping_is_answered_as_stopping_not_as_an_internal_error(
        fake: FakeHost) -> None:
    """`tunsup down` of a tunnel that failed while up, once a stop has
    begun: the answer is "stopping" (exit 1 with that message), not an
    internal error with a traceback (review finding)."""
    from tunsup.control import protocol as proto
    from tunsup.control.server import OpError

    seen: dict[str, Any] = {}

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        ops = ServiceOps(sup, ConfigSource(), Loaded(SupervisorConfig(), ()))
        fake.started[0].die(1)
        await tunnels[0].wait_state(TunnelState.FAILED)
        await trio.testing.wait_all_tasks_blocked()
        sup.stop()
        try:
            await ops.down("wgt0")
        except OpError as exc:
            seen["code"] = exc.code
        await trio.sleep_forever()

    out = run_supervisor(fake, [options(restart=RestartPolicy(max_restarts=0)), options()],
                         driver, on_failure="keep-running")
    assert seen.get("code") == proto.STOPPING, seen
    assert out.code == ExitCode.FAILURE
    assert_host_restored(fake)


def test_keep_running_after_the_last_tunnel_failed(fake: FakeHost) -> None:
    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.current.die(1)
        await tunnels[0].wait_state(TunnelState.FAILED)
        await trio.sleep(3600)  # run is still there
        assert fake.net.links == {}
        sup.stop()

    out = run_supervisor(fake, [options(restart=RestartPolicy(max_restarts=0))], driver,
                         on_failure="keep-running")
    assert out.code == ExitCode.FAILURE
    assert_host_restored(fake)


# --------------------------------------------------------------------- probes


def test_probe_against_a_server_that_never_answers_degrades_and_stop_is_unaffected(
        fake: FakeHost) -> None:
    fake.plan = [Behaviour.MUTE]

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        from tunsup.engine.tunnel import probe_phase

        tunnel = tunnels[0]
        start = trio.current_time()
        await tunnel.wait_state(TunnelState.DEGRADED)
        # The first probe went out at the tunnel's phase of the interval
        # (within one interval of the start) and timed out after probe_timeout.
        phase = probe_phase(tunnel.name) * 5.0
        first = phase + (math.floor((start - phase) / 5.0) + 1) * 5.0
        assert start < first <= start + 5.0
        assert trio.current_time() == pytest.approx(first + 1.5)
        status = tunnel.status
        assert status.state == "degraded"
        assert status.degraded_reason is not None
        assert "did not answer within 1.5s" in status.degraded_reason
        assert status.last_probe is not None and not status.last_probe.ok
        await trio.sleep(5.2)  # the next probe is now stuck in the server
        sup.stop()

    out = run_supervisor(fake, [options(probe_timeout=1.5, probe_interval=5.0)], driver)
    assert out.code == ExitCode.OK
    assert out.stop_took == 0.0  # the stuck probe was cancelled, nothing waited
    assert_host_restored(fake)


def test_a_good_probe_makes_a_degraded_tunnel_up_again(fake: FakeHost) -> None:
    fake.plan = [Behaviour.MUTE]

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        tunnel = tunnels[0]
        await tunnel.wait_state(TunnelState.DEGRADED)
        fake.current.mute = False
        await tunnel.wait_state(TunnelState.UP)
        assert tunnel.degraded_reason is None
        probe = tunnel.last_probe
        assert probe is not None and probe.ok and probe.peers[0].tx_bytes == 200
        sup.stop()

    out = run_supervisor(fake, [options(probe_timeout=1.0, probe_interval=2.0)], driver)
    assert out.code == ExitCode.OK
    assert_host_restored(fake)


def test_probes_sleep_between_runs(fake: FakeHost) -> None:
    """One probe per interval: no polling."""

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        await trio.sleep(100)
        sup.stop()

    run_supervisor(fake, [options(probe_interval=5.0)], driver)
    gets = fake.requests.count("get=1")
    assert gets in (20, 21), gets  # at 0, 5, ..., 100 s
    assert_host_restored(fake)


# ------------------------------------------------------------- wedged helper


def test_wedged_helper_stop_kills_after_the_grace_and_returns_in_bounds(
        fake: FakeHost) -> None:
    """The helper ignores SIGTERM and its UAPI never answers (stopped): the
    stuck probe is cancelled, the host restored, the helper killed after
    the grace; the stop takes the grace and no more."""
    fake.plan = [Behaviour.MUTE]

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.current.ignore_term = True
        await trio.sleep(0.5)  # a probe is in flight (timeout 60 s)
        sup.stop()

    out = run_supervisor(fake, [options(probe_timeout=60.0, stop_grace=2.0)], driver)
    assert out.code == ExitCode.OK
    helper = fake.started[0]
    assert helper.signals == [signal.SIGTERM, signal.SIGKILL]
    assert out.stop_took == pytest.approx(2.0)
    # The link went down and away before the helper was even signalled.
    assert fake.net.deleted[0] == "wgt0"
    assert_host_restored(fake)


def test_a_helper_that_cannot_be_stopped_after_a_failed_start_is_reported(
        fake: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    """The start fails right after the spawn (its start time cannot be
    read) and the helper is stuck in the kernel (no signal takes): the
    start's clean-up must say the helper is still running, and run exits 3
    (teardown incomplete), not 1 as if the host were restored."""
    fake.faults.extend([Fault(op="start_time"), Fault(op="signal_helper", kind="hang")])
    out = run_supervisor(fake, [options(tun_mode="helper")], stop)
    assert out.code == ExitCode.TEARDOWN_INCOMPLETE
    helper = fake.started[0]
    assert not helper.exited.is_set()
    assert f"fake-wg (pid {helper.pid}) is still running" in caplog.text, caplog.text


def test_a_helper_stuck_after_a_failed_restart_is_reported_once(fake: FakeHost) -> None:
    """The helper dies; its restart fails right after the spawn and the new
    process cannot be killed: the report names it exactly once (the
    generation's stack, unwound again by the teardown, used to repeat its
    clean-up failure), and run exits 3."""

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.faults.extend([Fault(op="start_time"), Fault(op="signal_helper", kind="hang")])
        fake.current.die(-9)
        await trio.sleep_forever()  # the tunnel fails: run returns by itself

    out = run_supervisor(fake, [options(restart=RestartPolicy(max_restarts=3,
                                                              backoff_initial=0.2))], driver)
    assert out.code == ExitCode.TEARDOWN_INCOMPLETE
    report = out.tunnels[0].report
    assert report is not None
    stuck = [f for f in report.failures if "is still running" in f]
    assert len(stuck) == 1, report.failures


def test_after_run_returned_a_failed_tunnel_cannot_be_cleared(fake: FakeHost) -> None:
    """A tunnel that failed while up stays listed (for status) until a
    `down` clears it; once run() has returned, that request is refused
    like every other (found by the race suite: it returned the tunnel)."""
    fake.default = Behaviour.CRASH
    fake.plan = [Behaviour.OK]
    seen: dict[str, Any] = {}

    async def main() -> None:
        tunnel = Tunnel(spec("wgt0"), fake.host, options(restart=RestartPolicy(max_restarts=0)))
        sup = Supervisor([tunnel], fake.host, handle_signals=False)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sup.run)
            await sup.ready.wait()
            fake.current.die(1, "ERROR: lost it")
        seen["failed"] = [slot.tunnel.name for slot in sup.failed()]
        with pytest.raises(Stopping):
            await sup.remove("wgt0")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert seen["failed"] == ["wgt0"]


# ------------------------------------------------------- generated schedules

EVENTS = st.sampled_from(["die", "crash-next", "mute", "unmute", "wedge"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    schedule=st.lists(st.tuples(st.floats(0, 40), EVENTS), max_size=8),
    stop_at=st.floats(0, 60),
    mode=st.sampled_from(["owned", "helper"]),
    max_restarts=st.integers(0, 3),
)
def test_whatever_happens_the_host_is_restored(
        schedule: list[tuple[float, str]], stop_at: float, mode: str,
        max_restarts: int) -> None:
    """Invariant: whatever faults arrive and whenever the stop comes, after
    run returns the fake host equals its start, every helper is reaped, and
    the stop took at most the grace."""
    with uapi_dir() as path:
        fake = FakeHost(path)
        policy = RestartPolicy(max_restarts=max_restarts, window=30.0, backoff_initial=1.0,
                               backoff_max=8.0, reset_after=10.0)

        async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
            now = 0.0
            events = sorted(schedule)
            for at, what in events:
                if at > stop_at:
                    break
                await trio.sleep(at - now)
                now = at
                helper = fake.current
                if what == "die":
                    helper.die(-9)
                elif what == "crash-next":
                    fake.plan.append(Behaviour.CRASH)
                elif what in ("mute", "unmute"):
                    helper.mute = what == "mute"
                else:
                    helper.ignore_term = True
            await trio.sleep(max(0.0, stop_at - now))
            sup.stop()

        out = run_supervisor(fake, [options(restart=policy, tun_mode=mode,
                                            probe_interval=3.0, probe_timeout=1.0)], driver)
        assert out.code in (ExitCode.OK, ExitCode.FAILURE)
        tunnel = out.tunnels[0]
        assert tunnel.report is not None and tunnel.report.complete
        assert (out.code == ExitCode.FAILURE) == (tunnel.failure is not None)
        assert out.stop_took <= 2.0 + 1e-9
        assert_host_restored(fake)



def test_the_first_probe_comes_at_the_tunnels_phase_not_at_once(fake: FakeHost) -> None:
    """Tunnels started together do not probe while they start (the helper
    has just answered the configuration request): each probes first at
    its own phase of the interval, then every interval."""
    from tunsup.engine.tunnel import probe_phase

    interval = 5.0
    seen: dict[str, list[float]] = {}

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        up_at = trio.current_time()
        assert all(t.last_probe is None for t in tunnels)

        async def watch(tunnel: Tunnel) -> None:
            times = seen.setdefault(tunnel.name, [])
            while len(times) < 2:
                probe = await tunnel.next_probe()
                assert probe.ok
                times.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            for tunnel in tunnels:
                nursery.start_soon(watch, tunnel)
        assert all(up_at < times[0] <= up_at + interval for times in seen.values())
        sup.stop("test")

    outcome = run_supervisor(fake, [options(probe_interval=interval)] * 4, driver)
    assert outcome.code == ExitCode.OK
    for name, (first, second) in seen.items():
        assert first % interval == pytest.approx(probe_phase(name) * interval, abs=1e-6)
        assert second - first == pytest.approx(interval)
    assert_host_restored(fake)


def test_service_gives_the_collector_back_once_its_tunnels_are_up(
        fake: FakeHost, tmp_path: Any) -> None:
    """`run` keeps the cyclic collector paused through the bring-up (its
    many young collections cost 20-35 ms of a 50-tunnel start) and the
    service lets it run again once the tunnels are up, not later."""
    import gc

    from tunsup._log import LogHub
    from tunsup.config.settings import ControlSettings
    from tunsup.service import run_service

    cfg = attrs.evolve(SupervisorConfig(), runtime_dir=str(tmp_path))
    seen: dict[str, bool] = {}

    async def main() -> None:
        tunnels = [Tunnel(spec(f"wgt{i}"), fake.host, options()) for i in range(3)]
        with trio.fail_after(60):
            await run(tunnels)

    async def run(tunnels: list[Tunnel]) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(
                run_service, tunnels, fake.host, source=ConfigSource(),
                loaded=Loaded(cfg, ()), hub=LogHub(), settings=ControlSettings(),
                collector_paused=True))
            await tunnels[0].wait_state(TunnelState.UP)
            seen["while starting"] = gc.isenabled()
            for tunnel in tunnels:
                await tunnel.wait_state(TunnelState.UP)
            await trio.testing.wait_all_tasks_blocked()
            seen["once up"] = gc.isenabled()
            nursery.cancel_scope.cancel()

    was = gc.isenabled()
    gc.disable()
    try:
        # Real time: the control server's socket files are handled in
        # worker threads (a MockClock would jump past their bounds).
        trio.run(main)
    finally:
        gc.unfreeze()
        if was:
            gc.enable()
        else:
            gc.disable()
    assert seen == {"while starting": False, "once up": True}
    assert_host_restored(fake)


def test_tun_framing_is_detected_while_the_bring_up_checks_the_host(
        fake: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    """With tun_header = "auto", asking the helper binary for its framing
    (a process: `wireguard-go --version`, stood in for here at that
    boundary) starts with the bring-up and runs while the checks before
    the TUN wait for the host; the TUN gets what it answered."""
    from tunsup.host import tun as tun_adapter

    seen: dict[str, Any] = {}

    async def detect_header(program: str, **_: Any) -> str:
        seen["ops_at_start"] = list(fake.net.ops)
        await trio.sleep(1.0)  # the process takes its time
        seen["ops_at_end"] = list(fake.net.ops)
        return "pi"

    monkeypatch.setattr(tun_adapter, "detect_header", detect_header)

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        sup.stop()

    out = run_supervisor(fake, [options(tun_header="auto", tun_mode="owned")], driver)
    assert out.code == ExitCode.OK
    # Asked at the start (at most the first check had been sent), and the
    # checks went on meanwhile; the TUN waited for the answer.
    assert seen["ops_at_start"] in ([], ["link_index"])
    assert len(seen["ops_at_end"]) > len(seen["ops_at_start"])
    assert "create_tun" not in seen["ops_at_end"]
    creates = [call for call in fake.net.calls if call[0] == "create_tun"]
    assert creates and creates[0][2] == {"packet_info": True}
    assert_host_restored(fake)


def test_a_fake_helper_that_cannot_set_up_exits_as_wireguard_go_does(fake: FakeHost) -> None:
    """The fake process, like wireguard-go, exits with status 1 when the
    link it would create exists or its UAPI socket is another live
    helper's: it was spawned (its start is not "never started"), it is
    not left among the living, and the other helper's socket stays."""
    log = logging.getLogger("test")

    async def main() -> None:
        with trio.fail_after(10):
            await started_twice()

    async def started_twice() -> None:
        async with trio.open_nursery() as nursery:
            first = await fake.host.start_helper(nursery, ["fake-wg", "wgt0"], log=log)
            try:
                second = await fake.host.start_helper(nursery, ["fake-wg", "wgt0"], log=log)
                await second.exited.wait()
                assert second.returncode == 1
                assert "setup failed" in second.describe_exit()
                assert fake.alive == {fake.started[0]}
                assert fake.net.by_name("wgt0") is not None  # the first one's link
            finally:
                # Its watcher is shielded: stopped, or the nursery waits on.
                assert await first.stop(0.1)
            assert fake.alive == set()

    trio.run(main)


def test_a_tun_fd_is_closed_even_when_the_deletion_of_its_link_hangs(
        fake: FakeHost) -> None:
    """Every link deletion hangs: the teardown's deadline passes inside the
    TUN's undo, yet its fd is closed (it was taken from the tunnel's fds:
    nothing else would close it, and an open fd keeps the device attached
    for the life of the service)."""
    fake.faults.append(Fault(op="delete_link", kind="hang", times=None))
    outcome = run_supervisor(fake, [options(stop_timeout=4.0)], stop)
    assert outcome.code == ExitCode.TEARDOWN_INCOMPLETE
    assert "timed out" in " ".join(outcome.tunnels[0].report.failures)
    assert fake.tun_fds == set(), "a TUN fd was left open"
    assert fake.alive == set()


def test_a_helper_given_up_on_is_reaped_when_it_dies_later(
        fake: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    """wgt0's helper stays in the kernel for 60 s after its first signal,
    longer than its teardown waits (grace, SIGKILL, the last resort): the
    teardown gives up on it, and the service (wgt1 still runs) reaps it
    when it dies, so no zombie piles up in a long-running service."""
    fake.faults.append(Fault(op="signal_helper", kind="delay", delay=60.0))

    async def down_wgt0_then_wait(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        await sup.remove("wgt0")
        helper = next(h for h in fake.started if h.ifname == "wgt0")
        assert not helper.exited.is_set(), "the helper died within the teardown"
        assert "still running after teardown" in caplog.text
        await helper.exited.wait()
        await trio.sleep(1.0)
        assert helper.reaped, "the helper given up on was never reaped"
        sup.stop("test")

    caplog.set_level(logging.INFO)
    outcome = run_supervisor(fake, [options(), options()], down_wgt0_then_wait,
                             on_failure="keep-running")
    assert "has exited and was reaped" in caplog.text
    assert outcome.code == ExitCode.TEARDOWN_INCOMPLETE
    assert_host_restored(fake)


@pytest.mark.parametrize("checkpoints", range(5))
def test_a_stop_in_the_first_steps_of_run_is_obeyed(fake: FakeHost, checkpoints: int) -> None:
    """``stop`` a few scheduler steps after ``run`` began (before or while
    its reaper starts, before its tunnels): ``run`` returns without waiting
    on anything (a stop that came before the cancel scope existed was once
    ignored: the tunnels started and ran on)."""

    async def main() -> None:
        tunnels = [Tunnel(spec("wgt0"), fake.host, options())]
        sup = Supervisor(tunnels, fake.host, handle_signals=False)
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.run)
                while sup.phase == "new":
                    await trio.lowlevel.checkpoint()
                for _ in range(checkpoints):
                    await trio.lowlevel.checkpoint()
                asked = trio.current_time()
                sup.stop("test")
        assert trio.current_time() == asked
        assert_host_restored(fake)

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.parametrize("tun_mode", ["owned", "helper"])
def test_a_stop_during_a_start_pays_the_abort_from_the_teardown_budget(
        fake: FakeHost, tun_mode: str) -> None:
    """The route install of a start hangs after the kernel took the routes
    (its answer lost), and removing them hangs too.  A stop then cancels
    the install; its abort (the teardown's first step) gets no more than
    ``stop_timeout`` (the routes' own undo bound is 60 s), and the rest of
    the teardown only what is left of that budget (each step its last
    second).  In helper mode the routes are on the helper generation's
    stack, unwound in place before the tunnel's: one budget for both."""
    fake.faults.append(Fault(op="add_routes", kind="applied-hang"))
    fake.faults.append(Fault(op="delete_routes", kind="hang", times=None))
    # The link's deletion hangs as well: a step that would take whatever
    # budget it were given.
    fake.faults.append(Fault(op="delete_link", kind="hang", times=None))
    opts = options(stop_timeout=4.0, tun_mode=tun_mode)

    async def main() -> float:
        sup = Supervisor([Tunnel(spec("wgt0"), fake.host, opts)], fake.host,
                         handle_signals=False)
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.run)
                # Virtual time: the install hangs from t=0 on.
                await trio.sleep(1.0)
                assert "add_routes" in fake.ops and sup.phase == "starting"
                asked = trio.current_time()
                sup.stop("test")
        return trio.current_time() - asked

    took = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took <= opts.stop_timeout + 3 * LAST_CHANCE, f"the stop took {took:.1f} s"
    assert fake.alive == set() and fake.tun_fds == set()


# The last chances past stop_timeout: the kill switch's (its removal hangs
# once the budget is spent), and for the in-place unwind its own last step
# (the SIGKILL after the helper's grace took the whole budget).
@pytest.mark.parametrize(("fails_at", "last_chances"), [("start_time", 1), ("set_mtu", 2)])
@pytest.mark.parametrize("tun_mode", ["owned", "helper"])
def test_a_stop_during_a_failed_restarts_cleanup_pays_it_from_the_teardown_budget(
        fake: FakeHost, tun_mode: str, fails_at: str, last_chances: int) -> None:
    """The helper dies, and the new helper of its restart ignores every
    signal.  ``start_time``: the restart's spawn hangs, and the stop that
    ends it waits for the spawn to stop that helper.  ``set_mtu``: the
    restart fails once the helper runs, and a stop comes while that
    generation is unwound in place (its whole bound).  Either clean-up is
    the teardown's first step: the teardown, whose removal of the kill
    switch hangs as well, gets only what is left of the same
    ``stop_timeout`` (not a second one), and the spawn's stop of its
    helper no more than that budget."""
    opts = options(stop_timeout=2.0, tun_mode=tun_mode, kill_switch=True,
                   restart=RestartPolicy(max_restarts=3, backoff_initial=0.2))

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.faults.extend([Fault(op="start_time", kind="hang") if fails_at == "start_time"
                            else Fault(op="set_mtu"),
                            Fault(op="signal_helper", kind="hang", times=None),
                            Fault(op="delete_routes", kind="hang", times=None)])
        # The restart's spawn hangs, or the failed restart's unwind does.
        waits_on = "start_time" if fails_at == "start_time" else "signal_helper"
        before = fake.ops.count(waits_on)
        fake.current.die(-9)
        while fake.ops.count(waits_on) == before:
            await trio.sleep(0.01)
        sup.stop("test")

    out = run_supervisor(fake, [opts], driver)
    assert out.stop_took <= opts.stop_timeout + last_chances * LAST_CHANCE, (
        f"the stop took {out.stop_took:.1f} s")


def test_a_stop_late_in_a_failed_restarts_cleanup_pays_only_its_wait(fake: FakeHost) -> None:
    """A failed restart's generation takes 6.5 s to unwind (its new helper
    leaves the kernel only then), and a stop comes 6.4 s into it: the stop
    waited 0.1 s, so the teardown still has 9.9 s of its 10 and removes the
    kill switch (5 s) in full: the tunnel stops cleanly, nothing left.
    (Counting the whole unwind against the stop failed the teardown.)"""
    opts = options(stop_timeout=10.0, kill_switch=True,
                   restart=RestartPolicy(max_restarts=3, backoff_initial=0.2))

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.faults.extend([Fault(op="set_mtu"),
                            Fault(op="signal_helper", kind="delay", delay=6.5),
                            Fault(op="delete_routes", kind="delay", delay=5.0)])
        fake.current.die(-9)
        while "signal_helper" not in fake.ops:
            await trio.sleep(0.01)
        await trio.sleep(6.4)
        sup.stop("test")

    out = run_supervisor(fake, [opts], driver)
    assert out.code == ExitCode.OK, out.tunnels[0].report
    assert out.tunnels[0].state is TunnelState.STOPPED
    assert_host_restored(fake)


def restart_spawn_fails(fake: FakeHost, *, helper_lingers: float) -> None:
    """The helper dies; its restart's spawn then fails (its start time
    cannot be read), and the new helper stays in the kernel for
    ``helper_lingers`` seconds once signalled."""
    fake.faults.extend([Fault(op="start_time"),
                        Fault(op="signal_helper", kind="delay", delay=helper_lingers)])
    fake.current.die(-9)


def test_a_failed_spawn_no_stop_waits_for_keeps_its_own_bound(fake: FakeHost) -> None:
    """With no stop asked for, a restart's spawn that fails stops its new
    helper within the spawn's own bound, not a (small) ``stop_timeout``:
    a helper that takes 1.2 s to leave the kernel is reaped, and the next
    attempt brings the tunnel up again."""
    opts = options(stop_timeout=1.0, restart=RestartPolicy(max_restarts=3, backoff_initial=0.2))

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        restart_spawn_fails(fake, helper_lingers=1.2)
        with trio.fail_after(60):
            while tunnels[0].status.restarts < 1:
                await trio.sleep(0.1)
        assert tunnels[0].state is TunnelState.UP
        sup.stop("test")

    out = run_supervisor(fake, [opts], driver)
    assert out.code == ExitCode.OK, out.tunnels[0].report
    assert_host_restored(fake)


def test_one_side_of_a_bring_up_failing_is_not_a_stop_for_the_spawn(
        fake: FakeHost, caplog: pytest.LogCaptureFixture) -> None:
    """A tunnel started alone configures its link while its helper starts;
    the routes fail while the spawn still waits (2 s), so that side
    cancels the spawn.  That is no stop: the spawn stops its helper within
    its own bound, not a (small) ``stop_timeout`` (a helper that takes
    1.2 s to leave the kernel is reaped, and the start's clean-up is
    complete).  (Taking any pending cancellation for a stop gave up on it.)"""
    opts = options(stop_timeout=1.0, tun_mode="owned")
    fake.faults.extend([Fault(op="start_time", kind="delay", delay=2.0),
                        Fault(op="add_routes"),
                        Fault(op="signal_helper", kind="delay", delay=1.2)])

    async def main() -> Tunnel:
        tunnel = Tunnel(spec("wgt0"), fake.host, opts)
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                with pytest.raises(Exception):  # noqa: B017 (the start's own error)
                    await nursery.start(tunnel.run)
        return tunnel

    with caplog.at_level(logging.INFO):
        tunnel = trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert "did not exit after SIGKILL" not in caplog.text
    assert tunnel.report is not None and tunnel.report.complete, tunnel.report
    assert_host_restored(fake)


def test_a_stop_during_a_spawns_own_cleanup_cuts_it_to_the_stop_budget(fake: FakeHost) -> None:
    """A restart's spawn fails with no stop pending, so it stops its new
    helper within its own bound (0.5 + 5 s); that helper stays in the
    kernel for 5 s.  A stop 0.1 s into that clean-up cuts it to the
    stop's budget (1 s): the stop does not wait out the spawn's bound, and
    the helper, given up on, is reaped once it dies."""
    opts = options(stop_timeout=1.0, restart=RestartPolicy(max_restarts=3, backoff_initial=0.2))

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        restart_spawn_fails(fake, helper_lingers=5.0)
        with trio.fail_after(60):
            while "signal_helper" not in fake.ops:
                await trio.sleep(0.01)
        await trio.sleep(0.1)
        sup.stop("test")

    out = run_supervisor(fake, [opts], driver)
    assert out.stop_took <= opts.stop_timeout + 2 * LAST_CHANCE, (
        f"the stop took {out.stop_took:.1f} s")


def test_a_stop_during_the_backoff_does_not_pay_a_failed_attempts_cleanup(
        fake: FakeHost) -> None:
    """A restart attempt fails after the kernel took its routes, and their
    removal (the abort) takes 3 s; a stop during the backoff that follows
    waited for nothing, so its teardown has the whole ``stop_timeout`` (5 s)
    and removes the kill switch (4 s) in full."""
    opts = options(stop_timeout=5.0, tun_mode="helper", kill_switch=True,
                   restart=RestartPolicy(max_restarts=3, backoff_initial=20.0,
                                         backoff_max=20.0))

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.faults.extend([Fault(op="add_routes", kind="applied-errno"),
                            Fault(op="delete_routes", kind="delay", delay=3.0),
                            Fault(op="delete_routes", kind="delay", delay=4.0)])
        fake.current.die(-9)
        def attempt_unwound() -> bool:
            # The kill switch's routes, the first generation's, the
            # attempt's; then the attempt's generation is unwound.
            adds = [i for i, op in enumerate(fake.ops) if op == "add_routes"]
            return len(adds) >= 3 and "delete_link" in fake.ops[adds[2]:]

        with trio.fail_after(100):
            while not attempt_unwound():
                await trio.sleep(0.1)
        await trio.sleep(1.0)  # into the next backoff
        assert tunnels[0].state is TunnelState.RESTARTING
        sup.stop("test")

    out = run_supervisor(fake, [opts], driver)
    assert out.tunnels[0].report is not None and out.tunnels[0].report.complete, (
        out.tunnels[0].report)
    assert_host_restored(fake)


def test_a_stop_after_a_rolled_back_change_does_not_pay_its_cleanup(fake: FakeHost) -> None:
    """An in-place change of the MTU fails after the kernel took it, and
    putting the old MTU back (the abort) takes 3 s; the tunnel stays up.
    A later stop waited for nothing, so its teardown has the whole
    ``stop_timeout`` (5 s) and removes the kill switch (4 s) in full."""
    opts = options(stop_timeout=5.0, kill_switch=True)
    tunnel_spec = spec("wgt0")

    async def driver(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        fake.faults.extend([Fault(op="set_mtu", kind="applied-errno"),
                            Fault(op="set_mtu", kind="delay", delay=3.0),
                            Fault(op="delete_routes", kind="delay", delay=4.0)])
        result = await sup.converge([(attrs.evolve(tunnel_spec, mtu=1300), opts)])
        assert result.failed or not result.changed, result
        assert tunnels[0].state is TunnelState.UP
        await trio.sleep(1.0)
        sup.stop("test")

    tunnel = Tunnel(tunnel_spec, fake.host, opts)

    async def main() -> None:
        sup = Supervisor([tunnel], fake.host, handle_signals=False)
        with trio.fail_after(HANG_LIMIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.run)
                await sup.ready.wait()
                await driver(sup, [tunnel])

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert tunnel.report is not None and tunnel.report.complete, tunnel.report
    assert_host_restored(fake)


def test_a_reload_that_only_reorders_tunnels_rewrites_their_dns_in_the_new_order(
        fake: FakeHost, tmp_path: Path) -> None:
    """Two tunnels share resolv.conf in configuration order; a reload that
    names them the other way round changes no tunnel, yet the file follows
    the new order (the merge follows the last reload)."""
    resolv = tmp_path / "resolv.conf"
    resolv.write_bytes(b"nameserver 192.0.2.1\n")
    fake.host = attrs.evolve(fake.host, dns_backend=lambda kind: FileBackend(str(resolv)))
    opts = options(dns_backend="file")
    specs = {name: attrs.evolve(spec(name), dns_servers=(ipaddress.ip_address(server),))
             for name, server in (("wgt0", "10.9.0.53"), ("wgt1", "10.9.1.53"))}

    def merged(*names: str) -> bytes:
        return render_claims([ResolvClaim(n, specs[n].dns_servers, ()) for n in names])

    async def reorder(sup: Supervisor, tunnels: list[Tunnel]) -> None:
        assert resolv.read_bytes() == merged("wgt0", "wgt1")
        result = await sup.converge([(specs["wgt1"], opts), (specs["wgt0"], opts)])
        assert set(result.unchanged) == {"wgt0", "wgt1"}, result
        assert resolv.read_bytes() == merged("wgt1", "wgt0")
        sup.stop("test")

    async def main() -> None:
        sup = Supervisor([Tunnel(specs[n], fake.host, opts) for n in ("wgt0", "wgt1")],
                         fake.host, handle_signals=False)
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sup.run)
                await sup.ready.wait()
                await reorder(sup, [])

    trio.run(main)
    assert resolv.read_bytes() == b"nameserver 192.0.2.1\n"
