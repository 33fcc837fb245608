"""Crash-safe write-ahead journal of host changes.

Before an effect is applied its *intent* is appended and fsync'd; once it
is applied its *record* is appended; once it is undone, that too.  After a
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
import time
import zlib
from collections.abc import Callable
from typing import Any

import attrs

from ..config.spec import IPAddress, IPInterface, IPNetwork, network_text
from ..host.dns import DnsState, FileDnsState, ResolvconfDnsState, ResolvedDnsState
from ..host.worker import SerialWorker, raise_if_abandoned
from . import effects
from .effects import Effect

log = logging.getLogger("tunsup.journal")

JOURNAL_PREFIX = "journal-"
JOURNAL_SUFFIX = ".log"
FORMAT_VERSION = 1
#: Bound on one append + fsync.
APPEND_TIMEOUT = 10.0

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
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as exc:
        return JournalContents(path, None, None, (), ((0, f"cannot read: {exc.strerror}"),))
    pid = start = None
    steps: dict[int, Step] = {}
    damaged: list[tuple[int, str]] = []
    for number, line in enumerate(lines, 1):
        entry = decode_line(line)
        if entry is None:
            damaged.append((number, "torn or corrupt record"))
            continue
        try:
            op = entry["op"]
            if op == "open":
                pid, start = int(entry["pid"]), int(entry["start_time"])
            elif op == "intent":
                seq = int(entry["seq"])
                steps[seq] = Step(seq, str(entry["tunnel"]), effect_from_dict(entry["effect"]))
            elif op == "applied":
                seq = int(entry["seq"])
                steps[seq] = attrs.evolve(steps[seq], record=effect_from_dict(entry["record"]))
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
            else:
                damaged.append((number, f"unknown record {op!r}"))
        except (KeyError, ValueError, TypeError) as exc:
            damaged.append((number, f"unusable record: {exc}"))
    torn = bool(damaged) and len(damaged) == 1 and damaged[0][0] == len(lines)
    return JournalContents(path, pid, start, tuple(steps[k] for k in sorted(steps)),
                           tuple(damaged), torn)


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


class Journal:
    """The append side, for one running instance.  Appends are serialized
    on a worker thread; each is written with O_APPEND and fsync'd before
    :meth:`append` returns."""

    def __init__(self, state_dir: str, pid: int, start_time: int) -> None:
        self.path = os.path.join(state_dir, journal_name(pid, start_time))
        self.state_dir = state_dir
        self.pid = pid
        self.start_time = start_time
        self._worker = SerialWorker("tunsup-journal")
        self._fd: int | None = None
        self._seq = 0
        self.appends = 0
        self.fault = FaultPoint.from_env()

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _append_sync(self, entry: Entry, durable: bool = True) -> None:
        data = encode_line(entry() if callable(entry) else entry)
        if self._fd is None:
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
            os.write(self._fd, header)
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        # An append its caller gave up on (reported as failed) is not written late.
        raise_if_abandoned()
        written = os.write(self._fd, data)
        if written != len(data):
            raise OSError(f"short write to {self.path}")
        if durable:
            os.fsync(self._fd)

    async def append(self, entry: Entry, *, durable: bool = True) -> None:
        """Append one entry, durably (fsync'd) unless ``durable`` is False:
        then it is written (a crash of the process cannot lose it) and made
        durable by the next durable append.  ``entry`` may be a function
        building it: it is then called on the worker thread (with effect
        records, that is where the cost is).  Cancellation: a queued append
        is skipped; one being written completes within a grace, else it is
        abandoned (see SerialWorker)."""
        await self._worker.call(lambda: self._append_sync(entry, durable),
                                timeout=APPEND_TIMEOUT, what=f"append to {self.path}")
        self.appends += 1

    async def close(self, *, remove: bool) -> None:
        """Close the file; with ``remove`` (everything was undone) delete it.
        Nothing touches the disk when nothing was ever appended (a stop
        during recovery on a hung state disk must not wait for it)."""
        if self._fd is None and self.appends == 0:
            self._worker.close()
            return

        def job() -> None:
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


class JournalObserver:
    """Connects one tunnel's :class:`~tunsup.engine.undo.EffectStack` to the journal."""

    def __init__(self, journal: Journal, tunnel: str) -> None:
        self.journal = journal
        self.tunnel = tunnel
        self._seqs: dict[int, int] = {}
        self._pending_intent: dict[int, int] = {}

    async def intent(self, effect: Effect) -> None:
        seq = self.journal.next_seq()
        self._pending_intent[id(effect)] = seq
        tunnel = self.tunnel
        await self.journal.append(lambda: {"op": "intent", "seq": seq, "tunnel": tunnel,
                                           "effect": effect_to_dict(effect)})
        self.journal.fault.hit("intent")

    async def applied(self, intent: Effect, record: Effect) -> None:
        self.journal.fault.hit("effect")  # applied, not yet recorded
        seq = self._pending_intent.pop(id(intent))
        self._seqs[id(record)] = seq
        await self.journal.append(lambda: {"op": "applied", "seq": seq,
                                           "record": effect_to_dict(record)})
        self.journal.fault.hit("applied")

    async def undone(self, record: Effect) -> None:
        seq = self._seqs.pop(id(record), None)
        if seq is not None:
            # Not fsync'd: losing it to a power cut only makes a later
            # recovery undo again what is already gone (undo is idempotent:
            # every undo checks that its object is still there and still
            # ours), while a teardown saves one fsync per record.
            await self.journal.append({"op": "undone", "seq": seq}, durable=False)

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
#: durable; ``routes:K`` once K routes of a bulk batch are installed.  Off
#: unless set; never set it in production.
FAULT_ENV = "TUNSUP_CRASH_AT"


@attrs.define
class FaultPoint:
    kind: str | None = None
    n: int = 0
    seen: dict[str, int] = attrs.field(factory=dict)

    @classmethod
    def from_env(cls) -> FaultPoint:
        spec = os.environ.get(FAULT_ENV, "")
        kind, _, n = spec.partition(":")
        if kind not in ("intent", "effect", "applied", "routes") or not n.isdigit():
            return cls()
        return cls(kind, int(n))

    def hit(self, kind: str) -> None:
        """Count one ``kind`` event; crash on the Nth."""
        if self.kind == kind:
            self.seen[kind] = self.seen.get(kind, 0) + 1
            self._check(self.seen[kind])

    def total(self, kind: str, total: int) -> None:
        """Report a running total (routes installed); crash once it reaches N."""
        if self.kind == kind:
            self._check(total)

    def _check(self, count: int) -> None:
        if count >= self.n:
            # stderr directly: the log writer thread would die with us.
            os.write(2, f"{FAULT_ENV}={self.kind}:{self.n}: SIGKILL (test fault point)\n".encode())
            os.kill(os.getpid(), signal.SIGKILL)
