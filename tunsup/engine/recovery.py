"""Crash recovery: undo what dead instances left, through the normal undo.

For every journal in ``state_dir`` whose owner (pid *and* start time) is no
longer alive, the effects it records as applied — and the intents whose
outcome it never recorded — are pushed on an :class:`EffectStack` and
unwound in reverse order, exactly as a normal stop would.  Undo is
idempotent: what is already gone is fine.  A journal that was fully undone
is deleted; one with leftovers is rewritten to hold just those (a later
``tunsup cleanup`` retries them); a damaged one is kept aside as
``*.corrupt.<timestamp>`` with a warning.  A compaction the dead instance
left half-done (``journal-*.log.compact``; its journal is complete) is
deleted.

Make-before-break: a protection (a kill switch and the rules leading to
it, see :attr:`Effect.protects`) of a tunnel the caller is about to start
again is *kept*: it stays on the host and in the journal, and the
:class:`Adoption` in the report holds it until the new tunnel's own
protection and routing stand (:meth:`Adoption.drop`).  Until then a crash
leaves the host closed, and a later recovery finds it again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .._bounded import bounded
from .._errors import HostError
from ..host import Host
from ..host.dns import ResolvConfOwners
from ..host.process import terminate_foreign
from ..pidfile import process_start_time
from .effects import Effect, EffectContext, Hooks, KillSwitch, OnHook
from .journal import (
    APPEND_TIMEOUT,
    COMPACT_SUFFIX,
    FORMAT_VERSION,
    PASSED,
    JournalContents,
    PendingIntent,
    Step,
    effect_to_dict,
    encode_line,
    list_journals,
    read_journal,
)
from .lock import is_alive
from .undo import EffectStack, TeardownReport

log = logging.getLogger("tunsup.recovery")

#: Bound on undoing one journal.
RECOVERY_TIMEOUT = 60.0
#: Bound on one file operation of recovery (list, read, rewrite, move
#: aside): a hung state disk (or a FIFO where a journal should be) makes it
#: a failure, never a wait without end.
IO_TIMEOUT = 10.0


@attrs.frozen
class RecoveryReport:
    #: Journals of dead instances that were processed.
    recovered: tuple[str, ...] = ()
    undone: tuple[str, ...] = ()
    failures: tuple[str, ...] = ()
    #: Journals owned by a live instance (left alone).
    live: tuple[str, ...] = ()
    #: Damaged journals moved aside, with their new names.
    quarantined: tuple[str, ...] = ()
    #: Damaged records that were not just a torn last write.
    unreadable: int = 0
    #: What could not be undone and was forgotten (``drop``).
    dropped: tuple[str, ...] = ()
    #: Protections kept for tunnels about to start (``keep``), one line each.
    kept: tuple[str, ...] = ()
    #: The same, to hand over and drop once their tunnels stand.
    adoption: Adoption | None = None

    @property
    def complete(self) -> bool:
        return not self.failures and not self.unreadable


async def recover(
    state_dir: str,
    host: Host,
    *,
    dry_run: bool = False,
    me: tuple[int, int] | None = None,
    out: Callable[[str], None] | None = None,
    timeout: float = RECOVERY_TIMEOUT,
    io_timeout: float = IO_TIMEOUT,
    drop: bool = False,
    keep: Callable[[str], bool] | None = None,
) -> RecoveryReport:
    """Undo every journal left in ``state_dir`` by a dead instance.

    ``me`` (pid, start time) is skipped: the caller's own journal.  With
    ``dry_run`` nothing changes; ``out`` receives one line per object that
    would be undone, in undo order.  ``timeout`` bounds the undo of one
    journal as ``stop_timeout`` bounds a stop (pass the configured one).
    Hook processes the dead instance left running are ended first; down
    hooks it had gone past are never run again (out of order): they stay
    recorded as failures.  With ``drop``, what could not be undone is
    reported (``out``, ``dropped``) and forgotten instead of kept for a
    later cleanup.  ``keep``: a tunnel name it accepts has its kill switch,
    with every protection of that tunnel, kept on the host and in the
    journal (``kept``; ``adoption`` hands them over, see :class:`Adoption`).
    Never raises for bad journals.
    Every file operation is bounded by ``io_timeout`` (one that overruns is
    a failure: the journal is left for a later cleanup).  Cancellation:
    file operations are abandoned at once (see :func:`tunsup._bounded.bounded`);
    an undo in progress is shielded and bounded (as at stop); cancellation
    then propagates.
    """
    say = out or (lambda line: log.info("%s", line))
    recovered: list[str] = []
    undone: list[str] = []
    failures: list[str] = []
    live: list[str] = []
    quarantined: list[str] = []
    dropped: list[str] = []
    kept: list[_Kept] = []
    unreadable = 0
    try:
        paths = await bounded(io_timeout, f"listing {state_dir}", list_journals, state_dir)
    except HostError as exc:
        return RecoveryReport(failures=(str(exc),))
    for path in paths:
        try:
            contents = await bounded(io_timeout, f"reading {path}", read_journal, path)
            alive = contents.pid is not None and contents.start_time is not None and \
                await bounded(io_timeout, f"checking pid {contents.pid}", is_alive,
                              contents.pid, contents.start_time)
        except HostError as exc:
            failures.append(f"{exc}; journal left as it is")
            continue
        owner = (contents.pid, contents.start_time)
        if owner == me:
            continue
        if alive:
            live.append(f"{path} (pid {contents.pid})")
            continue
        for number, why in contents.damaged:
            log.warning("%s:%d: %s%s", path, number, why,
                        " (a write torn by the crash)" if contents.torn_tail else "")
        if not contents.torn_tail:
            unreadable += len(contents.damaged)
        pending = [(s, _resumed(s, e)) for s, e in contents.pending()]
        stale = [(s, e) for s, e in pending if s.stale is not None]
        pending = [(s, e) for s, e in pending if s.stale is None]
        keeping = _protections(pending, keep)
        pending = [(s, e) for s, e in pending if id(e) not in keeping]
        if dry_run:
            who = f"pid {contents.pid}" if contents.pid is not None else "unknown owner"
            say(f"{path} ({who}, dead): {len(pending)} object(s) to undo")
            for _, effect in reversed(pending):
                say(f"  undo {effect.describe()}")
            for _, effect in keeping.values():
                say(f"  keep {effect.describe()}")
            for step, effect in stale:
                say(f"  {'drop' if drop else 'cannot undo'} {effect.describe()}: {step.stale}")
            continue
        if contents.damaged:
            try:
                quarantined.append(await _quarantine(path, io_timeout))
            except HostError as exc:
                failures.append(f"{exc}; journal left as it is")
                continue
        recovered.append(path)
        # The dead instance's hooks run in their own sessions and outlived
        # it: end them before anything runs them (or the next step) again.
        await _end_hooks(contents)
        if pending:
            say(f"recovering {len(pending)} object(s) left by pid {contents.pid} ({path})")
        report = await _undo(contents, [e for _, e in pending], host, timeout,
                             None if contents.damaged else _hook_recorder(path, pending))
        undone += report.undone
        passed = _passed_now(pending, report.remaining)
        left = [*[(e, passed.get(id(e))) for e in report.remaining],
                *[(e, s.stale) for s, e in stale]]
        if drop:
            for effect, _ in left:
                say(f"dropped (not undone, no longer tracked): {effect.describe()}")
            dropped += [f"{path}: {e.describe()}" for e, _ in left]
            left = []
        else:
            failures += [f"{path}: {f}" for f in report.failures]
            failures += [f"{path}: {e.describe()}: {s.stale}" for s, e in stale]
        # Kept last in undo order: a later undo removes them after the rest.
        left = [*left, *[(e, None) for _, e in reversed(keeping.values())]]
        tunnels = {id(e): s.tunnel for s, e in [*pending, *stale, *keeping.values()]}
        try:
            await bounded(io_timeout, f"removing {path}{COMPACT_SUFFIX}", _remove_if_there,
                          path + COMPACT_SUFFIX)
        except (HostError, OSError) as exc:
            log.warning("leftover of a compaction: %s", exc)
        try:
            # Abandoned late, the rewrite still leaves what it was given to
            # leave (atomically, by rename): nothing else writes that file.
            target, seqs = await bounded(io_timeout, f"rewriting {path}", _rewrite, path,
                                         contents, left, tunnels, not contents.damaged)
        except HostError as exc:
            failures.append(f"{exc}; the journal may still list what was undone")
            continue
        for _, effect in keeping.values():
            say(f"kept {effect.describe()} until tunnel {tunnels[id(effect)]} stands again")
            kept.append(_Kept(target, seqs[id(effect)], tunnels[id(effect)], effect))
    return RecoveryReport(tuple(recovered), tuple(undone), tuple(failures), tuple(live),
                          tuple(quarantined), unreadable, tuple(dropped),
                          tuple(f"{k.path}: {k.effect.describe()}" for k in kept),
                          Adoption(host, kept, timeout) if kept else None)


def _protections(pending: list[tuple[Step, Effect]],
                 keep: Callable[[str], bool] | None) -> dict[int, tuple[Step, Effect]]:
    """What to keep, by ``id``, in applied order: every protection of each
    tunnel ``keep`` accepts that has a kill switch in ``pending`` (its
    rules alone would protect nothing)."""
    if keep is None:
        return {}
    closed = {s.tunnel for s, e in pending
              if isinstance(_base(e), KillSwitch) and _base(e).protection() and keep(s.tunnel)}
    return {id(e): (s, e) for s, e in pending if s.tunnel in closed and _base(e).protection()}


def _base(effect: Effect) -> Effect:
    """The effect itself, or the intent of one never recorded as applied."""
    return effect.intent if isinstance(effect, PendingIntent) else effect


@attrs.define
class _Kept:
    #: The journal that records it, and its step there.
    path: str
    seq: int
    tunnel: str
    effect: Effect


class Adoption:
    """Protections kept by recovery for the tunnels this run starts.

    A tunnel's bring-up hands over what its own kill switch finds already
    there (:meth:`take_routes`, through ``EffectContext.adopted``); once the
    tunnel's routing stands, :meth:`drop` undoes the rest and records that in
    the dead instance's journal (deleted once nothing is left in it).  Until
    then the journal holds them: a crash leaves the host closed.
    """

    def __init__(self, host: Host, kept: list[_Kept], timeout: float) -> None:
        self.host = host
        self.timeout = timeout
        self._kept = kept

    @property
    def tunnels(self) -> set[str]:
        return {k.tunnel for k in self._kept}

    def take_routes(self, tunnel: str, table: int, found: Sequence[Any],
                    metric: int) -> tuple[Any, ...]:
        taken: dict[Any, None] = {}
        for kept in self._kept:
            base = _base(kept.effect)
            # Only routes of the same kind (metric): a kept hold's are not
            # the restarted tunnel's kill switch's, and stay the hold's.
            if (kept.tunnel != tunnel or not isinstance(base, KillSwitch)
                    or base.table != table or base.metric != metric):
                continue
            held = [p for p in found if p in base.prefixes]
            if not held:
                continue
            rest = attrs.evolve(base, prefixes=tuple(p for p in base.prefixes if p not in held))
            kept.effect = PendingIntent(rest) if isinstance(kept.effect, PendingIntent) else rest
            taken |= dict.fromkeys(held)
        return tuple(taken)

    async def drop(self, tunnel: str | None = None) -> TeardownReport:
        """Undo the kept protections of ``tunnel`` (all when None), newest
        first, and record each in its journal.  What fails stays kept (and
        journaled).  Shielded and bounded like recovery's undo (``timeout``
        per journal); cancellation then propagates."""
        mine = [k for k in self._kept if tunnel is None or k.tunnel == tunnel]
        if not mine:
            return TeardownReport()
        self._kept = [k for k in self._kept if k not in mine]
        paths = list(dict.fromkeys(k.path for k in mine))
        undone: list[str] = []
        failures: list[str] = []
        remaining: list[Effect] = []
        for path in paths:
            group = [k for k in mine if k.path == path]
            report = await self._drop(path, group)
            undone += report.undone
            failures += report.failures
            remaining += report.remaining
            failed = {id(e) for e in report.remaining}
            self._kept += [k for k in group if id(k.effect) in failed]
        return TeardownReport(tuple(undone), tuple(failures), tuple(remaining))

    async def _drop(self, path: str, group: list[_Kept]) -> TeardownReport:
        seqs = {id(k.effect): k.seq for k in group}
        journal = _Marker(path, seqs)
        with trio.CancelScope(shield=True):
            async with trio.open_nursery() as nursery:
                ctx = EffectContext(host=self.host, log=log, nursery=nursery, recovering=True)
                stack = EffectStack(ctx, log=log, observer=journal)
                stack.adopt([k.effect for k in group])
                report = await stack.unwind(self.timeout)
                nursery.cancel_scope.cancel()
            try:
                await bounded(IO_TIMEOUT, f"removing {path}", _remove_if_done, path)
            except HostError as exc:
                log.warning("%s", exc)
        for line in report.undone:
            log.info("replaced by the new tunnel, removed: %s", line)
        for failure in report.failures:
            log.error("adopted protection not removed: %s (left for 'tunsup cleanup')", failure)
        return report


class _Marker:
    """Records, in a dead instance's journal, each kept step undone."""

    def __init__(self, path: str, seqs: dict[int, int]) -> None:
        self.path = path
        self.seqs = seqs

    async def intent(self, effect: Effect) -> None:
        raise AssertionError("nothing is applied here")

    async def applied(self, intent: Effect, record: Effect) -> None:
        raise AssertionError("nothing is applied here")

    async def undone(self, record: Effect) -> None:
        line = encode_line({"op": "undone", "seq": self.seqs[id(record)]})
        try:
            await bounded(APPEND_TIMEOUT, f"appending to {self.path}", _append, self.path, line)
        except HostError as exc:
            # Harmless: a later recovery undoes it again (undo is idempotent).
            log.warning("%s", exc)


def _append(path: str, line: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_if_done(path: str) -> None:
    """Delete a dead instance's journal once nothing in it is pending."""
    try:
        if not read_journal(path).pending():
            os.unlink(path)
    except FileNotFoundError:
        pass


def _resumed(step: Step, effect: Effect) -> Effect:
    """Down hooks the dead instance had started run on from the one it was
    running (interrupted: run again); those that had finished do not."""
    first = step.down_started
    if isinstance(effect, Hooks) and first is not None:
        return attrs.evolve(effect, down=effect.down[first:])
    return effect


def _passed_now(pending: list[tuple[Step, Effect]],
                remaining: tuple[Effect, ...]) -> dict[int, str]:
    """Hooks whose down hooks failed in this unwind while a step below them
    (of their tunnel) was then undone: by ``id``, why they must not run
    again."""
    failed = {id(e) for e in remaining}
    passed = {}
    for i, (step, effect) in enumerate(pending):
        if id(effect) in failed and isinstance(effect, Hooks) and any(
                s.tunnel == step.tunnel and id(e) not in failed for s, e in pending[:i]):
            passed[id(effect)] = PASSED
    return passed


async def _end_hooks(contents: JournalContents) -> None:
    """End the hook processes of pending steps that are still running:
    SIGTERM then at once SIGKILL to each one's process group, as a live
    hook timeout kills it (only if its pid still has the recorded start
    time).  Bounded: 5 s each."""
    for step in contents.steps:
        if step.undone:
            continue
        for run in step.hooks:
            if run.start_time is None:
                continue
            try:
                alive = await bounded(IO_TIMEOUT, f"checking hook pid {run.pid}",
                                      process_start_time, run.pid) == run.start_time
            except HostError as exc:
                log.warning("%s", exc)
                continue
            if not alive:
                continue
            log.warning("ending hook pid %d of the dead instance (%s of %s)", run.pid,
                        run.phase, step.intent.describe())
            if not await terminate_foreign(run.pid, run.start_time, grace=0, group=True):
                log.error("hook pid %d did not exit after SIGKILL", run.pid)


def _hook_recorder(path: str, pending: list[tuple[Step, Effect]]) -> OnHook:
    """Journal the hooks recovery itself runs into the journal it recovers
    (as their dead instance did), so that a recovery killed mid-hook is no
    different from a service killed mid-hook.  A failed append is logged;
    the hook still runs.  Bounded (abandoned after APPEND_TIMEOUT)."""
    seqs = {id(e): (s.seq, s.down_started or 0) for s, e in pending}

    def append(line: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    async def on_hook(effect: Effect, phase: str, index: int, pid: int,
                      start_time: int | None) -> None:
        seq, offset = seqs.get(id(effect), (None, 0))
        if seq is None:
            return
        # A resumed Hooks record holds its down hooks from ``offset`` on.
        line = encode_line({"op": "hook", "seq": seq, "phase": phase, "pid": pid,
                            "index": index + offset if phase == "down" else index,
                            "start_time": start_time})
        try:
            with trio.fail_after(APPEND_TIMEOUT):
                await trio.to_thread.run_sync(append, line, abandon_on_cancel=True)
        except (OSError, trio.TooSlowError) as exc:
            log.warning("journal %s: cannot record hook pid %d: %s", path, pid, exc)

    return on_hook


async def _undo(contents: JournalContents, pending: list[Effect], host: Host,
                timeout: float, on_hook: OnHook | None = None) -> TeardownReport:
    # Shared resources get owners of their own, which learn the dead
    # instance's claims as its records are adopted (see Effect.adopted).
    host = attrs.evolve(host, dns_owners=ResolvConfOwners())
    async with trio.open_nursery() as nursery:
        ctx = EffectContext(host=host, log=log, nursery=nursery, recovering=True,
                            instance_start=contents.start_time, on_hook=on_hook)
        stack = EffectStack(ctx, log=log)
        stack.adopt(pending)
        report = await stack.unwind(timeout)
        nursery.cancel_scope.cancel()
    return report


def _remove_if_there(path: str) -> None:
    """Delete ``path`` (blocking); a missing file is fine."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    log.info("removed %s (a compaction interrupted by the crash; the journal was complete)",
             path)


async def _quarantine(path: str, io_timeout: float) -> str:
    target = f"{path}.corrupt.{time.strftime('%Y%m%dT%H%M%S')}"
    await bounded(io_timeout, f"moving {path} aside", os.replace, path, target)
    log.warning("damaged journal %s kept aside as %s; its readable records are recovered",
                path, target)
    return target


def _rewrite(path: str, contents: JournalContents, left: list[tuple[Effect, str | None]],
             tunnels: dict[int, str], replace: bool) -> tuple[str, dict[int, int]]:
    """Leave only what could not be undone (blocking): ``left`` holds, in
    undo order, each such effect and why it must not be undone again (or
    None); ``tunnels`` names their tunnels by ``id``.  ``replace``: the
    journal is still at ``path`` (not quarantined).  Returns the file
    written and each effect's step in it, by ``id``."""
    if not left:
        if replace:
            os.unlink(path)
        return path, {}
    lines = [encode_line({"op": "open", "pid": contents.pid, "start_time": contents.start_time,
                          "version": FORMAT_VERSION, "created": time.time(),
                          "rewritten_by": os.getpid()})]
    seqs = {}
    for seq, (effect, stale) in enumerate(reversed(left), 1):
        seqs[id(effect)] = seq
        tunnel = tunnels.get(id(effect), "?")
        if isinstance(effect, PendingIntent):
            lines.append(encode_line({"op": "intent", "seq": seq, "tunnel": tunnel,
                                      "effect": effect_to_dict(effect.intent)}))
        else:
            lines.append(encode_line({"op": "intent", "seq": seq, "tunnel": tunnel,
                                      "effect": effect_to_dict(effect)}))
            lines.append(encode_line({"op": "applied", "seq": seq,
                                      "record": effect_to_dict(effect)}))
        if stale is not None:
            lines.append(encode_line({"op": "stale", "seq": seq, "why": stale}))
    target = path if replace else path + ".leftovers" + os.path.splitext(path)[1]
    tmp = f"{target}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, b"".join(lines))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, target)
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target, seqs
