"""Crash-safe write-ahead journal of host changes.

Before an effect is applied its *intent* is appended and fsync'd; once it
is applied its *record* is appended; once it is undone, that too (see
"Durability" below for which appends are fsync'd).  After a
crash (SIGKILL, power cut) the journal says exactly what may be on the host,
and recovery (:mod:`tunsup.engine.recovery`) undoes it with the same undo code as a
normal stop.

Format: one record per line, ``CRC32HEX JSON\\n``, appended to
``STATE_DIR/journal-PID-START.log`` (file mode 0600, directory 0700).  The
first record names the owning process by pid *and* start time.  A torn last
line (a crash mid-write) or garbage is detected by the checksum; readable
records are still used.  Encoding (a record may hold 100,000 prefixes:
~100 ms of JSON), appends and fsyncs run on a worker thread, never on the
trio thread.

Durability.  An intent is fsync'd before its change is made, always: it
is what lets recovery find a change whatever happens next.  An *applied*
record is written (``write`` into the page cache) before the next change
is made, and fsync'd only when its change outlives a reboot (a file: DNS;
whatever a hook does); the records of kernel and process state (links,
addresses, MTU, routes, rules, sysctls, the helper, its UAPI
configuration: ``Effect.gone_on_reboot``) are not fsync'd themselves but by
the next durable append (the next intent, at the latest).  Nor is their
write waited for: it is started at once on the journal's thread
(:meth:`Journal.append_started`), and the next change's intent, queued
behind it, is written after it, so it is still written before the next
change is made; one that failed fails that change, and whatever applies
changes waits for what is left (:meth:`JournalObserver.flush`) before it
reports them done.  Why that is enough:

* A crash of the process (SIGKILL, a bug) loses nothing written: the page
  cache belongs to the kernel, and recovery reads the record.  One that
  comes between a change and the write of its record (started at once,
  as it always followed the change) leaves the intent without it: see
  the next point.
* A power cut or kernel crash may lose the unsynced tail of the file.  The
  state it leaves, an intent durable and its applied record missing, is
  one the journal could always be left in (a crash between the change and
  its record's fsync): recovery undoes the intent with the effect's
  ``abort``, which is safe whether or not the change happened.  And the
  changes concerned died with the kernel anyway: there is nothing on the
  host for their records to describe.  (The one thing an intent does not
  say is that an object was found already there, not ours: a rule or
  address recreated at boot by whoever had made it could then be removed
  by recovery.  That needs a power cut in the same window of
  microseconds to milliseconds as before, between a change and the next
  fsync, which a bring-up's next intent follows at once.)  What survives
  a reboot, files, is exactly what keeps fsync'd records.
* Records stay in order: appends are written in the order they were made,
  on one thread, to an O_APPEND file, and an fsync covers every byte
  written before it.  Undone records are not fsync'd either (losing one
  only makes a later recovery undo again what is gone: undo is
  idempotent).  For the same reason a teardown does not wait for each
  one to be written before its next step: it queues them
  (:meth:`Journal.append_soon`), in order, and waits once at its end for
  all of them (:meth:`Journal.flush`), before it reports the tunnel down.
  A crash in between loses at most some of them, a state a crash right
  after an undo and before its record could always leave.

Concurrent appends (many tunnels starting or stopping at once) share
their write and fsync (*group commit*): each durable append still returns
only once its record is durable, but one fsync covers every record queued
meanwhile.

The file is *compacted* while the service runs: once it has grown past
:data:`COMPACT_MIN` bytes and at least half of it is records of steps
undone (counted as they are written), it is rewritten with
only what is still applied (steps not undone, with their hooks and stale
marks): written to ``PATH.compact``, fsync'd, renamed over the journal, and
the directory fsync'd.  A crash at any point leaves either the old journal
or the new one, each complete (a leftover ``.compact`` file is removed by
recovery).

Key material is never journaled (fields with ``metadata={"secret": True}``
are left out).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import ipaddress
import json
import logging
import os
import signal
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .._errors import HostError
from .._input import read_regular_file
from ..config.spec import IPAddress, IPInterface, IPNetwork, network_text
from ..host.dns import DnsState, FileDnsState, ResolvconfDnsState, ResolvedDnsState
from ..host.worker import CANCEL_GRACE, Abandoned, SerialWorker, raise_if_abandoned
from . import effects
from .effects import Effect

log = logging.getLogger("tunsup.journal")

JOURNAL_PREFIX = "journal-"
JOURNAL_SUFFIX = ".log"
FORMAT_VERSION = 1
#: Bound on one append + fsync.
APPEND_TIMEOUT = 10.0
#: A journal is compacted once it is at least this big and at least half
#: of it is records of steps undone (which compaction drops): rewriting
#: then costs at most as much as it drops, and the file stays within twice
#: what is applied.
COMPACT_MIN = 64 * 1024
#: Suffix of the file a compaction writes before renaming it over the journal.
COMPACT_SUFFIX = ".compact"
#: Largest journal read (anything else in its place, a FIFO or a device
#: included, is "cannot read"): a route batch is one record, ~25 bytes a
#: route, so this is millions of routes.
MAX_JOURNAL_BYTES = 256 << 20

# --- effects <-> JSON ---------------------------------------------------------

EFFECT_KINDS: dict[str, type[Effect]] = {
    cls.__name__: cls
    for cls in (
        effects.Hooks, effects.StartHelper, effects.HelperRunning, effects.Link,
        effects.ConfigureWireguard, effects.WireguardConfigured, effects.Address,
        effects.Mtu, effects.LinkUp, effects.Routes, effects.Dns, effects.Rule,
        effects.Sysctl, effects.KillSwitch, effects.CreateTun, effects.OwnedTun,
        effects.HelperGeneration, effects.HeldRoutes, effects.WireguardChanged,
        effects.RoutesRemoved, effects.AddressRemoved, effects.MtuChanged, effects.HeldRule,
    )
}
_DNS_KINDS: dict[str, type[Any]] = {
    "file": FileDnsState, "resolvconf": ResolvconfDnsState, "resolved": ResolvedDnsState,
}

_IP_VALUES = (ipaddress.IPv4Interface, ipaddress.IPv6Interface, ipaddress.IPv4Network,
              ipaddress.IPv6Network, ipaddress.IPv4Address, ipaddress.IPv6Address)
_NETWORK_TYPES = frozenset((ipaddress.IPv4Network, ipaddress.IPv6Network))
_DNS_TAGS: dict[type[Any], str] = {cls: kind for kind, cls in _DNS_KINDS.items()}


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready data: attrs records as dicts without their
    secret fields (a DNS state tagged with its ``type``), addresses and
    networks as text, bytes as base64, sequences as lists."""
    if value is None or isinstance(value, str | int | float):
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if isinstance(value, tuple | list):
        return _plain_sequence(value)
    if isinstance(value, _IP_VALUES):
        return str(value)
    cls = type(value)
    if attrs.has(cls):
        out = {f.name: _plain(getattr(value, f.name))
               for f in attrs.fields(cls) if not f.metadata.get("secret")}
        tag = _DNS_TAGS.get(cls)
        return {"type": tag, **out} if tag is not None else out
    raise TypeError(f"cannot journal a {cls.__name__}")


#: The last long tuple made plain, and its result: a Routes effect's
#: prefixes are written twice (intent, then the applied record's, an equal
#: tuple of the same objects), 10,000 of them a few tens of milliseconds
#: each time.  Sound: tuples (and the values journaled) cannot change, and
#: an equal tuple has the same text; comparing the same objects costs next
#: to nothing (identity first).
_LAST_LONG: tuple[tuple[Any, ...], list[Any]] = ((), [])
_LONG = 64


def _plain_sequence(value: tuple[Any, ...] | list[Any]) -> list[Any]:
    global _LAST_LONG
    last, result = _LAST_LONG
    if isinstance(value, tuple) and len(value) == len(last) and (value is last or value == last):
        return result
    if all(type(v) in _NETWORK_TYPES for v in value):
        result = [network_text(v) for v in value]  # prefixes: no recursion
    else:
        result = [_plain(v) for v in value]
    if len(value) >= _LONG and isinstance(value, tuple):
        _LAST_LONG = (value, result)
    return result


def effect_to_dict(effect: Effect) -> dict[str, Any]:
    """A JSON-ready dict: ``{"kind": ClassName, ...fields}`` (no secrets).

    Written by hand rather than through cattrs: a cattrs converter with
    its generated functions cost every start ~25 ms (and a multiple of that
    under load) before the first tunnel; cattrs now only reads journals
    back (:func:`effect_from_dict`: recovery), and is imported then."""
    return {"kind": type(effect).__name__, **_plain(effect)}


@functools.cache
def _converter() -> Any:
    """The cattrs converter that reads records back (built on first use)."""
    import cattrs
    from cattrs.gen import make_dict_structure_fn, override

    conv = cattrs.Converter(forbid_extra_keys=True)
    conv.register_structure_hook(bytes, lambda v, _: base64.b64decode(v, validate=True))
    parsers: list[tuple[Any, Any]] = [(IPInterface, ipaddress.ip_interface),
                                      (IPNetwork, ipaddress.ip_network),
                                      (IPAddress, ipaddress.ip_address)]
    for union, parse in parsers:
        conv.register_structure_hook(union, _structure_with(parse))
    dns_type: Any = DnsState | None
    conv.register_structure_hook(dns_type, _dns_state_in)
    for cls in EFFECT_KINDS.values():
        fields: Any = attrs.fields(cls)  # type: ignore[arg-type]
        secret: dict[str, Any] = {f.name: override(omit=True) for f in fields
                                  if f.metadata.get("secret")}
        conv.register_structure_hook(cls, make_dict_structure_fn(cls, conv, **secret))
    return conv


def _dns_state_in(value: Any, _: Any) -> DnsState | None:
    if value is None:
        return None
    value = dict(value)
    cls = _DNS_KINDS[value.pop("type")]
    state: DnsState = _converter().structure(value, cls)
    return state


def _structure_with(parse: Any) -> Any:
    def structure(value: Any, _type: Any) -> Any:
        return parse(value)

    return structure


def effect_from_dict(data: dict[str, Any]) -> Effect:
    """The inverse of :func:`effect_to_dict`; raises ValueError if invalid."""
    import cattrs

    data = dict(data)
    cls = EFFECT_KINDS.get(str(data.pop("kind", "")))
    if cls is None:
        raise ValueError("unknown effect kind")
    try:
        effect: Effect = _converter().structure(data, cls)
    except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"invalid {cls.__name__} record: {exc}") from None
    return effect


# --- the file format ----------------------------------------------------------


def encode_line(entry: dict[str, Any]) -> bytes:
    payload = json.dumps(entry, separators=(",", ":"), sort_keys=True).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The entry of one line, or None if it is torn or corrupt."""
    if not line.endswith(b"\n") or len(line) < 11 or line[8:9] != b" ":
        return None
    payload = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(payload):
            return None
        entry = json.loads(payload)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


#: A journal entry, or a function building it (called off the trio thread).
Entry = dict[str, Any] | Callable[[], dict[str, Any]]


def journal_name(pid: int, start_time: int) -> str:
    return f"{JOURNAL_PREFIX}{pid}-{start_time}{JOURNAL_SUFFIX}"


def list_journals(state_dir: str) -> list[str]:
    """Paths of the journals in ``state_dir`` (blocking; use a thread)."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    return sorted(os.path.join(state_dir, n) for n in names
                  if n.startswith(JOURNAL_PREFIX) and n.endswith(JOURNAL_SUFFIX))


def ensure_state_dir(state_dir: str) -> None:
    """Create ``state_dir`` with mode 0700 (blocking)."""
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)


# --- reading ------------------------------------------------------------------


@attrs.frozen
class HookRun:
    """A hook process an effect started (a ``hook`` record)."""

    #: "up" (the effect's apply) or "down" (its undo).
    phase: str
    #: Position of the command in the effect's up or down list.
    index: int
    pid: int
    start_time: int | None


@attrs.frozen
class Step:
    """One effect of a journal: its intent and what became of it."""

    seq: int
    tunnel: str
    intent: Effect
    record: Effect | None = None
    undone: bool = False
    #: Hook processes it started, in order.
    hooks: tuple[HookRun, ...] = ()
    #: Why it must not be undone again (running it now would be wrong),
    #: or None.  Set for down hooks the teardown had already gone past.
    stale: str | None = None

    @property
    def down_started(self) -> int | None:
        """Index of the last down hook started, or None."""
        runs = [h.index for h in self.hooks if h.phase == "down"]
        return runs[-1] if runs else None

    @property
    def pending(self) -> Effect | None:
        """What still needs undoing: the applied record, or the intent of an
        effect whose outcome was never recorded (undone through ``abort``)."""
        if self.undone:
            return None
        return self.record if self.record is not None else PendingIntent(self.intent)


@attrs.frozen
class JournalContents:
    path: str
    pid: int | None
    start_time: int | None
    steps: tuple[Step, ...]
    #: Unreadable lines: (line number, why).
    damaged: tuple[tuple[int, str], ...] = ()
    #: Only the last line was unreadable: a write torn by the crash.
    torn_tail: bool = False

    def pending(self) -> list[tuple[Step, Effect]]:
        """Steps still to undo, in the order they were applied."""
        return [(s, e) for s in self.steps if (e := s.pending) is not None]


@attrs.frozen
class PendingIntent(Effect):
    """An intent without a recorded outcome: undone with the effect's
    ``abort`` (idempotent, and safe whether or not the change happened)."""

    intent: Effect

    def describe(self) -> str:
        return f"{self.intent.describe()} (possibly half-applied)"

    async def undo(self, ctx: effects.EffectContext) -> None:
        await self.intent.abort(ctx)

    def undo_timeout(self, ctx: effects.EffectContext) -> float:
        return self.intent.undo_timeout(ctx)

    def adopted(self, ctx: effects.EffectContext) -> None:
        self.intent.adopted(ctx)


def read_journal(path: str) -> JournalContents:
    """Parse a journal (blocking).  Never raises for bad content: unreadable
    lines are reported in ``damaged``; an unreadable file gives no steps."""
    try:
        lines = read_regular_file(path, MAX_JOURNAL_BYTES).splitlines(keepends=True)
    except OSError as exc:
        return JournalContents(path, None, None, (), ((0, f"cannot read: {exc.strerror}"),))
    parsed = _parse(lines)
    steps = parsed.steps
    damaged = parsed.damaged
    torn = bool(damaged) and len(damaged) == 1 and damaged[0][0] == len(lines)
    return JournalContents(path, parsed.pid, parsed.start_time,
                           tuple(steps[k] for k in sorted(steps)), tuple(damaged), torn)


@attrs.define
class _Parsed:
    pid: int | None = None
    start_time: int | None = None
    steps: dict[int, Step] = attrs.field(factory=dict)
    damaged: list[tuple[int, str]] = attrs.field(factory=list)
    #: The ``open`` line, and each step's lines (by seq), as read.
    header: bytes | None = None
    lines: dict[int, list[bytes]] = attrs.field(factory=dict)
    #: Steps whose stale mark was written as a record (not inferred).
    stale_written: set[int] = attrs.field(factory=set)


#: Stands for every effect where only the shape of a journal matters.
_NOT_DECODED = Effect()


def _parse(lines: list[bytes], *,
           decode: Callable[[dict[str, Any]], Effect] = effect_from_dict) -> _Parsed:
    """The steps of a journal's lines (see :func:`read_journal`), with the
    raw lines of each (for compaction), effects read with ``decode``."""
    out = _Parsed()
    steps = out.steps
    damaged = out.damaged
    for number, line in enumerate(lines, 1):
        entry = decode_line(line)
        if entry is None:
            damaged.append((number, "torn or corrupt record"))
            continue
        try:
            op = entry["op"]
            if op == "open":
                out.pid, out.start_time = int(entry["pid"]), int(entry["start_time"])
                out.header = line
                continue
            if op == "intent":
                seq = int(entry["seq"])
                steps[seq] = Step(seq, str(entry["tunnel"]), decode(entry["effect"]))
            elif op == "applied":
                seq = int(entry["seq"])
                steps[seq] = attrs.evolve(steps[seq], record=decode(entry["record"]))
            elif op == "undone":
                seq = int(entry["seq"])
                steps[seq] = attrs.evolve(steps[seq], undone=True)
                _mark_passed(steps, steps[seq])
            elif op == "hook":
                seq = int(entry["seq"])
                run = HookRun(str(entry["phase"]), int(entry["index"]), int(entry["pid"]),
                              None if entry["start_time"] is None else int(entry["start_time"]))
                steps[seq] = attrs.evolve(steps[seq], hooks=(*steps[seq].hooks, run))
            elif op == "stale":
                seq = int(entry["seq"])
                steps[seq] = attrs.evolve(steps[seq], stale=str(entry["why"]))
                out.stale_written.add(seq)
            else:
                damaged.append((number, f"unknown record {op!r}"))
                continue
            out.lines.setdefault(seq, []).append(line)
        except (KeyError, ValueError, TypeError) as exc:
            damaged.append((number, f"unusable record: {exc}"))
    return out


def compacted(lines: list[bytes]) -> list[bytes] | None:
    """The lines of a journal that still matter, in order: its ``open``
    line, then every step not undone with all its lines (a stale mark that
    was only implied by a step now dropped is written out).  Reading the
    result gives the same pending steps as reading ``lines``.  None when a
    line is damaged (a file this process writes never is): leave it.

    Effects are not decoded: each step keeps its raw lines, and what
    decides which to keep (undone, hooks, stale marks) is outside them.
    Decoding was all of its cost: 27 ms of 27 for two tunnels of 1,000
    routes (cattrs building every prefix of every record), during which
    every append waits."""
    parsed = _parse(lines, decode=lambda _data: _NOT_DECODED)
    if parsed.damaged or parsed.header is None:
        return None
    out = [parsed.header]
    for seq in sorted(parsed.steps):
        step = parsed.steps[seq]
        if step.undone:
            continue
        out += parsed.lines[seq]
        if step.stale is not None and seq not in parsed.stale_written:
            out.append(encode_line({"op": "stale", "seq": seq, "why": step.stale}))
    return out


#: Why down hooks the teardown went past are not run again.
PASSED = ("not run again: the teardown had already gone past them (running them now "
          "would be out of order); 'tunsup cleanup --drop' forgets them")


def _mark_passed(steps: dict[int, Step], undone: Step) -> None:
    """``undone`` was undone: down hooks of its tunnel that had started and
    are still pending were gone past (the teardown moved on)."""
    for seq, step in steps.items():
        if (step.tunnel == undone.tunnel and step is not undone and not step.undone
                and step.stale is None and step.down_started is not None):
            steps[seq] = attrs.evolve(step, stale=PASSED)


# --- writing ------------------------------------------------------------------


_QUEUED, _TAKEN, _WRITTEN, _FAILED, _DROPPED = range(5)


class _Ticket:
    """One append on its way to the file (see :meth:`Journal.append`)."""

    __slots__ = ("done", "durable", "entry", "error", "given_up", "own_job", "state", "token")

    def __init__(self, entry: Entry, token: trio.lowlevel.TrioToken, durable: bool) -> None:
        self.entry = entry
        #: Whether it must be fsync'd before its append returns.
        self.durable = durable
        self.token = token
        #: Set (on the trio thread) once it is written or failed.
        self.done = trio.Event()
        self.state = _QUEUED
        self.error: BaseException | None = None
        #: Its caller stopped waiting: a written-off batch must not queue it again.
        self.given_up = False
        #: Its own worker job ran (so the worker already waited for it).
        self.own_job = False


class Journal:
    """The append side, for one running instance.  Appends run on a worker
    thread; each is written with O_APPEND (and, if durable, fsync'd)
    before :meth:`append` returns, together with whatever other tasks
    queued meanwhile (group commit).  Compaction runs on the same thread,
    between writes, after the tickets of the write before it are settled."""

    def __init__(self, state_dir: str, pid: int, start_time: int, *,
                 compact_min: int = COMPACT_MIN) -> None:
        self.path = os.path.join(state_dir, journal_name(pid, start_time))
        self.state_dir = state_dir
        self.pid = pid
        self.start_time = start_time
        self._worker = SerialWorker("tunsup-journal")
        self._fd: int | None = None
        self._seq = 0
        self.appends = 0
        self.fault = FaultPoint.from_env()
        #: Compact once the file is this big and twice its live size.
        self.compact_min = compact_min
        #: Guards the queue and the tickets' states (trio and worker threads).
        self._lock = threading.Lock()
        self._queue: list[_Ticket] = []
        #: Held while writing, syncing or replacing the file, so that a
        #: written-off (wedged) thread and its successor never interleave.
        self._file_lock = threading.Lock()
        #: Bytes in the file.
        self.size = 0
        #: Bytes of each step's records while it is not undone, and the
        #: bytes a compaction would drop (the records of steps undone).
        #: Only those make one worth its cost: a compaction when anything
        #: at all was undone rewrote a journal of 10,000 routes (660 KB,
        #: 130 ms) in the middle of a ``down`` to drop 1 KB; and a
        #: bring-up of 50 tunnels (intents and records only) must not
        #: rewrite anything while every append waits.
        self._step_bytes: dict[int, int] = {}
        self._garbage = 0
        #: After a failed compaction: not again before the file is this big.
        self._retry_at = 0
        #: A compaction job is queued (one at a time).
        self._compaction_posted = False
        #: Writes (each one fsync) and compactions so far.
        self.commits = 0
        self.compactions = 0

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def append(self, entry: Entry, *, durable: bool = True) -> None:
        """Append one entry, durably (fsync'd) unless ``durable`` is False:
        then it is written (a crash of the process cannot lose it) and made
        durable by the next durable append.  ``entry`` may be a function
        building it: it is then called on the worker thread (with effect
        records, that is where the cost is).  Entries other tasks append
        meanwhile share the write and its fsync.

        Raises :class:`HostError` when it is not durable within
        APPEND_TIMEOUT, ``OSError`` when the write fails.  Cancellation: an
        entry not yet being written is dropped; one being written (in this
        call's batch or another's) is waited for within a grace (see
        SerialWorker): if it got written, this returns normally and the
        cancellation comes at the next checkpoint; else it may still land
        late."""
        ticket = _Ticket(entry, trio.lowlevel.current_trio_token(), durable)
        caller_deadline = trio.current_effective_deadline()
        with self._lock:
            self._queue.append(ticket)
        try:
            await self._worker.call(lambda: self._commit(ticket), timeout=APPEND_TIMEOUT,
                                    what=f"append to {self.path}")
        except trio.Cancelled:
            if not await self._written_anyway(ticket, caller_deadline):
                raise
        except BaseException:
            self._give_up(ticket)
            raise
        self.appends += 1

    def append_soon(self, entry: Entry) -> _Ticket:
        """Queue ``entry`` (not durable) without waiting for it: the next
        append's write, or :meth:`flush`, writes it, in order with every
        other entry (one queue, one writing thread).  For records whose
        loss in a crash is harmless (undone records: see the module's
        "Durability"); whoever queues them flushes them before reporting
        what they describe as done."""
        ticket = _Ticket(entry, trio.lowlevel.current_trio_token(), False)
        with self._lock:
            self._queue.append(ticket)
        self.appends += 1
        return ticket

    def append_started(self, entry: Entry) -> _Ticket:
        """:meth:`append_soon`, and its write started at once on the
        journal's thread, with nobody waiting for it: the trio thread goes
        on (to the next change's intent, whose append comes after it in
        the same queue) while it is written.  Not durable.  Whoever starts
        it checks it later (:meth:`failure`, :meth:`flush`)."""
        ticket = self.append_soon(entry)
        self._worker.post(lambda: self._commit_started(ticket), what=f"append to {self.path}")
        return ticket

    def _commit_started(self, ticket: _Ticket) -> None:
        # Its error (if any) stays on the ticket for whoever started it.
        with contextlib.suppress(Exception):
            self._commit(ticket)

    def failure(self, tickets: list[_Ticket], *,
                unwritten: str = "an earlier record was not written (its write did not finish)"
                ) -> BaseException | None:
        """Why the first of ``tickets`` that is not written is not (its
        error, else ``unwritten``), if any.  No wait."""
        with self._lock:
            for ticket in tickets:
                if ticket.state != _WRITTEN:
                    return ticket.error or HostError(f"append to {self.path}: {unwritten}")
        return None

    async def flush(self, tickets: list[_Ticket]) -> None:
        """Wait until ``tickets`` (from :meth:`append_soon`, in the order
        queued) are written, with one write for all still queued.  Raises
        as :meth:`append` when one of them could not be written.
        Cancellation: as :meth:`append` (what is still queued stays queued
        for the next write)."""
        if not tickets:
            return
        with self._lock:
            pending = any(t.state in (_QUEUED, _TAKEN) for t in tickets)
        last = tickets[-1]
        # The queue is first in, first out: writing the last one writes
        # every one before it that an earlier write did not take.
        if pending:  # else written already (started ones usually are)
            await self._worker.call(lambda: self._commit(last), timeout=APPEND_TIMEOUT,
                                    what=f"append to {self.path}")
        error = self.failure(tickets, unwritten="a record was not written")
        if error is not None:
            raise error

    def _give_up(self, ticket: _Ticket) -> bool:
        """The caller stops waiting for ``ticket``: drop it if it is still
        queued.  Returns whether it was written."""
        with self._lock:
            if ticket.state == _QUEUED:
                self._queue.remove(ticket)
                ticket.state = _DROPPED
            ticket.given_up = ticket.state != _WRITTEN
            return ticket.state == _WRITTEN

    async def _written_anyway(self, ticket: _Ticket, caller_deadline: float) -> bool:
        """After a cancellation: whether ``ticket`` got written, waiting
        (shielded, within CANCEL_GRACE and the caller's deadline) for a
        batch of another task's that is writing it."""
        with self._lock:
            wait = ticket.state == _TAKEN and not ticket.own_job
        if wait:
            grace_end = min(trio.current_time() + CANCEL_GRACE, caller_deadline)
            if grace_end > trio.current_time():
                with trio.CancelScope(shield=True, deadline=grace_end):
                    await ticket.done.wait()
        return self._give_up(ticket)

    # --- on the worker thread

    def _commit(self, ticket: _Ticket) -> None:
        """Make ``ticket`` durable: write it with every entry queued now,
        unless an earlier batch already did; then compact if due."""
        with self._lock:
            ticket.own_job = True
            if ticket.state == _TAKEN:  # by a write that was written off
                raise HostError(f"append to {self.path}: an earlier write of this record "
                                "did not finish")
            batch = self._queue if ticket.state == _QUEUED else []
            if batch:
                self._queue = []
                for queued in batch:
                    queued.state = _TAKEN
        if batch:
            with self._file_lock:
                self._write(batch)
                due = self._compaction_due() and not self._compaction_posted
                self._compaction_posted = self._compaction_posted or due
            if due:
                # After this job: whoever waits for this write (a teardown
                # about to report a tunnel down) need not wait for a
                # rewrite of the whole file too (130 ms for 10,000 routes).
                self._worker.post(self._compact_if_due, what=f"compact {self.path}")
        if ticket.state == _FAILED:
            assert ticket.error is not None
            raise ticket.error

    def _write(self, batch: list[_Ticket]) -> None:
        """One write and one fsync for ``batch``; every ticket ends written
        or failed (or, when this thread was written off before writing,
        queued again for its successor)."""
        data: list[bytes] = []
        encoded: list[_Ticket] = []
        for ticket in batch:
            try:
                entry = ticket.entry() if callable(ticket.entry) else ticket.entry
                line = encode_line(entry)
                data.append(line)
                # Counted before the write: a failed write wastes a
                # compaction at worst, a missed one never happens.
                seq = entry.get("seq")
                if isinstance(seq, int):
                    if entry.get("op") == "undone":
                        self._garbage += self._step_bytes.pop(seq, 0) + len(line)
                    else:
                        self._step_bytes[seq] = self._step_bytes.get(seq, 0) + len(line)
            except Exception as exc:
                self._settle([ticket], exc)
            else:
                encoded.append(ticket)
        try:
            self._open()
            # A batch its caller gave up on (reported as failed) is not
            # written late: its successor writes what is still wanted.
            raise_if_abandoned()
            blob = b"".join(data)
            assert self._fd is not None
            written = os.write(self._fd, blob)
            self.size += written
            if written != len(blob):
                raise OSError(f"short write to {self.path}")
            if any(ticket.durable for ticket in encoded):
                os.fsync(self._fd)
        except Abandoned:
            with self._lock:
                again = [t for t in encoded if not t.given_up]
                for ticket in again:
                    ticket.state = _QUEUED
                self._queue[:0] = again
            raise
        except OSError as exc:
            # A full or read-only disk: said as a host error (one line, the
            # journal named), not as an unexpected one.
            error = HostError(f"cannot write the journal {self.path}: {exc.strerror or exc}")
            error.__cause__ = exc
            self._settle(encoded, error)
            return
        except Exception as exc:
            self._settle(encoded, exc)
            return
        self.commits += 1
        self._settle(encoded, None)

    def _settle(self, tickets: list[_Ticket], error: BaseException | None) -> None:
        with self._lock:
            for ticket in tickets:
                ticket.state = _WRITTEN if error is None else _FAILED
                ticket.error = error
        # One wake-up of the trio thread per batch, not one per ticket.
        by_token: dict[trio.lowlevel.TrioToken, list[trio.Event]] = {}
        for ticket in tickets:
            by_token.setdefault(ticket.token, []).append(ticket.done)
        for token, events in by_token.items():
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(_set_all, events)

    def _open(self) -> None:
        """Create the file with its ``open`` record (once)."""
        if self._fd is not None:
            return
        ensure_state_dir(self.state_dir)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            raise_if_abandoned()  # a late thread leaves the journal to its successor
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        header = encode_line({"op": "open", "pid": self.pid, "start_time": self.start_time,
                              "version": FORMAT_VERSION, "created": time.time()})
        self.size = os.write(self._fd, header)
        _fsync_dir(self.state_dir)

    def _compaction_due(self) -> bool:
        return (self._fd is not None and self.size >= max(self.compact_min, self._retry_at)
                and 2 * self._garbage >= self.size)

    def _compact_if_due(self) -> None:
        """The compaction a write made due, as a job of its own (on the
        worker thread, between writes)."""
        with self._file_lock:
            self._compaction_posted = False
            if self._compaction_due():
                self._compact_or_log()

    def _compact_or_log(self) -> None:
        """Compact; a failure is logged and leaves the journal as it was
        (retried once the file has doubled again)."""
        try:
            self._compact()
        except Abandoned:
            raise
        except Exception as exc:
            self._retry_at = 2 * self.size
            log.warning("journal %s: compaction failed, the journal is kept as it is: %s",
                        self.path, exc)

    def _compact(self) -> None:
        """Rewrite the journal with what is still applied: a new file,
        fsync'd, renamed over the journal, then the directory fsync'd.  A
        crash anywhere leaves the old journal or the new one, both
        complete.  Holds the file lock (no append interleaves)."""
        assert self._fd is not None
        with open(self.path, "rb") as f:
            lines = f.readlines()
        kept = compacted(lines)
        if kept is None:
            raise OSError("a record is damaged")
        data = b"".join(kept)
        tmp = self.path + COMPACT_SUFFIX
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            if self.fault.due("compact-write"):
                os.write(fd, data[:len(data) // 2])
                self.fault.crash()
            if os.write(fd, data) != len(data):
                raise OSError(f"short write to {tmp}")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.fault.hit("compact-written")
        raise_if_abandoned()
        os.rename(tmp, self.path)
        self.fault.hit("compact-renamed")
        _fsync_dir(self.state_dir)
        fresh = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = fresh
        log.debug("journal compacted: %d -> %d bytes", self.size, len(data))
        self.size = len(data)
        self._garbage = self._retry_at = 0
        self.compactions += 1

    async def close(self, *, remove: bool) -> None:
        """Close the file; with ``remove`` (everything was undone) delete it.
        Nothing touches the disk when nothing was ever appended (a stop
        during recovery on a hung state disk must not wait for it)."""
        if self._fd is None and self.appends == 0:
            self._worker.close()
            return

        def job() -> None:
            with self._file_lock:
                if self._fd is not None:
                    os.close(self._fd)
                    self._fd = None
                if remove:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)

        try:
            await self._worker.call(job, timeout=APPEND_TIMEOUT, what=f"close {self.path}")
        finally:
            self._worker.close()


def _set_all(events: list[trio.Event]) -> None:
    for event in events:
        event.set()


def _fsync_dir(path: str) -> None:
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class JournalObserver:
    """Connects one tunnel's :class:`~tunsup.engine.undo.EffectStack` to the journal."""

    def __init__(self, journal: Journal, tunnel: str) -> None:
        self.journal = journal
        self.tunnel = tunnel
        self._seqs: dict[int, int] = {}
        self._pending_intent: dict[int, int] = {}
        #: Records queued by :meth:`undone_soon` or started by
        #: :meth:`applied`, not yet flushed.
        self._unflushed: list[_Ticket] = []
        #: Applied records started since the last intent.
        self._applied: list[_Ticket] = []

    async def intent(self, effect: Effect) -> None:
        seq = self.journal.next_seq()
        self._pending_intent[id(effect)] = seq
        tunnel = self.tunnel
        # The applied records started before it (not those another task
        # of this tunnel starts meanwhile: a helper starting while the link
        # is configured) are queued before it, so written first: one that
        # is not (its write failed, or a written-off thread left it
        # behind) fails this change before it is made, as its own append
        # would have.  The intent, written, is then closed at once: no
        # change was made for it.
        applied, self._applied = self._applied, []
        try:
            await self.journal.append(lambda: {"op": "intent", "seq": seq, "tunnel": tunnel,
                                               "effect": effect_to_dict(effect)})
        except BaseException:
            self._applied[:0] = applied  # still to be checked (or flushed)
            raise
        error = self.journal.failure(applied)
        if error is not None:
            del self._pending_intent[id(effect)]
            self._unflushed.append(self.journal.append_soon({"op": "undone", "seq": seq}))
            raise error
        self.journal.fault.hit("intent")

    async def applied(self, intent: Effect, record: Effect) -> None:
        self.journal.fault.hit("effect")  # applied, not yet recorded
        seq = self._pending_intent.pop(id(intent))
        self._seqs[id(record)] = seq
        # Written before the next change either way (a SIGKILL cannot lose
        # it); fsync'd only when the change outlives a reboot (see the
        # module's "Durability").
        durable = not (intent.gone_on_reboot and record.gone_on_reboot)

        def entry() -> dict[str, Any]:
            return {"op": "applied", "seq": seq, "record": effect_to_dict(record)}

        if durable:
            await self.journal.append(entry)
        else:
            # Written at once, but not waited for: the next change's intent
            # is queued behind it (one queue, one thread, in order), so it
            # is still written before the next change is made, and the
            # bring-up waits for what is left before reporting anything
            # done (:meth:`flush`).  One trip to the journal's thread less
            # per change: ~0.5-1 ms of each on a 2-vCPU machine.
            ticket = self.journal.append_started(entry)
            self._applied.append(ticket)
            self._unflushed.append(ticket)
            if self.journal.fault.kind == "applied":
                # The crash point means "right after its record is written".
                await self.flush()
        self.journal.fault.hit("applied")

    async def undone(self, record: Effect) -> None:
        seq = self._seqs.pop(id(record), None)
        if seq is not None:
            # Not fsync'd: losing it to a power cut only makes a later
            # recovery undo again what is already gone (undo is idempotent:
            # every undo checks that its object is still there and still
            # ours), while a teardown saves one fsync per record.
            await self.journal.append({"op": "undone", "seq": seq}, durable=False)

    def undone_soon(self, record: Effect) -> None:
        """:meth:`undone` without waiting for the write: an unwind queues
        its undone records and writes them all at its end (:meth:`flush`),
        one write instead of one trip to the journal's thread per record
        on the path of a stop.  Safe for the same reason they are not
        fsync'd: a crash that loses queued ones only makes recovery undo
        again what is gone; and the queue keeps them in order, before
        anything appended later."""
        seq = self._seqs.pop(id(record), None)
        if seq is not None:
            self._unflushed.append(self.journal.append_soon({"op": "undone", "seq": seq}))

    async def flush(self) -> None:
        """Wait until the records queued by :meth:`undone_soon` or started
        by :meth:`applied` are written; raises as :meth:`Journal.append`
        when one of them was not.  Cancellation: as :meth:`Journal.append`."""
        tickets, self._unflushed = self._unflushed, []
        self._applied = []
        await self.journal.flush(tickets)

    async def hook_started(self, effect: Effect, phase: str, index: int, pid: int,
                           start_time: int | None) -> None:
        """Record a hook process of ``effect`` (applied or being applied),
        so that recovery can end it if it outlives this instance.  A failed
        append is logged: the hook still runs.  Cancellation: as
        :meth:`Journal.append`."""
        seq = self._seqs.get(id(effect), self._pending_intent.get(id(effect)))
        if seq is None:
            return
        try:
            await self.journal.append({"op": "hook", "seq": seq, "phase": phase, "index": index,
                                       "pid": pid, "start_time": start_time})
        except Exception as exc:
            log.warning("journal: cannot record hook pid %d: %s", pid, exc)


# --- fault points (tests only) ------------------------------------------------

#: Test-only: ``intent:N`` SIGKILLs the process right after the Nth intent is
#: durable (before the change), ``effect:N`` right after the Nth change is
#: made (before it is recorded), ``applied:N`` right after its record is
#: durable; ``routes:K`` once K routes of a bulk batch are installed.  The
#: Nth compaction of the journal: ``compact-write:N`` half-way through
#: writing the new file, ``compact-written:N`` once it is written and
#: fsync'd (not yet renamed), ``compact-renamed:N`` right after the rename
#: (before the directory is fsync'd).  Off unless set; never set it in
#: production.
FAULT_ENV = "TUNSUP_CRASH_AT"
FAULT_KINDS = ("intent", "effect", "applied", "routes", "compact-write", "compact-written",
               "compact-renamed")


@attrs.define
class FaultPoint:
    kind: str | None = None
    n: int = 0
    seen: dict[str, int] = attrs.field(factory=dict)

    @classmethod
    def from_env(cls) -> FaultPoint:
        spec = os.environ.get(FAULT_ENV, "")
        kind, _, n = spec.partition(":")
        if kind not in FAULT_KINDS or not n.isdigit():
            return cls()
        return cls(kind, int(n))

    def due(self, kind: str) -> bool:
        """Count one ``kind`` event; whether it is the Nth (crash now)."""
        if self.kind != kind:
            return False
        self.seen[kind] = self.seen.get(kind, 0) + 1
        return self.seen[kind] >= self.n

    def hit(self, kind: str) -> None:
        """Count one ``kind`` event; crash on the Nth."""
        if self.due(kind):
            self.crash()

    def total(self, kind: str, total: int) -> None:
        """Report a running total (routes installed); crash once it reaches N."""
        if self.kind == kind and total >= self.n:
            self.crash()

    def crash(self) -> None:
        # stderr directly: the log writer thread would die with us.
        os.write(2, f"{FAULT_ENV}={self.kind}:{self.n}: SIGKILL (test fault point)\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
