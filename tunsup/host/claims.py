"""Numbers the tunnels of one process take from the host's shared spaces:
policy routing tables (a full tunnel's table is also its fwmark) and rule
priorities.

A tunnel picks a free table by asking the host which tables are in use,
and rule priorities by looking at the rules there.  Two tunnels starting at
once would both see the same free number (neither has added its routes or
rules yet), so each number is *claimed* here first, with no wait between
the last look and the claim: the trio thread runs one task at a time, so
the look-and-claim is atomic.  A tunnel releases its claims once its
teardown has run.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Claims:
    """Tables and rule priorities claimed by the tunnels of this process.
    Not thread-safe: used from the trio thread only."""

    def __init__(self) -> None:
        self._tables: dict[int, object] = {}
        self._priorities: dict[tuple[int, int], object] = {}

    def table_free(self, table: int, owner: object) -> bool:
        """Whether ``table`` is unclaimed or claimed by ``owner``."""
        return self._tables.get(table, owner) is owner

    def claim_table(self, table: int, owner: object) -> bool:
        """Claim ``table`` for ``owner``; False if another owner has it."""
        if not self.table_free(table, owner):
            return False
        self._tables[table] = owner
        return True

    def priorities(self, family: int) -> list[int]:
        """Rule priorities claimed for IPv``family`` (by anyone)."""
        return [priority for fam, priority in self._priorities if fam == family]

    def claim_priorities(self, family: int, priorities: Iterable[int], owner: object) -> None:
        """Claim rule ``priorities`` of IPv``family`` for ``owner``."""
        for priority in priorities:
            self._priorities[(family, priority)] = owner

    def owners(self) -> dict[str, dict[Any, object]]:
        """What is claimed now, for diagnostics and tests: ``tables``
        (table -> owner) and ``priorities`` ((family, priority) -> owner)."""
        return {"tables": dict(self._tables), "priorities": dict(self._priorities)}

    def release(self, owner: object) -> None:
        """Drop every claim of ``owner`` (its teardown has run)."""
        self._tables = {t: o for t, o in self._tables.items() if o is not owner}
        self._priorities = {k: o for k, o in self._priorities.items() if o is not owner}
