"""Sending windows and pacing: when a track route may send, and how fast."""

from __future__ import annotations

import datetime as dt

import pytest

from smtpgate.config import Rate
from smtpgate.pacing import RoutePace
from smtpgate.windows import SendingWindows

BERLIN = "Europe/Berlin"


def at(text: str, zone: str = BERLIN) -> float:
    """A wall-clock time in `zone` as Unix seconds."""
    windows = SendingWindows([], zone)
    return dt.datetime.fromisoformat(text).replace(tzinfo=windows.zone).timestamp()


NIGHTS_AND_WEEKENDS = SendingWindows(["mon-fri 22:00-06:00", "sat-sun"], BERLIN)


@pytest.mark.parametrize(
    ("moment", "is_open"),
    [
        ("2026-11-30 10:00", False),  # Monday morning
        ("2026-11-30 22:00", True),  # Monday night, the window opens
        ("2026-12-01 05:59", True),  # crossed midnight: still Monday's window
        ("2026-12-01 06:00", False),  # ends exactly at its end
        ("2026-12-04 23:30", True),  # Friday night
        ("2026-12-05 12:00", True),  # Saturday, all day
        ("2026-12-06 23:59", True),  # Sunday, all day
        ("2026-12-07 05:00", False),  # Monday 05:00: Sunday's window ended at midnight
    ],
)
def test_windows_cross_midnight_and_cover_whole_days(moment: str, is_open: bool) -> None:
    assert NIGHTS_AND_WEEKENDS.is_open(at(moment)) is is_open


def test_next_open_names_the_start_of_the_next_window() -> None:
    monday_morning = at("2026-11-30 10:00")
    opens = NIGHTS_AND_WEEKENDS.next_open(monday_morning)
    assert opens == at("2026-11-30 22:00")
    assert NIGHTS_AND_WEEKENDS.describe(opens) == "Mon 2026-11-30 22:00 Europe/Berlin"
    assert NIGHTS_AND_WEEKENDS.next_open(at("2026-11-30 23:00")) == at("2026-11-30 23:00")


def test_windows_keep_their_wall_clock_hours_across_daylight_saving() -> None:
    # Berlin leaves summer time on Sunday 2026-10-25; 09:00 stays 09:00 local.
    mornings = SendingWindows(["mon-fri 09:00-17:00"], BERLIN)
    friday = mornings.next_open(at("2026-10-23 08:00"))
    monday = mornings.next_open(at("2026-10-24 12:00"))
    assert dt.datetime.fromtimestamp(friday, mornings.zone).hour == 9
    assert dt.datetime.fromtimestamp(monday, mornings.zone).strftime("%a %H:%M") == "Mon 09:00"
    assert monday - friday == 3 * 86400 + 3600  # the extra hour of the autumn night


def test_a_single_day_a_day_range_that_wraps_and_every_day() -> None:
    wednesday = SendingWindows(["wed 09:00-17:00"], "UTC")
    assert wednesday.is_open(at("2026-12-02 12:00", "UTC"))
    assert not wednesday.is_open(at("2026-12-03 12:00", "UTC"))
    weekend = SendingWindows(["fri-mon"], "UTC")  # wraps over the week's end
    assert weekend.is_open(at("2026-12-07 12:00", "UTC"))  # Monday
    assert not weekend.is_open(at("2026-12-08 12:00", "UTC"))  # Tuesday
    nightly = SendingWindows(["23:00-01:00"], "UTC")
    assert nightly.is_open(at("2026-12-02 00:30", "UTC"))
    assert not nightly.is_open(at("2026-12-02 01:00", "UTC"))
    assert SendingWindows([], "UTC").is_open(0.0)  # no windows: any time


@pytest.mark.parametrize(
    "text", ["", "mox 09:00-10:00", "mon 25:00-26:00", "mon 9-17", "monday 09:00-10:00"]
)
def test_bad_windows_are_refused_with_the_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError, match=r"window|day|time"):
        SendingWindows([text], "UTC")


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        SendingWindows([], "Mars/Olympus")


def test_a_rate_is_spent_evenly_not_in_a_burst() -> None:
    pace = RoutePace(SendingWindows([], "UTC"), Rate(count=60, window=3600), turn_seconds=1)
    now = 1_000_000.0
    assert pace.allowance(now) == 1
    pace.took(1, now)
    assert pace.allowance(now + 1) == 0
    assert pace.allowance(now + 59.9) == 0
    assert pace.allowance(now + 60) == 1
    # An idle hour does not turn into sixty messages at once.
    assert pace.allowance(now + 3600) == 1
    pace.took(1, now + 3600)
    assert pace.allowance(now + 3601) == 0


def test_a_fast_rate_sends_what_one_scheduler_turn_allows() -> None:
    pace = RoutePace(SendingWindows([], "UTC"), Rate(count=10, window=1), turn_seconds=1)
    now = 5_000.0
    assert pace.allowance(now) == 10
    pace.took(10, now)
    assert pace.allowance(now + 0.05) == 0
    assert pace.allowance(now + 0.5) == 5


def test_a_closed_window_allows_nothing_and_says_until_when() -> None:
    pace = RoutePace(NIGHTS_AND_WEEKENDS, None, turn_seconds=1)
    morning = at("2026-11-30 10:00")
    assert pace.allowance(morning) == 0
    assert pace.waiting_reason(morning) == (
        "waiting for the sending window; sending resumes Mon 2026-11-30 22:00 Europe/Berlin"
    )
    assert pace.allowance(at("2026-11-30 22:30")) is None  # open and no rate: no limit
    assert pace.waiting_reason(at("2026-11-30 22:30")) is None


def test_the_last_send_before_a_restart_holds_the_rate() -> None:
    pace = RoutePace(SendingWindows([], "UTC"), Rate(count=1, window=60), turn_seconds=1)
    pace.sent_at(1000.0)
    assert pace.allowance(1030.0) == 0
    assert pace.allowance(1060.0) == 1


@pytest.mark.parametrize("rate", ["500/h", "3000/h", "90/min", "14/s"])
def test_over_an_hour_of_scheduler_turns_a_rate_sends_what_it_says(rate: str) -> None:
    limit = Rate.parse(rate)
    assert isinstance(limit, Rate)
    pace = RoutePace(SendingWindows([], "UTC"), limit, turn_seconds=1)
    sent = 0
    for second in range(3600):  # one scheduler turn a second, as the server runs
        allowed = pace.allowance(float(second))
        if allowed:
            pace.took(allowed, float(second))
            sent += allowed
    expected = limit.count * 3600 / limit.window
    assert expected * 0.99 <= sent <= expected + limit.count
