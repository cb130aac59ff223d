"""Sending windows: the weekly hours in which a track route may send.

Written as AY Track's "weekly timing parameters" were set: `"mon-fri 22:00-06:00"`,
`"sat-sun"`, `"wed 09:00-17:00"`, `"22:00-06:00"` (every day). A window whose end is not
after its start crosses midnight and belongs to the day it starts on. Times are wall-clock
times in the route's time zone, so a window keeps its hours across daylight saving.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from zoneinfo import ZoneInfo

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW = re.compile(
    r"^\s*(?P<days>[a-z]{3}(?:\s*-\s*[a-z]{3})?(?:\s*,\s*[a-z]{3}(?:\s*-\s*[a-z]{3})?)*)?"
    r"\s*(?:(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2}))?\s*$",
    re.IGNORECASE,
)
_LOOKAHEAD_DAYS = 8  # every weekly window starts within a week and a day


@dataclass(frozen=True, slots=True)
class Window:
    days: frozenset[int]  # Monday is 0, as datetime.weekday()
    start: dt.time
    end: dt.time  # not after start: the window ends on the next day
    text: str

    @classmethod
    def parse(cls, text: str) -> Window:
        match = _WINDOW.match(text)
        if not text.strip() or not match:
            raise ValueError(
                f"{text!r} is not a sending window such as 'mon-fri 22:00-06:00',"
                " 'sat-sun' or 'wed 09:00-17:00'"
            )
        days = _days(match.group("days")) if match.group("days") else frozenset(range(7))
        if match.group("start") is None:
            return cls(days, dt.time(0, 0), dt.time(0, 0), text.strip())
        return cls(days, _clock(match.group("start")), _clock(match.group("end")), text.strip())

    def spans(self, day: dt.date, zone: ZoneInfo) -> tuple[dt.datetime, dt.datetime] | None:
        """Where this window is open when it starts on `day`, or None if it does not."""
        if day.weekday() not in self.days:
            return None
        start = dt.datetime.combine(day, self.start, zone)
        end_day = day if self.end > self.start else day + dt.timedelta(days=1)
        return start, dt.datetime.combine(end_day, self.end, zone)


class SendingWindows:
    """A route's windows; with none, sending is always allowed."""

    def __init__(self, windows: Sequence[str], timezone: str = "local") -> None:
        self.windows = tuple(Window.parse(w) for w in windows)
        self.zone = zone_named(timezone)
        self.timezone = timezone if timezone != "local" else self.zone.key or "local time"

    def is_open(self, now: float) -> bool:
        return self.next_open(now) <= now

    def next_open(self, now: float) -> float:
        """When sending may next happen: `now` itself while a window is open."""
        if not self.windows:
            return now
        today = dt.datetime.fromtimestamp(now, self.zone).date()
        earliest: float | None = None
        for offset in range(-1, _LOOKAHEAD_DAYS):
            day = today + dt.timedelta(days=offset)
            for window in self.windows:
                span = window.spans(day, self.zone)
                if span is None:
                    continue
                # Compared as instants, not wall-clock times: in the hour that repeats
                # when daylight saving ends, 02:15 the second time is after 02:30 the first.
                start, end = span[0].timestamp(), span[1].timestamp()
                if start <= now < end:
                    return now
                if start > now and (earliest is None or start < earliest):
                    earliest = start
        if earliest is None:  # windows that never open are refused by the config
            raise ValueError("no sending window opens within a week")
        return earliest

    def describe(self, at: float) -> str:
        """'Mon 2026-11-30 22:00 Europe/Berlin', for `job show` and the queue."""
        return dt.datetime.fromtimestamp(at, self.zone).strftime("%a %Y-%m-%d %H:%M ") + (
            self.timezone
        )


def zone_named(name: str) -> ZoneInfo:
    """An IANA zone ('Europe/Berlin'), or "local": $TZ, else /etc/localtime, else UTC."""
    if name != "local":
        try:
            return ZoneInfo(name)
        except (ValueError, OSError, KeyError):  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(
                f"unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin'"
            ) from None
    configured = os.environ.get("TZ", "").lstrip(":")
    if configured:
        with contextlib.suppress(ValueError, OSError, KeyError):
            return ZoneInfo(configured)
    with contextlib.suppress(OSError, ValueError), open("/etc/localtime", "rb") as file:
        return ZoneInfo.from_file(file, key=_localtime_key())
    return ZoneInfo("UTC")


def _localtime_key() -> str | None:
    """/etc/localtime is usually a link into the zone database: its name, for display."""
    target = os.path.realpath("/etc/localtime")
    marker = "/zoneinfo/"
    return target.split(marker, 1)[1] if marker in target else None


def _days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"unknown day in {text!r}; use {', '.join(DAYS)}")
        a, b = DAYS.index(first), DAYS.index(last or first)
        days.update((a + i) % 7 for i in range((b - a) % 7 + 1))  # "fri-mon" wraps
    return frozenset(days)


def _clock(text: str) -> dt.time:
    hours, minutes = (int(p) for p in text.split(":"))
    if hours == 24 and minutes == 0:
        return dt.time(0, 0)
    if not (0 <= hours < 24 and 0 <= minutes < 60):
        raise ValueError(f"{text!r} is not a time of day (00:00-24:00)")
    return dt.time(hours, minutes)
