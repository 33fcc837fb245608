#!/usr/bin/env python3
"""Proof that the race suite bites: inject each known lifecycle bug into the
working tree (edit, run ``tests/test_races.py``, restore), and
report whether the suite found it and after how many examples.

Usage: ``scripts/race_bugs.py [substring-of-a-bug-name]``.  Every file is
restored even when the run fails or is interrupted; ``git diff`` must be
empty afterwards.  See tests/RACES.md for the last results.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

#: name -> (file, original text, buggy text)
BUGS: dict[str, tuple[str, str, str]] = {
    "skip one undo step (addresses)": (
        "tunsup/engine/undo.py",
        "                what = record.describe()\n",
        "                what = record.describe()\n"
        "                if what.startswith('address'):\n"
        "                    continue\n"),
    "undo in the wrong order": (
        "tunsup/engine/undo.py", "record = self._records.pop()", "record = self._records.pop(0)"),
    "backoff sleep ignores cancellation": (
        "tunsup/engine/tunnel.py",
        "            await trio.sleep(delay)\n",
        "            with trio.CancelScope(shield=True):\n"
        "                await trio.sleep(delay)\n"),
    "a double start proceeds": (
        "tunsup/engine/supervisor.py",
        "        if self._used:\n            raise RuntimeError",
        "        if False:\n            raise RuntimeError"),
    "a helper exit is swallowed": (
        "tunsup/engine/tunnel.py",
        "                await handle.exited.wait()\n"
        "                nursery.cancel_scope.cancel()",
        "                await trio.sleep_forever()\n"
        "                nursery.cancel_scope.cancel()"),
}

GENERATE = re.compile(r"during generate phase.*?(\d+) passing examples", re.S)


def main() -> int:
    only = sys.argv[1] if len(sys.argv) > 1 else ""
    missed = 0
    for name, (rel, old, new) in BUGS.items():
        if only not in name:
            continue
        path = ROOT / rel
        original = path.read_text()
        if original.count(old) != 1:
            print(f"{name}: cannot inject (the code changed)")
            missed += 1
            continue
        path.write_text(original.replace(old, new))
        try:
            run = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", "-x",
                 "tests/test_races.py", "--hypothesis-show-statistics"],
                cwd=ROOT, capture_output=True, text=True, check=False)
        finally:
            path.write_text(original)
        found = run.returncode != 0
        match = GENERATE.search(run.stdout)
        took = f"after {int(match.group(1)) + 1} example(s)" if match and found else ""
        print(f"{name}: {'found' if found else 'NOT found'} {took}".rstrip(), flush=True)
        missed += not found
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
