"""The order "fsync the message, then reply 250", seen from the kernel: `smtpgate serve`
runs under strace, and its system calls show the message written to the spool's WAL,
the WAL flushed to disk, and only then the 250 with the queue id sent to the client."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import GatewayFactory
from test_listener import submit

MARKER = "fsync-order-marker-7f3a"
_RESUMED = re.compile(r"<\.\.\. (\w+) resumed>")
_CALL = re.compile(r"(\w+)\(")


@dataclass
class Call:
    name: str
    text: str
    start: int  # line where the call began
    end: int  # line where it returned
    thread: str = ""


def calls(trace: str) -> list[Call]:
    """System calls of `strace -f` output, a call split by another thread joined up."""
    found: list[Call] = []
    open_calls: dict[str, Call] = {}
    for number, line in enumerate(trace.splitlines()):
        tid, _, rest = line.strip().partition(" ")
        rest = rest.strip()
        if resumed := _RESUMED.match(rest):
            call = open_calls.pop(tid, None)
            if call is not None and call.name == resumed.group(1):
                call.text += rest
                call.end = number
            continue
        match = _CALL.match(rest)
        if match is None:
            continue  # signals, exits
        call = Call(match.group(1), rest, number, number, tid)
        found.append(call)
        if rest.endswith("<unfinished ...>"):
            open_calls[tid] = call
    return found


def strace_refusal() -> str | None:
    """Why strace cannot trace here, or None when it can."""
    if shutil.which("strace") is None:
        return "strace is not installed"
    probe = subprocess.run(
        ["strace", "-f", "-e", "trace=fsync", "-o", os.devnull, "true"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}"
    return None


# A large message is written into its blob in chunks, in the same transaction: the
# marker at its end is in the last of them.
LARGE = "".join(f"{n:08} {'x' * 80}\r\n" for n in range(25_000))


@pytest.mark.parametrize("filler", ["", LARGE], ids=["small", "large"])
def test_the_wal_is_flushed_before_the_250_is_sent(
    gateway_factory: GatewayFactory, tmp_path: Path, filler: str
) -> None:
    if refusal := strace_refusal():
        pytest.skip(refusal)
    trace_path = tmp_path / "strace.out"
    gateway = gateway_factory(start=False)
    gateway.prefix = [
        "strace",
        "-f",
        "-yy",  # file descriptors with their paths and socket addresses
        "-s",
        "100000",  # whole buffers, to find the message in the WAL writes
        "-e",
        "trace=fsync,fdatasync,write,pwrite64,pwritev,sendto,sendmsg",
        "-o",
        str(trace_path),
    ]
    gateway.start()
    pid = int((gateway.state_dir / "spool.db.lock").read_text())  # smtpgate, not strace
    try:
        reply = submit(gateway.port, f"Subject: s\r\n\r\n{filler}{MARKER}\r\n.\r\n".encode())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        assert gateway.process is not None
        gateway.process.wait(30)
    assert reply.startswith("250 2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[-1]

    traced = calls(trace_path.read_text(errors="replace"))
    wal = "spool.db-wal>"
    [stored, *_] = [
        c for c in traced if c.name.startswith("pwrite") and wal in c.text and MARKER in c.text
    ]
    [flushed, *_] = [
        c
        for c in traced
        if c.name in ("fsync", "fdatasync")
        and wal in c.text
        and c.start > stored.end
        and c.thread == stored.thread  # the writer's own: not the log's copy by another
    ]
    [answered] = [
        c
        for c in traced
        if c.name in ("write", "sendto", "sendmsg") and f"queued as {queue_id}" in c.text
    ]
    assert "TCP:[" in answered.text  # the client's socket
    assert flushed.text.rstrip().endswith("= 0")  # the flush succeeded
    assert stored.end < flushed.start
    assert flushed.end < answered.start, "the 250 went out before the WAL reached the disk"
