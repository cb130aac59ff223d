"""The spool contract: every backend behind smtpgate.spool.Spool passes `TestSpoolContract`.

A backend joins by adding an entry to BACKENDS: a function that, given a fresh per-test
location, returns a `Backend` whose `open()` opens (or, called again, reopens) the same
store. A PostgreSQL backend would make a fresh schema or database from the tmp path's name.
Each test drives the spool inside its own `asyncio.run`, as a server or a CLI would.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import smtpgate.spool.sqlite as sqlite_spool
from smtpgate.spool import (
    NewMessage,
    NewRecipient,
    RecipientState,
    RecipientUpdate,
    Spool,
    SpoolLockedError,
    SqliteSpool,
)
from smtpgate.spool.base import Delivery, JobAction, JobCancelledError, MessageView

T0 = 1_700_000_000.0  # received_at of the first message in most tests
CONTENT = b"From: app@example.net\r\nSubject: hello\r\n\r\nHi there.\r\n"


@dataclass(frozen=True)
class Backend:
    name: str
    open: Callable[[], Spool]  # opens the same store each time it is called


def sqlite_backend(tmp_path: Path) -> Backend:
    path = tmp_path / "spool.db"
    return Backend("sqlite", lambda: SqliteSpool.open(path))


def sqlite_delivery_backend(tmp_path: Path) -> Backend:
    """The delivery process's connection, no mail arriving: its batches on a thread."""
    path = tmp_path / "spool.db"
    return Backend("sqlite-delivery", lambda: SqliteSpool.open(path, on_loop=True))


def sqlite_delivery_on_loop_backend(tmp_path: Path) -> Backend:
    """The delivery process's connection while mail arrives: its batches on the loop."""
    path = tmp_path / "spool.db"

    def opened() -> Spool:
        spool = SqliteSpool.open(path, on_loop=True)
        spool.mail_arriving(float("inf"))
        return spool

    return Backend("sqlite-delivery-on-loop", opened)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "sqlite": sqlite_backend,
    "sqlite-delivery": sqlite_delivery_backend,
    "sqlite-delivery-on-loop": sqlite_delivery_on_loop_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    factory: Callable[[Path], Backend] = BACKENDS[request.param]
    return factory(tmp_path)


@pytest.fixture
def spool(backend: Backend) -> Iterator[Spool]:
    opened = backend.open()
    yield opened
    asyncio.run(opened.close())


def message(
    *recipients: str | tuple[str, str],
    received_at: float = T0,
    content: bytes = CONTENT,
    sender: str = "app@example.net",
    job: str = "",
) -> NewMessage:
    """Recipients as 'address' (route 'corp') or ('address', 'route'), all in `job` (""
    is the route's job of the day)."""
    rcpts = [
        NewRecipient(r, "corp", job=job) if isinstance(r, str) else NewRecipient(*r, job=job)
        for r in recipients
    ]
    return NewMessage(
        sender=sender,
        recipients=rcpts,
        content=content,
        client_address="127.0.0.1",
        helo="client.example.net",
        received_at=received_at,
    )


async def view(spool: Spool, queue_id: str) -> MessageView:
    found = await spool.message(queue_id)
    assert found is not None, f"message {queue_id} not found"
    return found


async def states(spool: Spool, queue_id: str) -> dict[str, RecipientState]:
    return {r.address: r.state for r in (await view(spool, queue_id)).recipients}


def leased(deliveries: list[Delivery]) -> set[tuple[str, str, tuple[str, ...]]]:
    return {
        (d.queue_id, d.route, tuple(sorted(r.address for r in d.recipients))) for d in deliveries
    }


class TestSpoolContract:
    def test_store_returns_an_id_and_every_recipient_is_queued(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(
                message("a@example.org", "b@example.org", ("c@example.com", "direct"))
            )
            assert queue_id
            shown = await view(spool, queue_id)
            assert shown.queue_id == queue_id
            assert shown.sender == "app@example.net"
            assert shown.size == len(CONTENT)
            assert shown.received_at == T0
            assert shown.client_address == "127.0.0.1"
            assert shown.helo == "client.example.net"
            assert [
                (r.address, r.route, r.state, r.attempts, r.last_reply) for r in shown.recipients
            ] == [
                ("a@example.org", "corp", RecipientState.QUEUED, 0, None),
                ("b@example.org", "corp", RecipientState.QUEUED, 0, None),
                ("c@example.com", "direct", RecipientState.QUEUED, 0, None),
            ]
            assert await spool.content(queue_id) == CONTENT

        asyncio.run(scenario())

    def test_unknown_queue_id(self, spool: Spool) -> None:
        async def scenario() -> None:
            assert await spool.message("NOSUCHID") is None
            assert await spool.content("NOSUCHID") is None

        asyncio.run(scenario())

    def test_content_is_kept_byte_for_byte(self, spool: Spool) -> None:
        raw = (
            b"Subject: =?x?q?\xff?=\r\nX-Raw: \xe9\xe8\x00\x80\r\n\r\n"
            + bytes(range(256))
            + b"\r\n.\r\n..\r\n"
        )

        async def scenario() -> None:
            queue_id = await spool.store(message("a@example.org", content=raw))
            assert await spool.content(queue_id) == raw
            assert (await view(spool, queue_id)).size == len(raw)
            (delivery,) = await spool.lease_due(["corp"], T0, 10)
            assert delivery.content == raw

        asyncio.run(scenario())

    def test_lease_takes_only_due_recipients_of_the_named_routes(self, spool: Spool) -> None:
        async def scenario() -> None:
            early = await spool.store(
                message(
                    "a@example.org",
                    "b@example.org",
                    ("c@example.com", "direct"),
                    ("d@example.com", "bulk"),
                    received_at=T0,
                )
            )
            later = await spool.store(message("e@example.org", received_at=T0 + 100))

            deliveries = await spool.lease_due(["corp", "direct"], T0 + 50, 100)
            assert leased(deliveries) == {
                (early, "corp", ("a@example.org", "b@example.org")),
                (early, "direct", ("c@example.com",)),
            }
            corp = next(d for d in deliveries if d.route == "corp")
            assert corp.sender == "app@example.net"
            assert corp.content == CONTENT
            assert corp.received_at == T0
            assert [r.attempts for r in corp.recipients] == [0, 0]

            assert await states(spool, early) == {
                "a@example.org": RecipientState.SENDING,
                "b@example.org": RecipientState.SENDING,
                "c@example.com": RecipientState.SENDING,
                "d@example.com": RecipientState.QUEUED,  # route not asked for
            }
            assert await states(spool, later) == {"e@example.org": RecipientState.QUEUED}

            # Leased once: a second lease (another worker, same time) gets nothing more.
            assert await spool.lease_due(["corp", "direct"], T0 + 50, 100) == []
            # Once the later message is due, only it is leased.
            assert leased(await spool.lease_due(["corp", "direct"], T0 + 100, 100)) == {
                (later, "corp", ("e@example.org",)),
            }

        asyncio.run(scenario())

    def test_lease_limit_takes_the_oldest_due_first(self, spool: Spool) -> None:
        async def scenario() -> None:
            newer = await spool.store(message("new@example.org", received_at=T0 + 10))
            older = await spool.store(message("old@example.org", received_at=T0))
            assert leased(await spool.lease_due(["corp"], T0 + 60, 1)) == {
                (older, "corp", ("old@example.org",)),
            }
            assert leased(await spool.lease_due(["corp"], T0 + 60, 1)) == {
                (newer, "corp", ("new@example.org",)),
            }
            assert await spool.lease_due(["corp"], T0 + 60, 1) == []

        asyncio.run(scenario())

    def test_lease_with_no_routes_or_no_room_takes_nothing(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(message("a@example.org"))
            assert await spool.lease_due([], T0 + 60, 10) == []
            assert await spool.lease_due(["corp"], T0 + 60, 0) == []
            assert await spool.lease_due(["elsewhere"], T0 + 60, 10) == []
            assert await states(spool, queue_id) == {"a@example.org": RecipientState.QUEUED}

        asyncio.run(scenario())

    def test_record_moves_states_and_counts_attempts(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(
                message(
                    "ok@example.org",
                    "later@example.org",
                    "bad@example.org",
                    "cancelled@example.org",
                )
            )
            (delivery,) = await spool.lease_due(["corp"], T0, 10)
            ids = {r.address: r.id for r in delivery.recipients}
            now = T0 + 5
            await spool.record(
                [
                    RecipientUpdate(
                        ids["ok@example.org"], RecipientState.DELIVERED, "250 2.0.0 Ok: queued as X"
                    ),
                    RecipientUpdate(
                        ids["later@example.org"],
                        RecipientState.DEFERRED,
                        "451 4.3.0 try later",
                        next_attempt=now + 300,
                    ),
                    RecipientUpdate(
                        ids["bad@example.org"], RecipientState.FAILED, "550 5.1.1 no such user"
                    ),
                    RecipientUpdate(
                        ids["cancelled@example.org"],
                        RecipientState.CANCELLED,
                        "cancelled by the operator",
                        counts_as_attempt=False,
                    ),
                ],
                now,
            )
            shown = {r.address: r for r in (await view(spool, queue_id)).recipients}
            assert {a: (r.state, r.attempts, r.last_reply) for a, r in shown.items()} == {
                "ok@example.org": (RecipientState.DELIVERED, 1, "250 2.0.0 Ok: queued as X"),
                "later@example.org": (RecipientState.DEFERRED, 1, "451 4.3.0 try later"),
                "bad@example.org": (RecipientState.FAILED, 1, "550 5.1.1 no such user"),
                "cancelled@example.org": (RecipientState.CANCELLED, 0, "cancelled by the operator"),
            }
            assert shown["later@example.org"].next_attempt == now + 300
            assert all(r.updated_at == now for r in shown.values())

            # The deferred one comes back when due, and only then, with its attempt count.
            assert await spool.lease_due(["corp"], now + 299, 10) == []
            (again,) = await spool.lease_due(["corp"], now + 300, 10)
            assert [(r.address, r.attempts) for r in again.recipients] == [("later@example.org", 1)]
            await spool.record(
                [RecipientUpdate(again.recipients[0].id, RecipientState.DELIVERED, "250 ok")],
                now + 301,
            )
            later = next(
                r
                for r in (await view(spool, queue_id)).recipients
                if r.address == "later@example.org"
            )
            assert (later.state, later.attempts) == (RecipientState.DELIVERED, 2)

        asyncio.run(scenario())

    def test_record_ignores_recipients_that_are_not_leased(self, spool: Spool) -> None:
        # A scheduler that lost its lease (released at a restart) must not overwrite state.
        async def scenario() -> None:
            queue_id = await spool.store(message("a@example.org"))
            (delivery,) = await spool.lease_due(["corp"], T0, 10)
            assert await spool.release_leases(T0 + 1) == 1
            await spool.record(
                [RecipientUpdate(delivery.recipients[0].id, RecipientState.DELIVERED, "250 late")],
                T0 + 2,
            )
            (shown,) = (await view(spool, queue_id)).recipients
            assert (shown.state, shown.attempts) == (RecipientState.QUEUED, 0)

        asyncio.run(scenario())

    def test_release_leases_of_some_routes_leaves_the_others_leased(self, spool: Spool) -> None:
        """A dead delivery process's leases are released; those of the server's own
        routes, still being sent, are not."""

        async def scenario() -> None:
            queue_id = await spool.store(message("a@example.org", ("c@example.com", "direct")))
            await spool.lease_due(["corp", "direct"], T0, 10)
            assert await spool.release_leases(T0 + 60, ["direct", "gone"]) == 1
            shown = {r.address: r.state for r in (await view(spool, queue_id)).recipients}
            assert shown == {
                "a@example.org": RecipientState.SENDING,
                "c@example.com": RecipientState.QUEUED,
            }
            assert await spool.release_leases(T0 + 61, []) == 0

        asyncio.run(scenario())

    def test_release_leases_requeues_what_was_sending(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(
                message("a@example.org", "b@example.org", ("c@example.com", "direct"))
            )
            await spool.lease_due(["corp"], T0, 10)
            assert await spool.release_leases(T0 + 60) == 2
            shown = {r.address: r for r in (await view(spool, queue_id)).recipients}
            for address in ("a@example.org", "b@example.org"):
                assert shown[address].state is RecipientState.QUEUED
                assert shown[address].attempts == 0
                assert "outcome unknown" in (shown[address].last_reply or "")
            assert shown["c@example.com"].last_reply is None  # was never sending
            assert await spool.release_leases(T0 + 61) == 0
            # Due again at once.
            assert leased(await spool.lease_due(["corp"], T0 + 60, 10)) == {
                (queue_id, "corp", ("a@example.org", "b@example.org")),
            }

        asyncio.run(scenario())

    def test_retry_now_makes_deferred_recipients_due(self, spool: Spool) -> None:
        async def scenario() -> None:
            first = await spool.store(message("a@example.org", "b@example.org"))
            second = await spool.store(message("c@example.org", received_at=T0 + 1))
            deliveries = await spool.lease_due(["corp"], T0 + 1, 10)
            later = T0 + 86400
            await spool.record(
                [
                    RecipientUpdate(r.id, RecipientState.DEFERRED, "421 busy", next_attempt=later)
                    for d in deliveries
                    for r in d.recipients
                ],
                T0 + 2,
            )
            now = T0 + 10
            assert await spool.lease_due(["corp"], now, 10) == []

            assert await spool.retry_now(second, now) == 1
            assert leased(await spool.lease_due(["corp"], now, 10)) == {
                (second, "corp", ("c@example.org",)),
            }
            assert await spool.retry_now(None, now) == 2
            assert leased(await spool.lease_due(["corp"], now, 10)) == {
                (first, "corp", ("a@example.org", "b@example.org")),
            }
            # Nothing deferred is left (all are sending now), so nothing to retry.
            assert await spool.retry_now(None, now) == 0

        asyncio.run(scenario())

    def test_retry_now_leaves_final_recipients_alone(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(message("a@example.org"))
            (delivery,) = await spool.lease_due(["corp"], T0, 10)
            await spool.record(
                [RecipientUpdate(delivery.recipients[0].id, RecipientState.FAILED, "550 no")], T0
            )
            assert await spool.retry_now(queue_id, T0 + 1) == 0
            assert await spool.retry_now(None, T0 + 1) == 0
            assert await states(spool, queue_id) == {"a@example.org": RecipientState.FAILED}

        asyncio.run(scenario())

    def test_note_waiting_explains_only_unexplained_queued_recipients(self, spool: Spool) -> None:
        async def scenario() -> None:
            queue_id = await spool.store(
                message(
                    "a@example.org",
                    "b@example.org",
                    ("c@example.com", "direct"),
                )
            )
            await spool.lease_due(["corp"], T0, 10)
            await spool.release_leases(T0 + 1)  # a and b: queued again, with a reply
            second = await spool.store(
                message("d@example.org", "e@example.org", received_at=T0 + 2)
            )

            assert await spool.note_waiting("corp", "relay corp is unreachable") == 2
            assert await spool.note_waiting("corp", "a second reason") == 0

            def replies(shown: MessageView) -> dict[str, str | None]:
                return {r.address: r.last_reply for r in shown.recipients}

            assert replies(await view(spool, second)) == {
                "d@example.org": "relay corp is unreachable",
                "e@example.org": "relay corp is unreachable",
            }
            first = replies(await view(spool, queue_id))
            assert first["c@example.com"] is None  # another route
            assert "outcome unknown" in (first["a@example.org"] or "")  # kept, not replaced
            assert await states(spool, second) == {
                "d@example.org": RecipientState.QUEUED,
                "e@example.org": RecipientState.QUEUED,
            }

        asyncio.run(scenario())

    def test_messages_newest_first(self, spool: Spool) -> None:
        async def scenario() -> None:
            ids = [
                await spool.store(message(f"r{i}@example.org", received_at=T0 + i))
                for i in range(3)
            ]
            assert [m.queue_id for m in await spool.messages()] == ids[::-1]
            assert [m.queue_id for m in await spool.messages(limit=2)] == ids[:0:-1]
            assert [r.address for m in await spool.messages() for r in m.recipients] == [
                "r2@example.org",
                "r1@example.org",
                "r0@example.org",
            ]

        asyncio.run(scenario())

    def test_data_survives_close_and_reopen(self, backend: Backend) -> None:
        async def write() -> tuple[str, str]:
            spool = backend.open()
            try:
                done = await spool.store(message("a@example.org", "b@example.org"))
                (delivery,) = await spool.lease_due(["corp"], T0, 10)
                await spool.record(
                    [
                        RecipientUpdate(
                            delivery.recipients[0].id, RecipientState.DELIVERED, "250 ok"
                        ),
                        RecipientUpdate(
                            delivery.recipients[1].id,
                            RecipientState.DEFERRED,
                            "451 later",
                            next_attempt=T0 + 300,
                        ),
                    ],
                    T0 + 1,
                )
                waiting = await spool.store(message("c@example.org", received_at=T0 + 2))
                return done, waiting
            finally:
                await spool.close()

        async def read(done: str, waiting: str) -> None:
            spool = backend.open()
            try:
                shown = {r.address: r for r in (await view(spool, done)).recipients}
                assert (
                    shown["a@example.org"].state,
                    shown["a@example.org"].attempts,
                    shown["a@example.org"].last_reply,
                ) == (RecipientState.DELIVERED, 1, "250 ok")
                assert (shown["b@example.org"].state, shown["b@example.org"].next_attempt) == (
                    RecipientState.DEFERRED,
                    T0 + 300,
                )
                assert await spool.content(done) == CONTENT
                assert await states(spool, waiting) == {"c@example.org": RecipientState.QUEUED}
                assert leased(await spool.lease_due(["corp"], T0 + 300, 10)) == {
                    (done, "corp", ("b@example.org",)),
                    (waiting, "corp", ("c@example.org",)),
                }
            finally:
                await spool.close()

        ids = asyncio.run(write())
        asyncio.run(read(*ids))

    def test_many_concurrent_stores_all_succeed_with_distinct_ids(self, spool: Spool) -> None:
        count = 200

        async def scenario() -> None:
            # What many SMTP sessions ending DATA at once look like: each its own time.
            messages = [
                message(
                    f"r{i}@example.org",
                    received_at=T0 + i / 1000,
                    content=CONTENT + f"{i}\r\n".encode(),
                )
                for i in range(count)
            ]
            ids = await asyncio.gather(*(spool.store(m) for m in messages))
            assert len(set(ids)) == count
            for i in (0, count // 2, count - 1):
                assert await spool.content(ids[i]) == CONTENT + f"{i}\r\n".encode()
            assert len(await spool.messages()) == count
            due = await spool.lease_due(["corp"], T0 + 1, 1000)
            assert sum(len(d.recipients) for d in due) == count

        asyncio.run(scenario())


# --- SQLite only ----------------------------------------------------------------------


@contextlib.contextmanager
def another_writer_has_the_turn(path: Path) -> Iterator[None]:
    """Hold the spool's write turn as the delivery process or the CLI would: writes queue
    up meanwhile and go in the next transaction together."""
    turn = os.open(f"{path}.turn", os.O_RDWR)
    try:
        fcntl.flock(turn, fcntl.LOCK_EX)
        yield
    finally:
        os.close(turn)  # and with it the lock


def server_and_delivery(path: Path, mail_arriving: bool) -> tuple[SqliteSpool, SqliteSpool]:
    """The server's spool and its delivery process's, whose batches run on its event loop
    while mail arrives, else on a thread."""
    server = SqliteSpool.open(path, exclusive=True)
    delivery = SqliteSpool.open(path, on_loop=True)
    if mail_arriving:
        delivery.mail_arriving(float("inf"))
    return server, delivery


class TestSqliteSpool:
    def test_exclusive_open_twice_names_the_holder(self, tmp_path: Path) -> None:
        path = tmp_path / "spool.db"
        first = SqliteSpool.open(path, exclusive=True)
        try:
            with pytest.raises(SpoolLockedError, match=f"pid {os.getpid()}") as caught:
                SqliteSpool.open(path, exclusive=True)
            assert str(path) in str(caught.value)
        finally:
            asyncio.run(first.close())
        # Released on close: the next server may start.
        second = SqliteSpool.open(path, exclusive=True)
        asyncio.run(second.close())

    def test_the_server_keeps_the_log_short_while_mail_flows(self, tmp_path: Path) -> None:
        """The server copies the write-ahead log back into the spool in the background,
        a few times a second, so the log stays short during a long stream of stores,
        well before the point where a commit (one a 250 waits for) would do it: 13-14
        MB at most here, 41 MB without."""
        path = tmp_path / "spool.db"
        server = SqliteSpool.open(path, exclusive=True)
        wal = Path(f"{path}-wal")
        content = b"Subject: big\r\n\r\n" + b"y" * 32 * 1024 + b"\r\n"
        largest = 0

        def log_size() -> int:
            return wal.stat().st_size

        async def scenario() -> int:
            nonlocal largest
            for _ in range(100):  # 1,000 messages, 32 MB
                await asyncio.gather(
                    *(server.store(message("a@example.org", content=content)) for _ in range(10))
                )
                largest = max(largest, log_size())
                await asyncio.sleep(0.01)
            return len(await server.messages())

        try:
            assert asyncio.run(scenario()) == 1000
        finally:
            asyncio.run(server.close())
        assert largest < 30 * 1024 * 1024, f"the log grew to {largest / 2**20:.0f} MB"

    def test_non_exclusive_open_beside_a_server(self, tmp_path: Path) -> None:
        # The CLI reads and writes the spool while the server runs.
        path = tmp_path / "spool.db"
        server = SqliteSpool.open(path, exclusive=True)
        cli = SqliteSpool.open(path)

        async def scenario() -> None:
            queue_id = await server.store(message("a@example.org"))
            assert await cli.content(queue_id) == CONTENT
            assert await cli.retry_now(None, T0) == 0

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(cli.close())
            asyncio.run(server.close())

    def test_writers_take_turns_and_readers_need_none(self, tmp_path: Path) -> None:
        """The server and its delivery process both write: a write waits while another
        writer has the turn and goes on the moment it is given back; a read never waits."""
        path = tmp_path / "spool.db"
        server = SqliteSpool.open(path, exclusive=True)

        async def scenario() -> None:
            first = await server.store(message("a@example.org"))
            with another_writer_has_the_turn(path):
                storing = asyncio.ensure_future(server.store(message("b@example.org")))
                assert await server.content(first) == CONTENT  # a read goes on
                await asyncio.sleep(0.3)
                assert not storing.done(), "a write went on while another writer had the turn"
            second = await storing
            assert await server.content(second) == CONTENT

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(server.close())

    @pytest.mark.parametrize("mail_arriving", [False, True])
    def test_the_delivery_process_waits_for_the_turn_with_its_loop_going_on(
        self, tmp_path: Path, mail_arriving: bool
    ) -> None:
        """The delivery process runs its transactions on its event loop: while the
        listener has the turn, its lease and results wait for it on another thread, the
        loop goes on meanwhile, and all that queued up lands once the turn is given back."""
        path = tmp_path / "spool.db"
        server, delivery = server_and_delivery(path, mail_arriving)

        async def scenario() -> None:
            first = await server.store(message("a@example.org"))
            [lease] = await delivery.lease_due(["corp"], T0 + 1e9, 10)
            second = await server.store(message("b@example.org"))
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    await asyncio.sleep(0.01)
                    ticks += 1

            ticking = asyncio.create_task(tick())
            with another_writer_has_the_turn(path):
                [sent] = lease.recipients
                update = RecipientUpdate(sent.id, RecipientState.DELIVERED, "250 ok")
                recording = asyncio.ensure_future(delivery.record([update], T0 + 1e9))
                leasing = asyncio.ensure_future(delivery.lease_due(["corp"], T0 + 1e9, 10))
                await asyncio.sleep(0.3)
                assert not recording.done() and not leasing.done()
                assert ticks >= 10, f"the loop stood still while waiting: {ticks} ticks"
            await recording
            assert [d.queue_id for d in await leasing] == [second]
            ticking.cancel()
            assert await states(server, first) == {"a@example.org": RecipientState.DELIVERED}
            assert await states(server, second) == {"b@example.org": RecipientState.SENDING}

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(delivery.close())
            asyncio.run(server.close())

    @pytest.mark.parametrize("mail_arriving", [False, True])
    def test_the_delivery_process_closes_once_what_waits_for_the_turn_landed(
        self, tmp_path: Path, mail_arriving: bool
    ) -> None:
        path = tmp_path / "spool.db"
        server, delivery = server_and_delivery(path, mail_arriving)

        async def scenario() -> None:
            queue_id = await server.store(message("a@example.org"))
            [lease] = await delivery.lease_due(["corp"], T0 + 1e9, 10)
            update = RecipientUpdate(lease.recipients[0].id, RecipientState.FAILED, "550 no")
            with another_writer_has_the_turn(path):
                recording = asyncio.ensure_future(delivery.record([update], T0 + 1e9))
                await asyncio.sleep(0)
                closing = asyncio.ensure_future(delivery.close())
                await asyncio.sleep(0.2)
                assert not closing.done()
            await closing
            await recording
            assert await states(server, queue_id) == {"a@example.org": RecipientState.FAILED}

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(server.close())

    @pytest.mark.parametrize("mail_arriving", [False, True])
    def test_a_loop_that_ended_waiting_for_the_turn_leaves_the_next_one_working(
        self, tmp_path: Path, mail_arriving: bool
    ) -> None:
        """The delivery connection outlives an event loop that gave up on a write while
        the turn was held elsewhere: that write is dropped, the next loop writes, and
        the turn is not kept."""
        path = tmp_path / "spool.db"
        server, delivery = server_and_delivery(path, mail_arriving)
        queue_id = asyncio.run(server.store(message("a@example.org")))

        async def give_up_waiting() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(delivery.log_send("corp", T0), 0.2)

        with another_writer_has_the_turn(path):
            asyncio.run(give_up_waiting())
        try:
            [lease] = asyncio.run(delivery.lease_due(["corp"], T0 + 1e9, 10))
            assert lease.queue_id == queue_id
            with another_writer_has_the_turn(path):  # the turn was given back
                pass
            assert asyncio.run(states(server, queue_id)) == {
                "a@example.org": RecipientState.SENDING
            }
            assert asyncio.run(delivery.sends_since("corp", 0.0)) == []
        finally:
            asyncio.run(delivery.close())
            asyncio.run(server.close())

    def test_stores_queued_together_still_fail_alone(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Stores queued while another writer has the turn are written together; one
        that cannot be stored (its named job was cancelled) fails alone, and two that
        draw the same queue id in the same microsecond are both stored."""
        monkeypatch.setattr("smtpgate.spool.base.random.getrandbits", lambda bits: 0xABABA)
        path = tmp_path / "spool.db"
        spool = SqliteSpool.open(path, exclusive=True)

        def mail(address: str, job: str = "") -> NewMessage:
            return NewMessage(
                sender="app@example.net",
                recipients=[NewRecipient(address, "corp", job=job)],
                content=CONTENT + address.encode() + b"\r\n",
                client_address="127.0.0.1",
                helo="client.example.net",
                received_at=T0,  # all in the same microsecond: the same queue id first
            )

        async def scenario() -> None:
            await spool.store(mail("first@example.org", job="winter"))
            await spool.control_job("winter", JobAction.CANCEL, T0 + 1)
            with another_writer_has_the_turn(path):
                addresses = [f"r{n}@example.org" for n in range(6)]
                storing = [asyncio.ensure_future(spool.store(mail(a))) for a in addresses[:3]]
                late = asyncio.ensure_future(spool.store(mail("late@example.org", job="winter")))
                storing += [asyncio.ensure_future(spool.store(mail(a))) for a in addresses[3:]]
                await asyncio.sleep(0.2)
            ids = await asyncio.gather(*storing)
            with pytest.raises(JobCancelledError, match="'winter' was cancelled"):
                await late
            assert len(set(ids)) == len(addresses)
            for address, queue_id in zip(addresses, ids, strict=True):
                assert await states(spool, queue_id) == {address: RecipientState.QUEUED}
                assert await spool.content(queue_id) == CONTENT + address.encode() + b"\r\n"

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(spool.close())

    def test_results_recorded_together_each_land(self, tmp_path: Path) -> None:
        """Results queued while another writer has the turn are written together: each
        recipient gets its own, a job cancelled meanwhile cancels what would be retried,
        and a job with nothing left to send is finished."""
        path = tmp_path / "spool.db"
        spool = SqliteSpool.open(path, exclusive=True)

        async def scenario() -> None:
            sent = await spool.store(message("ok@example.org", "later@example.org"))
            winter = NewRecipient("w@example.org", "corp", job="winter")
            cold = await spool.store(
                NewMessage("app@example.net", [winter], CONTENT, "127.0.0.1", "c.example.net")
            )
            deliveries = {d.queue_id: d for d in await spool.lease_due(["corp"], T0 + 1e9, 10)}
            ids = {r.address: r.id for d in deliveries.values() for r in d.recipients}
            await spool.control_job("winter", JobAction.CANCEL, T0 + 1e9)
            results = [
                [RecipientUpdate(ids["ok@example.org"], RecipientState.DELIVERED, "250 sent")],
                [
                    RecipientUpdate(
                        ids["later@example.org"], RecipientState.DEFERRED, "451 busy", T0 + 2e9
                    )
                ],
                [RecipientUpdate(ids["w@example.org"], RecipientState.DEFERRED, "451 busy", 0)],
            ]
            with another_writer_has_the_turn(path):
                recording = [
                    asyncio.ensure_future(spool.record(updates, T0 + 1e9 + 5))
                    for updates in results
                ]
                await asyncio.sleep(0.2)
            await asyncio.gather(*recording)
            shown = {r.address: r for r in (await view(spool, sent)).recipients}
            assert {a: (r.state, r.attempts, r.last_reply) for a, r in shown.items()} == {
                "ok@example.org": (RecipientState.DELIVERED, 1, "250 sent"),
                "later@example.org": (RecipientState.DEFERRED, 1, "451 busy"),
            }
            assert shown["later@example.org"].next_attempt == T0 + 2e9
            assert await states(spool, cold) == {"w@example.org": RecipientState.CANCELLED}
            job = await spool.job("winter")
            assert job is not None and job.finished_at == T0 + 1e9 + 5

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(spool.close())

    @pytest.mark.parametrize("meanwhile", ["paused", "cancelled", "paused and resumed"])
    def test_a_lease_waiting_for_the_turn_sees_what_the_cli_did_meanwhile(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meanwhile: str
    ) -> None:
        """A lease reads what is due without the write turn and leases it once it has the
        turn. A job paused or cancelled in between is not leased (its recipients stay
        queued, or cancelled); one paused and resumed is, its pause counted in when it
        began sending; a job still sending beside it is leased as usual."""
        path = tmp_path / "spool.db"
        spool = SqliteSpool.open(path, exclusive=True)
        planned, raced = threading.Event(), []
        plan, take = sqlite_spool._plan_lease, sqlite_spool._take_lease

        def planning(*args: Any) -> Any:
            found = plan(*args)
            planned.set()
            return found

        def taking(*args: Any) -> Any:
            try:
                return take(*args)
            except sqlite_spool._LeaseRacedError:
                raced.append(args)
                raise

        monkeypatch.setattr(sqlite_spool, "_plan_lease", planning)
        monkeypatch.setattr(sqlite_spool, "_take_lease", taking)

        async def scenario() -> None:
            winter = await spool.store(message("w@example.org", job="winter"))
            summer = await spool.store(message("s@example.org", job="summer"))
            with another_writer_has_the_turn(path):
                leasing = asyncio.ensure_future(spool.lease_due(["corp"], T0 + 1e9, 10))
                assert await asyncio.to_thread(planned.wait, 10)  # read; waits for the turn
                cli = sqlite3.connect(path, isolation_level=None)
                if meanwhile == "paused and resumed":  # as `smtpgate job resume` counts it
                    cli.execute("UPDATE jobs SET paused_for = 3600 WHERE name = 'winter'")
                else:
                    cli.execute("UPDATE jobs SET control = ? WHERE name = 'winter'", (meanwhile,))
                if meanwhile == "cancelled":
                    cli.execute(
                        "UPDATE recipients SET state = 'cancelled' WHERE queue_id = ?", (winter,)
                    )
                cli.close()
            leased = {d.job: d for d in await leasing}
            assert leased["summer"].queue_id == summer
            assert await states(spool, summer) == {"s@example.org": RecipientState.SENDING}
            if meanwhile == "paused and resumed":
                assert not raced
                assert leased["winter"].job_started_at == T0 + 1e9 + 3600
            else:
                assert len(raced) == 1 and "winter" not in leased
                left = RecipientState.QUEUED if meanwhile == "paused" else RecipientState.CANCELLED
                assert await states(spool, winter) == {"w@example.org": left}

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(spool.close())

    def test_a_waiting_route_is_explained_in_bounded_transactions(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A route's waiting reason reaches every queued recipient, a few per transaction,
        so that the write turn is never held for the whole of a big campaign."""
        monkeypatch.setattr(sqlite_spool, "NOTE_ROWS", 2)
        spool = SqliteSpool.open(tmp_path / "spool.db")

        async def scenario() -> None:
            queue_id = await spool.store(message(*(f"r{n}@example.org" for n in range(5))))
            assert await spool.note_waiting("corp", "relay corp is unreachable") == 5
            shown = await view(spool, queue_id)
            assert {r.last_reply for r in shown.recipients} == {"relay corp is unreachable"}
            assert await spool.note_waiting("corp", "again") == 0

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(spool.close())

    def test_too_old_an_sqlite_is_named_at_open(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setattr(sqlite3, "sqlite_version_info", (3, 31, 1))
        monkeypatch.setattr(sqlite3, "sqlite_version", "3.31.1")
        with pytest.raises(sqlite3.NotSupportedError, match=r"SQLite 3\.31\.1 is too old.*3\.35"):
            SqliteSpool.open(tmp_path / "spool.db", exclusive=True)
        # Nothing left locked: with a good SQLite the same spool opens.
        monkeypatch.undo()
        asyncio.run(SqliteSpool.open(tmp_path / "spool.db", exclusive=True).close())

    def test_closed_spool_refuses_work(self, tmp_path: Path) -> None:
        spool = SqliteSpool.open(tmp_path / "spool.db")
        asyncio.run(spool.close())

        async def scenario() -> None:
            await spool.store(message("a@example.org"))

        with pytest.raises(RuntimeError, match="closed"):
            asyncio.run(scenario())

    def test_two_messages_in_the_same_microsecond(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # Forces the collision that otherwise happens with a chance of about 1 in 2**20
        # per pair of messages received in the same microsecond.
        monkeypatch.setattr("smtpgate.spool.base.random.getrandbits", lambda bits: 0xABABA)
        spool = SqliteSpool.open(tmp_path / "spool.db")

        async def scenario() -> None:
            first = await spool.store(message("a@example.org"))
            second = await spool.store(message("b@example.org"))
            assert first != second

        try:
            asyncio.run(scenario())
        finally:
            asyncio.run(spool.close())
