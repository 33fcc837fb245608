#!/usr/bin/env python3
"""Check that the race suite's ``ci`` profile replays exactly: inject one
bug of ``scripts/race_bugs.py`` (default: "jitter ignored", found only
through the seeded restart jitter), run the race suite (both property
tests) twice in fresh
processes, and compare the failing example's report (its schedule, jitter
seed, transitions with their virtual times, faults fired, the assertion).

Usage::

    scripts/race_replay.py [BUG NAME SUBSTRING]

Exit 0 when both runs failed with the same report, 1 otherwise.  The file
is restored even when interrupted (as ``race_bugs.py`` does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import race_bugs

ROOT = race_bugs.ROOT


def failing_report() -> list[str]:
    """The property test's failure report, as lines (empty if it passed)."""
    env = {**os.environ, "TUNSUP_RACE_PROFILE": "ci", "PYTHONPATH": str(ROOT / "scripts"),
           "PYTEST_ADDOPTS": "-p noshrink"}
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
         *race_bugs.RACE_SUITE],
        cwd=ROOT, env=env, text=True, capture_output=True, timeout=600).stdout
    # The assertion and Hypothesis' notes (schedule, transitions, faults):
    # everything pytest prints with the "E" prefix.
    return [line for line in out.splitlines() if line.startswith("E ")]


def main() -> int:
    wanted = sys.argv[1] if len(sys.argv) > 1 else "jitter ignored"
    bug = next(b for b in race_bugs.BUGS if wanted in b.name)
    path = ROOT / bug.file
    original = path.read_text()
    if original.count(bug.original) != 1:
        print(f"cannot inject {bug.name!r}: the code changed", file=sys.stderr)
        return 1
    for signum in race_bugs.STOP_SIGNALS:
        signal.signal(signum, race_bugs.on_signal)
    try:
        path.write_text(original.replace(bug.original, bug.buggy))
        first, second = failing_report(), failing_report()
    finally:
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, race_bugs.STOP_SIGNALS)
        path.write_text(original)
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    if not first:
        print(f"{bug.name}: the ci profile did not fail: nothing to replay")
        return 1
    if first != second:
        print(f"{bug.name}: the two runs differ")
        for a, b in zip(first, second, strict=False):
            if a != b:
                print(f"  first:  {a}\n  second: {b}")
                break
        return 1
    print(f"{bug.name}: both runs failed identically ({len(first)} report lines)")
    print("\n".join(first))
    return 0


if __name__ == "__main__":
    sys.exit(main())
