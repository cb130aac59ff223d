"""WAL checkpoints off the commit path, by a thread of the server.

SQLite copies the write-ahead log back into the database file (a checkpoint) in the
commit that finds the log past `wal_autocheckpoint` pages, and flushes the database
file there. Under 50 sessions flat out that took 30 to 320 ms, in whichever process
committed, with the spool's write turn held: every 250 of the listener waited for it.
Here the server copies the log a few times a second on a connection of its own without
the turn (writers go on meanwhile), and takes the turn only to copy the few pages
written during that copy, so that the log is copied whole and the next writer starts
it again from the beginning instead of letting it grow.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from pathlib import Path

from smtpgate import logs

log = logs.get(__name__)

CHECK_SECONDS = 0.2  # how often the log is copied while mail flows
RESTART_PAGES = 2000  # log pages (8 MB of 4 KiB) past which the turn is taken to finish
# The spool's connections still checkpoint in a commit past this many pages: only when
# no server runs (the CLI alone) or this thread cannot keep up.
FALLBACK_PAGES = 10000
LOG_BYTES_KEPT = 16 << 20  # a longer log file is cut back to this when it starts over


class Checkpointer:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spool-checkpoint", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        try:
            turn = os.open(f"{self._path}.turn", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            self._cannot(error)
            return
        try:
            db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA synchronous = FULL")  # the copy is flushed before it counts
        except sqlite3.Error as error:
            os.close(turn)
            self._cannot(error)
            return
        failing = False
        restarted_at = 0  # the log's size when the turn was last taken to finish a copy
        try:
            while not self._stop.wait(CHECK_SECONDS):
                try:
                    restarted_at = self._copy(db, turn, restarted_at)
                except Exception as error:  # never die: commits would do it, with the turn
                    if not failing:  # once, not five times a second
                        log.warning("cannot copy the spool's log back", error=str(error))
                    failing = True
                else:
                    failing = False
        finally:
            db.close()
            os.close(turn)

    @staticmethod
    def _copy(db: sqlite3.Connection, turn: int, restarted_at: int) -> int:
        """PASSIVE copies what no reader still needs and never waits for anyone. The turn
        is taken only when it helps: the log is long, everything in it could be copied
        (no reader holds old pages), and it grew since the turn was last taken (an idle
        log stays long until the next writer starts it over)."""
        _, pages, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        pages, copied = int(pages), int(copied)
        if pages < RESTART_PAGES or copied < pages or pages == restarted_at:
            return restarted_at
        fcntl.flock(turn, fcntl.LOCK_EX)  # no writer adds pages while the rest is copied
        try:
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        finally:
            fcntl.flock(turn, fcntl.LOCK_UN)
        return pages

    @staticmethod
    def _cannot(error: Exception) -> None:
        log.warning(
            "cannot copy the spool's log back in the background; commits will do it"
            f" themselves past {FALLBACK_PAGES} pages",
            error=str(error),
        )
