"""Unit tests for the relay throttles: rate limits (sliding windows) and adaptive backoff.

Pure bookkeeping: every test injects the time (`now`, or a fake clock), nothing sleeps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from smtpgate.config import Rate
from smtpgate.transports import throttle
from smtpgate.transports.throttle import Backoff, RateLimiter

PER_SECOND_3 = Rate(count=3, window=1.0)


# --- RateLimiter.wait_time ------------------------------------------------------------


def test_rate_limits_parse_into_count_and_window() -> None:
    # The limits the tests below build by hand are what a user writes in the config.
    assert Rate.parse("3/s") == PER_SECOND_3
    assert Rate.parse("30/min") == Rate(count=30, window=60.0)


def test_under_the_limit_a_message_may_go_now() -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0, 100.5])
    assert limiter.wait_time(100.75) == 0


def test_at_the_limit_waits_until_the_oldest_send_leaves_the_window() -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0, 100.25, 100.5])
    assert limiter.wait_time(100.75) == pytest.approx(0.25)


def test_a_send_exactly_one_window_ago_no_longer_counts() -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0, 100.25, 100.5])
    assert limiter.wait_time(101.0) == 0


def test_history_order_does_not_matter() -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.5, 100.0, 100.25])
    assert limiter.wait_time(100.75) == pytest.approx(0.25)


def test_the_window_slides_instead_of_resetting_on_boundaries() -> None:
    # A fixed window [100, 101) would allow 3 more right at 101.0; a sliding window
    # must not, because then 6 messages would go within 100.9 .. 101.9.
    rate = Rate(count=3, window=1.0)
    limiter = RateLimiter([rate], history=[100.9, 100.95, 100.99])
    assert limiter.wait_time(101.0) == pytest.approx(0.9)
    assert limiter.wait_time(101.9) == 0
    # Only the oldest has left at 101.9: one may go, then the next waits for 100.95.
    limiter = RateLimiter([rate], history=[100.9, 100.95, 100.99, 101.9])
    assert limiter.wait_time(101.9) == pytest.approx(0.05)


def test_following_wait_time_never_puts_more_than_count_in_any_window() -> None:
    rate = Rate(count=3, window=1.0)
    sent = [0.0, 0.1, 0.2]
    now = 0.2
    for _ in range(12):
        limiter = RateLimiter([rate], history=sent)
        now += limiter.wait_time(now)
        sent.append(now)
    for start in sent:  # every window that starts at a send holds at most 3
        assert sum(1 for t in sent if start <= t < start + rate.window - 1e-9) <= 3
    # ... and the limit is reached, not undercut: 3 more at the start of every second.
    assert sent[3:] == pytest.approx([1.0, 1.1, 1.2, 2.0, 2.1, 2.2, 3.0, 3.1, 3.2, 4.0, 4.1, 4.2])


def test_with_two_rates_the_longer_one_binds_when_it_is_full() -> None:
    rates = [Rate(count=2, window=10.0), Rate(count=5, window=100.0)]
    # 5 sends in the last 100 s, but only 1 in the last 10 s: the short rate allows
    # one more, the long one only when the send at 20.0 is 100 s old.
    limiter = RateLimiter(rates, history=[20.0, 40.0, 60.0, 80.0, 95.0])
    assert limiter.wait_time(100.0) == pytest.approx(20.0)


def test_with_two_rates_the_shorter_one_binds_when_it_is_full() -> None:
    rates = [Rate(count=5, window=100.0), Rate(count=2, window=10.0)]  # any order
    limiter = RateLimiter(rates, history=[95.0, 97.0])
    assert limiter.wait_time(100.0) == pytest.approx(5.0)


def test_history_older_than_the_longest_window_is_forgotten() -> None:
    rates = [Rate(count=1, window=10.0), Rate(count=2, window=60.0)]
    limiter = RateLimiter(rates, history=[0.0, 30.0])
    assert limiter.longest_window == 60.0
    # Kept as long as the longest window needs it (not just the shortest) ...
    assert limiter.wait_time(50.0) == pytest.approx(10.0)
    assert limiter.wait_time(65.0) == 0  # 0.0 is older than a minute: only 30.0 counts
    # ... then forgotten for good: a wall clock stepped back does not bring it back.
    assert limiter.wait_time(45.0) == 0


@pytest.mark.parametrize("history", [[], [1.0] * 1000])
def test_without_rates_there_is_never_a_wait(history: list[float]) -> None:
    limiter = RateLimiter([], history=history)
    assert limiter.longest_window == 0
    assert limiter.wait_time(1.0) == 0


# --- RateLimiter.acquire ----------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeClock]:
    fake = FakeClock(100.75)
    monkeypatch.setattr(throttle.asyncio, "sleep", fake.sleep)
    yield fake


def test_acquire_under_the_limit_does_not_sleep(clock: FakeClock) -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0], clock=clock)
    assert asyncio.run(limiter.acquire()) == 100.75
    assert clock.sleeps == []


def test_acquire_sleeps_exactly_until_the_oldest_send_leaves_the_window(clock: FakeClock) -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0, 100.25, 100.5], clock=clock)
    sent_at = asyncio.run(limiter.acquire())
    assert clock.sleeps == [pytest.approx(0.25)]
    assert sent_at == pytest.approx(101.0)


def test_acquire_records_the_send_so_the_next_one_waits_for_it(clock: FakeClock) -> None:
    limiter = RateLimiter([PER_SECOND_3], history=[100.0, 100.25], clock=clock)
    first = asyncio.run(limiter.acquire())  # the third in the window: no wait
    assert first == 100.75
    assert limiter.wait_time(clock.now) == pytest.approx(0.25)  # now counted
    second = asyncio.run(limiter.acquire())  # waits for 100.0 to leave
    third = asyncio.run(limiter.acquire())  # waits for 100.25 to leave
    assert clock.sleeps == [pytest.approx(0.25), pytest.approx(0.25)]
    assert (second, third) == (pytest.approx(101.0), pytest.approx(101.25))


def test_concurrent_acquires_are_spaced_by_the_rate(clock: FakeClock) -> None:
    limiter = RateLimiter([Rate(count=1, window=2.0)], clock=clock)

    async def five() -> list[float]:
        return list(await asyncio.gather(*(limiter.acquire() for _ in range(5))))

    times = asyncio.run(five())
    assert times == [pytest.approx(100.75 + 2 * i) for i in range(5)]


# --- Backoff ----------------------------------------------------------------------------

SLOW = "421 4.7.0 Too many connections, slow down"


def recover_one_step(backoff: Backoff) -> None:
    results = [backoff.success() for _ in range(Backoff.recover_after)]
    assert results == [False] * (Backoff.recover_after - 1) + [True]


def test_a_fresh_backoff_is_not_backing_off() -> None:
    backoff = Backoff(connections=4, first_pause=30.0)
    assert not backoff.backing_off
    assert backoff.allowed == 4
    assert backoff.describe(now=0.0) is None
    assert [backoff.success() for _ in range(25)] == [False] * 25  # nothing to recover


def test_slow_down_takes_a_connection_away_and_pauses() -> None:
    backoff = Backoff(connections=4, first_pause=30.0)
    backoff.slow_down(SLOW, now=1000.0)
    assert backoff.backing_off
    assert backoff.allowed == 3
    assert backoff.pause == 30.0
    assert backoff.paused_until == 1030.0
    assert backoff.reason == SLOW


def test_connections_never_drop_below_one() -> None:
    backoff = Backoff(connections=2, first_pause=30.0)
    for i in range(4):
        backoff.slow_down(SLOW, now=1000.0 + i)
    assert backoff.allowed == 1


def test_the_pause_doubles_up_to_32_times_the_first() -> None:
    backoff = Backoff(connections=1, first_pause=10.0)
    pauses, untils = [], []
    for i in range(8):
        now = 1000.0 + i
        backoff.slow_down(f"451 4.7.1 too many messages ({i})", now=now)
        pauses.append(backoff.pause)
        untils.append(backoff.paused_until - now)
    assert pauses == [10, 20, 40, 80, 160, 320, 320, 320]
    assert untils == pauses
    assert backoff.reason == "451 4.7.1 too many messages (7)"  # the latest reply


def test_recovery_needs_recover_after_successes_per_step() -> None:
    backoff = Backoff(connections=3, first_pause=10.0)
    for _ in range(3):
        backoff.slow_down(SLOW, now=0.0)
    assert (backoff.allowed, backoff.pause) == (1, 40.0)

    recover_one_step(backoff)
    assert (backoff.allowed, backoff.pause) == (2, 20.0)
    recover_one_step(backoff)
    assert (backoff.allowed, backoff.pause) == (3, 10.0)
    assert backoff.backing_off  # all connections back, but still a pause
    assert backoff.reason == SLOW
    recover_one_step(backoff)  # half of 10 would be below first_pause: no pause at all
    assert (backoff.allowed, backoff.pause) == (3, 0.0)
    assert not backoff.backing_off
    assert backoff.reason is None
    assert backoff.describe(now=0.0) is None
    assert backoff.success() is False  # nothing left to recover


def test_a_slow_down_during_recovery_restarts_the_count() -> None:
    backoff = Backoff(connections=2, first_pause=10.0)
    backoff.slow_down(SLOW, now=0.0)
    for _ in range(Backoff.recover_after - 1):
        assert backoff.success() is False
    backoff.slow_down(SLOW, now=1.0)
    assert (backoff.allowed, backoff.pause) == (1, 20.0)
    recover_one_step(backoff)  # a full streak again, not one more success
    assert (backoff.allowed, backoff.pause) == (2, 10.0)


def test_describe_while_paused() -> None:
    backoff = Backoff(connections=4, first_pause=30.0)
    backoff.slow_down(SLOW, now=1000.0)
    text = backoff.describe(now=1010.0)
    assert text is not None
    assert text.startswith("backing off")
    assert "paused until" in text
    assert "3 of 4 connections" in text
    assert SLOW in text


def test_describe_after_the_pause_ended_no_longer_says_paused() -> None:
    backoff = Backoff(connections=4, first_pause=30.0)
    backoff.slow_down(SLOW, now=1000.0)
    text = backoff.describe(now=1030.0)
    assert text is not None
    assert "backing off" in text
    assert "paused until" not in text
    assert "3 of 4 connections" in text
    assert SLOW in text


def test_describe_follows_recovery() -> None:
    backoff = Backoff(connections=2, first_pause=30.0)
    backoff.slow_down(SLOW, now=1000.0)
    backoff.slow_down(SLOW, now=1000.0)
    assert "1 of 2 connections" in (backoff.describe(now=1000.0) or "")
    recover_one_step(backoff)
    assert "2 of 2 connections" in (backoff.describe(now=1000.0) or "")
    recover_one_step(backoff)
    assert backoff.describe(now=1000.0) is None
