#!/usr/bin/env python3
"""Proof that the tests bite: inject each hand-written lifecycle bug into the
working tree (one at a time: edit, run the tests, restore) and report
whether the tests found it, by which test, and after how many Hypothesis
examples.

Usage::

    scripts/race_bugs.py [--whole] [--list] [SUBSTRING]

By default the race suite alone runs (``tests/test_races.py`` and
``tests/test_races_crash.py``, their ``ci``
profile); ``--whole`` runs the whole suite (``pytest -x -q tests``; tests
that need root and network namespaces skip themselves when not root).
SUBSTRING picks the bugs whose name contains it.  Every file is restored
even when a run fails or the script is interrupted (Ctrl-C, SIGTERM), and
``git diff`` of the touched files is checked to be what it was before.
The last results are in tests/RACES.md ("Bug set").
"""

from __future__ import annotations

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import NamedTuple

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: One run of the tests longer than this counts as a hang (found: CI's
#: per-test timeout would fail it).
RUN_LIMIT = {"race": 600.0, "whole": 3600.0}


class Bug(NamedTuple):
    name: str
    file: str
    original: str
    buggy: str


E, T, S, U = ("tunsup/engine/effects.py", "tunsup/engine/tunnel.py",
              "tunsup/engine/supervisor.py", "tunsup/engine/undo.py")
R, P, REC = "tunsup/engine/restart.py", "tunsup/host/process.py", "tunsup/engine/recovery.py"
ROUTING, CLAIMS = "tunsup/engine/routing.py", "tunsup/host/claims.py"

BUGS: list[Bug] = [
    # --- the original five -----------------------------------------------------
    Bug("skip one undo step (addresses)", U,
        "                record = self._records.pop()\n",
        "                record = self._records.pop()\n"
        "                if record.describe().startswith('address'):\n"
        "                    continue\n"),
    Bug("undo in the wrong order", U,
        "record = self._records.pop()", "record = self._records.pop(0)"),
    Bug("backoff sleep ignores cancellation", T,
        "            await trio.sleep(delay)\n",
        "            with trio.CancelScope(shield=True):\n"
        "                await trio.sleep(delay)\n"),
    Bug("a double start proceeds", S,
        "        if self._used:\n            raise RuntimeError",
        "        if False:\n            raise RuntimeError"),
    Bug("a helper exit is swallowed", T,
        "                await handle.exited.wait()\n"
        "                nursery.cancel_scope.cancel()",
        "                await trio.sleep_forever()\n"
        "                nursery.cancel_scope.cancel()"),
    # --- undo stack -------------------------------------------------------------
    Bug("unwind not shielded from cancellation", U,
        "        with trio.CancelScope(shield=True):\n            while self._records:",
        "        with trio.CancelScope(shield=False):\n            while self._records:"),
    Bug("a failing undo step ends the unwind", U,
        "undone, failures, remaining)\n                deleted = ",
        "undone, failures, remaining)\n"
        "                if not ok:\n"
        "                    break\n"
        "                deleted = "),
    Bug("a cancelled apply is not aborted (except Exception)", U,
        "            record = await effect.apply(self._ctx)\n        except BaseException:",
        "            record = await effect.apply(self._ctx)\n        except Exception:"),
    Bug("abort of a failed apply not shielded", U,
        "            with ctx.cleaning_up(), trio.CancelScope(shield=True) as scope:",
        "            with ctx.cleaning_up(), trio.CancelScope(shield=False) as scope:"),
    # --- restart policy -----------------------------------------------------------
    Bug("off-by-one in restart counting (>=)", R,
        "if len(self._failures) > self.policy.max_restarts:",
        "if len(self._failures) >= self.policy.max_restarts:"),
    Bug("failures outside the window still count", R,
        "        self._failures.append(now)\n        self._expire(now)\n",
        "        self._failures.append(now)\n"),
    Bug("backoff never grows (attempt not counted)", R,
        "        self.attempt += 1\n", ""),
    Bug("jitter ignored", R,
        "return base / 2 + self._rng.uniform(0.0, base / 2)", "return base"),
    Bug("backoff reset never happens", T,
        "        self._tracker.reset()\n", ""),
    # --- tunnel -------------------------------------------------------------------
    Bug("restarted generation registered only once complete", T,
        "                    gen = self._new_generation(ctx)\n"
        "                    handle = await self._start_generation(gen, ctx)\n",
        "                    gen = EffectStack(ctx, log=self.log, observer=self._observer)\n"
        "                    handle = await self._start_generation(gen, ctx)\n"
        "                    ctx.generations[self.name] = gen\n"),
    Bug("first generation's record pushed after the helper started", T,
        "            await stack.apply(HelperGeneration(spec.name))\n"
        "            await self._start_generation(self._new_generation(ctx), ctx)\n",
        "            await self._start_generation(self._new_generation(ctx), ctx)\n"
        "            await stack.apply(HelperGeneration(spec.name))\n"),
    Bug("dead generation's unwind not awaited", T,
        "        await self._end_generation(ctx)\n"
        '        self.log.warning("helper died while',
        "        self._end_generation(ctx)\n"
        '        self.log.warning("helper died while'),
    Bug("a failed restart's partial generation is not unwound", T,
        "                self.helper_pid = None\n"
        "                await self._end_generation(ctx)\n"
        '                self.log.warning("restart failed',
        "                self.helper_pid = None\n"
        '                self.log.warning("restart failed'),
    Bug("a failure grouped with cancellations is taken for a stop", T,
        "return exc.split(trio.Cancelled)[1] is None",
        "return exc.split(trio.Cancelled)[0] is not None"),
    # --- supervisor ---------------------------------------------------------------
    Bug("signal watcher awaits a reload", S,
        "        async for signum in receiver:\n            self._on_signal(signum)\n",
        "        async for signum in receiver:\n"
        "            if (signum == RELOAD_SIGNAL and self._reload is not None\n"
        "                    and self._root is not None and self.stop_reason is None):\n"
        "                await self._reload_task()\n"
        "            else:\n"
        "                self._on_signal(signum)\n"),
    Bug("one tunnel's failure cancels the root nursery", S,
        "            if not tunnel.was_up:\n                raise\n"
        "            self._failed_slots[tunnel.name] = slot\n",
        "            raise\n"),
    Bug("remove does not wait for the teardown", S,
        "        slot.scope.cancel()\n        await slot.done.wait()\n",
        "        slot.scope.cancel()\n"),
    # --- effects ------------------------------------------------------------------
    Bug("helper handle never registered (forgotten registration)", E,
        "        ctx.helpers[handle.pid] = handle\n", ""),
    Bug("helper grace ignores the undo step's deadline", E,
        "        grace = max(0.0, min(ctx.stop_grace, left - 1.0))\n        reaped =",
        "        grace = ctx.stop_grace\n        reaped ="),
    Bug("routes record claims prefixes that already existed", E,
        "                     elapsed * 1000)\n"
        "        return attrs.evolve(self, prefixes=tuple(result.added))\n",
        "                     elapsed * 1000)\n"
        "        return self\n"),
    Bug("a failed set-down aborts the link delete", E,
        '        ctx.log.warning("setting %s down failed (deleting it anyway): %s", name, exc)\n',
        "        raise\n"),
    # --- helper processes (host/process.py) ---------------------------------------
    Bug("SIGKILL never sent after the grace", P,
        "            self.signal(signal.SIGKILL)\n",
        "            self.signal(signal.SIGTERM)\n"),
    Bug("reap not awaited after SIGKILL", P,
        "            with trio.move_on_after(kill_wait):\n"
        "                await self.exited.wait()\n",
        "            return True\n"),
    Bug("helper watcher not shielded", P,
        "        scope = trio.CancelScope(shield=True)\n",
        "        scope = trio.CancelScope()\n"),
    Bug("a start cancelled after the spawn leaks the helper", P,
        "    except BaseException:\n        # Cancelled (a stop",
        "    except Exception:\n        # Cancelled (a stop"),
    # --- crash recovery -----------------------------------------------------------
    Bug("recovery undoes a live instance's journal", REC,
        "        if alive:\n            live.append",
        "        if False:\n            live.append"),
    Bug("recovery undoes in journal order, not reverse", REC,
        "        stack.adopt(pending)\n", "        stack.adopt(pending[::-1])\n"),
    Bug("recovery for a restart keeps no kill switch", REC,
        "    if keep is None:\n        return {}\n",
        "    if True:\n        return {}\n"),
    Bug("an intent without its outcome is not undone", "tunsup/engine/journal.py",
        "        return self.record if self.record is not None else PendingIntent(self.intent)",
        "        return self.record"),
    Bug("a helper stuck after a failed start is forgotten", E,
        "                    ctx.unreaped[self.ifname] = helper\n",
        "                    pass\n"),
    # --- full tunnel: tables, rule priorities, holds ---------------------------
    Bug("table claims never released", CLAIMS,
        "        self._tables = {t: o for t, o in self._tables.items() if o is not owner}\n", ""),
    Bug("a rebuild's hold rules count when picking priorities", ROUTING,
        "        ignored = held.rules if held is not None else ()\n",
        "        ignored = ()\n"),
    Bug("a rebuild does not reuse its hold's table", ROUTING,
        "    if table is None and held is not None:\n",
        "    if False:\n"),
    Bug("no kill switch for the default route", ROUTING,
        "    if kill_switch:\n        await stack.apply(KillSwitch(name, table, plan.defaults))",
        "    if False:\n        await stack.apply(KillSwitch(name, table, plan.defaults))"),
    # --- the link while up ------------------------------------------------------
    Bug("an owned TUN keeps the MTU its helper set", T,
        "        if self.options.tun_mode == \"owned\":\n"
        "            await gen.apply(Mtu(spec.name, index, self._mtu))",
        "        if self.options.tun_mode == \"owned\":\n"
        "            pass"),
    Bug("an in-place MTU change is not made", T,
        "        if mtu != self._mtu:\n",
        "        if mtu != self._mtu and False:\n"),
    Bug("a restart after an in-place MTU change sets the old MTU", T,
        "self.spec, self._endpoints, self._plan, self._mtu, self._request = spec, *state",
        "self.spec, self._endpoints, self._plan, _, self._request = spec, *state"),
]

#: Hypothesis statistics of the test that failed: old ("N passing
#: examples, M failing examples") and new ("N passing, M failing") wording.
PHASE = re.compile(r"during (\w+) phase.*?(\d+) passing(?: examples)?, (\d+) failing", re.S)
FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.M)


#: The race suite: lifecycle schedules, and a crash at any point of one
#: followed by recovery.
RACE_SUITE = ("tests/test_races.py", "tests/test_races_crash.py")


class Outcome(NamedTuple):
    found: bool
    by: str
    examples: str
    seconds: float


def command(whole: bool) -> list[str]:
    base = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
            "--hypothesis-show-statistics"]
    return [*base, "tests"] if whole else [*base, *RACE_SUITE]


def run_tests(whole: bool) -> Outcome:
    """Run the tests in a child we own (its own process group, so that it
    can be stopped without touching anything else)."""
    started = time.monotonic()
    env = {**os.environ, "TUNSUP_RACE_PROFILE": "ci", "PYTHONPATH": str(ROOT / "scripts"),
           "PYTEST_ADDOPTS": "-p noshrink"}
    child = subprocess.Popen(command(whole), cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        out, _ = child.communicate(timeout=RUN_LIMIT["whole" if whole else "race"])
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return Outcome(True, "(hang: run limit)", "-", time.monotonic() - started)
    except BaseException:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        raise
    took = time.monotonic() - started
    if child.returncode == 0:
        return Outcome(False, "", "", took)
    failed = FAILED.findall(out)
    by = failed[0].split("::")[-1] if failed else f"(pytest exit {child.returncode})"
    # The statistics of the failing test: the section after its header.
    section = out
    if failed and f"{failed[0]}:" in out:
        section = out.split(f"{failed[0]}:", 1)[1]
    examples = "-"
    for phase, passing, failing in PHASE.findall(section):
        if int(failing):
            examples = (str(int(passing) + 1) if phase == "generate"
                        else f"{phase} phase")
            break
    return Outcome(True, by, examples, took)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def on_signal(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def diff_of(files: list[str]) -> str:
    return subprocess.run(["git", "diff", "--", *files], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="?", default="", help="run the bugs whose name has this")
    parser.add_argument("--whole", action="store_true", help="run the whole suite (pytest tests)")
    parser.add_argument("--list", action="store_true", help="list the bugs and exit")
    args = parser.parse_args()
    chosen = [b for b in BUGS if args.only in b.name]
    if args.list:
        for bug in chosen:
            print(f"{bug.file}: {bug.name}")
        return 0
    files = sorted({b.file for b in chosen})
    originals = {f: (ROOT / f).read_text() for f in files}
    diff_before = diff_of(files)
    for signum in STOP_SIGNALS:  # SIGINT too: a background job inherits it ignored
        signal.signal(signum, on_signal)
    print(f"{len(chosen)} bug(s); tests: {' '.join(command(args.whole)[3:])}", flush=True)
    print("| injected bug | file | found | by | examples | s |\n|---|---|---|---|---|---|",
          flush=True)
    missed = 0
    try:
        for bug in chosen:
            path = ROOT / bug.file
            original = originals[bug.file]
            if original.count(bug.original) != 1:
                print(f"| {bug.name} | `{bug.file}` | cannot inject (the code changed: "
                      f"{original.count(bug.original)} matches) | | | |", flush=True)
                missed += 1
                continue
            path.write_text(original.replace(bug.original, bug.buggy))
            try:
                result = run_tests(args.whole)
            finally:
                path.write_text(original)
            print(f"| {bug.name} | `{bug.file.removeprefix('tunsup/')}` | "
                  f"{'yes' if result.found else '**no**'} | {result.by} | "
                  f"{result.examples if result.found else ''} | {result.seconds:.0f} |",
                  flush=True)
            missed += not result.found
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        missed += 1
    finally:
        # No second Ctrl-C may cut the restore short.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        for f, text in originals.items():
            (ROOT / f).write_text(text)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if diff_of(files) != diff_before:
        print(f"FILES NOT RESTORED: {files}", file=sys.stderr)
        return 2
    print(f"found {len(chosen) - missed} of {len(chosen)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
