"""smtpgate.delivery: what an SMTP reply means, and when a recipient is tried again."""

from __future__ import annotations

import pytest

from smtpgate.delivery.outcome import Outcome, Scope, Verdict, describe_error, format_reply
from smtpgate.delivery.retry import RetryPolicy
from smtpgate.spool.base import RecipientState

# --- outcome ------------------------------------------------------------------------


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("code", [220, 250, 251, 299])
def test_2xx_is_delivered(code: int, scope: Scope) -> None:
    outcome = Outcome.from_reply(code, "2.0.0 Ok: queued as 1234", scope)
    assert outcome.verdict is Verdict.DELIVERED
    assert outcome.reply == f"{code} 2.0.0 Ok: queued as 1234"
    assert outcome.scope is scope


@pytest.mark.parametrize("scope", list(Scope))
@pytest.mark.parametrize("code", [421, 450, 451, 452, 499])
def test_4xx_is_deferred(code: int, scope: Scope) -> None:
    assert Outcome.from_reply(code, "try later", scope).verdict is Verdict.DEFERRED


@pytest.mark.parametrize("scope", [Scope.MESSAGE, Scope.RECIPIENT])
@pytest.mark.parametrize("code", [500, 550, 552, 554, 599])
def test_5xx_is_failed(code: int, scope: Scope) -> None:
    outcome = Outcome.from_reply(code, "5.1.1 no such user", scope)
    assert outcome.verdict is Verdict.FAILED
    assert outcome.reply == f"{code} 5.1.1 no such user"


@pytest.mark.parametrize("code", [500, 530, 554])
def test_5xx_to_the_session_is_deferred(code: int) -> None:
    # An upstream that refuses every client (554 greeting, 530 auth) is a fault to fix,
    # not a verdict on the mail: keep it queued.
    outcome = Outcome.from_reply(code, "5.7.1 go away", Scope.SESSION)
    assert outcome.verdict is Verdict.DEFERRED
    assert outcome.reply == f"{code} 5.7.1 go away"


def test_multi_line_reply_is_one_line() -> None:
    text = (
        "5.1.1 The email account that you tried to reach does not exist.\n"
        "  \n5.1.1 Please try double-checking the recipient's email address\r\n"
    )
    assert format_reply(550, text) == (
        "550 5.1.1 The email account that you tried to reach does not exist."
        " / 5.1.1 Please try double-checking the recipient's email address"
    )
    assert Outcome.from_reply(550, text, Scope.RECIPIENT).reply == format_reply(550, text)


def test_reply_without_text() -> None:
    assert format_reply(421, "") == "421"
    assert format_reply(250, "   ") == "250"


def test_network_errors_are_deferred_or_failed_as_said() -> None:
    assert Outcome.deferred("timed out", Scope.SESSION) == Outcome(
        Verdict.DEFERRED, "timed out", Scope.SESSION
    )
    assert Outcome.failed("no MX", Scope.RECIPIENT).verdict is Verdict.FAILED


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
        (TimeoutError(), "timed out"),
    ],
)
def test_describe_error(error: BaseException, text: str) -> None:
    assert describe_error(error) == text


def test_describe_error_names_an_error_without_text() -> None:
    class UpstreamGone(Exception):
        pass

    assert describe_error(UpstreamGone()) == "UpstreamGone"
    assert describe_error(UpstreamGone("went away")) == "UpstreamGone: went away"


# --- retry --------------------------------------------------------------------------

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
RECEIVED = 1_700_000_000.0
POLICY = RetryPolicy.of([5 * MINUTE, 10 * MINUTE, HOUR], give_up_after=5 * DAY)
TEMPORARY = Outcome.from_reply(451, "4.3.0 try again later", Scope.RECIPIENT)


def test_delay_grows_then_the_last_step_repeats() -> None:
    assert [POLICY.delay(n) for n in range(6)] == [
        5 * MINUTE,
        10 * MINUTE,
        HOUR,
        HOUR,
        HOUR,
        HOUR,
    ]


def test_a_schedule_needs_a_step() -> None:
    with pytest.raises(ValueError, match="at least one step"):
        RetryPolicy.of([], give_up_after=DAY)


def test_delivered_and_failed_are_final() -> None:
    delivered = POLICY.decide(
        7,
        Outcome.from_reply(250, "ok", Scope.MESSAGE),
        attempts_before=0,
        received_at=RECEIVED,
        now=RECEIVED,
    )
    assert (delivered.recipient_id, delivered.state, delivered.reply) == (
        7,
        RecipientState.DELIVERED,
        "250 ok",
    )
    assert delivered.next_attempt is None

    failed = POLICY.decide(
        7,
        Outcome.from_reply(550, "5.1.1 unknown user", Scope.RECIPIENT),
        attempts_before=3,
        received_at=RECEIVED,
        now=RECEIVED + HOUR,
    )
    assert (failed.state, failed.reply) == (RecipientState.FAILED, "550 5.1.1 unknown user")
    assert failed.next_attempt is None


@pytest.mark.parametrize(
    ("attempts_before", "wait"), [(0, 5 * MINUTE), (1, 10 * MINUTE), (2, HOUR), (9, HOUR)]
)
def test_deferred_is_tried_again_after_the_schedule_step(attempts_before: int, wait: float) -> None:
    now = RECEIVED + DAY
    update = POLICY.decide(
        3, TEMPORARY, attempts_before=attempts_before, received_at=RECEIVED, now=now
    )
    assert update.state is RecipientState.DEFERRED
    assert update.next_attempt == now + wait
    assert update.reply == "451 4.3.0 try again later"


def test_last_retry_that_still_fits_the_lifetime_is_kept() -> None:
    now = RECEIVED + 5 * DAY - HOUR  # next attempt lands exactly at the end of the lifetime
    update = POLICY.decide(3, TEMPORARY, attempts_before=5, received_at=RECEIVED, now=now)
    assert update.state is RecipientState.DEFERRED
    assert update.next_attempt == RECEIVED + 5 * DAY


def test_gives_up_when_the_next_attempt_would_pass_the_lifetime() -> None:
    now = RECEIVED + 5 * DAY - HOUR + 1
    update = POLICY.decide(3, TEMPORARY, attempts_before=5, received_at=RECEIVED, now=now)
    assert update.state is RecipientState.FAILED
    assert update.next_attempt is None
    assert "gave up after 5d" in update.reply
    assert "451 4.3.0 try again later" in update.reply  # the last reply stays visible


def test_give_up_text_for_a_session_deferral() -> None:
    policy = RetryPolicy.of([HOUR], give_up_after=90 * MINUTE)
    refused = Outcome.deferred("connection refused", Scope.SESSION)
    update = policy.decide(1, refused, attempts_before=1, received_at=RECEIVED, now=RECEIVED + HOUR)
    assert update.state is RecipientState.FAILED
    assert "gave up after 90m" in update.reply
    assert update.reply.endswith("last reply: connection refused")


def test_zero_lifetime_gives_up_on_the_first_deferral() -> None:
    policy = RetryPolicy.of([MINUTE], give_up_after=0)
    update = policy.decide(1, TEMPORARY, attempts_before=0, received_at=RECEIVED, now=RECEIVED)
    assert update.state is RecipientState.FAILED
