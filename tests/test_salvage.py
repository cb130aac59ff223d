"""A damaged spool at start: the damage is quarantined and reported, every intact message
is delivered. The spool is built by a real `smtpgate serve`, damaged on disk page by
page, and salvaged by the next `smtpgate serve`, which delivers to a real upstream."""

from __future__ import annotations

import contextlib
import json
import smtplib
import sqlite3
import struct
from pathlib import Path
from typing import Any

from conftest import (
    GatewayFactory,
    Upstreams,
    free_port,
    own_trace_removed,
    relay_config,
    wait_until,
    with_default_route,
)

from smtpgate.spool.pages import varint

PAGE = 4096  # SQLite's default page size, which the spool keeps
# Message number -> how many recipients. Message 3 has one recipient, on the recipients
# page that gets damaged; 2 and 4 are its neighbours there and lose some rows too.
RECIPIENTS = {0: 20, 1: 20, 2: 20, 3: 1, 4: 20, 5: 20, 6: 20}
BROKEN_CHAIN = 1  # a page in the middle of its content: reading it fails
SILENT_END = 5  # the last page of its content: SQLite reads it without an error


def address(message: int, n: int) -> str:
    return f"m{message}-r{n}-{'x' * 40}@example.com"


def content(message: int) -> bytes:
    line = f"[message {message}]".encode() * 70 + b"\r\n"
    return f"Subject: message {message}\r\n\r\n".encode() + line * 40


def pages_holding(data: bytes, needle: bytes) -> list[int]:
    return [n for n in range(len(data) // PAGE) if needle in data[n * PAGE : (n + 1) * PAGE]]


def live_cells(data: bytes, page: int) -> list[bytes]:
    """The payload of each cell of a table leaf page (free space may hold stale copies
    of rows, so a plain byte search would find rows that are not there)."""
    base = page * PAGE
    count = struct.unpack(">H", data[base + 3 : base + 5])[0]
    cells = []
    for n in range(count):
        (offset,) = struct.unpack(">H", data[base + 8 + 2 * n : base + 10 + 2 * n])
        size, at = varint(data, base + offset)
        _, at = varint(data, at)  # the rowid
        cells.append(bytes(data[at : at + size]))
    return cells


def live_leaves(spool: Path, table: str) -> set[int]:
    with contextlib.closing(sqlite3.connect(spool)) as db:
        return {
            page - 1  # dbstat counts pages from 1
            for (page,) in db.execute(
                "SELECT pageno FROM dbstat WHERE name = ? AND pagetype = 'leaf'", (table,)
            )
        }


def next_overflow(data: bytes, page: int) -> int:
    """An overflow page starts with the number of the next one; 0 ends the chain."""
    number: int = struct.unpack(">I", data[page * PAGE : page * PAGE + 4])[0]
    return number


def test_a_damaged_spool_is_quarantined_and_every_intact_message_delivered(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    port = free_port()  # the upstream is down while the spool fills
    gateway = gateway_factory(
        relay_config(port, retry='["1s"]'), server=with_default_route("upstream")
    )
    queue_ids: dict[int, str] = {}
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        for message, count in RECIPIENTS.items():
            client.mail("sender@example.org")
            for n in range(count):
                assert client.rcpt(address(message, n))[0] == 250
            code, reply = client.data(content(message))
            assert code == 250
            queue_ids[message] = reply.decode().rsplit(" ", 1)[-1]
    assert gateway.stop() == 0
    spool = gateway.state_dir / "spool.db"
    assert not Path(f"{spool}-wal").exists()  # all of it is in the main file

    data = bytearray(spool.read_bytes())
    broken = [
        p for p in pages_holding(data, b"[message 1]" * 5) if next_overflow(data, p) not in (0, p)
    ]
    silent = [p for p in pages_holding(data, b"[message 5]" * 5) if next_overflow(data, p) == 0]
    leaves = live_leaves(spool, "recipients")
    recipients_page = [p for p in pages_holding(data, address(3, 0).encode()) if p in leaves]
    assert broken and len(silent) == 1 and len(recipients_page) == 1
    rows = b"".join(live_cells(data, recipients_page[0]))
    on_damaged_page = {
        address(m, n)
        for m, count in RECIPIENTS.items()
        for n in range(count)
        if address(m, n).encode() in rows
    }
    for page in (broken[len(broken) // 2], silent[0], recipients_page[0]):
        data[page * PAGE : (page + 1) * PAGE] = b"\xa5" * PAGE
    spool.write_bytes(bytes(data))

    upstream = upstreams.start(port=port)
    gateway.start()

    # Every intact message reaches the upstream, whole, for each readable recipient.
    damaged = {BROKEN_CHAIN, SILENT_END} | {
        m
        for m, count in RECIPIENTS.items()
        if all(address(m, n) in on_damaged_page for n in range(count))
    }
    assert 3 in damaged
    expected = {
        address(m, n) for m in RECIPIENTS if m not in damaged for n in range(RECIPIENTS[m])
    } - on_damaged_page
    assert len(expected) >= 40  # most of the mail is intact
    wait_until(
        lambda: all(r["state"] == "delivered" for r in gateway.recipients().values()),
        30,
        "every recipient in the spool delivered",
    )
    got = {r: own_trace_removed(m.content) for m in upstream.messages for r in m.rcpt_tos}
    assert set(got) == expected  # nothing damaged went out, nothing intact was dropped
    for recipient, body in got.items():
        assert body == content(int(recipient[1 : recipient.index("-")])), recipient

    # The quarantine keeps the damaged files as they were and names each damaged message.
    [quarantine] = (gateway.state_dir / "quarantine").iterdir()
    assert (quarantine / "spool.db").read_bytes() == bytes(data)
    report = json.loads((quarantine / "report.json").read_text())
    entries: dict[str, dict[str, Any]] = {e["queue_id"]: e for e in report["messages"]}
    text = (quarantine / "report.txt").read_text()
    for message in damaged:
        entry = entries[queue_ids[message]]
        assert not entry["kept"]
        assert f"{queue_ids[message]}  NOT DELIVERED" in text
    assert "content bytes readable" in entries[queue_ids[BROKEN_CHAIN]]["reason"]
    partial = (quarantine / entries[queue_ids[BROKEN_CHAIN]]["content_file"]).read_bytes()
    assert 0 < len(partial) < len(content(BROKEN_CHAIN))
    assert partial.startswith(b"Received: ")  # as stored, with smtpgate's trace field
    assert content(BROKEN_CHAIN).startswith(partial[partial.index(b"Subject: ") :])
    assert "cannot be trusted" in entries[queue_ids[SILENT_END]]["reason"]
    assert "no readable recipients" in entries[queue_ids[3]]["reason"]
    assert entries[queue_ids[3]]["lost_recipient_ids"]
    for message in set(RECIPIENTS) - damaged:  # the rest is delivered, the loss reported
        lost = {address(message, n) for n in range(RECIPIENTS[message])} & on_damaged_page
        if lost:
            entry = entries[queue_ids[message]]
            assert entry["kept"]
            assert len(entry["lost_recipient_ids"]) == len(lost)

    # The log says so once, loudly, with the counts and where to look.
    [warning] = [e for e in gateway.events() if e["event"].startswith("the spool was damaged")]
    assert warning["level"] == "warning"
    assert warning["quarantine"] == str(quarantine)
    assert warning["messages_not_delivered"] == len(damaged)
    assert warning["messages_kept"] == len(RECIPIENTS) - len(damaged)
    undeliverable = {
        e["queue_id"] for e in gateway.events() if e["event"] == "message cannot be delivered"
    }
    assert undeliverable == {queue_ids[m] for m in damaged}

    # A restart finds a sound spool: nothing is quarantined twice.
    assert gateway.stop() == 0
    gateway.start()
    assert len(list((gateway.state_dir / "quarantine").iterdir())) == 1


def test_mail_whose_job_row_was_lost_is_still_delivered(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """Recipients are leased through their job: a lost job is made again, active."""
    port = free_port()
    gateway = gateway_factory(
        relay_config(port, retry='["1s"]'), server=with_default_route("upstream")
    )
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(3):
            client.sendmail("a@example.org", [f"r{n}@example.com"], content(n))
    assert gateway.stop() == 0
    spool = gateway.state_dir / "spool.db"
    [jobs_page] = live_leaves(spool, "jobs")  # a small table: its root is its one leaf
    data = bytearray(spool.read_bytes())
    data[jobs_page * PAGE : (jobs_page + 1) * PAGE] = b"\xa5" * PAGE
    spool.write_bytes(bytes(data))

    upstream = upstreams.start(port=port)
    gateway.start()

    wait_until(lambda: len(upstream.messages) == 3, 30, "the three messages upstream")
    assert sorted(own_trace_removed(m.content) for m in upstream.messages) == [
        content(n) for n in range(3)
    ]
    [quarantine] = (gateway.state_dir / "quarantine").iterdir()
    report = json.loads((quarantine / "report.json").read_text())
    assert report["messages"] == []  # no message was damaged
    assert any("made again, active" in note for note in report["notes"])
    [job] = json.loads(gateway.cli("jobs", "--json").stdout)
    assert job["name"].startswith("salvaged-")
