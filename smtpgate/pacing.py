"""Pacing: how many messages a track route may start now, by its window and its rate.

The scheduler asks before it leases a track route's work. A rate such as "60/h" is spent
evenly, one message a minute, not sixty at the top of the hour: a token bucket that holds
at most what one scheduler turn would send, so an idle hour (or a closed window) never
turns into a burst. Times come from `smtpgate.clock`, so tests can drive it.
"""

from __future__ import annotations

import math

from smtpgate.config import Rate
from smtpgate.windows import SendingWindows


class RoutePace:
    def __init__(self, windows: SendingWindows, rate: Rate | None, turn_seconds: float) -> None:
        self.windows = windows
        self.rate = rate
        self._interval = rate.window / rate.count if rate else 0.0
        # The bucket holds one turn's worth at this rate plus the one message that may be
        # due between two turns: it keeps pace, and never bursts after idling.
        per_turn = turn_seconds / self._interval if rate else 0.0
        self._capacity = per_turn + 1.0
        self._tokens = max(1.0, per_turn)
        self._last: float | None = None

    def allowance(self, now: float) -> int | None:
        """Messages that may start now: 0 outside the windows, None for no limit."""
        if not self.windows.is_open(now):
            return 0
        if self.rate is None:
            return None
        self._refill(now)
        return math.floor(self._tokens + 1e-9)  # 0.4 / 0.1 is 3.999...

    def took(self, count: int, now: float) -> None:
        if self.rate is None or count <= 0:
            return
        self._refill(now)
        self._tokens = max(0.0, self._tokens - count)

    def sent_at(self, at: float) -> None:
        """The last send before a restart (from the spool's ledger): the rate holds
        across it, as if the bucket had been emptied then."""
        if self.rate is not None:
            self._tokens, self._last = 0.0, at

    def _refill(self, now: float) -> None:
        if self._last is not None and now > self._last:
            gained = (now - self._last) / self._interval
            self._tokens = min(self._capacity, self._tokens + gained)
        if self._last is None or now > self._last:
            self._last = now

    def ledger_key(self, route: str) -> str:
        return f"track:{route}"

    def waiting_reason(self, now: float) -> str | None:
        """Why nothing of this route goes out now, in words for `smtpgate queue`."""
        opens = self.windows.next_open(now)
        if opens > now:
            return f"waiting for the sending window; sending resumes {self.windows.describe(opens)}"
        return None
