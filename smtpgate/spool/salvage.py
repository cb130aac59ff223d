"""Salvage: a damaged SQLite spool is quarantined at start and its intact mail kept.

`SqliteSpool.open` calls `check` before the writer opens the spool. When SQLite's
quick_check fails, `salvage` copies every readable row into a fresh spool, in Python, by
rowid ranges (a damaged page costs the rows on it, not the table), links the damaged
files into `<state_dir>/quarantine/<UTC time>/` and writes there, with a report, what is
readable of each message that cannot be delivered whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sqlite3
import struct
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from smtpgate.spool.pages import Pages

# A message or recipient we cannot trust must never be sent; everything else must be.
MESSAGES, RECIPIENTS = "messages", "recipients"
ROWID_MIN, ROWID_MAX = -(2**63), 2**63 - 1
CHUNK = 256  # rows read per statement; a failing chunk is read again row by row
PROBLEMS_LISTED = 1000  # quick_check lines used to find rows SQLite reads without error
_CELL = re.compile(r"On tree page (\d+) cell (\d+)")
_SIDE_FILES = ("-wal", "-shm")
RECOVER_BY_HAND = (
    "Move it aside as damaged.db and recover what it holds into a new one:"
    " sqlite3 damaged.db .recover | sqlite3 {name}"
)


class SpoolDamagedError(sqlite3.DatabaseError):
    """Damaged beyond what smtpgate can salvage by itself: the operator recovers it."""


@dataclass
class QuarantinedMessage:
    """A message that cannot be delivered whole; `kept` when its readable recipients
    stay in the spool (the content is intact, only some recipient rows are lost)."""

    queue_id: str
    reason: str
    kept: bool
    sender: str | None = None
    size: int | None = None
    readable_bytes: int = 0
    content_file: str | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)  # address, state
    lost_recipient_ids: list[int] = field(default_factory=list)


@dataclass
class SalvageReport:
    quarantine: Path
    problems: list[str]  # what quick_check said, as SQLite words it
    copied: dict[str, int]  # rows per table now in the fresh spool
    lost: dict[str, int]  # rows per table that could not be read (at least this many)
    messages: list[QuarantinedMessage]
    notes: list[str] = field(default_factory=list)

    @property
    def undeliverable(self) -> list[QuarantinedMessage]:
        return [m for m in self.messages if not m.kept]


def check(path: Path) -> list[str]:
    """What SQLite's quick_check finds wrong with the spool; [] when it is sound or new.
    Opened read-only, so a damaged spool is not touched before it is quarantined."""
    if not path.exists():
        return []
    try:
        with contextlib.closing(_read_only(path)) as db:
            return _problems(db, 5)
    except sqlite3.DatabaseError as error:
        return [str(error)]


def _problems(db: sqlite3.Connection, limit: int) -> list[str]:
    """quick_check's findings, one line each. Asked for many, it may give up with an
    error where asked for fewer it names them: ask again for fewer."""
    error: sqlite3.DatabaseError | None = None
    while limit >= 1:
        try:
            rows = db.execute(f"PRAGMA quick_check({int(limit)})").fetchall()
        except sqlite3.DatabaseError as failed:
            error, limit = failed, limit // 4
            continue
        found = [
            line
            for (text,) in rows
            for line in str(text).splitlines()
            if not line.startswith("***")
        ]
        return [] if found == ["ok"] else found
    return [str(error)]


def refusal(path: Path, problems: list[str], why: str = "") -> SpoolDamagedError:
    found = "; ".join(problems)
    cannot = f" smtpgate cannot salvage it: {why}." if why else ""
    return SpoolDamagedError(
        f"the spool is damaged ({found}).{cannot} {RECOVER_BY_HAND.format(name=path.name)}"
    )


def finish_pending(path: Path) -> None:
    """Complete a salvage that a crash interrupted. A complete fresh spool waits as
    `<spool>.salvage` only after the damaged files were linked into the quarantine, so
    the swap can always go on; a `.salvage.tmp` was never finished and is dropped."""
    for suffix in ("", *_SIDE_FILES):
        _unlink(Path(f"{_tmp(path)}{suffix}"))
    ready = _ready(path)
    if not ready.exists():
        return
    for suffix in _SIDE_FILES:  # the damaged spool's WAL must never meet the fresh file
        _unlink(Path(f"{path}{suffix}"))
    os.replace(ready, path)
    _sync_dir(path.parent)


def salvage(
    path: Path, quarantine_root: Path, problems: list[str], schema_version: int
) -> SalvageReport:
    """Quarantine the damaged spool at `path` and put a fresh one with every readable
    row in its place. The fresh one has the damaged one's own schema and version, so
    the usual migrations bring an older one up to date when the writer opens it."""
    try:
        source = _read_only(path)
        tables = _tables(source)
        version = source.execute("PRAGMA user_version").fetchone()[0]
        problems = _problems(source, PROBLEMS_LISTED) or problems
    except sqlite3.DatabaseError as error:
        raise refusal(path, problems, f"its table list cannot be read ({error})") from None
    with contextlib.closing(source):
        if version > schema_version:
            raise refusal(path, problems, f"its schema {version} is newer than this smtpgate's")
        if MESSAGES not in tables or RECIPIENTS not in tables:
            raise refusal(path, problems, "its messages or recipients table is gone")
        quarantine = _quarantine_dir(quarantine_root)
        for suffix in ("", *_SIDE_FILES):  # evidence, untouched; the swap unlinks ours
            original = Path(f"{path}{suffix}")
            if original.exists():
                try:
                    os.link(original, quarantine / f"{path.name}{suffix}")
                except OSError:  # a file system without hard links
                    shutil.copy2(original, quarantine / f"{path.name}{suffix}")
        report = SalvageReport(quarantine, problems, {}, {}, [])
        tmp = _tmp(path)
        target = sqlite3.connect(tmp, isolation_level=None)
        try:
            _create_like(source, target, version)
            _copy(path, source, target, tables, report)
        finally:
            target.close()
    _write_report(report)
    _sync_file(tmp)
    os.replace(tmp, _ready(path))
    _sync_dir(path.parent)
    finish_pending(path)
    return report


# --- reading what can be read ------------------------------------------------------------


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def _tables(db: sqlite3.Connection) -> dict[str, list[str]]:
    names = [
        name
        for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    ]
    return {
        name: [row[1] for row in db.execute(f"PRAGMA table_info({_q(name)})")] for name in names
    }


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rowids(db: sqlite3.Connection, table: str) -> tuple[list[int], list[tuple[int, int]]]:
    """Every readable rowid in order, and the rowid ranges skipped as unreadable. Only
    the table's own b-tree is read (NOT INDEXED): a seek past a damaged page lands on
    the next readable one. LIMIT keeps SQLite (and Python, which steps one row ahead)
    from touching the page after the last row returned."""
    sql = f"SELECT rowid FROM {_q(table)} NOT INDEXED WHERE rowid >= ? ORDER BY rowid LIMIT ?"
    found: list[int] = []
    skipped: list[tuple[int, int]] = []
    low = ROWID_MIN
    while True:
        try:
            rows = db.execute(sql, (low, CHUNK)).fetchall()
        except sqlite3.DatabaseError:
            rows = []
            with contextlib.suppress(sqlite3.DatabaseError):  # up to the damage, one by one
                rows = db.execute(sql, (low, 1)).fetchall()
            if not rows:
                after = _next_readable(db, table, low)
                skipped.append((low, ROWID_MAX if after is None else after - 1))
                if after is None:
                    return found, skipped
                low = after
                continue
        if not rows:
            return found, skipped
        found += [rowid for (rowid,) in rows]
        low = rows[-1][0] + 1


def _next_readable(db: sqlite3.Connection, table: str, low: int) -> int | None:
    """The first rowid from which a seek succeeds again: exponential steps, then a
    binary search back. None when nothing after `low` can be read."""
    sql = f"SELECT rowid FROM {_q(table)} NOT INDEXED WHERE rowid >= ? ORDER BY rowid LIMIT 1"

    def probe(start: int) -> tuple[bool, int | None]:
        try:
            row = db.execute(sql, (start,)).fetchone()
        except sqlite3.DatabaseError:
            return False, None
        return True, None if row is None else row[0]

    step, bad = 1, low
    while True:
        candidate = min(low + step, ROWID_MAX)
        ok, first = probe(candidate)
        if ok:
            break
        if candidate == ROWID_MAX:
            return None
        bad, step = candidate, step * 2
    good = candidate
    while good - bad > 1:
        middle = (bad + good) // 2
        ok, found = probe(middle)
        if ok:
            good, first = middle, found
        else:
            bad = middle
    return first


@dataclass
class _Row:
    rowid: int
    values: dict[str, Any]
    unreadable: set[str]
    partial: dict[str, bytes]  # readable start of an unreadable text or blob


def _rows(
    db: sqlite3.Connection, table: str, columns: list[str], rowids: list[int]
) -> Iterator[_Row]:
    """The rows at `rowids`; a chunk that fails is read row by row, a row column by
    column, and an unreadable text or blob as far as its first damaged page."""
    listed = ", ".join(_q(c) for c in columns)
    for start in range(0, len(rowids), CHUNK):
        chunk = rowids[start : start + CHUNK]
        try:
            rows = db.execute(
                f"SELECT rowid, {listed} FROM {_q(table)} NOT INDEXED"
                " WHERE rowid BETWEEN ? AND ? ORDER BY rowid",
                (chunk[0], chunk[-1]),
            ).fetchall()
        except sqlite3.DatabaseError:
            for rowid in chunk:
                yield _row_by_row(db, table, columns, rowid)
            continue
        for rowid, *values in rows:
            yield _Row(rowid, dict(zip(columns, values, strict=True)), set(), {})


def _row_by_row(db: sqlite3.Connection, table: str, columns: list[str], rowid: int) -> _Row:
    row = _Row(rowid, {}, set(), {})
    for column in columns:
        try:
            (row.values[column],) = db.execute(
                f"SELECT {_q(column)} FROM {_q(table)} NOT INDEXED WHERE rowid = ?", (rowid,)
            ).fetchone()
        except sqlite3.DatabaseError:
            row.unreadable.add(column)
            row.partial[column] = _readable_start(db, table, column, rowid)
    return row


def _readable_start(db: sqlite3.Connection, table: str, column: str, rowid: int) -> bytes:
    """The value's bytes before its damage. SQLite fails one page after the damaged one
    (whose bad link it follows), so a page's worth more is dropped from the end."""
    parts: list[bytes] = []
    with contextlib.suppress(sqlite3.Error):
        with contextlib.closing(db.blobopen(table, column, rowid, readonly=True)) as blob:
            while part := blob.read(512):
                parts.append(part)
    readable = b"".join(parts)
    (page_size,) = db.execute("PRAGMA page_size").fetchone()
    return readable[: max(0, len(readable) - int(page_size))]


def _suspects(
    db: sqlite3.Connection, path: Path, problems: list[str], report: SalvageReport
) -> dict[str, set[int]]:
    """Rows SQLite reads without an error although quick_check names their cell: the
    last page of a long value is read without checking its link, so its bytes may be
    anything. The raw leaf page gives the cell's rowid."""
    suspects: dict[str, set[int]] = {}
    cells = {(int(p), int(c)) for line in problems for p, c in _CELL.findall(line)}
    if not cells:
        return suspects
    try:
        roots = {
            name: root
            for name, root in db.execute(
                "SELECT name, rootpage FROM sqlite_master"
                " WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        }
        reader = Pages(path)
    except (sqlite3.Error, OSError, struct.error) as error:
        report.notes.append(f"cannot read raw pages to place quick_check's findings: {error}")
        return suspects
    for page, cell in sorted(cells):
        try:
            rowid = reader.rowid_of_cell(page, cell)
            table = reader.table_of_leaf(page, roots) if rowid is not None else None
        except (OSError, struct.error) as error:
            rowid, table = None, None
            report.notes.append(f"tree page {page}: {error}")
        if rowid is None or table is None:
            continue  # an index or an interior page: reading by rowid copes with those
        suspects.setdefault(table, set()).add(rowid)
        report.notes.append(f"tree page {page} cell {cell} is row {rowid} of {table}")
    return suspects


def _expected_recipients(db: sqlite3.Connection, queue_id: str) -> set[int] | None:
    """The recipient ids the index lists for a message (None if it cannot be read): it
    tells which messages lost recipient rows, though not their addresses."""
    try:
        return {
            rid
            for (rid,) in db.execute(
                "SELECT id FROM recipients INDEXED BY recipients_of_message WHERE queue_id = ?",
                (queue_id,),
            )
        }
    except sqlite3.Error:
        return None


# --- writing the fresh spool and the quarantine ------------------------------------------


def _create_like(source: sqlite3.Connection, target: sqlite3.Connection, version: int) -> None:
    """Tables, then indexes, views and triggers, as the damaged spool declares them."""
    target.execute("PRAGMA synchronous = FULL")  # a rollback journal: one file in the end
    statements = source.execute(
        "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
        " ORDER BY CASE type WHEN 'table' THEN 0 WHEN 'index' THEN 1 ELSE 2 END, rowid"
    ).fetchall()
    target.execute("BEGIN")
    for (sql,) in statements:
        target.execute(sql)
    target.execute(f"PRAGMA user_version = {int(version)}")
    target.execute("COMMIT")


def _copy(
    path: Path,
    source: sqlite3.Connection,
    target: sqlite3.Connection,
    tables: dict[str, list[str]],
    report: SalvageReport,
) -> None:
    fresh = _tables(target)
    order: dict[str, list[int]] = {}
    for table in tables:
        order[table], skipped = _rowids(source, table)
        if skipped:
            report.notes.append(f"{table}: unreadable rowid ranges {skipped}")
    suspects = _suspects(source, path, report.problems, report)
    target.execute("PRAGMA foreign_keys = OFF")  # parents and children arrive in any order
    target.execute("BEGIN IMMEDIATE")
    recipients = _salvage_recipients(source, tables, order, suspects, report)
    keep = _salvage_messages(source, target, tables, fresh, order, suspects, recipients, report)
    kept = [r for queue_id, rows in recipients.items() if queue_id in keep for r in rows]
    _insert(target, RECIPIENTS, fresh, kept, report)
    for table, columns in tables.items():
        if table in (MESSAGES, RECIPIENTS):
            continue
        readable = []
        for row in _rows(source, table, columns, order[table]):
            if row.unreadable or row.rowid in suspects.get(table, set()):
                report.lost[table] = report.lost.get(table, 0) + 1
            else:
                readable.append(row)
        _insert(target, table, fresh, readable, report)
    _drop_orphans(target, report)
    target.execute("COMMIT")


def _salvage_recipients(
    source: sqlite3.Connection,
    tables: dict[str, list[str]],
    order: dict[str, list[int]],
    suspects: dict[str, set[int]],
    report: SalvageReport,
) -> dict[str, list[_Row]]:
    """Readable recipient rows by queue id; unreadable ones only count as lost."""
    by_message: dict[str, list[_Row]] = {}
    for row in _rows(source, RECIPIENTS, tables[RECIPIENTS], order[RECIPIENTS]):
        if row.unreadable or row.rowid in suspects.get(RECIPIENTS, set()):
            report.lost[RECIPIENTS] = report.lost.get(RECIPIENTS, 0) + 1
            continue
        by_message.setdefault(str(row.values["queue_id"]), []).append(row)
    return by_message


def _salvage_messages(
    source: sqlite3.Connection,
    target: sqlite3.Connection,
    tables: dict[str, list[str]],
    fresh: dict[str, list[str]],
    order: dict[str, list[int]],
    suspects: dict[str, set[int]],
    recipients: dict[str, list[_Row]],
    report: SalvageReport,
) -> set[str]:
    """Insert each message that can be delivered; quarantine what cannot be whole.
    Returns the queue ids kept."""
    keep: set[str] = set()
    seen: set[str] = set()
    read_ids = {r.rowid for rows in recipients.values() for r in rows}
    for row in _rows(source, MESSAGES, tables[MESSAGES], order[MESSAGES]):
        queue_id = row.values.get("queue_id")
        name = str(queue_id) if queue_id is not None else f"row-{row.rowid}"
        seen.add(name)
        mine = recipients.get(name, [])
        expected = _expected_recipients(source, name) if queue_id is not None else None
        lost_ids = sorted(expected - read_ids) if expected else []
        damaged = row.unreadable or row.rowid in suspects.get(MESSAGES, set())
        if damaged or not mine:
            report.lost[MESSAGES] = report.lost.get(MESSAGES, 0) + 1
            if damaged:
                reason = _damage(row)
            else:
                reason = "no readable recipients: it cannot be delivered"
            _quarantine(report, name, reason, row, mine, lost_ids, kept=False)
            continue
        _insert(target, MESSAGES, fresh, [row], report)
        keep.add(name)
        if lost_ids:
            _quarantine(
                report,
                name,
                f"{len(lost_ids)} recipient rows could not be read; the readable"
                " recipients stay in the spool and will be delivered",
                row,
                mine,
                lost_ids,
                kept=True,
            )
    for queue_id, rows in sorted(recipients.items()):
        if queue_id not in seen:  # the message row itself is on a damaged page
            _quarantine(
                report, queue_id, "the message itself could not be read", None, rows, [], False
            )
    return keep


def _damage(row: _Row) -> str:
    if not row.unreadable:
        return (
            "its content is damaged (quick_check names its row: SQLite reads the bytes"
            " without an error, but they cannot be trusted)"
        )
    size = row.values.get("size")
    readable = len(row.partial.get("content", b""))
    columns = ", ".join(sorted(row.unreadable))
    if "content" in row.unreadable and isinstance(size, int):
        return f"its {columns} could not be read: {readable} of {size} content bytes readable"
    return f"its {columns} could not be read"


def _quarantine(
    report: SalvageReport,
    queue_id: str,
    reason: str,
    row: _Row | None,
    recipients: list[_Row],
    lost_ids: list[int],
    kept: bool,
) -> None:
    entry = QuarantinedMessage(
        queue_id,
        reason,
        kept,
        lost_recipient_ids=lost_ids,
        recipients=[
            {"id": r.rowid, "address": r.values.get("address"), "state": r.values.get("state")}
            for r in recipients
        ],
    )
    if row is not None:
        sender, size = row.values.get("sender"), row.values.get("size")
        entry.sender = str(sender) if sender is not None else None
        entry.size = size if isinstance(size, int) else None
        content = row.values.get("content", row.partial.get("content"))
        if isinstance(content, bytes):
            safe = re.sub(r"[^A-Za-z0-9-]", "_", queue_id)
            entry.content_file = f"{safe}.eml"
            entry.readable_bytes = len(content)
            (report.quarantine / entry.content_file).write_bytes(content)
    report.messages.append(entry)


def _insert(
    target: sqlite3.Connection,
    table: str,
    fresh: dict[str, list[str]],
    rows: list[_Row],
    report: SalvageReport,
) -> None:
    """Columns by name in both schemas; a column only the fresh schema has takes its
    default. The rowid is kept, so ids in other rows still point at the right row."""
    if not rows:
        return
    columns = [c for c in fresh[table] if c in rows[0].values]
    keeps_rowid = "rowid" not in columns and not _has_rowid_alias(target, table)
    names = (["rowid"] if keeps_rowid else []) + columns
    target.executemany(
        f"INSERT INTO {_q(table)} ({', '.join(_q(n) for n in names)})"
        f" VALUES ({', '.join('?' * len(names))})",
        [([r.rowid] if keeps_rowid else []) + [r.values[c] for c in columns] for r in rows],
    )
    report.copied[table] = report.copied.get(table, 0) + len(rows)


def _has_rowid_alias(db: sqlite3.Connection, table: str) -> bool:
    keys = [row for row in db.execute(f"PRAGMA table_info({_q(table)})") if row[5]]
    return len(keys) == 1 and str(keys[0][2]).upper() == "INTEGER"


def _restore_lost_jobs(target: sqlite3.Connection, report: SalvageReport) -> None:
    """A recipient is only leased through its job: a job row that was lost is made
    again, active, as `salvaged-ID`, so its intact mail is still delivered. (Its pause,
    if it had one, is lost with it; the report says so.)"""
    try:
        restored = target.execute(
            "INSERT INTO jobs (id, name, route, created_at)"
            " SELECT job_id, 'salvaged-' || job_id, min(route), min(updated_at)"
            " FROM recipients WHERE job_id IS NOT NULL"
            " AND job_id NOT IN (SELECT id FROM jobs) GROUP BY job_id RETURNING name"
        ).fetchall()
    except sqlite3.Error:
        return  # a spool from before jobs existed: the migration assigns them
    for (name,) in restored:
        report.notes.append(
            f"job {name}: its row was lost; made again, active, for its recipients"
            " (a pause it had is lost)"
        )


def _drop_orphans(target: sqlite3.Connection, report: SalvageReport) -> None:
    """Rows whose parent row was lost go, except messages and recipients: intact mail
    is delivered even when a row it refers to is gone."""
    _restore_lost_jobs(target, report)
    for table, rowid, parent, _ in target.execute("PRAGMA foreign_key_check").fetchall():
        if table in (MESSAGES, RECIPIENTS) or rowid is None:
            report.notes.append(f"{table} row {rowid} refers to a lost {parent} row: kept")
            continue
        target.execute(f"DELETE FROM {_q(table)} WHERE rowid = ?", (rowid,))
        report.copied[table] -= 1
        report.lost[table] = report.lost.get(table, 0) + 1
        report.notes.append(f"{table} row {rowid} refers to a lost {parent} row: dropped")


def _write_report(report: SalvageReport) -> None:
    data = asdict(report)
    data["quarantine"] = str(report.quarantine)
    (report.quarantine / "report.json").write_text(json.dumps(data, indent=2) + "\n")
    lines = [
        "smtpgate found its spool damaged at start and salvaged it.",
        f"SQLite said: {'; '.join(report.problems)}",
        f"Copied into the new spool: {report.copied}",
        f"Rows that could not be read: {report.lost or 'none'}",
        "",
        "Messages not delivered whole (content, if any was readable, in QUEUE_ID.eml):",
    ]
    for entry in report.messages:
        state = "kept for its readable recipients" if entry.kept else "NOT DELIVERED"
        lines.append(f"  {entry.queue_id}  {state}: {entry.reason}")
        lines.append(f"      sender: {entry.sender!r}  size: {entry.size}")
        for r in entry.recipients:
            lines.append(f"      recipient {r['address']} ({r['state']})")
        if entry.lost_recipient_ids:
            lines.append(f"      recipient rows lost: {entry.lost_recipient_ids}")
    if not report.messages:
        lines.append("  none")
    lines += ["", *report.notes, ""]
    (report.quarantine / "report.txt").write_text("\n".join(lines))
    for item in report.quarantine.iterdir():
        _sync_file(item)
    _sync_dir(report.quarantine)


# --- files -----------------------------------------------------------------------------


def _quarantine_dir(root: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    root.mkdir(parents=True, exist_ok=True)
    for n in range(100):
        candidate = root / (stamp if n == 0 else f"{stamp}-{n}")
        with contextlib.suppress(FileExistsError):
            candidate.mkdir()
            return candidate
    raise FileExistsError(f"{root}: no free quarantine directory for {stamp}")


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".salvage.tmp")


def _ready(path: Path) -> Path:
    return path.with_name(path.name + ".salvage")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _sync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    _sync_file(path)
