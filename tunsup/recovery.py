"""Crash recovery: undo what dead instances left, through the normal undo.

For every journal in ``state_dir`` whose owner (pid *and* start time) is no
longer alive, the effects it records as applied — and the intents whose
outcome it never recorded — are pushed on an :class:`EffectStack` and
unwound in reverse order, exactly as a normal stop would.  Undo is
idempotent: what is already gone is fine.  A journal that was fully undone
is deleted; one with leftovers is rewritten to hold just those (a later
``tunsup cleanup`` retries them); a damaged one is kept aside as
``*.corrupt.<timestamp>`` with a warning.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import attrs
import trio

from .effects import Effect, EffectContext
from .host import Host
from .instance import is_alive
from .journal import (
    FORMAT_VERSION,
    JournalContents,
    PendingIntent,
    effect_to_dict,
    encode_line,
    list_journals,
    read_journal,
)
from .undo import EffectStack, TeardownReport

log = logging.getLogger("tunsup.recovery")

#: Bound on undoing one journal.
RECOVERY_TIMEOUT = 60.0


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
) -> RecoveryReport:
    """Undo every journal left in ``state_dir`` by a dead instance.

    ``me`` (pid, start time) is skipped: the caller's own journal.  With
    ``dry_run`` nothing changes; ``out`` receives one line per object that
    would be undone, in undo order.  Never raises for bad journals.
    Cancellation: an undo in progress is shielded and bounded (as at stop);
    cancellation then propagates.
    """
    say = out or (lambda line: log.info("%s", line))
    recovered: list[str] = []
    undone: list[str] = []
    failures: list[str] = []
    live: list[str] = []
    quarantined: list[str] = []
    unreadable = 0
    for path in await trio.to_thread.run_sync(list_journals, state_dir):
        contents = await trio.to_thread.run_sync(read_journal, path)
        owner = (contents.pid, contents.start_time)
        if owner == me:
            continue
        if contents.pid is not None and contents.start_time is not None and await \
                trio.to_thread.run_sync(is_alive, contents.pid, contents.start_time):
            live.append(f"{path} (pid {contents.pid})")
            continue
        for number, why in contents.damaged:
            log.warning("%s:%d: %s%s", path, number, why,
                        " (a write torn by the crash)" if contents.torn_tail else "")
        if not contents.torn_tail:
            unreadable += len(contents.damaged)
        pending = contents.pending()
        if dry_run:
            who = f"pid {contents.pid}" if contents.pid is not None else "unknown owner"
            say(f"{path} ({who}, dead): {len(pending)} object(s) to undo")
            for _, effect in reversed(pending):
                say(f"  undo {effect.describe()}")
            continue
        if contents.damaged:
            quarantined.append(await _quarantine(path))
        recovered.append(path)
        if pending:
            say(f"recovering {len(pending)} object(s) left by pid {contents.pid} ({path})")
        report = await _undo(contents, [e for _, e in pending], host, timeout)
        undone += report.undone
        failures += [f"{path}: {f}" for f in report.failures]
        await trio.to_thread.run_sync(_rewrite, path, contents, report.remaining,
                                      not contents.damaged)
    return RecoveryReport(tuple(recovered), tuple(undone), tuple(failures), tuple(live),
                          tuple(quarantined), unreadable)


async def _undo(contents: JournalContents, pending: list[Effect], host: Host,
                timeout: float) -> TeardownReport:
    async with trio.open_nursery() as nursery:
        ctx = EffectContext(host=host, log=log, nursery=nursery, recovering=True,
                            instance_start=contents.start_time)
        stack = EffectStack(ctx, log=log)
        stack.adopt(pending)
        report = await stack.unwind(timeout)
        nursery.cancel_scope.cancel()
    return report


async def _quarantine(path: str) -> str:
    target = f"{path}.corrupt.{time.strftime('%Y%m%dT%H%M%S')}"
    await trio.to_thread.run_sync(os.replace, path, target)
    log.warning("damaged journal %s kept aside as %s; its readable records are recovered",
                path, target)
    return target


def _rewrite(path: str, contents: JournalContents, remaining: tuple[Effect, ...],
             replace: bool) -> None:
    """Leave only what could not be undone (blocking).  ``replace``: the
    journal is still at ``path`` (not quarantined)."""
    if not remaining:
        if replace:
            os.unlink(path)
        return
    lines = [encode_line({"op": "open", "pid": contents.pid, "start_time": contents.start_time,
                          "version": FORMAT_VERSION, "created": time.time(),
                          "rewritten_by": os.getpid()})]
    # By the steps' own objects: `pending()` builds a new PendingIntent on
    # every call, so ids of what it returns match nothing later.
    tunnels = {id(s.record if s.record is not None else s.intent): s.tunnel
               for s in contents.steps}
    for seq, effect in enumerate(reversed(remaining), 1):
        own = effect.intent if isinstance(effect, PendingIntent) else effect
        tunnel = tunnels.get(id(own), "?")
        if isinstance(effect, PendingIntent):
            lines.append(encode_line({"op": "intent", "seq": seq, "tunnel": tunnel,
                                      "effect": effect_to_dict(effect.intent)}))
        else:
            lines.append(encode_line({"op": "intent", "seq": seq, "tunnel": tunnel,
                                      "effect": effect_to_dict(effect)}))
            lines.append(encode_line({"op": "applied", "seq": seq,
                                      "record": effect_to_dict(effect)}))
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
