"""A pytest plugin for scripts/race_bugs.py and scripts/mutants: Hypothesis
stops at the first failing example instead of shrinking it.

Whether (and after how many examples) a bug is found is decided in the
generate phase; shrinking only makes the report readable, and on a loaded
machine it costs more than the search.  Load with ``-p noshrink`` and
``scripts/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

from hypothesis import Phase, settings


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        test = getattr(item, "obj", None)
        used = getattr(test, "_hypothesis_internal_use_settings", None)
        if used is not None:
            # Read by @given's wrapper at call time (Hypothesis internals).
            test._hypothesis_internal_use_settings = settings(  # type: ignore[union-attr]
                used, phases=[p for p in used.phases if p is not Phase.shrink])
