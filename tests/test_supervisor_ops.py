"""The supervisor's dynamic tunnel set (add, remove, converge, stop wins),
with fake tunnels whose starts park on events: no host, no clock."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from tunsup import ExitCode
from tunsup._errors import ConfigError, HelperExited
from tunsup.config.keys import Key
from tunsup.config.spec import PeerSpec, TunnelSpec
from tunsup.engine.reload import NeedsRebuild
from tunsup.engine.supervisor import (
    Change,
    NoSuchTunnel,
    StartFailed,
    Stopping,
    Supervisor,
    same_plan,
)
from tunsup.engine.tunnel import TunnelOptions, TunnelState
from tunsup.engine.undo import TeardownReport
from tunsup.host import Host


class _Net:
    async def close(self) -> None:
        pass


def _host() -> Host:
    async def unused(*args: object, **kwargs: object) -> None:
        raise AssertionError("no host change expected")

    return Host(net=_Net(), start_helper=unused, run_hook=unused,  # type: ignore[arg-type]
                dns_backend=lambda kind: None)


def spec(name: str, allowed: str | None = None, line: int = 5) -> TunnelSpec:
    """A tunnel of its own: by default its AllowedIPs overlap no other's
    (overlaps are refused: see test_concurrent_full_tunnels_one_is_refused)."""
    import ipaddress

    allowed = allowed or f"10.{ord(name[0])}.{len(name)}.0/24"
    peer = PeerSpec(public_key=Key(b"\x01" * 32),
                    allowed_ips=(ipaddress.ip_network(allowed),), line=line)
    return TunnelSpec(name=name, source=f"/etc/wg/{name}.conf", peers=(peer,))


class FakeTunnel:
    """Quacks like :class:`tunsup.engine.tunnel.Tunnel`.  Its start waits for
    ``gate`` (if any), then fails with ``fail`` (if any); it supervises
    until cancelled or ``crash`` is set; its teardown records itself."""

    def __init__(self, spec: TunnelSpec, options: TunnelOptions, journal: list[str]) -> None:
        self.spec = spec
        self.options = options
        self.name = spec.name
        self.log = logging.getLogger(f"tunsup.{spec.name}")
        self.state = TunnelState.NEW
        self.report: TeardownReport | None = None
        self.failure: BaseException | None = None
        self.timings: dict[str, float] = {}
        self.helper_pid: int | None = None
        self.gate: trio.Event | None = None
        self.fail: Exception | None = None
        self.crash = trio.Event()
        self.incomplete = False
        self.starting = trio.Event()
        self.stopping = trio.Event()
        #: When set, the teardown waits for it (shielded, as a real one runs).
        self.teardown_gate: trio.Event | None = None
        self.journal = journal
        self.stops_asked = 0

    @property
    def was_up(self) -> bool:
        return "up" in self.timings

    async def reconfigure(self, spec: TunnelSpec, options: TunnelOptions) -> str:
        """A fake tunnel changes nothing in place: every change rebuilds it."""
        raise NeedsRebuild("fake tunnels rebuild")

    def held_routes(self) -> list[Any]:
        return []

    def stop_asked(self) -> None:
        """The supervisor is cancelling it (a stop, a ``down``)."""
        self.stops_asked += 1

    def held_policy(self) -> None:
        return None

    async def run(self, *, task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        self.state = TunnelState.STARTING
        self.starting.set()
        self.journal.append(f"start {self.name}")
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.fail is not None:
                raise self.fail
            self.state = TunnelState.UP
            self.timings["up"] = 0.0
            task_status.started(self)
            await self.crash.wait()
            raise HelperExited(f"{self.name}: helper died")
        finally:
            self.state = TunnelState.STOPPING
            self.stopping.set()
            with trio.CancelScope(shield=True):
                await trio.sleep(0)
                if self.teardown_gate is not None:
                    await self.teardown_gate.wait()
            failures = ("undo something: failed",) if self.incomplete else ()
            self.report = TeardownReport(("everything",), failures)
            self.state = TunnelState.STOPPED
            self.journal.append(f"down {self.name}")


@attrs.define
class World:
    journal: list[str] = attrs.field(factory=list)
    made: dict[str, list[FakeTunnel]] = attrs.field(factory=dict)
    #: Applied to the next tunnel made of that name.
    setups: dict[str, Callable[[FakeTunnel], None]] = attrs.field(factory=dict)

    def make(self, spec: TunnelSpec, options: TunnelOptions) -> Any:
        tunnel = FakeTunnel(spec, options, self.journal)
        setup = self.setups.pop(spec.name, None)
        if setup is not None:
            setup(tunnel)
        self.made.setdefault(spec.name, []).append(tunnel)
        return tunnel

    def supervisor(self, *names: str, persistent: bool = True,
                   max_parallel: int = 16) -> Supervisor:
        tunnels = [self.make(spec(n), TunnelOptions()) for n in names]
        return Supervisor(tunnels, _host(), handle_signals=False, persistent=persistent,
                          make_tunnel=self.make, max_parallel=max_parallel)


def run_with(sup: Supervisor, body: Callable[[], Awaitable[None]]) -> ExitCode:
    """Run ``sup`` and, once it is ready, ``body``; stop it afterwards."""
    code: list[ExitCode] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def supervise() -> None:
                code.append(await sup.run())

            nursery.start_soon(supervise)
            await sup.ready.wait()
            await body()
            sup.stop("test over")

    trio.run(main)
    return code[0]


def test_add_and_remove_leave_the_others_alone() -> None:
    world = World()
    sup = world.supervisor("a")

    async def body() -> None:
        tunnel, started = await sup.add(spec("b"), TunnelOptions())
        assert started and tunnel.state is TunnelState.UP
        assert [s.tunnel.name for s in sup.slots()] == ["a", "b"]
        assert all(s.up_since is not None for s in sup.slots())
        removed = await sup.remove("b")
        assert removed.report is not None and removed.report.complete
        assert [s.tunnel.name for s in sup.slots()] == ["a"]
        with pytest.raises(NoSuchTunnel):
            await sup.remove("b")

    assert run_with(sup, body) == ExitCode.OK
    assert world.journal == ["start a", "start b", "down b", "down a"]


def test_add_is_idempotent_for_the_same_configuration_only() -> None:
    """The same configuration: nothing happens.  Another one changes the
    running tunnel (issue 14; these fake tunnels can only be rebuilt)."""
    world = World()
    sup = world.supervisor("a")

    async def body() -> None:
        first = sup.slots()[0].tunnel
        # Same configuration, different line numbers: the same tunnel.
        tunnel, started = await sup.add(spec("a", line=99), TunnelOptions())
        assert tunnel is first and not started
        tunnel, started = await sup.add(spec("a", allowed="10.9.0.0/24"), TunnelOptions())
        assert started == Change(rebuilt="fake tunnels rebuild") and tunnel is not first
        tunnel, started = await sup.add(spec("a", allowed="10.9.0.0/24"), TunnelOptions())
        assert started is False

    assert run_with(sup, body) == ExitCode.OK
    assert world.journal == ["start a", "down a", "start a", "down a"]


def test_a_failed_add_is_reported_and_the_service_goes_on() -> None:
    world = World()
    world.setups["b"] = lambda t: setattr(t, "fail", HelperExited("b: no good"))
    sup = world.supervisor("a")

    async def body() -> None:
        with pytest.raises(StartFailed, match="no good") as info:
            await sup.add(spec("b"), TunnelOptions())
        assert info.value.tunnel.report is not None  # its undo ran
        assert [s.tunnel.name for s in sup.slots()] == ["a"]
        _, started = await sup.add(spec("c"), TunnelOptions())
        assert started

    assert run_with(sup, body) == ExitCode.OK  # a failed `up` does not make the exit 1


def test_incomplete_teardown_of_a_removed_tunnel_makes_the_exit_code_3() -> None:
    world = World()
    world.setups["b"] = lambda t: setattr(t, "incomplete", True)
    sup = world.supervisor("a")

    async def body() -> None:
        await sup.add(spec("b"), TunnelOptions())
        removed = await sup.remove("b")
        assert removed.report is not None and not removed.report.complete

    assert run_with(sup, body) == ExitCode.TEARDOWN_INCOMPLETE


def test_stop_cancels_an_add_in_flight_then_waits() -> None:
    world = World()
    gate = trio.Event()  # never set: the start parks
    world.setups["b"] = lambda t: setattr(t, "gate", gate)
    sup = world.supervisor("a")
    outcome: list[BaseException] = []

    async def body() -> None:
        async def add() -> None:
            try:
                await sup.add(spec("b"), TunnelOptions())
            except Stopping as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(add)
            await _wait_made(world, "b")
            sup.stop("test")

    assert run_with(sup, body) == ExitCode.OK
    assert len(outcome) == 1 and "stopping" in str(outcome[0])
    assert "down b" in world.journal and "down a" in world.journal
    with pytest.raises(Stopping):
        trio.run(sup.add, spec("c"), TunnelOptions())


async def _wait_made(world: World, name: str) -> None:
    while not world.made.get(name):
        await trio.testing.wait_all_tasks_blocked()
    await world.made[name][0].starting.wait()


def test_requests_for_one_tunnel_are_serialized() -> None:
    """A remove issued while the same tunnel is starting waits for the start
    to finish, then tears it down; it never cancels the start half-way."""
    world = World()
    gate = trio.Event()
    world.setups["b"] = lambda t: setattr(t, "gate", gate)
    sup = world.supervisor("a")
    order: list[str] = []

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            async def add() -> None:
                await sup.add(spec("b"), TunnelOptions())
                order.append("added")

            async def remove() -> None:
                await sup.remove("b")
                order.append("removed")

            nursery.start_soon(add)
            await _wait_made(world, "b")
            nursery.start_soon(remove)
            await trio.testing.wait_all_tasks_blocked()
            assert order == []  # the remove waits for the start
            gate.set()

    assert run_with(sup, body) == ExitCode.OK
    assert order == ["added", "removed"]
    assert world.journal == ["start a", "start b", "down b", "down a"]


def test_remove_racing_stop_both_complete() -> None:
    """A stop arriving while a remove waits for the tunnel's teardown: the
    stop cancels the rest and waits; the remove still gets its report."""
    world = World()
    sup = world.supervisor("a", "b")
    gate = trio.Event()
    results: list[Any] = []

    async def body() -> None:
        world.made["b"][0].teardown_gate = gate
        async with trio.open_nursery() as nursery:
            async def remove() -> None:
                results.append(await sup.remove("b"))

            nursery.start_soon(remove)
            await world.made["b"][0].stopping.wait()
            sup.stop("racing")
            await world.made["a"][0].stopping.wait()
            assert results == []  # b's teardown is still going
            gate.set()

    assert run_with(sup, body) == ExitCode.OK
    assert len(results) == 1 and results[0].report.complete
    assert sorted(world.journal) == ["down a", "down b", "start a", "start b"]


def test_remove_after_a_stop_took_the_tunnel_down_says_stopping() -> None:
    world = World()
    sup = world.supervisor("a")
    errors: list[BaseException] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def supervise() -> None:
                await sup.run()

            nursery.start_soon(supervise)
            await sup.ready.wait()
            sup.stop("test")
            await world.made["a"][0].stopping.wait()
            await trio.testing.wait_all_tasks_blocked()
            try:
                await sup.remove("a")
            except Stopping as exc:
                errors.append(exc)

    trio.run(main)
    assert len(errors) == 1 and "already down" in str(errors[0])


def test_converge_starts_stops_restarts_and_leaves_the_rest() -> None:
    world = World()
    sup = world.supervisor("a", "b", "c")

    async def body() -> None:
        await sup.add(spec("e"), TunnelOptions())  # from `up`: not the config's
        before = {s.tunnel.name: s.tunnel for s in sup.slots()}
        result = await sup.converge([
            (spec("b", line=42), TunnelOptions()),  # unchanged (only a line moved)
            (spec("c"), TunnelOptions(stop_grace=5.0)),  # changed
            (spec("d"), TunnelOptions()),  # new
        ])
        assert result.started == ("d",)
        assert result.stopped == ("a",)
        assert result.restarted == ("c",)
        assert result.unchanged == ("b",)
        assert result.failed == ()
        after = {s.tunnel.name: s.tunnel for s in sup.slots()}
        assert sorted(after) == ["b", "c", "d", "e"]
        assert after["b"] is before["b"] and after["e"] is before["e"]
        assert after["c"] is not before["c"]
        assert after["c"].options.stop_grace == 5.0

    assert run_with(sup, body) == ExitCode.OK
    assert world.journal.index("down a") < world.journal.index("start d")
    assert world.journal.count("start c") == 2


def test_converge_reports_a_tunnel_that_fails_and_goes_on() -> None:
    world = World()
    sup = world.supervisor("a")
    world.setups["x"] = lambda t: setattr(t, "fail", HelperExited("x: broken"))

    async def body() -> None:
        result = await sup.converge([(spec("a"), TunnelOptions()), (spec("x"), TunnelOptions()),
                                     (spec("y"), TunnelOptions())])
        assert result.failed == (("x", "x: broken"),)
        assert result.started == ("y",)

    assert run_with(sup, body) == ExitCode.OK


def test_a_tunnel_failing_while_up_ends_alone_then_run_exits_1_with_none_left() -> None:
    """A tunnel that fails once up (its restarts exhausted) is torn down on
    its own; the others keep running; with none left, run exits 1."""
    world = World()
    sup = world.supervisor("a", "b")

    async def body() -> None:
        await sup.ready.wait()
        world.made["b"][0].crash.set()
        await trio.testing.wait_all_tasks_blocked()
        assert [s.tunnel.name for s in sup.slots()] == ["a"]
        # The initial tunnels start concurrently, in either order.
        assert sorted(world.journal[:2]) == ["start a", "start b"]
        assert world.journal[2:] == ["down b"]
        world.made["a"][0].crash.set()

    code = trio.run(_run_until_done, sup, body)
    assert code == ExitCode.FAILURE
    assert world.journal[2:] == ["down b", "down a"]


async def _run_until_done(sup: Supervisor, body: Callable[[], Awaitable[None]]) -> ExitCode:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(body)
        code = await sup.run()
        nursery.cancel_scope.cancel()
    return code


def test_a_persistent_supervisor_keeps_running_without_tunnels() -> None:
    world = World()
    sup = world.supervisor("a")

    async def body() -> None:
        await sup.remove("a")
        await trio.testing.wait_all_tasks_blocked()
        assert sup.phase == "running" and sup.slots() == []
        _, started = await sup.add(spec("a"), TunnelOptions())
        assert started

    assert run_with(sup, body) == ExitCode.OK


def test_a_non_persistent_supervisor_ends_with_its_last_tunnel() -> None:
    world = World()
    sup = world.supervisor("a", persistent=False)

    async def body() -> None:
        await sup.ready.wait()
        await sup.remove("a")

    assert trio.run(_run_until_done, sup, body) == ExitCode.OK


def test_same_plan_ignores_line_numbers_only() -> None:
    world = World()
    tunnel: Any = world.make(spec("a"), TunnelOptions())
    assert same_plan(tunnel, spec("a", line=7), TunnelOptions())
    assert not same_plan(tunnel, spec("a", allowed="10.1.0.0/24"), TunnelOptions())
    assert not same_plan(tunnel, spec("a"), TunnelOptions(dns_backend="none"))


def test_stop_cancels_a_reload_in_flight() -> None:
    world = World()
    gate = trio.Event()  # never set: the new tunnel's start parks
    world.setups["new"] = lambda t: setattr(t, "gate", gate)
    sup = world.supervisor("a", "old")
    outcome: list[BaseException] = []

    async def body() -> None:
        async def reload() -> None:
            try:
                await sup.converge([(spec("a"), TunnelOptions()), (spec("new"), TunnelOptions())])
            except Stopping as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reload)
            await _wait_made(world, "new")  # "old" is down, "new" is starting
            assert "down old" in world.journal
            sup.stop("test")

    assert run_with(sup, body) == ExitCode.OK
    assert len(outcome) == 1
    assert sorted(world.journal) == ["down a", "down new", "down old", "start a", "start new",
                                     "start old"]


# Issue 10 item 15: names in the configuration are claimed from load time.


def _gated(world: World, name: str) -> trio.Event:
    gate = trio.Event()
    world.setups[name] = lambda t: setattr(t, "gate", gate)
    return gate


def test_up_of_a_configured_tunnel_not_started_yet_waits_for_it() -> None:
    """``a`` is starting, configured ``b`` has not started (one start at a
    time, so it waits for ``a``'s): an ``up`` of
    ``b`` waits for the configured start instead of starting its own (which
    made the configured start fail and the whole service exit 1); one with
    another configuration is then refused; a ``down`` of ``b`` waits too."""
    world = World()
    gate = _gated(world, "a")
    sup = world.supervisor("a", "b", max_parallel=1)
    results: dict[str, Any] = {}

    async def body() -> None:
        await world.made["a"][0].starting.wait()

        async def up_same() -> None:
            results["same"] = await sup.add(spec("b"), TunnelOptions())

        async def up_other() -> None:
            results["other"] = await sup.add(spec("b", allowed="10.9.0.0/24"),
                                             TunnelOptions())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(up_same)
            nursery.start_soon(up_other)
            await trio.testing.wait_all_tasks_blocked()
            assert world.journal == ["start a"]  # no b of their own
            assert results == {}
            gate.set()
        # Both waited for the configured start; then each found a running
        # ``b`` (in either order): the other configuration changed it.
        assert results["same"][0] in world.made["b"]
        assert results["other"][1] == Change(rebuilt="fake tunnels rebuild")
        assert len(world.made["b"]) in (2, 3)
        assert [(s.tunnel.name, s.origin) for s in sup.slots()] == [("a", "config"),
                                                                    ("b", "config")]
        sup.stop("test over")

    assert trio.run(_run_until_done, sup, body) == ExitCode.OK
    assert world.journal[:4] == ["start a", "start b", "down b", "start b"]
    assert sorted(world.journal[-2:]) == ["down a", "down b"]


def test_down_of_a_configured_tunnel_not_started_yet_waits_then_takes_it_down() -> None:
    world = World()
    gate = _gated(world, "a")
    sup = world.supervisor("a", "b", max_parallel=1)
    removed: list[Any] = []

    async def body() -> None:
        await world.made["a"][0].starting.wait()
        async with trio.open_nursery() as nursery:
            async def down() -> None:
                removed.append(await sup.remove("b"))

            nursery.start_soon(down)
            await trio.testing.wait_all_tasks_blocked()
            assert removed == []
            gate.set()
        assert removed == [world.made["b"][0]]
        assert [s.tunnel.name for s in sup.slots()] == ["a"]
        sup.stop("test over")

    assert trio.run(_run_until_done, sup, body) == ExitCode.OK
    assert world.journal == ["start a", "start b", "down b", "down a"]


def test_up_racing_a_reload_that_adds_the_same_name_waits_for_the_reload() -> None:
    """A reload adds ``x`` (parked) then ``c``; an ``up`` of ``c`` with
    another configuration meanwhile must not start its own ``c`` (the
    reload would then restart it under the client): it waits for the
    reload, then changes the reload's ``c``."""
    world = World()
    gate = _gated(world, "x")
    sup = world.supervisor("a", max_parallel=1)  # c starts once x has
    outcome: dict[str, Any] = {}

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            async def reload() -> None:
                outcome["reload"] = (await sup.converge([(spec("a"), TunnelOptions()),
                                                   (spec("x"), TunnelOptions()),
                                                   (spec("c"), TunnelOptions())]))

            async def up() -> None:
                outcome["up"] = await sup.add(spec("c", allowed="10.7.0.0/24"),
                                              TunnelOptions())

            nursery.start_soon(reload)
            await _wait_made(world, "x")
            nursery.start_soon(up)
            await trio.testing.wait_all_tasks_blocked()
            assert "c" not in world.made
            gate.set()
        assert outcome["reload"].started == ("x", "c")
        assert outcome["up"][1] == Change(rebuilt="fake tunnels rebuild")
        # Made by the reload first, then by the change after it.
        assert len(world.made["c"]) == 2

    assert run_with(sup, body) == ExitCode.OK


def test_concurrent_full_tunnels_one_is_refused_before_it_starts() -> None:
    """Issue 13 item 3: two full tunnels (a default route under Table =
    auto) added at once: the conflict check and the slot taking its place
    are one step, so exactly one starts (and picks the policy table); the
    other is refused with both lines and never runs."""
    world = World()
    sup = world.supervisor("a")
    results: dict[str, object] = {}

    async def body() -> None:
        async def add(name: str) -> None:
            try:
                results[name] = await sup.add(spec(name, allowed="0.0.0.0/0"), TunnelOptions())
            except Exception as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(add, "full1")
            nursery.start_soon(add, "full2")

    assert run_with(sup, body) == ExitCode.OK
    refused = [r for r in results.values() if isinstance(r, ConfigError)]
    assert len(refused) == 1, results
    (started,) = [n for n in ("full1", "full2") if f"start {n}" in world.journal]
    assert "is a full tunnel" in str(refused[0])
    assert f"/etc/wg/{started}.conf:5" in str(refused[0])
