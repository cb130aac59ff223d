"""Jobs in the spool: naming, counts, fair turns, controls, scheduling and the upgrade of
a spool written before jobs existed."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from smtpgate.config import RouteConfig
from smtpgate.jobs import SendAtError, day_job, job_of, parse_send_at
from smtpgate.spool import NewMessage, NewRecipient, RecipientState, RecipientUpdate, SqliteSpool
from smtpgate.spool.base import JobAction, JobCancelledError, JobError, JobState

T = TypeVar("T")
T0 = 1_900_000_000.0
CONTENT = b"From: app@example.net\r\nSubject: hi\r\n\r\nHi.\r\n"


def run(path: Path, use: Callable[[SqliteSpool], Awaitable[T]]) -> T:
    async def go() -> T:
        spool = SqliteSpool.open(path)
        try:
            return await use(spool)
        finally:
            await spool.close()

    return asyncio.run(go())


def message(*addresses: str, job: str = "", hold: bool = False, at: float = T0) -> NewMessage:
    return NewMessage(
        sender="app@example.net",
        recipients=[NewRecipient(a, "news", job=job, hold=hold) for a in addresses],
        content=CONTENT,
        client_address="127.0.0.1",
        helo="client.test",
        received_at=at,
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "spool.db"


def test_a_message_joins_its_named_job_and_counts_follow_the_recipients(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("a@x.test", "b@x.test", job="autumn"))
        job = await spool.job("autumn")
        assert job is not None
        assert (job.state, job.total, job.counts) == (
            JobState.QUEUED,
            2,
            {RecipientState.QUEUED: 2},
        )
        [delivery] = await spool.lease_due(["news"], T0, 10)
        assert delivery.job == "autumn"
        assert (await spool.job("autumn")).state is JobState.SENDING  # type: ignore[union-attr]
        a, b = delivery.recipients
        await spool.record(
            [
                RecipientUpdate(a.id, RecipientState.DELIVERED, "250 ok"),
                RecipientUpdate(b.id, RecipientState.FAILED, "550 5.1.1 unknown"),
            ],
            T0 + 1,
        )
        job = await spool.job("autumn")
        assert job is not None
        assert job.state is JobState.DONE and job.finished_at == T0 + 1
        assert await spool.job_failures("autumn", 5) == [("550 5.1.1 unknown", 1)]
        failed = await spool.job_recipients("autumn", RecipientState.FAILED, 0, 10)
        assert [(r.address, r.attempts, r.last_reply) for r in failed] == [
            ("b@x.test", 1, "550 5.1.1 unknown")
        ]
        # More mail for a finished job opens it again.
        await spool.store(message("c@x.test", job="autumn"))
        assert (await spool.job("autumn")).state is JobState.SENDING  # type: ignore[union-attr]

    run(path, use)


def test_a_big_job_does_not_starve_a_small_one_queued_after_it(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        for n in range(50):
            await spool.store(message(f"big{n}@x.test", job="big"))
        await spool.store(message("small@x.test", job="small", at=T0 + 60))
        leased = await spool.lease_due(["news"], T0 + 60, 2)
        assert sorted(d.job for d in leased) == ["big", "small"]
        # The next turn starts with the job served least recently.
        [next_one] = await spool.lease_due(["news"], T0 + 61, 1)
        assert next_one.job == "big"

    run(path, use)


def test_cancel_stops_what_is_unsent_and_keeps_what_went_out(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        for n in range(4):
            await spool.store(message(f"r{n}@x.test", job="winter"))
        on_the_wire = await spool.lease_due(["news"], T0, 2)
        assert await spool.control_job("winter", JobAction.CANCEL, T0 + 1) == 2
        first, second = (d.recipients[0].id for d in on_the_wire)
        await spool.record(
            [
                RecipientUpdate(first, RecipientState.DELIVERED, "250 ok"),
                RecipientUpdate(second, RecipientState.DEFERRED, "451 later", T0 + 60),
            ],
            T0 + 2,
        )
        job = await spool.job("winter")
        assert job is not None
        assert job.state is JobState.CANCELLED
        assert job.counts == {RecipientState.DELIVERED: 1, RecipientState.CANCELLED: 3}
        assert await spool.lease_due(["news"], T0 + 3600, 10) == []
        with pytest.raises(JobCancelledError, match="'winter' was cancelled"):
            await spool.store(message("late@x.test", job="winter"))
        with pytest.raises(JobError, match="is cancelled; it cannot resume"):
            await spool.control_job("winter", JobAction.RESUME, T0)

    run(path, use)


def test_a_restart_after_a_cancel_does_not_send_what_was_on_the_wire_again(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("a@x.test", "b@x.test", job="autumn"))
        await spool.lease_due(["news"], T0, 10)  # then the process dies mid-send
        await spool.control_job("autumn", JobAction.CANCEL, T0 + 1)
        assert await spool.release_leases(T0 + 2) == 2
        job = await spool.job("autumn")
        assert job is not None
        assert job.state is JobState.CANCELLED and job.counts == {RecipientState.CANCELLED: 2}
        assert job.finished_at == T0 + 2
        with pytest.raises(JobError, match="is cancelled; it cannot retry"):
            await spool.retry_job("autumn", T0, failed_too=True)

    run(path, use)


def test_a_cancelled_job_of_the_day_gives_way_to_a_new_one(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("a@x.test"))  # unlabelled: the route's job of the day
        today = day_job("news", T0)
        await spool.control_job(today, JobAction.CANCEL, T0)
        await spool.store(message("b@x.test"))  # a cron job's next mail is not refused
        fresh = await spool.job(f"{today}-2")
        assert fresh is not None and fresh.counts == {RecipientState.QUEUED: 1}
        [delivery] = await spool.lease_due(["news"], T0, 10)
        assert delivery.job == f"{today}-2"

    run(path, use)


def test_retries_give_up_counting_from_when_the_job_could_first_send(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("h@x.test", job="held", hold=True))
        await spool.control_job("held", JobAction.RELEASE, T0 + 6 * 86400)  # a week later
        [delivery] = await spool.lease_due(["news"], T0 + 6 * 86400, 10)
        assert delivery.lifetime_from == T0 + 6 * 86400

    run(path, use)


def test_time_spent_paused_does_not_count_toward_giving_up(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("a@x.test", "b@x.test", job="j"))
        [first] = await spool.lease_due(["news"], T0, 1)  # the job starts at T0
        a = first.recipients[0]
        await spool.record([RecipientUpdate(a.id, RecipientState.DEFERRED, "451", T0)], T0)
        await spool.control_job("j", JobAction.PAUSE, T0 + 100)
        await spool.control_job("j", JobAction.RESUME, T0 + 100 + 3 * 86400)  # 3 days off
        [again] = await spool.lease_due(["news"], T0 + 3 * 86400 + 200, 10)
        assert again.lifetime_from == T0 + 3 * 86400

    run(path, use)


def test_pause_resume_hold_and_release(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("p@x.test", job="paused"))
        await spool.control_job("paused", JobAction.PAUSE, T0)
        assert (await spool.job_controls())["paused"].value == "paused"
        assert await spool.lease_due(["news"], T0, 10) == []
        await spool.control_job("paused", JobAction.RESUME, T0)
        assert [d.job for d in await spool.lease_due(["news"], T0, 10)] == ["paused"]

        await spool.store(message("h@x.test", job="held", hold=True))
        held = await spool.job("held")
        assert held is not None and held.state is JobState.HELD
        assert held.counts == {RecipientState.HELD: 1}
        assert await spool.lease_due(["news"], T0, 10) == []
        assert await spool.control_job("held", JobAction.RELEASE, T0) == 1
        assert [d.job for d in await spool.lease_due(["news"], T0, 10)] == ["held"]
        with pytest.raises(JobError, match="no job 'nope'"):
            await spool.control_job("nope", JobAction.PAUSE, T0)

    run(path, use)


def test_retry_and_schedule_a_job(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("d@x.test", "f@x.test", job="j"))
        [delivery] = await spool.lease_due(["news"], T0, 10)
        d, f = delivery.recipients
        await spool.record(
            [
                RecipientUpdate(d.id, RecipientState.DEFERRED, "451 later", T0 + 3600),
                RecipientUpdate(f.id, RecipientState.FAILED, "550 no"),
            ],
            T0,
        )
        assert await spool.retry_job("j", T0 + 5, failed_too=False) == 1
        assert await spool.retry_job("j", T0 + 5, failed_too=True) == 2
        await spool.schedule_job("j", T0 + 7200)
        assert await spool.lease_due(["news"], T0 + 10, 10) == []
        [again] = await spool.lease_due(["news"], T0 + 7200, 10)
        assert sorted(r.address for r in again.recipients) == ["d@x.test", "f@x.test"]

    run(path, use)


def test_a_spool_from_before_jobs_is_upgraded_with_a_job_per_route(path: Path) -> None:
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE messages (queue_id TEXT PRIMARY KEY, sender TEXT NOT NULL,
            size INTEGER NOT NULL, received_at REAL NOT NULL, client_address TEXT NOT NULL,
            helo TEXT NOT NULL, smtputf8 INTEGER NOT NULL, content BLOB NOT NULL);
        CREATE TABLE recipients (id INTEGER PRIMARY KEY, queue_id TEXT NOT NULL,
            address TEXT NOT NULL, route TEXT NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL, last_reply TEXT,
            updated_at REAL NOT NULL, via TEXT);
        CREATE INDEX recipients_due ON recipients(next_attempt)
            WHERE state IN ('queued', 'deferred');
        INSERT INTO messages VALUES ('Q1', 'a@x.test', 10, 1900000000, '127.0.0.1', 'h', 0, X'78');
        INSERT INTO recipients (queue_id, address, route, state, next_attempt, updated_at)
            VALUES ('Q1', 'r1@x.test', 'corp', 'queued', 1900000000, 1900000000),
                   ('Q1', 'r2@x.test', 'corp', 'delivered', NULL, 1900000000);
        PRAGMA user_version = 2;
        """
    )
    db.close()

    async def use(spool: SqliteSpool) -> None:
        [job] = await spool.jobs()
        assert job.name == day_job("corp", T0) and job.route == "corp"
        assert job.counts == {RecipientState.QUEUED: 1, RecipientState.DELIVERED: 1}
        [delivery] = await spool.lease_due(["corp"], T0, 10)
        assert [r.address for r in delivery.recipients] == ["r1@x.test"]

    run(path, use)


def test_the_job_of_a_message() -> None:
    plain = RouteConfig(mode="direct")
    named = RouteConfig(mode="direct", job="weekly news")
    assert job_of("launch", named) == "launch"  # the header first
    assert job_of(None, named) == "weekly news"  # then the route's setting
    assert job_of(None, plain) == ""  # then the route's job of the day, named by the spool
    with pytest.raises(ValueError, match="not a job name"):
        job_of("../../etc", plain)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2030-01-07T12:00:00+00:00", 1_894_017_600.0),
        ("2030-01-07T12:00:00Z", 1_894_017_600.0),
        ("2030-01-07 13:00:00+01:00", 1_894_017_600.0),
        ("Mon, 07 Jan 2030 12:00:00 +0000", 1_894_017_600.0),
        ("Mon, 07 Jan 2030 12:00:00 -0000", 1_894_017_600.0),  # UTC, local zone unknown
        ("2030-01-07t12:00:00z", 1_894_017_600.0),  # RFC 3339 allows lower case
    ],
)
def test_send_at_reads_rfc_3339_and_rfc_5322(text: str, expected: float) -> None:
    assert parse_send_at(text, T0) == expected


@pytest.mark.parametrize(
    "text",
    [
        "tomorrow",
        "2030-01-07T12:00:00",
        "",
        "Mon, 07 Jan 2030",
        "Tue, 1 Dec 99999999999999999999 09:00:00 +0000",
        "2300-01-07T12:00:00Z",  # a mistyped year would hold the mail for good
    ],
)
def test_send_at_refuses_garbage_and_times_without_a_zone(text: str) -> None:
    with pytest.raises(SendAtError):
        parse_send_at(text, T0)


def test_the_server_completes_a_spool_missing_an_index(path: Path) -> None:
    """A spool built by another version (or salvaged) gets every index the queries name."""
    run(path, lambda spool: spool.store(message("a@x.test")))
    db = sqlite3.connect(path)
    db.execute("DROP INDEX recipients_of_message")
    db.commit()
    db.close()

    async def server_start() -> None:
        spool = SqliteSpool.open(path, exclusive=True)
        try:
            [delivery] = await spool.lease_due(["news"], T0, 10)  # INDEXED BY needs it
            assert [r.address for r in delivery.recipients] == ["a@x.test"]
        finally:
            await spool.close()

    asyncio.run(server_start())


def test_a_failure_and_its_bounce_are_recorded_together(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("gone@x.test", job="j"))
        [delivery] = await spool.lease_due(["news"], T0, 10)
        gone = delivery.recipients[0]
        failed = [RecipientUpdate(gone.id, RecipientState.FAILED, "550 5.1.1 unknown")]
        notice = NewMessage(
            sender="",
            recipients=[NewRecipient("app@example.net", "news")],
            content=b"Subject: Undelivered Mail\r\n\r\n",
            client_address="",
            helo="gateway.test",
            received_at=T0 + 1,
        )
        [dsn_id] = await spool.record(failed, T0 + 1, [notice])
        stored = await spool.message(dsn_id)
        assert stored is not None and stored.sender == ""
        assert [r.address for r in stored.recipients] == ["app@example.net"]

    run(path, use)


def test_a_notice_that_cannot_be_stored_does_not_hold_back_the_results(path: Path) -> None:
    async def use(spool: SqliteSpool) -> None:
        await spool.store(message("gone@x.test", job="j"))
        await spool.store(message("other@x.test", job="closed"))
        await spool.control_job("closed", JobAction.CANCEL, T0)
        [delivery] = await spool.lease_due(["news"], T0, 10)
        failed = [RecipientUpdate(delivery.recipients[0].id, RecipientState.FAILED, "550 no")]
        refused = message("app@example.net", job="closed")  # a cancelled job takes none
        assert await spool.record(failed, T0 + 1, [refused]) == []
        job = await spool.job("j")
        assert job is not None and job.counts == {RecipientState.FAILED: 1}

    run(path, use)
