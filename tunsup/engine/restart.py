"""The restart policy for helpers that die: bounded restarts within a
window, exponential backoff with jitter.  Pure book-keeping; the tunnel
sleeps and restarts.
"""

from __future__ import annotations

import collections
import random

import attrs


@attrs.frozen
class RestartPolicy:
    """When and how often a helper that died is started again.

    Up to ``max_restarts`` failures within any ``window`` seconds are
    followed by a restart; one more gives up (``max_restarts = 0``: never
    restart).  The delay before restart *n* (counted from 0 since the last
    reset) is drawn from ``[d/2, d]`` with ``d = min(backoff_max,
    backoff_initial * 2**n)`` ("equal jitter": tunnels that die together do
    not restart in lockstep, and the delay still grows).  Once a helper has
    been healthy for ``reset_after`` seconds, the next delay starts from
    ``backoff_initial`` again.
    """

    max_restarts: int = 5
    window: float = 60.0
    backoff_initial: float = 0.2
    backoff_max: float = 30.0
    reset_after: float = 30.0


class RestartTracker:
    """Book-keeping for one tunnel's :class:`RestartPolicy`.  Pure: the
    caller passes the time, so it is tested without a clock."""

    def __init__(self, policy: RestartPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self._rng = rng or random.Random()
        self._failures: collections.deque[float] = collections.deque()
        #: Restarts since the last reset: the backoff exponent.
        self.attempt = 0

    def failures_in_window(self, now: float) -> int:
        self._expire(now)
        return len(self._failures)

    def _expire(self, now: float) -> None:
        while self._failures and self._failures[0] <= now - self.policy.window:
            self._failures.popleft()

    def failure(self, now: float) -> float | None:
        """Record a failure at ``now``.  Returns the delay, in seconds,
        before the next attempt, or None when the limit is reached (the
        tunnel has failed)."""
        self._failures.append(now)
        self._expire(now)
        if len(self._failures) > self.policy.max_restarts:
            return None
        base = self.base_delay(self.attempt)
        self.attempt += 1
        return base / 2 + self._rng.uniform(0.0, base / 2)

    def base_delay(self, attempt: int) -> float:
        """The backoff before jitter for restart number ``attempt``."""
        p = self.policy
        if p.backoff_initial <= 0:
            return 0.0
        # 2.0**n raises past n = 1023; a product too large is inf, capped below.
        return min(p.backoff_max, p.backoff_initial * 2.0 ** min(attempt, 1000))

    def reset(self) -> None:
        """The helper has been healthy long enough: start the backoff over."""
        self.attempt = 0
