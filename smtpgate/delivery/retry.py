"""Retry: when a deferred recipient is tried again, and when smtpgate gives up.

Pure, like procrastinate's RetryStrategy: the scheduler asks, the spool stores the answer.
Defaults follow Postfix: first retry after minutes, growing, give up after 5 days.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from smtpgate.delivery.outcome import Outcome, Verdict
from smtpgate.spool.base import RecipientState, RecipientUpdate

POSTPONE_SECONDS = 2.0  # a recipient whose destination was busy waits this long


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """`schedule[n]` is the wait after the (n+1)th failed attempt; the last step repeats."""

    schedule: tuple[float, ...]
    give_up_after: float

    @classmethod
    def of(cls, schedule: Sequence[float], give_up_after: float) -> RetryPolicy:
        if not schedule:
            raise ValueError("a retry schedule needs at least one step")
        return cls(tuple(schedule), give_up_after)

    def delay(self, attempts_before: int) -> float:
        return self.schedule[min(attempts_before, len(self.schedule) - 1)]

    def decide(
        self,
        recipient_id: int,
        outcome: Outcome,
        *,
        attempts_before: int,
        received_at: float,
        now: float,
    ) -> RecipientUpdate:
        via = outcome.via
        if outcome.verdict is Verdict.DELIVERED:
            return RecipientUpdate(recipient_id, RecipientState.DELIVERED, outcome.reply, via=via)
        if outcome.verdict is Verdict.FAILED:
            return RecipientUpdate(recipient_id, RecipientState.FAILED, outcome.reply, via=via)
        if outcome.verdict is Verdict.POSTPONED:
            # Its turn was skipped, not tried: soon again, no attempt counted, and the
            # last real reply stays what `smtpgate queue` shows.
            state = RecipientState.DEFERRED if attempts_before else RecipientState.QUEUED
            return RecipientUpdate(
                recipient_id, state, None, now + POSTPONE_SECONDS, counts_as_attempt=False
            )
        next_attempt = now + self.delay(attempts_before)
        if next_attempt > received_at + self.give_up_after:
            return RecipientUpdate(
                recipient_id,
                RecipientState.FAILED,
                f"gave up after {_human(self.give_up_after)} in the queue;"
                f" last reply: {outcome.reply}",
                via=via,
            )
        return RecipientUpdate(
            recipient_id, RecipientState.DEFERRED, outcome.reply, next_attempt, via=via
        )


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
