"""Book-keeping of the restart policy for helpers that die: bounded
restarts within a window, exponential backoff with jitter.  Pure; the
tunnel sleeps and restarts.  The policy record itself
(:class:`~tunsup.config.settings.RestartPolicy`) is configuration.
"""

from __future__ import annotations

import collections
import random

from ..config.settings import RestartPolicy as RestartPolicy


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
