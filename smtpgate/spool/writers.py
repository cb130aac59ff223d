"""Spool writers: the thread or event loop that runs a connection's queued operations.

Operations queued while a transaction commits are batched into the next one, so many
concurrent SMTP sessions share one WAL fsync (group commit) instead of paying one disk
flush each. A batch that writes takes the spool's write turn first, a lock file that
the server, its delivery process and the CLI share. In the server, all statements run
on one thread that owns the connection (ThreadWriter); stores, and results, queued
together also share their statements: each statement the thread runs lets go of the
interpreter lock and must wait to take it back from the busy event loop, and those
waits, not SQLite, were most of a commit's time while the turn was held. While mail
arrives, the delivery process runs its batches on its event loop's thread instead
(LoopWriter), so that the turn it takes is given back as soon as SQLite is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fcntl
import itertools
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
Operation = Callable[[sqlite3.Connection], Any]
# An operation that can also run in one go with its queued neighbours of the same kind:
# (run_many, its argument); run_many takes the arguments and returns the results in order.
Together = tuple[Callable[[sqlite3.Connection, list[Any]], list[Any]], Any]
Queued = tuple[Operation, asyncio.Future[Any], asyncio.AbstractEventLoop, bool, Together | None]
Settled = tuple[asyncio.Future[Any], Any, BaseException | None]
Outcome = tuple[asyncio.Future[Any], asyncio.AbstractEventLoop, Any, BaseException | None]

MAX_BATCH = 512  # operations per transaction; bounds the latency one commit adds


class ThreadWriter:
    """The one thread that owns the connection and runs queued operations in batches.

    A batch that writes first takes the spool's write turn, a lock file the server, its
    delivery process and the CLI share: a writer waiting for it is woken the moment the
    other lets go, where SQLite's own busy handler would sleep and poll (1, 2, 5, 10 ms
    and more), and two processes writing all the time would mostly wait."""

    def __init__(
        self, path: Path, connect: Callable[[], sqlite3.Connection], *, name: str = "spool-writer"
    ) -> None:
        self._path = path  # of the database: the write turn is `<path>.turn`
        self._connect = connect
        self._turn: int | None = None  # the write turn's lock file, when it can be opened
        self._queue: queue.SimpleQueue[Queued | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ready = threading.Event()
        self._open_error: BaseException | None = None

    def start_and_wait(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._open_error is not None:
            raise self._open_error

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    async def close(self) -> None:
        await asyncio.to_thread(self.stop)

    def submit(
        self,
        operation: Callable[[sqlite3.Connection], T],
        *,
        reads_only: bool = False,
        together: Together | None = None,
    ) -> asyncio.Future[T]:
        """Run `operation` in the next transaction. A batch of reads only begins a deferred
        transaction, so `smtpgate queue` in another process never holds up a write.
        `together` runs it with its queued neighbours of the same kind in one go instead;
        should that fail, each runs alone, so a failing one still fails alone."""
        if not self._thread.is_alive():
            raise RuntimeError("the spool is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._queue.put((operation, future, loop, reads_only, together))
        return future

    def _run(self) -> None:
        try:
            db = self._connect()
        except BaseException as error:
            self._open_error = error
            self._ready.set()
            return
        self._ready.set()
        stopping = False
        self._turn = _open_turn(self._path)
        with contextlib.closing(db):
            while not stopping:
                first = self._queue.get()
                batch = []
                if first is None:
                    stopping = True
                else:
                    batch.append(first)
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                    else:
                        batch.append(item)
                if batch:
                    with self._write_turn(reads_only=all(item[3] for item in batch)):
                        _run_batch(db, batch)
        if self._turn is not None:
            os.close(self._turn)

    @contextlib.contextmanager
    def _write_turn(self, *, reads_only: bool) -> Generator[None, None, None]:
        if reads_only or self._turn is None:
            yield
            return
        fcntl.flock(self._turn, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._turn, fcntl.LOCK_UN)


class LoopWriter:
    """The delivery process's connection: its batches run on the event loop's own thread
    while mail arrives, on a thread of their own when none does.

    Its leases and results hold the write turn that the listener's commits, and so its
    250s, wait for. Run on a writer thread, each statement of such a write waited for
    the interpreter lock held by the busy event loop: 0.2 ms of work held the turn for
    5 to 15 ms at the 99th percentile, half of a 250's slowest waits. On the loop's
    thread a transaction runs straight through, the loop stopping for it; only a wait
    for the turn while the listener holds it goes to the thread, and what is queued
    meanwhile joins it. With no mail arriving (`mail_arriving`), nobody waits for the
    turn, and the thread runs the batches beside the sending: a queue drains on two
    cores, a quarter faster than on the loop alone.

    Nothing in it may wait for the disk: its connection's commits are not flushed (see
    SqliteSpool.open).

    One event loop at a time uses it. When the next one comes (`asyncio.run` after
    `asyncio.run` in the tests), what the closed one left is dropped: the thread skips
    its batches, gives back a turn handed to it, and only then lets the new one go on."""

    def __init__(self, path: Path, connect: Callable[[], sqlite3.Connection]) -> None:
        self._path = path  # of the database: the write turn is `<path>.turn`
        self._connect = connect
        self._db: sqlite3.Connection | None = None
        self._using = threading.Lock()  # the connection, by the loop or the thread
        self._turn: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop it serves
        self._on_loop_until = 0.0  # time.monotonic(): mail arrives, batches run on the loop
        self._queued: list[Queued] = []
        self._flushing = False  # a flush is scheduled on the loop
        self._away: asyncio.Future[None] | None = None  # the thread has a request of ours
        self._closed: asyncio.Event | None = None  # set once close() is done
        # The thread's hand-over: `_handed` while the loop has been given the turn and has
        # not taken it yet; under `_handing` so a loop that closed meanwhile gives it back.
        self._handing = threading.Lock()
        self._handed = False
        # (loop, a batch to run | HAND_OVER | RESYNC), or None to stop
        self._requests: queue.SimpleQueue[
            tuple[asyncio.AbstractEventLoop, list[Queued] | str] | None
        ] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def start_and_wait(self) -> None:
        self._db = self._connect()
        self._turn = _open_turn(self._path)
        if self._turn is not None:
            self._thread = threading.Thread(
                target=contextvars.copy_context().run,  # its log lines say whose it is
                args=(self._serve_requests, self._db, self._turn),
                name="spool-turn",
                daemon=True,
            )
            self._thread.start()

    def mail_arriving(self, seconds: float) -> None:
        """The listener is storing mail: run batches on the loop for the next `seconds`,
        holding the turn no longer than SQLite needs."""
        self._on_loop_until = time.monotonic() + seconds

    async def close(self) -> None:
        """Once what was submitted has run; what is submitted meanwhile is refused."""
        if self._closed is not None:
            await self._closed.wait()
            return
        self._serve(asyncio.get_running_loop())
        self._closed = asyncio.Event()
        try:
            while self._away is not None or self._queued:
                if self._away is not None:
                    await asyncio.wait({self._away})
                else:
                    self._flush()
            if self._thread is not None:
                self._requests.put(None)
                await asyncio.to_thread(self._thread.join)
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._turn is not None:
                os.close(self._turn)
                self._turn = None
        finally:
            self._closed.set()

    def submit(
        self,
        operation: Callable[[sqlite3.Connection], T],
        *,
        reads_only: bool = False,
        together: Together | None = None,
    ) -> asyncio.Future[T]:
        """See ThreadWriter.submit: the same batches, run at the loop's next turn."""
        if self._db is None or self._closed is not None:
            raise RuntimeError("the spool is closed")
        loop = asyncio.get_running_loop()
        self._serve(loop)
        future: asyncio.Future[T] = loop.create_future()
        self._queued.append((operation, future, loop, reads_only, together))
        self._flush_soon()
        return future

    def _serve(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            return
        if self._loop is not None and not self._loop.is_closed():
            raise RuntimeError("the spool's connection is in use by another event loop")
        first, self._loop = self._loop is None, loop
        self._queued = []  # the closed loop's: its futures can no longer be resolved
        self._flushing = False
        self._away = None
        if not first and self._thread is not None:  # until the thread is done with it
            self._away = loop.create_future()
            self._requests.put((loop, RESYNC))

    def _flush_soon(self) -> None:
        if self._queued and not self._flushing and self._away is None:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flushing = False
        if self._away is not None or not self._queued or self._db is None:
            return  # the thread is at work: all that is queued then runs with it
        loop = asyncio.get_running_loop()
        batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
        if all(item[3] for item in batch) or self._turn is None:
            with self._using:
                _run_batch(self._db, batch)
        elif time.monotonic() >= self._on_loop_until:  # nobody waits for the turn: beside us
            self._away = loop.create_future()
            self._requests.put((loop, batch))
            return
        else:
            try:
                fcntl.flock(self._turn, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # the listener is committing: wait on the thread
                self._queued[:0] = batch
                self._away = loop.create_future()
                self._requests.put((loop, HAND_OVER))
                return
            except OSError as error:
                _settle_outcomes([(item[1], item[2], None, error) for item in batch])
            else:
                with self._using:
                    _run_holding_turn(self._db, self._turn, batch)
        self._flush_soon()

    def _back(self, error: BaseException | None, handed: bool) -> None:
        """On the loop: the thread is done with our request; with the turn (`handed`)
        for the batch at the head of the queue, or without it having taken it."""
        try:
            with self._handing:
                held, self._handed = self._handed, False
            if handed:
                batch, self._queued = self._queued[:MAX_BATCH], self._queued[MAX_BATCH:]
                if error is None and held and self._db is not None and self._turn is not None:
                    with self._using:
                        _run_holding_turn(self._db, self._turn, batch)
                else:
                    if held and self._turn is not None:
                        fcntl.flock(self._turn, fcntl.LOCK_UN)
                    failure = error or RuntimeError("the spool is closed")
                    _settle_outcomes([(item[1], item[2], None, failure) for item in batch])
        finally:
            away, self._away = self._away, None
            if away is not None and not away.done():
                away.set_result(None)
            self._flush_soon()

    def _serve_requests(self, db: sqlite3.Connection, turn: int) -> None:
        """The thread, one request after another: take the turn, then run the batch given
        and give the turn back, or hand the turn over to the loop (a lock of the open
        file: the loop holds it once taken). RESYNC, from a new loop: what was handed
        to the closed one is given back."""
        while (request := self._requests.get()) is not None:
            loop, work = request
            if work is RESYNC:
                with self._handing:
                    if self._handed:
                        fcntl.flock(turn, fcntl.LOCK_UN)
                    self._handed = False
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(self._back, None, False)
                continue
            error: BaseException | None = None
            try:
                fcntl.flock(turn, fcntl.LOCK_EX)
            except OSError as failed:
                error = failed
            if isinstance(work, list):  # a batch of ours: run here, unless its loop is gone
                if error is None and loop.is_closed():
                    fcntl.flock(turn, fcntl.LOCK_UN)
                elif error is None:
                    try:
                        with self._using:
                            _run_holding_turn(db, turn, work)
                    except BaseException as failed:  # never leave the loop waiting
                        error = RuntimeError(f"the spool's writer failed: {failed!r}")
                        _settle_outcomes([(item[1], item[2], None, error) for item in work])
                else:
                    _settle_outcomes([(item[1], item[2], None, error) for item in work])
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._back, None, False)
                continue
            with self._handing:
                try:
                    loop.call_soon_threadsafe(self._back, error, True)
                except RuntimeError:  # the loop closed meanwhile: nothing will use the turn
                    if error is None:
                        fcntl.flock(turn, fcntl.LOCK_UN)
                else:
                    self._handed = error is None


HAND_OVER, RESYNC = "hand over the turn", "done with the closed loop"


def _run_holding_turn(db: sqlite3.Connection, turn: int, batch: list[Queued]) -> None:
    try:
        _run_batch(db, batch)
    except BaseException:  # past what _run_batch catches: no transaction left open
        if db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
        raise
    finally:
        fcntl.flock(turn, fcntl.LOCK_UN)


def _open_turn(path: Path) -> int | None:
    """The write turn's lock file; None for a reader without write access, for which
    SQLite's busy handler will do."""
    try:
        return os.open(f"{path}.turn", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return None


def _run_batch(db: sqlite3.Connection, batch: list[Queued]) -> None:
    """One transaction, one savepoint per operation, or per run of neighbours that go
    together: a failing operation fails alone. A batch that is one such unit needs
    no savepoint: the transaction is its savepoint (two statements fewer, and each
    statement is a wait for the interpreter lock)."""
    begin = "BEGIN" if all(item[3] for item in batch) else "BEGIN IMMEDIATE"
    shared = True  # neighbours that go together run in one go
    if _one_unit(batch):
        outcomes = _run_unit(db, begin, batch)
        if outcomes is not None:
            _settle_outcomes(outcomes)
            return
        shared = False  # they failed together: now each runs alone
    outcomes = []
    try:
        db.execute(begin)
        for _, neighbours in itertools.groupby(batch, key=_kind):
            run = list(neighbours)
            if shared and len(run) > 1 and (together := run[0][4]) is not None:
                run_many, arguments = together[0], [item[4][1] for item in run if item[4]]
                results, error = _attempt(db, run_many, arguments)
                if error is None:
                    outcomes += [(i[1], i[2], r, None) for i, r in zip(run, results, strict=True)]
                    continue
            for operation, future, loop, _, _ in run:
                outcomes.append((future, loop, *_attempt(db, operation)))
        db.execute("COMMIT")
    except Exception as commit_error:  # the commit itself failed (disk full, I/O error)
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        outcomes = [(future, loop, None, commit_error) for _, future, loop, _, _ in batch]
    _settle_outcomes(outcomes)


def _one_unit(batch: list[Queued]) -> bool:
    """One operation, or neighbours that all run together."""
    together = batch[0][4]
    return len(batch) == 1 or (
        together is not None and all(_kind(item) is together[0] for item in batch)
    )


def _run_unit(db: sqlite3.Connection, begin: str, batch: list[Queued]) -> list[Outcome] | None:
    """A batch that is one unit (see _one_unit) in a transaction of its own, without a
    savepoint; None when neighbours that ran together failed, so each must run alone. A
    BEGIN or COMMIT that fails (the spool busy, the disk full) fails them all at once."""
    try:
        db.execute(begin)
    except Exception as error:
        return [(item[1], item[2], None, error) for item in batch]
    try:
        together = batch[0][4]
        if len(batch) == 1 or together is None:
            results = [batch[0][0](db)]
        else:
            results = together[0](db, [item[4][1] for item in batch if item[4]])
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} operations")
    except Exception as error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        return None if len(batch) > 1 else [(batch[0][1], batch[0][2], None, error)]
    try:
        db.execute("COMMIT")
    except Exception as error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        return [(item[1], item[2], None, error) for item in batch]
    return [(item[1], item[2], r, None) for item, r in zip(batch, results, strict=True)]


def _settle_outcomes(outcomes: list[Outcome]) -> None:
    """One wake-up of each waiting loop per batch, not one per operation."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Settled]] = {}
    for future, loop, result, error in outcomes:
        by_loop.setdefault(loop, []).append((future, result, error))
    for loop, settled in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop has closed
            loop.call_soon_threadsafe(_settle, settled)


def _kind(item: Queued) -> object:
    """What neighbours must share to run together: their run_many (None runs alone)."""
    return item[4][0] if item[4] is not None else item


def _attempt(
    db: sqlite3.Connection, operation: Callable[..., Any], *arguments: Any
) -> tuple[Any, Exception | None]:
    """Run `operation(db, *arguments)` in a savepoint: (its result, None), or (None, the
    error it raised) with its writes undone."""
    db.execute("SAVEPOINT operation")
    try:
        result = operation(db, *arguments)
    except Exception as error:
        db.execute("ROLLBACK TO operation")
        db.execute("RELEASE operation")
        return None, error
    db.execute("RELEASE operation")
    return result, None


def _settle(settled: list[Settled]) -> None:
    for future, result, error in settled:
        if future.done():  # the waiting SMTP session went away
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
