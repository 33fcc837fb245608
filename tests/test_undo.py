"""The undo stack: exact reverse order, failures isolated, aborts, deadlines.

Effects here are tiny in-memory ones that change a shared "host" list; the
stack under test is the real one.  Runs under trio's MockClock, so
timeouts cost no wall time.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tunsup._errors import HostError
from tunsup.engine.effects import Effect, EffectContext
from tunsup.engine.undo import EffectStack, TeardownReport

log = logging.getLogger("test.undo")


@attrs.define
class World:
    objects: list[str] = attrs.field(factory=list)
    events: list[str] = attrs.field(factory=list)


@attrs.frozen
class Thing(Effect):
    world: World = attrs.field(eq=False)
    name: str
    fail_apply: bool = False
    fail_undo: bool = False
    hang_undo: bool = False
    apply_delay: float = 0.0

    def describe(self) -> str:
        return f"thing {self.name}"

    async def apply(self, ctx: EffectContext) -> Effect:
        self.world.events.append(f"apply {self.name}")
        self.world.objects.append(self.name)  # the change happens first ...
        if self.apply_delay:
            await trio.sleep(self.apply_delay)
        if self.fail_apply:  # ... then the failure: abort must clean up
            raise HostError(f"{self.name} failed")
        return self

    async def undo(self, ctx: EffectContext) -> None:
        self.world.events.append(f"undo {self.name}")
        if self.hang_undo:
            await trio.sleep_forever()
        if self.fail_undo:
            raise HostError(f"cannot undo {self.name}")
        if self.name in self.world.objects:
            self.world.objects.remove(self.name)

    def undo_timeout(self, ctx: EffectContext) -> float:
        return 5.0


def run(fn: Any) -> Any:
    async def bounded() -> Any:
        # A virtual deadline, so that a lost timeout fails instead of
        # hanging in real time (the MockClock jumps only to deadlines).
        with trio.fail_after(10_000):
            return await fn()

    return trio.run(bounded, clock=trio.testing.MockClock(autojump_threshold=0))


def ctx_for(nursery: trio.Nursery) -> EffectContext:
    return EffectContext(host=None, log=log, nursery=nursery)  # type: ignore[arg-type]


def test_undo_runs_in_exact_reverse_order() -> None:
    world = World()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            for name in "abcd":
                await stack.apply(Thing(world, name))
            return await stack.unwind(30)

    report = run(main)
    assert report.complete
    assert world.objects == []
    assert world.events[4:] == ["undo d", "undo c", "undo b", "undo a"]
    assert report.undone == ("thing d", "thing c", "thing b", "thing a")


def test_failed_step_is_reported_and_the_rest_still_run() -> None:
    world = World()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            await stack.apply(Thing(world, "a"))
            await stack.apply(Thing(world, "b", fail_undo=True))
            await stack.apply(Thing(world, "c", hang_undo=True))
            await stack.apply(Thing(world, "d"))
            return await stack.unwind(60)

    report = run(main)
    assert not report.complete
    assert report.failures == ("undo thing c: timed out after 5 s", "undo thing b: cannot undo b")
    assert world.objects == ["b", "c"]  # a and d undone despite b and c
    assert world.events[-4:] == ["undo d", "undo c", "undo b", "undo a"]


def test_failed_apply_is_aborted_and_not_pushed() -> None:
    world = World()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            await stack.apply(Thing(world, "a"))
            with pytest.raises(HostError):
                await stack.apply(Thing(world, "b", fail_apply=True))
            assert [r.describe() for r in stack.records] == ["thing a"]
            return await stack.unwind(30)

    report = run(main)
    assert report.complete and world.objects == []


def test_cancel_during_apply_aborts_then_unwind_restores() -> None:
    world = World()

    async def main() -> TeardownReport | None:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            with trio.move_on_after(1):
                await stack.apply(Thing(world, "a"))
                await stack.apply(Thing(world, "b", apply_delay=10))  # cancelled mid-way
            return await stack.unwind(30)

    report = run(main)
    assert report is not None and report.complete
    assert world.objects == []
    assert "undo b" in world.events  # the abort of the half-applied effect


def test_unwind_is_shielded_and_a_hung_step_does_not_starve_the_rest() -> None:
    world = World()

    async def main() -> tuple[TeardownReport, float]:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            await stack.apply(Thing(world, "a"))
            await stack.apply(Thing(world, "b", hang_undo=True))
            await stack.apply(Thing(world, "c"))
            start = trio.current_time()
            with trio.CancelScope() as outer:
                outer.cancel()  # already cancelled: unwind must still run
                report = await stack.unwind(3)
            return report, trio.current_time() - start

    report, took = run(main)
    # b used the whole stop budget; a still got its last chance after it.
    assert took == pytest.approx(3)
    assert world.objects == ["b"]
    assert report.failures == ("undo thing b: timed out after 3 s",)


def test_steps_past_the_deadline_get_a_last_chance_each() -> None:
    world = World()

    async def main() -> tuple[TeardownReport, float]:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            await stack.apply(Thing(world, "a", hang_undo=True))
            await stack.apply(Thing(world, "b", hang_undo=True))
            await stack.apply(Thing(world, "c"))
            start = trio.current_time()
            report = await stack.unwind(2)
            return report, trio.current_time() - start

    report, took = run(main)
    assert world.objects == ["a", "b"]
    assert report.failures == ("undo thing b: timed out after 2 s",
                               "undo thing a: timed out after 1 s")
    assert took == pytest.approx(3)  # the deadline plus one last chance


@attrs.frozen
class HangingAbort(Thing):
    async def abort(self, ctx: EffectContext) -> None:
        await trio.sleep_forever()


def test_an_abort_that_hangs_is_bounded_and_reported() -> None:
    world = World()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            with pytest.raises(HostError):
                await stack.apply(HangingAbort(world, "x", fail_apply=True))
            return await stack.unwind(30)

    report = run(main)
    assert report.failures == ("clean up after failed thing x: timed out",)


def test_apply_after_unwind_is_refused() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            await stack.unwind(1)
            with pytest.raises(RuntimeError):
                await stack.apply(Thing(World(), "x"))

    run(main)


@settings(max_examples=200, deadline=None)
@given(
    plan=st.lists(st.tuples(st.booleans(), st.booleans(), st.booleans()), max_size=8),
    cancel_at=st.one_of(st.none(), st.floats(min_value=0, max_value=20)),
)
def test_whatever_fails_every_undoable_change_is_undone(
    plan: list[tuple[bool, bool, bool]], cancel_at: float | None
) -> None:
    """Invariant: after unwind, only effects whose undo itself failed remain,
    and the report names exactly those."""
    world = World()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log)
            with trio.move_on_after(cancel_at if cancel_at is not None else 1e9):
                try:
                    for i, (fail_apply, fail_undo, slow) in enumerate(plan):
                        await stack.apply(Thing(world, f"e{i}", fail_apply=fail_apply,
                                                fail_undo=fail_undo,
                                                apply_delay=3.0 if slow else 0.0))
                except HostError:
                    pass
            return await stack.unwind(1e6)

    report = run(main)
    stuck = {f"thing {name}" for name in world.objects}
    named = {f.split(":")[0].removeprefix("undo ").removeprefix("clean up after failed ")
             for f in report.failures}
    assert named == stuck
    assert report.complete == (not world.objects)


# --- what goes with a deleted link --------------------------------------------


@attrs.frozen
class OnLink(Thing):
    """A route or address on link 7: deleting the link removes it too."""

    def goes_with_link(self) -> int | None:
        return 7


@attrs.frozen
class LinkSeven(Thing):
    def deletes_link(self) -> int | None:
        return 7

    async def undo(self, ctx: EffectContext) -> None:
        await super().undo(ctx)
        # The kernel's part: what was on the link goes with it.
        self.world.objects[:] = [o for o in self.world.objects if not o.startswith("on7")]


@attrs.define
class Recorder:
    log: list[str] = attrs.field(factory=list)

    async def intent(self, effect: Effect) -> None:
        pass

    async def applied(self, intent: Effect, record: Effect) -> None:
        pass

    async def undone(self, record: Effect) -> None:
        self.log.append(record.describe())


@pytest.mark.parametrize("link_fails", [False, True])
def test_what_goes_with_a_link_is_not_undone_piece_by_piece(link_fails: bool) -> None:
    """Routes and addresses on a link that the unwind deletes anyway are
    recorded as undone once the deletion succeeded, not removed one by one;
    if the deletion fails, they are undone one by one after all."""
    world = World()
    recorder = Recorder()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log, observer=recorder)
            await stack.apply(Thing(world, "before"))
            await stack.apply(LinkSeven(world, "link7", fail_undo=link_fails))
            await stack.apply(OnLink(world, "on7-address"))
            await stack.apply(OnLink(world, "on7-routes"))
            await stack.apply(Thing(world, "after"))
            return await stack.unwind(10)

    report = run(main)
    undos = [e for e in world.events if e.startswith("undo")]
    if not link_fails:
        assert undos == ["undo after", "undo link7", "undo before"]
        assert world.objects == []
        assert report.complete
        assert recorder.log == ["thing after", "thing on7-routes", "thing on7-address",
                                   "thing link7", "thing before"]
    else:
        assert undos == ["undo after", "undo link7", "undo on7-routes", "undo on7-address",
                         "undo before"]
        assert world.objects == ["link7"]
        assert report.failures == ("undo thing link7: cannot undo link7",)
        assert recorder.log == ["thing after", "thing on7-routes", "thing on7-address",
                                   "thing before"]


def test_only_what_lies_directly_on_its_link_goes_with_it() -> None:
    """A record on the link with something else between it and the link is
    undone on its own (in exact reverse order), so nothing else is undone
    while it is still in place."""
    world = World()
    recorder = Recorder()

    async def main() -> TeardownReport:
        async with trio.open_nursery() as nursery:
            stack = EffectStack(ctx_for(nursery), log=log, observer=recorder)
            await stack.apply(LinkSeven(world, "link7"))
            await stack.apply(OnLink(world, "on7-address"))
            await stack.apply(Thing(world, "between"))
            await stack.apply(OnLink(world, "on7-routes"))
            return await stack.unwind(10)

    report = run(main)
    assert report.complete and world.objects == []
    assert [e for e in world.events if e.startswith("undo")] == [
        "undo on7-routes", "undo between", "undo link7"]
    assert recorder.log == ["thing on7-routes", "thing between", "thing on7-address",
                            "thing link7"]
