"""Throttles for one relay: rate limits the upstream imposes, and an adaptive slow-down
when it says "too many". Pure bookkeeping with an injected clock; the relay transport
does the waiting and persists what must survive a restart.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence

from smtpgate.config import Rate


class RateLimiter:
    """At most `count` messages in any `window` seconds, for every rate at once (sliding
    windows over the send times, so "30/min" never lets 31 through in any minute)."""

    def __init__(
        self,
        rates: Sequence[Rate],
        history: Iterable[float] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._rates = sorted(rates, key=lambda r: r.window)
        self._longest = max((r.window for r in rates), default=0.0)
        self._sent: deque[float] = deque(sorted(history))
        self._clock = clock
        self._lock = asyncio.Lock()

    @property
    def longest_window(self) -> float:
        return self._longest

    def wait_time(self, now: float) -> float:
        """Seconds until one more message may go (0: now)."""
        while self._sent and self._sent[0] <= now - self._longest:
            self._sent.popleft()
        wait = 0.0
        for rate in self._rates:
            in_window = [t for t in self._sent if t > now - rate.window]
            if len(in_window) >= rate.count:
                # The oldest send that must leave the window before one more fits.
                wait = max(wait, in_window[-rate.count] + rate.window - now)
        return wait

    async def acquire(self) -> float:
        """Wait for a free place in every window, take it, and return the send time."""
        async with self._lock:  # first come, first served
            while (wait := self.wait_time(self._clock())) > 0:  # noqa: ASYNC110 (a timer)
                await asyncio.sleep(wait)
            now = self._clock()
            self._sent.append(now)
            return now


class Backoff:
    """Adaptive slow-down. A "slow down" reply takes one connection away and pauses the
    relay for a time that doubles with each one; every `recover_after` successes give one
    connection back and halve the pause."""

    recover_after = 10
    max_factor = 32  # the pause grows to at most first_pause * 32

    def __init__(self, connections: int, first_pause: float) -> None:
        self.configured = connections
        self.allowed = connections
        self.first_pause = first_pause
        self.pause = 0.0
        self.paused_until = 0.0
        self.reason: str | None = None
        self._streak = 0

    @property
    def backing_off(self) -> bool:
        return self.allowed < self.configured or self.pause > 0

    def slow_down(self, reply: str, now: float) -> None:
        self.allowed = max(1, self.allowed - 1)
        self.pause = min(self.first_pause * self.max_factor, max(self.first_pause, self.pause * 2))
        self.paused_until = now + self.pause
        self.reason = reply
        self._streak = 0

    def success(self) -> bool:
        """Count a delivered message; True when this recovered one step."""
        if not self.backing_off:
            return False
        self._streak += 1
        if self._streak < self.recover_after:
            return False
        self._streak = 0
        self.allowed = min(self.configured, self.allowed + 1)
        self.pause = self.pause / 2 if self.pause / 2 >= self.first_pause else 0.0
        if not self.backing_off:
            self.reason = None
        return True

    def describe(self, now: float) -> str | None:
        """What `smtpgate queue` shows about this relay, or None when all is well."""
        if not self.backing_off:
            return None
        paused = ""
        if self.paused_until > now:
            until = dt.datetime.fromtimestamp(self.paused_until).astimezone()
            paused = f"paused until {until:%H:%M:%S}, "
        return (
            f"backing off: {paused}{self.allowed} of {self.configured} connections;"
            f" the upstream said: {self.reason}"
        )
