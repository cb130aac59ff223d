"""SQLite spool: the embedded default, one file in WAL mode.

Its statements run in batches on a writer (`spool/writers.py`): a thread in the server,
where many SMTP sessions share one commit and one WAL fsync; in the delivery process,
its event loop's own thread while mail arrives, a thread beside it otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import functools
import itertools
import json
import os
import sqlite3
from collections.abc import Generator, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from smtpgate import crashpoints, logs
from smtpgate.body import CHUNK, HEAD, LARGE, Body, Content, size_of
from smtpgate.jobs import day_job
from smtpgate.spool import salvage
from smtpgate.spool.base import (
    Delivery,
    JobAction,
    JobCancelledError,
    JobControl,
    JobError,
    JobRecipientView,
    JobView,
    LeasedRecipient,
    MessageView,
    NewMessage,
    NewRecipient,
    RecipientState,
    RecipientUpdate,
    RecipientView,
    Spool,
    SpoolLockedError,
    new_queue_id,
)
from smtpgate.spool.checkpoint import FALLBACK_PAGES, LOG_BYTES_KEPT, Checkpointer
from smtpgate.spool.writers import LoopWriter, ThreadWriter

T = TypeVar("T")
log = logs.get(__name__)

SCHEMA_VERSION = 3
MIGRATIONS = {  # from version N to N + 1
    1: "ALTER TABLE recipients ADD COLUMN via TEXT;",
    2: """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, route TEXT NOT NULL,
        control TEXT NOT NULL DEFAULT 'active', created_at REAL NOT NULL, started_at REAL,
        finished_at REAL, served_at REAL, send_at REAL, submitted_by TEXT, paused_at REAL,
        paused_for REAL NOT NULL DEFAULT 0
    );
    ALTER TABLE messages ADD COLUMN send_at REAL;
    ALTER TABLE messages ADD COLUMN submitted_by TEXT;
    ALTER TABLE recipients ADD COLUMN job_id INTEGER REFERENCES jobs(id);
    INSERT INTO jobs (name, route, created_at)
        SELECT r.route || '-' || date(min(m.received_at), 'unixepoch', 'localtime'),
               r.route, min(m.received_at)
        FROM recipients r JOIN messages m USING (queue_id) GROUP BY r.route;
    UPDATE recipients SET job_id = (SELECT id FROM jobs WHERE jobs.route = recipients.route);
    UPDATE jobs SET finished_at = created_at WHERE NOT EXISTS (SELECT 1 FROM recipients
        WHERE job_id = jobs.id AND state IN ('queued', 'deferred', 'sending', 'held'));
    DROP INDEX IF EXISTS recipients_due;
    """,
}
SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id       TEXT PRIMARY KEY,
    sender         TEXT NOT NULL,
    size           INTEGER NOT NULL,
    received_at    REAL NOT NULL,
    client_address TEXT NOT NULL,
    helo           TEXT NOT NULL,
    smtputf8       INTEGER NOT NULL,
    content        BLOB NOT NULL,
    send_at        REAL,
    submitted_by   TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    route        TEXT NOT NULL,  -- of its first recipient: what `smtpgate jobs` shows
    control      TEXT NOT NULL DEFAULT 'active',
    created_at   REAL NOT NULL,
    started_at   REAL,
    finished_at  REAL,  -- set when nothing is left to send; cleared when mail joins again
    served_at    REAL,  -- last lease: the least recently served job goes first
    send_at      REAL,
    submitted_by TEXT,
    paused_at    REAL,  -- while paused: since when
    paused_for   REAL NOT NULL DEFAULT 0  -- time spent paused, not counted in retry lifetimes
);
CREATE TABLE IF NOT EXISTS recipients (
    id           INTEGER PRIMARY KEY,
    queue_id     TEXT NOT NULL REFERENCES messages(queue_id),
    address      TEXT NOT NULL,
    route        TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL,
    last_reply   TEXT,
    updated_at   REAL NOT NULL,
    via          TEXT,
    job_id       INTEGER REFERENCES jobs(id)
);
CREATE INDEX IF NOT EXISTS recipients_of_message ON recipients(queue_id);
CREATE INDEX IF NOT EXISTS recipients_due_by_job_route ON recipients(job_id, route, next_attempt)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS recipients_by_job ON recipients(job_id, state);
CREATE INDEX IF NOT EXISTS recipients_of_job ON recipients(job_id);
CREATE INDEX IF NOT EXISTS recipients_unexplained ON recipients(route, state)
    WHERE last_reply IS NULL;
CREATE INDEX IF NOT EXISTS messages_by_age ON messages(received_at);
CREATE TABLE IF NOT EXISTS relay_sends (
    relay TEXT NOT NULL,
    at    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS relay_sends_by_time ON relay_sends(relay, at);
CREATE TABLE IF NOT EXISTS relay_status (
    relay      TEXT PRIMARY KEY,
    status     TEXT NOT NULL,
    updated_at REAL NOT NULL
);
"""
ID_ATTEMPTS = 8
INSERT_RECIPIENTS = (
    "INSERT INTO recipients (queue_id, address, route, state, next_attempt, updated_at, job_id)"
)
MIN_SQLITE = (3, 35, 0)
LEASE_WINDOW = 5000  # at most this many due recipients looked at to find the oldest-due
LEASE_ROWS_MIN, LEASE_ROWS_PER_MESSAGE = 100, 20  # the window for a smaller lease
ROWS_PER_STATEMENT = 256  # at most 2,560 bound values, far under SQLite's limit
NOTE_ROWS = 10_000  # recipients explained a transaction (note_waiting): 20 ms or so


class SqliteSpool(Spool):
    """See `Spool`. Open with `SqliteSpool.open(path, exclusive=True)` in the server."""

    def __init__(
        self,
        writer: ThreadWriter | LoopWriter,
        lock_file: int | None,
        salvaged: salvage.SalvageReport | None,
        reader: ThreadWriter | LoopWriter | None = None,
        checkpointer: Checkpointer | None = None,
    ) -> None:
        self._writer = writer
        # Reads for people (the jobs page, metrics, job controls) on a connection of their
        # own: counting a million recipients never holds up the commit a 250 waits for.
        self._reader = reader or writer
        self._lock_file = lock_file
        self._checkpointer = checkpointer
        self.salvaged = salvaged  # what a salvage at this start quarantined, for the log

    @classmethod
    def open(
        cls,
        path: Path,
        *,
        exclusive: bool = False,
        quarantine: Path | None = None,
        on_loop: bool = False,
    ) -> SqliteSpool:
        """Open (creating if needed). `exclusive` takes the single-server lock or raises
        SpoolLockedError, so two servers never lease the same recipients, and checks the
        spool: a damaged one is salvaged with its damage moved into `quarantine`, or,
        without one or when salvage is impossible, refused with SpoolDamagedError.
        `on_loop`: the delivery process's connection, its batches run on the caller's
        event loop while mail arrives, else on a thread (LoopWriter). Its commits do not
        wait for the disk (synchronous = NORMAL), and it leaves copying the log back to
        the server's Checkpointer: a power cut may take back its last leases and results,
        so a message may be delivered again, as after any crash mid-delivery, but none is
        lost; and the listener's next commit flushes them with its own, being later in
        the same log."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if on_loop:
            if exclusive:
                raise ValueError("the server's own connection runs on a thread of its own")
            on_the_loop = LoopWriter(path, functools.partial(_connect, path, delivery=True))
            on_the_loop.start_and_wait()
            return cls(on_the_loop, None, None)
        lock_file = _take_lock(path) if exclusive else None
        try:
            report = _checked(path, quarantine) if exclusive else None
            writer = ThreadWriter(path, functools.partial(_connect, path, server=exclusive))
            writer.start_and_wait()
            reader = checkpointer = None
            if exclusive:
                reader = ThreadWriter(path, functools.partial(_connect, path), name="spool-reader")
                try:
                    reader.start_and_wait()
                except BaseException:
                    writer.stop()
                    raise
                checkpointer = Checkpointer(path)
                try:
                    checkpointer.start()
                except BaseException:
                    reader.stop()
                    writer.stop()
                    raise
        except BaseException:
            if lock_file is not None:
                os.close(lock_file)
            raise
        return cls(writer, lock_file, report, reader, checkpointer)

    def mail_arriving(self, seconds: float) -> None:
        """The delivery process hears that the listener is storing mail: for the next
        `seconds` its batches hold the write turn for as little as possible (LoopWriter)."""
        if isinstance(self._writer, LoopWriter):
            self._writer.mail_arriving(seconds)

    @property
    def lock_file(self) -> int | None:
        """The descriptor holding the single-server lock (an exclusive open only): a
        child that inherits it keeps the spool locked until it exits too."""
        return self._lock_file

    async def close(self) -> None:
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
        if self._reader is not self._writer:
            await self._reader.close()
        await self._writer.close()
        if self._lock_file is not None:
            os.close(self._lock_file)
            self._lock_file = None

    # --- writes ---------------------------------------------------------------------

    async def store(self, message: NewMessage) -> str:
        # A message held whole is stored with those queued beside it, in shared statements.
        together = (_insert_many, message) if isinstance(message.content, bytes) else None
        written = self._writer.submit(lambda db: _insert(db, message), together=together)
        try:
            # Shielded: the writer thread reads a Body's file while it runs, so a caller
            # cancelled meanwhile (its client hung up) must not return and close that
            # file first; the descriptor could be reused by another file by then.
            queue_id: str = await asyncio.shield(written)
        except asyncio.CancelledError:
            await asyncio.wait({written})
            if not written.cancelled():
                written.exception()  # seen: the caller is gone, the log is not the place
            raise
        crashpoints.reached("after_commit")
        return queue_id

    async def lease_due(self, routes: Sequence[str], now: float, limit: int) -> list[Delivery]:
        if not routes or limit <= 0:
            return []
        # What to lease is read without the write turn; the lease itself is one short
        # write, which the server's stores need not wait long for.
        plan = await self._writer.submit(
            lambda db: _plan_lease(db, routes, now, limit), reads_only=True
        )
        if plan is None:
            return []
        try:
            return await self._writer.submit(lambda db: _take_lease(db, plan))
        except _LeaseRacedError:  # a job paused or a recipient cancelled in between

            def read_and_lease(db: sqlite3.Connection) -> list[Delivery]:
                again = _plan_lease(db, routes, now, limit)
                return [] if again is None else _take_lease(db, again)

            return await self._writer.submit(read_and_lease)

    async def record(
        self, updates: Sequence[RecipientUpdate], now: float, notices: Sequence[NewMessage] = ()
    ) -> list[str]:
        def write(db: sqlite3.Connection) -> list[str]:
            _record_many(db, [(updates, now)])
            stored = []
            for notice in notices:  # in this transaction: a recorded failure keeps its DSN
                db.execute("SAVEPOINT notice")
                try:
                    stored.append(_insert(db, notice))
                except Exception:  # the results must be written even if a notice cannot
                    db.execute("ROLLBACK TO notice")
                    log.exception("cannot store a delivery status notice")
                db.execute("RELEASE notice")
            return stored

        # Results without bounces are written with those queued beside them, in one go.
        together = None if notices else (_record_many, (updates, now))
        stored: list[str] = await self._writer.submit(write, together=together)
        return stored

    async def release_leases(self, now: float, routes: Sequence[str] | None = None) -> int:
        def release(db: sqlite3.Connection) -> int:
            where, chosen = "state = 'sending'", tuple(routes or ())
            if routes is not None:
                where += f" AND route IN ({_marks(chosen)})"
            # A job cancelled meanwhile does not send them again: cancelled, not queued.
            jobs = [
                job_id
                for (job_id,) in db.execute(
                    f"SELECT DISTINCT job_id FROM recipients WHERE {where}", chosen
                )
            ]
            released: int = db.execute(
                "UPDATE recipients SET state = CASE WHEN (SELECT control FROM jobs"
                " WHERE id = job_id) = 'cancelled' THEN 'cancelled' ELSE 'queued' END,"
                " next_attempt = ?, updated_at = ?,"
                " last_reply = 'interrupted while sending (outcome unknown); ' || CASE WHEN"
                " (SELECT control FROM jobs WHERE id = job_id) = 'cancelled'"
                " THEN 'its job was cancelled' ELSE 'sending again' END"
                f" WHERE {where}",
                (now, now, *chosen),
            ).rowcount
            # Every open job, not only those with leases: one whose last recipients were
            # settled by a process that died first (or by a salvage) is finished too.
            _settle_jobs(db, jobs + _open_jobs(db), now)
            return released

        return await self._writer.submit(release)

    async def note_waiting(self, route: str, reason: str) -> int:
        """In transactions of NOTE_ROWS rows: a campaign of a million (1.3 s in one) would
        hold the write turn, and the listener's 250s, that long."""

        def note(db: sqlite3.Connection) -> int:
            return db.execute(
                "UPDATE recipients SET last_reply = ? WHERE id IN (SELECT id FROM recipients"
                " WHERE route = ? AND state = 'queued' AND last_reply IS NULL LIMIT ?)",
                (reason, route, NOTE_ROWS),
            ).rowcount

        noted = 0
        while True:
            done = await self._writer.submit(note)
            noted += done
            if done < NOTE_ROWS:
                return noted

    async def recipient_ids(self, queue_id: str) -> list[int]:
        def read(db: sqlite3.Connection) -> list[int]:
            return [
                rid
                for (rid,) in db.execute(
                    "SELECT id FROM recipients WHERE queue_id = ? ORDER BY id", (queue_id,)
                )
            ]

        return await self._writer.submit(read, reads_only=True)

    async def pending_routes(self) -> set[str]:
        def read(db: sqlite3.Connection) -> set[str]:
            return {
                route
                for (route,) in db.execute(
                    "SELECT DISTINCT route FROM recipients WHERE state IN ('queued', 'deferred')"
                )
            }

        return await self._writer.submit(read, reads_only=True)

    async def retry_now(self, queue_id: str | None, now: float) -> int:
        def retry(db: sqlite3.Connection) -> int:
            sql = "UPDATE recipients SET next_attempt = ?, updated_at = ? WHERE state = 'deferred'"
            if queue_id is None:
                return db.execute(sql, (now, now)).rowcount
            return db.execute(sql + " AND queue_id = ?", (now, now, queue_id)).rowcount

        return await self._writer.submit(retry)

    async def log_send(self, relay: str, at: float) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO relay_sends VALUES (?, ?)", (relay, at))
            # The longest rate window is a day: older sends are of no use.
            db.execute(
                "DELETE FROM relay_sends WHERE relay = ? AND at < ?", (relay, at - 2 * 86400)
            )

        await self._writer.submit(insert)

    async def sends_since(self, relay: str, since: float) -> list[float]:
        def read(db: sqlite3.Connection) -> list[float]:
            db.execute("DELETE FROM relay_sends WHERE relay = ? AND at <= ?", (relay, since))
            return [
                at
                for (at,) in db.execute(
                    "SELECT at FROM relay_sends WHERE relay = ? ORDER BY at", (relay,)
                )
            ]

        return await self._writer.submit(read)

    async def set_relay_status(self, relay: str, status: str | None, now: float) -> None:
        def write(db: sqlite3.Connection) -> None:
            if status is None:
                db.execute("DELETE FROM relay_status WHERE relay = ?", (relay,))
            else:
                db.execute(
                    "INSERT OR REPLACE INTO relay_status VALUES (?, ?, ?)", (relay, status, now)
                )

        await self._writer.submit(write)

    async def relay_statuses(self) -> dict[str, tuple[str, float]]:
        def read(db: sqlite3.Connection) -> dict[str, tuple[str, float]]:
            return {
                relay: (status, at)
                for relay, status, at in db.execute(
                    "SELECT relay, status, updated_at FROM relay_status"
                )
            }

        return await self._reader.submit(read, reads_only=True)

    # --- reads ----------------------------------------------------------------------

    async def jobs(self) -> list[JobView]:
        def read(db: sqlite3.Connection) -> list[JobView]:
            return _job_views(db, "SELECT {} FROM jobs ORDER BY created_at DESC, id DESC", ())

        return await self._reader.submit(read, reads_only=True)

    async def job(self, name: str) -> JobView | None:
        def read(db: sqlite3.Connection) -> JobView | None:
            views = _job_views(db, "SELECT {} FROM jobs WHERE name = ?", (name,))
            return views[0] if views else None

        return await self._reader.submit(read, reads_only=True)

    async def job_failures(self, name: str, limit: int) -> list[tuple[str, int]]:
        def read(db: sqlite3.Connection) -> list[tuple[str, int]]:
            return [
                (reply or "(no reply)", count)
                for reply, count in db.execute(
                    "SELECT last_reply, count(*) FROM recipients WHERE job_id ="
                    " (SELECT id FROM jobs WHERE name = ?) AND state = 'failed'"
                    " GROUP BY last_reply ORDER BY count(*) DESC, last_reply LIMIT ?",
                    (name, limit),
                )
            ]

        return await self._reader.submit(read, reads_only=True)

    async def job_recipients(
        self, name: str, state: RecipientState | None, after_id: int, limit: int
    ) -> list[JobRecipientView]:
        def read(db: sqlite3.Connection) -> list[JobRecipientView]:
            sql = (
                "SELECT id, queue_id, address, route, state, attempts, last_reply, updated_at,"
                " via FROM recipients WHERE job_id = (SELECT id FROM jobs WHERE name = ?)"
                " AND id > ?"
            )
            params: tuple[object, ...] = (name, after_id)
            if state is not None:
                sql += " AND state = ?"
                params += (state.value,)
            rows = db.execute(sql + " ORDER BY id LIMIT ?", (*params, limit)).fetchall()
            return [
                JobRecipientView(rid, qid, address, route, RecipientState(st), *rest)
                for rid, qid, address, route, st, *rest in rows
            ]

        return await self._reader.submit(read, reads_only=True)

    async def control_job(self, name: str, action: JobAction, now: float) -> int:
        def control(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT id, control FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise JobError(f"no job {name!r}; `smtpgate jobs` lists them")
            job_id, current = row
            allowed, new = _JOB_TRANSITIONS[action]
            if current not in allowed:
                raise JobError(f"job {name!r} is {current}; it cannot {action.value}")
            db.execute("UPDATE jobs SET control = ? WHERE id = ?", (new, job_id))
            if action is JobAction.PAUSE:
                db.execute("UPDATE jobs SET paused_at = ? WHERE id = ?", (now, job_id))
            elif action is JobAction.RESUME:  # the pause does not eat the retry lifetime
                db.execute(
                    "UPDATE jobs SET paused_for = paused_for + max(0, ? - coalesce(paused_at, ?)),"
                    " paused_at = NULL WHERE id = ?",
                    (now, now, job_id),
                )
            changed = 0
            if action is JobAction.CANCEL:
                changed = db.execute(
                    "UPDATE recipients SET state = 'cancelled', updated_at = ?,"
                    " last_reply = 'cancelled by smtpgate job cancel' WHERE job_id = ?"
                    " AND state IN ('queued', 'deferred', 'held')",
                    (now, job_id),
                ).rowcount
            elif action is JobAction.RELEASE:
                changed = db.execute(
                    "UPDATE recipients SET state = 'queued', updated_at = ?"
                    " WHERE job_id = ? AND state = 'held'",
                    (now, job_id),
                ).rowcount
            _settle_jobs(db, [job_id], now)
            return changed

        return await self._writer.submit(control)

    async def retry_job(self, name: str, now: float, *, failed_too: bool) -> int:
        def retry(db: sqlite3.Connection) -> int:
            row = db.execute("SELECT id, control FROM jobs WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise JobError(f"no job {name!r}; `smtpgate jobs` lists them")
            if row[1] == "cancelled":
                raise JobError(f"job {name!r} is cancelled; it cannot retry")
            states = "('deferred', 'failed')" if failed_too else "('deferred')"
            changed: int = db.execute(
                "UPDATE recipients SET state = CASE state WHEN 'failed' THEN 'queued'"
                " ELSE state END, next_attempt = ?, updated_at = ?"
                f" WHERE job_id = ? AND state IN {states}",
                (now, now, row[0]),
            ).rowcount
            if changed:
                db.execute("UPDATE jobs SET finished_at = NULL WHERE id = ?", (row[0],))
            return changed

        return await self._writer.submit(retry)

    async def schedule_job(self, name: str, send_at: float | None) -> None:
        def schedule(db: sqlite3.Connection) -> None:
            if not db.execute(
                "UPDATE jobs SET send_at = ? WHERE name = ?", (send_at, name)
            ).rowcount:
                raise JobError(f"no job {name!r}; `smtpgate jobs` lists them")

        await self._writer.submit(schedule)

    async def job_controls(self) -> dict[str, JobControl]:
        def read(db: sqlite3.Connection) -> dict[str, JobControl]:
            return {
                name: JobControl(control)
                for name, control in db.execute(
                    "SELECT name, control FROM jobs WHERE control != 'active'"
                    " AND finished_at IS NULL"
                )
            }

        return await self._reader.submit(read, reads_only=True)

    async def messages(self, limit: int | None = None) -> list[MessageView]:
        def read(db: sqlite3.Connection) -> list[MessageView]:
            rows = db.execute(
                "SELECT queue_id, sender, size, received_at, client_address, helo"
                " FROM messages ORDER BY received_at DESC, queue_id DESC LIMIT ?",
                (-1 if limit is None else limit,),
            ).fetchall()
            return _with_recipients(db, rows)

        return await self._reader.submit(read, reads_only=True)

    async def message(self, queue_id: str) -> MessageView | None:
        def read(db: sqlite3.Connection) -> MessageView | None:
            rows = db.execute(
                "SELECT queue_id, sender, size, received_at, client_address, helo"
                " FROM messages WHERE queue_id = ?",
                (queue_id,),
            ).fetchall()
            views = _with_recipients(db, rows)
            return views[0] if views else None

        return await self._reader.submit(read, reads_only=True)

    async def content(self, queue_id: str) -> bytes | None:
        def read(db: sqlite3.Connection) -> bytes | None:
            row = db.execute(
                "SELECT content FROM messages WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            return None if row is None else bytes(row[0])

        return await self._reader.submit(read, reads_only=True)


def _record_many(
    db: sqlite3.Connection, results: list[tuple[Sequence[RecipientUpdate], float]]
) -> list[list[str]]:
    """Results of many deliveries in one UPDATE (and the jobs they finish); the stored
    bounces of each, none here. A job cancelled while these were on the wire: what went
    out stays delivered or failed, what would be tried again is cancelled instead."""
    rows: dict[int, tuple[object, ...]] = {}  # a recipient's first result counts, as in turn
    for updates, now in results:
        for u in updates:
            rows.setdefault(
                u.recipient_id,
                (
                    u.recipient_id,
                    u.state.value,
                    u.reply,
                    u.next_attempt,
                    int(u.counts_as_attempt),
                    now,
                    u.via,
                ),
            )
    for chunk in _in_chunks(list(rows.values())):
        db.execute(
            "UPDATE recipients SET state = CASE WHEN r.column2 IN ('queued', 'deferred')"
            " AND (SELECT control FROM jobs WHERE id = job_id) = 'cancelled'"
            " THEN 'cancelled' ELSE r.column2 END,"
            " last_reply = coalesce(r.column3, last_reply), next_attempt = r.column4,"
            " attempts = attempts + r.column5, updated_at = r.column6,"
            f" via = coalesce(r.column7, via) FROM (VALUES {_rows(7, len(chunk))}) AS r"
            " WHERE recipients.id = r.column1 AND state = 'sending'",
            [value for row in chunk for value in row],
        )
    _settle_jobs(db, _jobs_of(db, list(rows)), max(now for _, now in results))
    return [[] for _ in results]


class _LeaseRacedError(Exception):
    """What a lease plan read changed before it was leased."""


@dataclasses.dataclass(frozen=True)
class _LeasePlan:
    """A lease as read, before it is taken: the messages chosen, in the jobs' turns, and
    their due recipients."""

    now: float
    chosen: list[tuple[int, tuple[str, str]]]  # (job id, (queue id, route))
    job_names: dict[int, str]
    recipients: list[list[Any]]  # [queue id, route, id, address, attempts], by id
    messages: dict[str, _Stored]


def _plan_lease(
    db: sqlite3.Connection, routes: Sequence[str], now: float, limit: int
) -> _LeasePlan | None:
    """Up to `limit` messages with recipients due on `routes`, and all they need to be
    sent; None when nothing is due. Reads only."""
    # Jobs take turns, least recently served first, one message each per round:
    # a job of a million recipients never starves a small one queued after it.
    jobs = db.execute(
        "SELECT id, name FROM jobs WHERE control = 'active' AND finished_at IS NULL"
        " AND coalesce(send_at, 0) <= ? ORDER BY coalesce(served_at, 0), id",
        (now,),
    ).fetchall()
    # One indexed range per (job, route): (job_id, route, next_attempt) in index
    # order, so a job of a million due recipients costs `limit` rows, not a scan.
    due = "job_id = ? AND route = ? AND state IN ('queued', 'deferred') AND next_attempt <= ?"
    candidates = []
    for job_id, _ in jobs:
        rows: list[tuple[float, int, str, str]] = []
        for route in routes:
            # A row a message, its oldest due, not a row a recipient: every row
            # fetched costs the thread a wait for the interpreter lock.
            rows += db.execute(
                "SELECT min(next_attempt), min(id), queue_id, ? FROM"
                " (SELECT next_attempt, id, queue_id FROM recipients"
                f" WHERE {due} ORDER BY next_attempt, id LIMIT ?)"
                " GROUP BY queue_id ORDER BY 1, 2 LIMIT ?",
                (route, job_id, route, now, _window(limit), limit),
            ).fetchall()
        picks: dict[tuple[str, str], None] = {}  # oldest due first, once each
        for _, _, queue_id, route in sorted(rows):
            picks.setdefault((queue_id, route))
            if len(picks) >= limit:
                break
        candidates.append([(job_id, pick) for pick in picks])
    chosen = [pick for turn in itertools.zip_longest(*candidates) for pick in turn if pick]
    chosen = chosen[:limit]
    if not chosen:
        return None
    # The due recipients of the chosen messages, by message (its index), not by the
    # job's due range; all in one row.
    wanted = json.dumps([[queue_id, job_id, route] for job_id, (queue_id, route) in chosen])
    (found,) = db.execute(
        "SELECT json_group_array(json_array(r.queue_id, r.route, r.id, r.address,"
        " r.attempts)) FROM json_each(?) AS p"
        " JOIN recipients AS r INDEXED BY recipients_of_message"
        " ON r.queue_id = json_extract(p.value, '$[0]')"
        " AND r.job_id = json_extract(p.value, '$[1]')"
        " AND r.route = json_extract(p.value, '$[2]')"
        " WHERE r.state IN ('queued', 'deferred') AND r.next_attempt <= ?",
        (wanted, now),
    ).fetchone()
    recipients = sorted(json.loads(found), key=lambda row: row[2])
    if not recipients:
        return None
    messages = _fetch_messages(db, {row[0] for row in recipients})
    return _LeasePlan(now, chosen, dict(jobs), recipients, messages)


def _take_lease(db: sqlite3.Connection, plan: _LeasePlan) -> list[Delivery]:
    """Lease what `plan` read, if every one of its recipients is still due and its job
    still sending; else _LeaseRacedError, and the caller rolls back what this wrote."""
    now = plan.now
    leased = db.execute(
        "UPDATE recipients SET state = 'sending', updated_at = ?"
        " WHERE id IN (SELECT value FROM json_each(?))"
        " AND state IN ('queued', 'deferred') AND next_attempt <= ?"
        " AND job_id IN (SELECT id FROM jobs WHERE control = 'active'"
        " AND finished_at IS NULL AND coalesce(send_at, 0) <= ?)",
        (now, json.dumps([row[2] for row in plan.recipients]), now, now),
    ).rowcount
    if leased != len(plan.recipients):
        raise _LeaseRacedError
    served = sorted({job_id for job_id, _ in plan.chosen})
    started = dict(  # when each job began sending, moved on by the time it spent paused
        db.execute(
            "UPDATE jobs SET served_at = ?, started_at = coalesce(started_at, ?)"
            " WHERE id IN (SELECT value FROM json_each(?)) RETURNING id, started_at + paused_for",
            (now, now, json.dumps(served)),
        ).fetchall()
    )
    # Deliveries in the order chosen: the jobs' turns.
    grouped: dict[tuple[str, str], list[LeasedRecipient]] = {p: [] for _, p in plan.chosen}
    for queue_id, route, rid, address, attempts in plan.recipients:
        grouped[(queue_id, route)].append(LeasedRecipient(rid, address, attempts))
    job_of = {pick: job_id for job_id, pick in plan.chosen}
    deliveries = []
    for (queue_id, route), recipients in grouped.items():
        if not recipients:
            continue
        sender, content, smtputf8, received_at, send_at, client, user = plan.messages[queue_id]
        job_id = job_of[(queue_id, route)]
        deliveries.append(
            Delivery(
                queue_id,
                route,
                sender,
                content,
                smtputf8,
                received_at,
                tuple(recipients),
                job=plan.job_names[job_id],
                send_at=send_at,
                job_started_at=started[job_id],
                client_address=client,
                submitted_by=user,
            )
        )
    return deliveries


def _open_jobs(db: sqlite3.Connection) -> list[int]:
    return [job_id for (job_id,) in db.execute("SELECT id FROM jobs WHERE finished_at IS NULL")]


def _jobs_of(db: sqlite3.Connection, recipient_ids: Sequence[int]) -> set[int]:
    jobs: set[int] = set()
    for start in range(0, len(recipient_ids), 500):
        chunk = recipient_ids[start : start + 500]
        jobs.update(
            job_id
            for (job_id,) in db.execute(
                f"SELECT DISTINCT job_id FROM recipients WHERE id IN ({_marks(chunk)})", chunk
            )
        )
    return jobs


def _window(limit: int) -> int:
    """Due rows to look at for `limit` messages: enough for a few recipients each, and
    no more, since the scheduler leases often and each row looked at costs a lookup."""
    return min(LEASE_WINDOW, LEASE_ROWS_MIN + LEASE_ROWS_PER_MESSAGE * limit)


def _marks(values: Sequence[object]) -> str:
    """Bound-parameter placeholders: values never enter the SQL text."""
    return ",".join("?" * len(values))


def _insert(db: sqlite3.Connection, message: NewMessage) -> str:
    """The message and its recipients, under a fresh queue id; returns the id. A Body is
    written into a blob of its size chunk by chunk, never held whole in memory."""
    blob = "?" if isinstance(message.content, bytes) else "zeroblob(?)"
    for step in range(ID_ATTEMPTS):
        # Each retry moves the clock part on by 1 µs, so even a stuck random
        # source cannot collide forever.
        queue_id = new_queue_id(message.received_at + step / 1_000_000)
        try:
            cursor = db.execute(
                f"INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, {blob}, ?, ?)",
                _message_row(queue_id, message),
            )
        except sqlite3.IntegrityError:
            continue
        break
    else:
        raise RuntimeError(f"no free queue id after {ID_ATTEMPTS} attempts")
    if isinstance(message.content, Body) and cursor.lastrowid is not None:
        with db.blobopen("messages", "content", cursor.lastrowid) as stored:
            for chunk in message.content.chunks():
                stored.write(chunk)
    _insert_rows(db, INSERT_RECIPIENTS, _recipient_rows(db, queue_id, message, {}))
    return queue_id


def _insert_many(db: sqlite3.Connection, messages: list[NewMessage]) -> list[str]:
    """Messages held whole (bytes), stored as `_insert` would store each, in a few
    statements for all. A queue id taken already, or a named job cancelled, fails them
    all; the writer then stores each alone, where `_insert` deals with it."""
    queue_ids = [new_queue_id(message.received_at) for message in messages]
    stored = list(zip(queue_ids, messages, strict=True))
    _insert_rows(db, "INSERT INTO messages", [_message_row(*pair) for pair in stored])
    jobs: dict[str, tuple[int, str]] = {}  # shared: each job is joined once
    rows = [row for pair in stored for row in _recipient_rows(db, *pair, jobs)]
    _insert_rows(db, INSERT_RECIPIENTS, rows)
    return queue_ids


def _message_row(queue_id: str, message: NewMessage) -> tuple[object, ...]:
    """A messages row; a Body's content is its size, for a zeroblob it is written into."""
    content = message.content
    return (
        queue_id,
        message.sender,
        size_of(content),
        message.received_at,
        message.client_address,
        message.helo,
        message.smtputf8,
        content if isinstance(content, bytes) else content.size,
        message.send_at,
        message.submitted_by,
    )


def _recipient_rows(
    db: sqlite3.Connection,
    queue_id: str,
    message: NewMessage,
    jobs: dict[str, tuple[int, str]],
) -> list[tuple[object, ...]]:
    """The message's recipients rows (see INSERT_RECIPIENTS), joining each one's job;
    `jobs` remembers the jobs joined already, by name."""
    due = max(message.received_at, message.send_at or 0.0)
    rows: list[tuple[object, ...]] = []
    for r in message.recipients:
        name = r.job or day_job(r.route, message.received_at)
        if name not in jobs:
            jobs[name] = _join_job(db, name, r, message)
        job_id, control = jobs[name]
        state = "sending" if r.leased else "held" if control == "held" else "queued"
        rows.append((queue_id, r.address, r.route, state, due, message.received_at, job_id))
    return rows


def _insert_rows(db: sqlite3.Connection, into: str, rows: Sequence[tuple[object, ...]]) -> None:
    for chunk in _in_chunks(rows):
        db.execute(
            f"{into} VALUES {_rows(len(chunk[0]), len(chunk))}", [v for r in chunk for v in r]
        )


def _in_chunks(rows: Sequence[T]) -> Generator[Sequence[T], None, None]:
    """Rows for as few statements as keep each one prepared: a chunk's size is a power of
    two (at most ROWS_PER_STATEMENT), so SQLite's statement cache holds a few sizes
    instead of parsing a new statement for every number of rows."""
    start = 0
    while start < len(rows):
        size = min(ROWS_PER_STATEMENT, 1 << (len(rows) - start).bit_length() - 1)
        yield rows[start : start + size]
        start += size


@functools.lru_cache(maxsize=64)
def _rows(width: int, size: int) -> str:
    """Placeholders for `size` rows of `width` values: "(?,?),(?,?)"."""
    return ",".join(["(" + ",".join("?" * width) + ")"] * size)


_Stored = tuple[str, Content, bool, float, float | None, str, str | None]


def _fetch_messages(db: sqlite3.Connection, queue_ids: set[str]) -> dict[str, _Stored]:
    """The messages to send: small ones whole, large ones as a BlobBody that reads them
    later, a chunk at a time, with only their head read now."""
    path: Path | None = None
    found: dict[str, _Stored] = {}
    ids = sorted(queue_ids)
    for start in range(0, len(ids), 500):  # stay under SQLite's bound-parameter limit
        chunk = ids[start : start + 500]
        for queue_id, row, size, sender, small, *rest in db.execute(
            # CASE leaves a large blob unread: SQLite reads a column only when it is used.
            "SELECT queue_id, rowid, size, sender, CASE WHEN size > ? THEN NULL ELSE content"
            " END, smtputf8, received_at, send_at, client_address, submitted_by"
            f" FROM messages WHERE queue_id IN ({_marks(chunk)})",
            (LARGE, *chunk),
        ):
            smtputf8, received_at, send_at, client, user = rest
            content: Content
            if small is not None:
                content = bytes(small)
            else:
                with db.blobopen("messages", "content", row, readonly=True) as blob:
                    head = blob.read(HEAD)
                path = path or Path(db.execute("PRAGMA database_list").fetchone()[2])
                content = BlobBody(path, queue_id, size, head)
            found[queue_id] = (sender, content, bool(smtputf8), received_at, send_at, client, user)
    return found


class BlobBody(Body):
    """A stored message, read from its blob a chunk at a time on a connection of its own
    (one per pass, in one read transaction): the spool never changes a stored message."""

    def __init__(self, path: Path, queue_id: str, size: int, head: bytes) -> None:
        self._path = path
        self._queue_id = queue_id
        self.size = size
        self._head = head

    @property
    def head(self) -> bytes:
        return self._head

    def chunks(self) -> Generator[bytes, None, None]:
        # Not bound to one thread: read_chunks reads each chunk on any worker thread.
        db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 10000")
            db.execute("BEGIN")
            row = db.execute(
                "SELECT rowid FROM messages WHERE queue_id = ?", (self._queue_id,)
            ).fetchone()
            if row is None:
                raise LookupError(f"message {self._queue_id} is no longer in the spool")
            with db.blobopen("messages", "content", row[0], readonly=True) as blob:
                while piece := blob.read(CHUNK):
                    yield piece
        finally:
            db.close()

    def close(self) -> None:
        """Nothing is held between passes."""


def _join_job(
    db: sqlite3.Connection, name: str, recipient: NewRecipient, message: NewMessage
) -> tuple[int, str]:
    """The job's id and control, creating the job (held if its route holds new jobs).
    Mail joining a finished job opens it again. A cancelled job someone named takes no
    more mail; the route's job of the day gives way to a new one ("news-2026-11-29-2")."""
    for suffix in range(1, 1000):
        candidate = name if suffix == 1 else f"{name}-{suffix}"
        job_id, control = db.execute(
            "INSERT INTO jobs (name, route, control, created_at, submitted_by)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET finished_at ="
            " CASE WHEN control = 'cancelled' THEN finished_at END RETURNING id, control",
            (
                candidate,
                recipient.route,
                "held" if recipient.hold else "active",
                message.received_at,
                message.submitted_by,
            ),
        ).fetchone()
        if control != "cancelled":
            return job_id, control
        if recipient.job:
            raise JobCancelledError(name)
    raise JobCancelledError(name)


def _settle_jobs(db: sqlite3.Connection, job_ids: Iterable[int], now: float) -> None:
    """Mark jobs with nothing left to send as finished (the scheduler stops asking)."""
    db.executemany(
        "UPDATE jobs SET finished_at = ? WHERE id = ? AND finished_at IS NULL AND NOT EXISTS"
        " (SELECT 1 FROM recipients WHERE job_id = jobs.id"
        " AND state IN ('queued', 'deferred', 'sending', 'held'))",
        [(now, job_id) for job_id in job_ids],
    )


_JOB_COLUMNS = (
    "id, name, route, control, created_at, started_at, finished_at, send_at, submitted_by"
)
_JOB_TRANSITIONS = {  # action: (controls it applies to, the control it sets)
    JobAction.CANCEL: (("active", "held", "paused"), "cancelled"),
    JobAction.PAUSE: (("active",), "paused"),
    JobAction.RESUME: (("paused",), "active"),
    JobAction.RELEASE: (("held",), "active"),
}


def _job_views(db: sqlite3.Connection, sql: str, params: tuple[object, ...]) -> list[JobView]:
    """Jobs with their counts. The counts come from the (job_id, state) index alone, so a
    spool of a million recipients is counted without reading a single recipient row."""
    jobs = db.execute(sql.format(_JOB_COLUMNS), params).fetchall()
    counts: dict[int, dict[RecipientState, int]] = {job[0]: {} for job in jobs}
    if len(jobs) == 1:
        rows = db.execute(
            "SELECT job_id, state, count(*) FROM recipients WHERE job_id = ? GROUP BY state",
            (jobs[0][0],),
        )
    else:
        rows = db.execute("SELECT job_id, state, count(*) FROM recipients GROUP BY job_id, state")
    for job_id, state, count in rows:
        if job_id in counts:
            counts[job_id][RecipientState(state)] = count
    return [
        JobView(
            name=row[1],
            route=row[2],
            control=JobControl(row[3]),
            created_at=row[4],
            started_at=row[5],
            finished_at=row[6],
            send_at=row[7],
            submitted_by=row[8],
            counts=counts[row[0]],
        )
        for row in jobs
    ]


def _with_recipients(db: sqlite3.Connection, rows: list[Any]) -> list[MessageView]:
    """Messages with their recipients: one query per 500 messages, not one per message."""
    recipients: dict[str, list[RecipientView]] = {row[0]: [] for row in rows}
    ids = list(recipients)
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for queue_id, *fields in db.execute(
            "SELECT queue_id, id, address, route, state, attempts, next_attempt,"
            " last_reply, updated_at, via FROM recipients"
            f" WHERE queue_id IN ({_marks(chunk)}) ORDER BY id",
            chunk,
        ):
            rid, address, route, state, attempts, next_attempt, reply, updated, via = fields
            recipients[queue_id].append(
                RecipientView(
                    rid,
                    address,
                    route,
                    RecipientState(state),
                    attempts,
                    next_attempt,
                    reply,
                    updated,
                    via,
                )
            )
    return [
        MessageView(queue_id, sender, size, received_at, client, helo, tuple(recipients[queue_id]))
        for queue_id, sender, size, received_at, client, helo in rows
    ]


def _checked(path: Path, quarantine: Path | None) -> salvage.SalvageReport | None:
    """At the server's start, under its lock: finish a salvage a crash interrupted, then
    salvage the spool if quick_check finds it damaged."""
    salvage.finish_pending(path)
    problems = salvage.check(path)
    if not problems:
        return None
    if quarantine is None:
        raise salvage.refusal(path, problems)
    return salvage.salvage(path, quarantine, problems, SCHEMA_VERSION)


def _take_lock(path: Path) -> int:
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise SpoolLockedError(
            f"spool {path} is in use by smtpgate pid {holder}; stop that server first"
            " or give this one another --state-dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _connect(path: Path, *, server: bool = False, delivery: bool = False) -> sqlite3.Connection:
    """The spool's connection, its schema made current. `server`: the server may complete
    the schema (a CLI reader writes nothing). Every commit reaches the disk before it
    returns (before a 250), and one past FALLBACK_PAGES copies the log back itself; not
    the `delivery` process's (see SqliteSpool.open), whose LoopWriter uses it from its
    loop and its thread, never both at once."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=not delivery)
    try:
        _check_sqlite(db)
    except BaseException:
        db.close()
        raise
    db.execute("PRAGMA busy_timeout = 10000")  # the CLI may write while the server runs
    if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
        raise sqlite3.OperationalError(f"{path}: cannot switch to WAL mode")
    db.execute(f"PRAGMA synchronous = {'NORMAL' if delivery else 'FULL'}")
    # The server's Checkpointer copies the log back off the commit path.
    db.execute(f"PRAGMA wal_autocheckpoint = {0 if delivery else FALLBACK_PAGES}")
    db.execute(f"PRAGMA journal_size_limit = {LOG_BYTES_KEPT}")  # after a burst
    db.execute("PRAGMA foreign_keys = ON")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise sqlite3.OperationalError(
            f"{path} has schema {version}, newer than this smtpgate knows"
            f" ({SCHEMA_VERSION}); upgrade smtpgate"
        )
    if version == 0:
        db.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    elif version < SCHEMA_VERSION:  # a reader of a current spool writes nothing here
        steps = "".join(MIGRATIONS[v] for v in range(version, SCHEMA_VERSION))
        db.executescript(f"BEGIN; {steps} {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    elif server:  # the server: every table and index the queries name is there,
        db.executescript(f"BEGIN; {SCHEMA} COMMIT;")  # whatever built this file
    return db


def _check_sqlite(db: sqlite3.Connection) -> None:
    """The statements need RETURNING (SQLite 3.35), UPDATE ... FROM (3.33) and the JSON
    functions: say so at start, not with a syntax error at the first lease."""
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise sqlite3.NotSupportedError(
            f"SQLite {sqlite3.sqlite_version} is too old; smtpgate needs"
            f" {'.'.join(map(str, MIN_SQLITE))} or newer (the one Python is linked with)"
        )
    try:
        db.execute("SELECT json_array(1)").fetchone()
    except sqlite3.OperationalError:
        raise sqlite3.NotSupportedError(
            f"SQLite {sqlite3.sqlite_version} was built without its JSON functions,"
            " which smtpgate needs"
        ) from None
