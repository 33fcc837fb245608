"""Lifecycle race suite: Hypothesis draws schedules of operations against a
:class:`~tunsup.engine.supervisor.Supervisor` over :mod:`tunsup.testing.fakehost`'s fake host,
and every schedule runs as one ``trio.run`` under
``MockClock(autojump_threshold=0)`` (virtual time: backoffs and timeouts
cost nothing, and trio's Hypothesis plugin makes scheduling replayable).

A schedule is a list of steps, each started as its own task at a drawn
virtual time, so steps overlap each other and the engine's own work:
stop, SIGTERM / SIGINT / SIGHUP (through the supervisor's signal path),
``add`` / ``remove`` requests, a second ``run()``, a helper crash or wedge,
the next helper crashing or starting slowly, a fault on the Nth call of a
host operation.  A final stop ends every schedule.

Invariants:

- after ``run()`` returns, the fake host equals its initial state;
- every helper ever started has been reaped;
- a stop completes within its bound (virtual time), whatever is in flight;
  and no schedule runs forever;
- tunnel states only move along :data:`tunsup.engine.tunnel.TRANSITIONS`, and
  every tunnel ends stopped or failed;
- a second ``run()`` raises, before and after the first one returns; so do
  an ``add`` after ``run()`` returned and a ``run()`` after ``stop()``;
- status agrees with the model: a helper's death is noticed at once (the
  tunnel leaves *up*), nothing is left in ``slots()`` and the phase is
  "stopped" at the end, the exit code matches the tunnels' outcomes.

Profiles: "ci" (the default: derandomized, 1,000 schedules) and "thorough"
(``TUNSUP_RACE_PROFILE=thorough``: 5,000 random schedules).  A failing
example is printed as its schedule, one step per line.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from tunsup import ExitCode
from tunsup.config.spec import TunnelSpec
from tunsup.engine.effects import Effect, EffectContext
from tunsup.engine.restart import RestartPolicy
from tunsup.engine.supervisor import AlreadyRunning, NoSuchTunnel, StartFailed, Stopping, Supervisor
from tunsup.engine.tunnel import TRANSITIONS, Tunnel, TunnelOptions, TunnelState
from tunsup.engine.undo import EffectStack
from tunsup.testing.fakehost import Behaviour, FakeHost, Fault, spec, uapi_dir

settings.register_profile(
    "ci", derandomize=True, max_examples=1000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("TUNSUP_RACE_PROFILE", "ci")

NAMES = ("wgt0", "wgt1", "wgt2")
STOP_TIMEOUT = 10.0
STOP_GRACE = 2.0
#: Teardown is bounded by stop_timeout in general.  What a stop may take
#: when no undo step times out: a wedged helper's
#: SIGTERM grace, then SIGKILL.  Nothing in these schedules makes an undo
#: step slow (faults only hit operations made while applying), so this is
#: the bound checked.
STOP_BOUND = STOP_GRACE + 1e-6
#: No schedule may run longer than this (virtual seconds): a hang is a bug.
HANG_LIMIT = 10_000.0

#: Host operations made only while applying (never by an undo), so that a
#: fault there must be survived with the host restored.
APPLY_OPS = ("add_address", "add_routes", "set_mtu", "start_helper", "create_tun")


@attrs.frozen
class Step:
    at: float
    action: str
    arg: Any = None

    def __str__(self) -> str:
        arg = "" if self.arg is None else f" {self.arg}"
        return f"t={self.at:7.3f}  {self.action}{arg}"


def show(steps: list[Step], initial: list[tuple[str, str]], stop_at: float) -> str:
    lines = [f"initial tunnels: {initial or 'none'}", *map(str, sorted(steps, key=lambda s: s.at)),
             f"t={stop_at:7.3f}  final stop"]
    return "\n".join(lines)


times = st.floats(0, 12, allow_nan=False).map(lambda t: round(t, 3))
names = st.sampled_from(NAMES)
steps = st.one_of(
    st.builds(Step, times, st.just("stop")),
    st.builds(Step, times, st.just("signal"), st.sampled_from(["SIGTERM", "SIGINT", "SIGHUP"])),
    st.builds(Step, times, st.just("add"), st.tuples(names, st.sampled_from(["owned", "helper"]))),
    st.builds(Step, times, st.just("remove"), names),
    st.builds(Step, times, st.just("crash"), names),
    st.builds(Step, times, st.just("wedge"), names),
    st.builds(Step, times, st.just("next-helper"), st.sampled_from(["crash", "slow", "mute"])),
    st.builds(Step, times, st.just("fault"),
              st.tuples(st.sampled_from(APPLY_OPS), st.integers(1, 4),
                        st.sampled_from(["errno", "hang", "delay"]))),
    st.builds(Step, times, st.just("second-run")),
)


def options(mode: str) -> TunnelOptions:
    return TunnelOptions(
        helper=("fake-wg",), tun_header="none", tun_mode=mode,  # type: ignore[arg-type]
        stop_grace=STOP_GRACE, start_timeout=5.0, stop_timeout=STOP_TIMEOUT,
        probe_interval=3.0, probe_timeout=1.0,
        restart=RestartPolicy(max_restarts=2, window=30.0, backoff_initial=8.0,
                              backoff_max=16.0, reset_after=10.0))


class UndoOrder:
    """Observes one effect stack: every undo must be of the most recently
    applied record still in place (exact reverse order, none skipped)."""

    def __init__(self, name: str, out: list[str]) -> None:
        self.name = name
        self.live: list[Effect] = []
        self.out = out

    async def intent(self, effect: Effect) -> None:
        pass

    async def applied(self, intent: Effect, record: Effect) -> None:
        self.live.append(record)

    async def undone(self, record: Effect) -> None:
        if not self.live or self.live[-1] is not record:
            top = self.live[-1].describe() if self.live else "nothing"
            self.out.append(f"{self.name}: undid {record.describe()} while {top} was still "
                            "in place")
        self.live = [r for r in self.live if r is not record]


class Recorder:
    """Every state change of every tunnel, checked against TRANSITIONS, and
    the order of every undo (see :class:`UndoOrder`)."""

    def __init__(self) -> None:
        self.moves: list[tuple[str, TunnelState, TunnelState]] = []
        self.illegal: list[str] = []
        self.misordered: list[str] = []

    def tunnel(self, spec_: TunnelSpec, opts: TunnelOptions, fake: FakeHost) -> Tunnel:
        recorder = self

        class Recorded(Tunnel):
            def _set_state(self, new: TunnelState) -> None:
                old = self.state
                if new not in TRANSITIONS[old]:
                    recorder.illegal.append(f"{self.name}: {old.value} -> {new.value}")
                recorder.moves.append((self.name, old, new))
                super()._set_state(new)

            def _new_generation(self, ctx: EffectContext) -> EffectStack:
                gen = EffectStack(ctx, log=self.log,
                                  observer=UndoOrder(f"{self.name} generation",
                                                     recorder.misordered))
                ctx.generations[self.name] = gen
                return gen

        return Recorded(spec_, fake.host, opts,
                        observer=UndoOrder(spec_.name, recorder.misordered))


def run_schedule(initial: list[tuple[str, str]], schedule: list[Step], stop_at: float, *,
                 in_hypothesis: bool = True) -> None:
    with uapi_dir() as path:
        fake = FakeHost(path)
        before = fake.net.state()
        rec = Recorder()
        specs = {name: spec(name) for name in NAMES}
        failures: list[str] = []
        stops: list[float] = []
        result: dict[str, Any] = {}

        async def reload() -> None:
            await sup.converge([(specs[n], options(m)) for n, m in initial])

        sup = Supervisor(
            [rec.tunnel(specs[n], options(m), fake) for n, m in initial], fake.host,
            handle_signals=False, reload=reload,
            make_tunnel=lambda s, o: rec.tunnel(s, o, fake))
        send, receive = trio.open_memory_channel[int](math.inf)

        def stopping() -> None:
            if not stops:
                stops.append(trio.current_time())

        def helper_of(name: str) -> Any:
            return next((h for h in reversed(fake.started)
                         if h.ifname == name and not h.exited.is_set()), None)

        async def act(step: Step) -> None:
            await trio.sleep(step.at)
            if "ended" in result:
                return
            if step.action == "stop":
                stopping()
                sup.stop("schedule")
            elif step.action == "signal":
                if step.arg != "SIGHUP":
                    stopping()
                send.send_nowait(int(signal.Signals[step.arg]))
            elif step.action == "add":
                name, mode = step.arg
                with contextlib.suppress(Stopping, StartFailed, AlreadyRunning):
                    await sup.add(specs[name], options(mode))
            elif step.action == "remove":
                with contextlib.suppress(Stopping, NoSuchTunnel):
                    await sup.remove(step.arg)
            elif step.action == "crash":
                await crash(step.arg)
            elif step.action == "wedge":
                helper = helper_of(step.arg)
                if helper is not None:
                    helper.wedge()
            elif step.action == "next-helper":
                fake.plan.append({"crash": Behaviour.CRASH, "slow": Behaviour.SLOW,
                                  "mute": Behaviour.MUTE}[step.arg])
            elif step.action == "fault":
                op, nth, kind = step.arg
                fake.faults.append(Fault(op=op, nth=nth, kind=kind, delay=3.0))
            elif step.action == "second-run":
                try:
                    await sup.run()
                except RuntimeError:
                    pass
                else:
                    failures.append(f"{step}: a second run() did not raise")

        async def crash(name: str) -> None:
            helper = helper_of(name)
            if helper is None:
                return
            slot = next((s for s in sup.slots() if s.tunnel.name == name), None)
            tunnel = slot.tunnel if slot is not None else None
            was_up = tunnel is not None and tunnel.state in (TunnelState.UP,
                                                             TunnelState.DEGRADED)
            moves = len(rec.moves)
            helper.die(-int(signal.SIGKILL))
            if not was_up or tunnel is None:
                return
            await trio.sleep(0.01)
            if not any(n == name for n, _, _ in rec.moves[moves:]):
                failures.append(f"t={trio.current_time():.3f}: helper of {name} died but the "
                                f"tunnel is still {tunnel.state.value}")

        async def main() -> None:
            with trio.fail_after(HANG_LIMIT):
                async with trio.open_nursery() as nursery:

                    async def runner() -> None:
                        result["code"] = await sup.run()
                        result["ended"] = trio.current_time()
                        nursery.cancel_scope.cancel()

                    nursery.start_soon(runner)
                    nursery.start_soon(sup._watch_signals, receive)
                    for step in schedule:
                        nursery.start_soon(act, step)
                    await trio.sleep(stop_at)
                    stopping()
                    sup.stop("end of schedule")
                    await trio.sleep_forever()
            try:
                await sup.run()
            except RuntimeError:
                pass
            else:
                failures.append("a run() after the first returned did not raise")
            try:
                await sup.add(specs["wgt0"], options("owned"))
            except Stopping:
                pass
            else:
                failures.append("an add() after run() returned did not raise")
            early = Supervisor([], fake.host, handle_signals=False)
            early.stop("before run")
            try:
                await early.run()
            except RuntimeError:
                pass
            else:
                failures.append("run() after stop() did not raise")

        try:
            trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        except trio.TooSlowError:
            pytest.fail(f"the schedule hung: still running after {HANG_LIMIT} virtual s")

        if in_hypothesis:
            note(f"transitions: {[(n, a.value, b.value) for n, a, b in rec.moves]}")
        assert not failures, failures
        assert not rec.illegal, f"illegal transitions: {rec.illegal}"
        assert not rec.misordered, f"undo out of order: {rec.misordered}"
        # The host is back to its start; every helper was reaped.
        assert fake.net.state() == before
        assert fake.tun_fds == set(), "a TUN fd was left open"
        assert fake.alive == set(), "a helper was left running"
        assert all(h.exited.is_set() for h in fake.started), "a helper was not reaped"
        # Stop bound (from the first stop request; the engine may have
        # ended earlier on its own).
        ended = result["ended"]
        if stops and stops[0] <= ended:
            assert ended - stops[0] <= STOP_BOUND, f"stop took {ended - stops[0]:.3f} s"
        # Status agrees with the model.
        assert sup.slots() == []
        assert sup.phase == "stopped"
        for tunnel in sup.history:
            assert tunnel.state in (TunnelState.STOPPED, TunnelState.FAILED), tunnel.state
            assert tunnel.helper_pid is None
            assert tunnel.report is not None and tunnel.report.complete, tunnel.report
            assert tunnel.status.state == tunnel.state.value
            assert (tunnel.state is TunnelState.FAILED) == (tunnel.failure is not None)
        code = result["code"]
        assert code in (ExitCode.OK, ExitCode.FAILURE)
        if any(t.failure is not None and t.was_up for t in sup.history):
            assert code == ExitCode.FAILURE


initials = st.lists(st.tuples(names, st.sampled_from(["owned", "helper"])), max_size=2,
                    unique_by=lambda t: t[0])


@settings(settings.get_profile(PROFILE))
@given(st.data())
def test_every_schedule_keeps_the_invariants(data: st.DataObject) -> None:
    initial = data.draw(initials, label="initial tunnels")
    schedule = data.draw(st.lists(steps, max_size=8), label="schedule")
    stop_at = data.draw(times.map(lambda t: t + 5.0), label="final stop at")
    note("schedule:\n" + show(schedule, initial, stop_at))
    run_schedule(initial, schedule, stop_at)


def test_a_sighup_while_run_ends_is_ignored() -> None:
    """Found by this suite: with no tunnel, run() ends at once; a SIGHUP
    meanwhile reached a closing root nursery and raised out of the signal
    watcher.  Whether the SIGHUP lands in that window depends on trio's
    (randomized) scheduling order: try several times."""
    for _ in range(30):
        run_schedule([], [Step(0.0, "signal", "SIGHUP")], 5.0, in_hypothesis=False)


def test_a_stop_during_a_backoff_is_immediate() -> None:
    """The crash leaves the tunnel in a 4-8 s backoff; the stop 1 s later
    must not wait it out."""
    run_schedule([("wgt0", "owned")], [Step(1.0, "crash", "wgt0")], 2.0,
                 in_hypothesis=False)
