"""The undo stack: one cleanup path for stop, failed start and crash.

Every host change is an :class:`~tunsup.engine.effects.Effect`.  ``apply`` runs it
and pushes the record it returns; when the stack unwinds (normal stop,
failure during start, or a runtime failure) every record is undone in exact
reverse order, shielded from cancellation and bounded by a deadline, each
step by its own timeout.  A failing step is logged and the rest still run.

An *observer* hears about every intent, application and undo; the crash-safe
journal plugs in there.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import attrs
import trio

from ..host import HelperHandle, Host

#: Seconds every undo step gets even after the stop deadline has passed.
LAST_CHANCE = 1.0


Log = logging.Logger | logging.LoggerAdapter[logging.Logger]


@attrs.define
class EffectContext:
    """What effects need at run time; not part of any record."""

    host: Host
    log: Log
    #: Background tasks of helpers (watchers, log pumps) run here.
    nursery: trio.Nursery
    stop_grace: float = 2.0
    hook_timeout: float = 60.0
    #: The bound on a teardown: the abort of an apply a stop interrupted
    #: is its first step, so it gets no longer than this either.
    stop_timeout: float = math.inf
    #: Seconds spent cleaning up since the tunnel last came up (or began a
    #: restart): aborts of interrupted applies on any of its stacks, a
    #: generation unwound in place.  A teardown that follows pays them
    #: from its ``stop_timeout``.
    cleanup_seconds: float = 0.0
    #: When the tunnel was told to stop (its tasks cancelled from outside:
    #: a stop, a ``down``), noted the moment it came (by the supervisor as
    #: it cancels, else by a task of the tunnel's); None until then.  A
    #: stop that had to wait for clean-up already under way (a failed
    #: restart's generation unwound in place, a spawn stopping the helper
    #: it started) pays that wait from its ``stop_timeout``.
    stop_asked_at: float | None = None
    #: Set once ``stop_asked_at`` is (see :meth:`note_stop`): clean-up
    #: already under way may cut itself short to the stop's budget.
    stop_noted: trio.Event = attrs.field(factory=trio.Event)

    def note_stop(self, at: float) -> None:
        """The tunnel was told to stop at ``at`` (the first time counts)."""
        if self.stop_asked_at is None:
            self.stop_asked_at = at
        self.stop_noted.set()

    def budget_left(self, *, waited: float = 0.0) -> float:
        """What is left of ``stop_timeout``: after the cleanup so far (and
        ``waited`` seconds more, spent since), and since the stop was
        asked for, whichever leaves less."""
        left = self.stop_timeout - self.cleanup_seconds - waited
        if self.stop_asked_at is not None:
            left = min(left, self.stop_timeout - (trio.current_time() - self.stop_asked_at))
        return max(left, 0.0)

    def stop_budget(self) -> float | None:
        """For shielded clean-up that a stop may be waiting for: what is
        left of the stop's budget (its last second at least) once a stop
        was asked for, else None (no stop waits: the clean-up's own bound
        holds; a cancellation of tunsup's own, such as one side of a
        bring-up stopping the other, is not a stop)."""
        if self.stop_asked_at is None:
            return None
        return max(self.budget_left(), LAST_CHANCE)

    @contextlib.contextmanager
    def cleaning_up(self) -> Iterator[None]:
        """Count the time spent inside in ``cleanup_seconds``."""
        began = trio.current_time()
        try:
            yield
        finally:
            self.cleanup_seconds += trio.current_time() - began
    #: Live helper handles by pid (records only hold pid + start time).
    helpers: dict[int, HelperHandle] = attrs.field(factory=dict)
    #: Helpers whose start failed and that could not be stopped (stuck in
    #: the kernel), by interface name: the start's abort reports them.
    unreaped: dict[str, HelperHandle] = attrs.field(factory=dict)
    #: Crash recovery: undoing a dead instance's journal.  Helpers are then
    #: not our children; they are found by pid *and* start time.
    recovering: bool = False
    #: Recovery: start time (clock ticks since boot) of the dead instance,
    #: to find a helper it started but did not get to record.
    instance_start: int | None = None
    #: Open fds of the TUN devices tunsup owns, by interface name.
    tun_fds: dict[str, int] = attrs.field(factory=dict)
    #: The current helper generation of each tunnel (see HelperGeneration).
    generations: dict[str, EffectStack] = attrs.field(factory=dict)
    #: Told of every hook process once it exists (the journal records it:
    #: see :class:`HookRecorder`).
    on_hook: OnHook | None = None
    #: Protections a dead instance left for this tunnel, kept until its own
    #: stand (make-before-break; see :class:`Handover`).
    adopted: Handover | None = None


class Handover(Protocol):
    """Protections adopted from a dead instance (crash recovery keeps them
    for the tunnels a run starts).  An effect that finds its host object
    already there asks whether an adopted protection holds it: if so the
    object is handed over (the new record owns it; the adopted one no
    longer does), so dropping the adopted one later leaves it in place."""

    def take_routes(self, tunnel: str, table: int, found: Sequence[Any],
                    metric: int) -> tuple[Any, ...]:
        """Of the unreachable routes ``found`` in ``table`` at ``metric``,
        those an adopted protection of ``tunnel`` holds: handed over to the
        caller."""
        ...


#: ``(effect, "up" | "down", index in its list, pid, start time)``.
OnHook = Callable[["Effect", str, int, int, "int | None"], Awaitable[None]]


@runtime_checkable
class HookRecorder(Protocol):
    """An effect-stack observer that also records hook processes."""

    async def hook_started(self, effect: Effect, phase: str, index: int, pid: int,
                           start_time: int | None) -> None: ...


class Effect:
    """Base class of effect records."""

    #: A protection (kill switch, the rules leading to it): after a crash
    #: it is kept for a tunnel that will start again, until that tunnel's
    #: own is in place (make-before-break; see tunsup.engine.recovery).
    protects: ClassVar[bool] = False
    #: What it changes is kernel or process state (links, addresses,
    #: routes, rules, sysctls, helpers): a reboot takes it away.  Its
    #: applied record is then written to the journal but not fsync'd (see
    #: tunsup.engine.journal, "Durability"); a change that outlives a reboot
    #: (a file, whatever a hook does) keeps an fsync'd record.
    gone_on_reboot: ClassVar[bool] = False
    #: Its undo neither needs a link nor changes one (a helper process,
    #: its WireGuard configuration): records that go with a link are
    #: carried past it to the record that deletes the link (see
    #: :meth:`EffectStack.unwind`).  In a journal a helper started and
    #: configured while its link was configured sits among the link's
    #: records.
    link_neutral: ClassVar[bool] = False

    def describe(self) -> str:
        raise NotImplementedError

    def protection(self) -> bool:
        """Whether this record is a protection (:attr:`protects`); a record
        that stands in for one only sometimes says so itself."""
        return self.protects

    async def prepare(self, ctx: EffectContext) -> Effect:
        return self

    async def apply(self, ctx: EffectContext) -> Effect:
        raise NotImplementedError

    async def undo(self, ctx: EffectContext) -> None:
        raise NotImplementedError

    async def abort(self, ctx: EffectContext) -> None:
        await self.undo(ctx)

    def undo_timeout(self, ctx: EffectContext) -> float:
        return 10.0

    def goes_with_link(self) -> int | None:
        """The index of the link whose deletion also removes what this
        record stands for (a route through it, an address on it), if any:
        see :meth:`EffectStack.unwind`."""
        return None

    def deletes_link(self) -> int | None:
        """The index of the link this record's undo deletes, if any."""
        return None

    def adopted(self, ctx: EffectContext) -> None:
        """Recovery adopted this record of a dead instance (in the order
        they were applied), before unwinding: an effect on a resource that
        tunnels share re-registers its claim with the resource's owner
        here, so that undoing each claim gives the right host state.  No
        I/O; default: nothing."""


class StackObserver(Protocol):
    async def intent(self, effect: Effect) -> None: ...
    async def applied(self, intent: Effect, record: Effect) -> None: ...
    async def undone(self, record: Effect) -> None: ...


@runtime_checkable
class QueueingObserver(Protocol):
    """An observer that can take undone records without a wait each:
    :meth:`EffectStack.unwind` queues them (``undone_soon``) and waits once,
    at its end (``flush``), for all of them."""

    def undone_soon(self, record: Effect) -> None: ...
    async def flush(self) -> None: ...


@attrs.frozen
class TeardownReport:
    """What unwinding achieved."""

    undone: tuple[str, ...] = ()
    #: One line per step that failed or was not reached; empty = complete.
    failures: tuple[str, ...] = ()
    #: The records whose undo failed, in undo order (what is left).
    remaining: tuple[Effect, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.failures


class EffectStack:
    """Applies effects and undoes them in reverse.  Single use."""

    def __init__(
        self,
        ctx: EffectContext,
        *,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger],
        observer: StackObserver | None = None,
    ) -> None:
        self._ctx = ctx
        self._log = log
        self._observer = observer
        self._records: list[Effect] = []
        #: Aborts of half-applied effects that failed: reported by unwind.
        self._abort_failures: list[str] = []
        self._unwound = False

    @property
    def records(self) -> tuple[Effect, ...]:
        return tuple(self._records)

    def adopt(self, records: list[Effect], *, live: bool = False) -> None:
        """Push records applied by someone else, in the order they were
        applied: crash recovery unwinds a dead instance's journal through
        this same stack (each record hears of it: :meth:`Effect.adopted`).
        ``live``: records of this process (see :meth:`take`), whose shared
        resources already know their claims."""
        if self._unwound:
            raise RuntimeError("effect stack already unwound")
        for record in records if not live else ():
            record.adopted(self._ctx)
        self._records.extend(records)

    def take(self) -> list[Effect]:
        """Hand every record over (to :meth:`adopt` on another stack, in
        this order) and leave this stack empty; their journal entries stay
        as they are.  A reload applies its changes to a stack of its own,
        so that a failure unwinds just those, then hands them to the
        tunnel's stacks."""
        records, self._records = self._records, []
        return records

    async def settle(self, record: Effect) -> None:
        """Drop ``record`` (by identity): nothing is left to undo for it.
        The observer hears of it as undone.  Cancellation: as the
        observer's ``undone``."""
        self._records = [r for r in self._records if r is not record]
        if self._observer is not None:
            await self._observer.undone(record)

    async def retire(self, record: Effect) -> None:
        """Undo ``record`` now, out of turn (it was needed for a while
        only: a hold), then drop it as :meth:`settle` does.  If its undo
        fails, it stays on the stack (the unwind tries again) and the error
        propagates.  Cancellation: likewise."""
        await record.undo(self._ctx)
        await self.settle(record)

    async def apply(self, effect: Effect) -> Effect:
        """Apply ``effect`` and push the record of what it did.

        If applying fails or is cancelled, the effect's ``abort`` cleans up
        whatever part of it may have happened (shielded, bounded by its undo
        timeout and what is left of the context's ``stop_timeout``, its
        last second at least) before the exception propagates; the stack
        itself is left for the caller to unwind.
        """
        if self._unwound:
            raise RuntimeError("effect stack already unwound")
        effect = await effect.prepare(self._ctx)
        if self._observer is not None:
            await self._observer.intent(effect)
        try:
            record = await effect.apply(self._ctx)
        except BaseException:
            what = effect.describe()
            ctx = self._ctx
            with ctx.cleaning_up(), trio.CancelScope(shield=True) as scope:
                # What is left of the teardown's budget, but its last
                # second at least (as every undo step gets).
                scope.deadline = trio.current_time() + min(
                    effect.undo_timeout(ctx), max(ctx.budget_left(), LAST_CHANCE))
                try:
                    await effect.abort(ctx)
                except Exception as exc:
                    self._abort_failures.append(f"clean up after failed {what}: {exc}")
                    self._log.error("cleaning up after failed %s: %s", what, exc)
            if scope.cancelled_caught:
                self._abort_failures.append(f"clean up after failed {what}: timed out")
                self._log.error("cleaning up after failed %s: timed out", what)
            raise
        self._records.append(record)
        if self._observer is not None:
            await self._observer.applied(effect, record)
        return record

    async def flush(self) -> None:
        """Wait until the observer holds every record applied so far (a
        queueing observer starts their writes without waiting for them);
        raises as the observer's ``flush``.  Called before anything
        applied is reported done.  Cancellation: as the observer's."""
        if isinstance(self._observer, QueueingObserver):
            await self._observer.flush()

    async def unwind(self, timeout: float) -> TeardownReport:
        """Undo every record in reverse order; never raises.

        Runs shielded from outside cancellation.  Each step gets its own
        undo timeout, capped by what is left of ``timeout``; once that is
        spent, every remaining step still gets a last chance of
        :data:`LAST_CHANCE` seconds (a route delete or a SIGKILL takes
        milliseconds), so one slow step — a hanging PreDown hook — cannot
        leave the rest of the host unrestored.  Whole bound: ``timeout``
        plus ``LAST_CHANCE`` per step.

        What goes with a link that the record right below it deletes
        (routes through it, addresses, MTU and state on it, stacked directly
        above it: :meth:`Effect.goes_with_link`) is not removed piece by
        piece — 10,000 routes took longer than the whole rest of a stop —
        but by that deletion: such records are recorded as undone right
        after the link's undo succeeded (in reverse order, before the link
        itself), and undone one by one only if it failed.
        """
        self._unwound = True
        undone: list[str] = []
        # Reported once: a stack unwound again (a helper generation, after
        # a failed restart, by the tunnel's teardown) does not repeat them.
        failures: list[str] = list(self._abort_failures)
        self._abort_failures.clear()
        remaining: list[Effect] = []
        deadline = trio.current_time() + timeout if math.isfinite(timeout) else math.inf
        #: Records waiting for the deletion of their link, by link index.
        carried: dict[int, list[Effect]] = {}
        with trio.CancelScope(shield=True):
            while self._records:
                record = self._records.pop()
                link = record.goes_with_link()
                if link is not None and self._goes_with_link_below(link):
                    carried.setdefault(link, []).append(record)
                    continue
                ok = await self._undo_one(record, deadline, undone, failures, remaining)
                deleted = record.deletes_link()
                gone = carried.pop(deleted, []) if deleted is not None else []
                if ok:
                    # What went with the link is recorded before the link
                    # itself: a crash in between leaves only the (gone)
                    # link for recovery, never routes on a deleted link.
                    for piece in gone:
                        undone.append(piece.describe())
                        self._log.info("%s: gone with the link", piece.describe())
                        await self._record_undone(piece)
                    await self._record_undone(record)
                else:
                    for piece in gone:
                        if await self._undo_one(piece, deadline, undone, failures, remaining):
                            await self._record_undone(piece)
            await self._flush_undone()
        return TeardownReport(tuple(undone), tuple(failures), tuple(remaining))

    def _goes_with_link_below(self, link: int) -> bool:
        """Whether the records still on the stack end, from the top down,
        in a run of records on link ``link`` (and link-neutral ones: a
        helper) directly above the one that deletes it: only then are the
        carried records' undos skipped, so nothing but link-neutral undos
        happens while they are still in place, and the order of the other
        undos stays exactly the reverse of the applies."""
        for record in reversed(self._records):
            if record.deletes_link() == link:
                return True
            if record.link_neutral:
                continue
            if record.goes_with_link() != link:
                return False
        return False

    async def _undo_one(self, record: Effect, deadline: float, undone: list[str],
                        failures: list[str], remaining: list[Effect]) -> bool:
        """Undo one record within its budget (see :meth:`unwind`); True on
        success (the caller then records it as undone).  Called shielded."""
        what = record.describe()
        left = deadline - trio.current_time()
        budget = max(min(record.undo_timeout(self._ctx), left), LAST_CHANCE)
        try:
            with trio.fail_after(budget):
                await record.undo(self._ctx)
        except trio.TooSlowError:
            failures.append(f"undo {what}: timed out after {budget:.3g} s")
            remaining.append(record)
            self._log.error("undo %s: timed out after %.3g s", what, budget)
            return False
        except Exception as exc:
            failures.append(f"undo {what}: {exc}")
            remaining.append(record)
            self._log.error("undo %s failed: %s", what, exc)
            return False
        undone.append(what)
        self._log.debug("undone: %s", what)
        return True

    async def _record_undone(self, record: Effect) -> None:
        """Tell the observer ``record`` is undone: queued, when it can
        queue (written by :meth:`_flush_undone`, at the end of the
        unwind), else waited for.  Called shielded."""
        if isinstance(self._observer, QueueingObserver):
            self._observer.undone_soon(record)
            return
        if self._observer is not None:
            try:
                with trio.move_on_after(LAST_CHANCE):
                    await self._observer.undone(record)
            except Exception as exc:
                # The host is restored; only the journal lags (a later
                # recovery finds the object gone: fine).
                self._log.warning("journal: %s", exc)

    async def _flush_undone(self) -> None:
        """Wait (at most :data:`LAST_CHANCE`) for the undone records queued
        by :meth:`_record_undone`; a failure is logged, as there.  Called
        shielded."""
        if not isinstance(self._observer, QueueingObserver):
            return
        try:
            with trio.move_on_after(LAST_CHANCE):
                await self._observer.flush()
        except Exception as exc:
            self._log.warning("journal: %s", exc)
