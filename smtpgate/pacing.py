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
        # The bucket holds what one turn of the scheduler may send at this rate, at least 1.
        self._burst = max(1, math.floor(turn_seconds / self._interval)) if rate else 0
        self._next_slot = 0.0

    def allowance(self, now: float) -> int | None:
        """Messages that may start now: 0 outside the windows, None for no limit."""
        if not self.windows.is_open(now):
            return 0
        if self.rate is None:
            return None
        if now < self._next_slot:
            return 0
        slots = (now - self._next_slot) / self._interval
        return min(self._burst, 1 + math.floor(slots + 1e-9))  # 0.4 / 0.1 is 3.999...

    def took(self, count: int, now: float) -> None:
        if self.rate is None or count <= 0:
            return
        earliest = now - (self._burst - 1) * self._interval  # unused slots do not pile up
        self._next_slot = max(self._next_slot, earliest) + count * self._interval

    def sent_at(self, at: float) -> None:
        """A send before a restart (from the spool's ledger): the rate holds across it."""
        if self.rate is not None:
            self._next_slot = max(self._next_slot, at + self._interval)

    def ledger_key(self, route: str) -> str:
        return f"track:{route}"

    def waiting_reason(self, now: float) -> str | None:
        """Why nothing of this route goes out now, in words for `smtpgate queue`."""
        opens = self.windows.next_open(now)
        if opens > now:
            return f"waiting for the sending window; sending resumes {self.windows.describe(opens)}"
        return None
