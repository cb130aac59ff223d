"""Content: what the listener makes of the bytes a client sent after DATA.

Stored content is canonical, so nothing that leaves smtpgate can smuggle a second message
past a server with a laxer idea of where a line ends (the 2023 SMTP smuggling research):
every line ends in CRLF, no NUL, and the trace fields show where the message has been.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import BinaryIO, Literal

from smtpgate.body import file_pieces

BareLineEnds = Literal["fix", "refuse"]
HEADER_WINDOW = 256 * 1024  # of a message in a file, read for its header section

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_RECEIVED = re.compile(rb"^received:", re.IGNORECASE | re.MULTILINE)


class ContentRefused(Exception):
    """The message cannot be accepted; `reply` says why, in SMTP."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


def canonical(raw: bytes, *, bare_line_ends: BareLineEnds, max_hops: int) -> bytes:
    """Line ends made CRLF (or the message refused, as configured); NUL and mail loops
    refused."""
    if b"\x00" in raw:
        raise ContentRefused("554 5.6.0 Message contains NUL characters")
    crlf = raw.count(b"\r\n")  # counting is a C loop; the regex costs 5% of an accept
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        if bare_line_ends == "refuse":
            # RFC 5321 2.3.8: CR and LF only ever come together.
            raise ContentRefused("554 5.6.0 Message contains a bare CR or LF")
        raw = _BARE.sub(b"\r\n", raw)
    end = raw.find(b"\r\n\r\n")
    _count_hops(raw if end < 0 else raw[: end + 2], max_hops)
    return raw


def _count_hops(header: bytes, max_hops: int) -> None:
    if len(_RECEIVED.findall(header)) > max_hops:
        # RFC 5321 6.3: a message with this many trace fields is in a loop.
        raise ContentRefused(f"554 5.4.0 Too many hops ({max_hops} Received: fields)")


@dataclass(frozen=True, slots=True)
class CanonicalFile:
    """A message in a file, made canonical: `header` (the header section and the empty
    line after it, in memory) and then `length` bytes of `file` from `offset`."""

    header: bytes
    file: BinaryIO
    offset: int
    length: int


def canonical_file(
    raw: BinaryIO,
    size: int,
    *,
    bare_line_ends: BareLineEnds,
    max_hops: int,
    directory: Path | None,
) -> CanonicalFile:
    """canonical() for a message in a file, read in chunks with the same refusals. Its
    own file when nothing needs changing (the usual case), else a new temporary file
    in `directory` with every line end CRLF; the caller closes a file that is not `raw`.

    The header section is what lies before the first empty line within HEADER_WINDOW
    bytes (all of a message without one); a longer one is taken as far as the last line
    end within them."""
    fd = raw.fileno()
    crlf = cr = lf = 0
    last = b""
    for piece in file_pieces(fd, 0, size):
        if b"\x00" in piece:
            raise ContentRefused("554 5.6.0 Message contains NUL characters")
        crlf += piece.count(b"\r\n") + (last == b"\r" and piece[:1] == b"\n")
        cr += piece.count(b"\r")
        lf += piece.count(b"\n")
        last = piece[-1:]
    file = raw
    if cr != crlf or lf != crlf:
        if bare_line_ends == "refuse":
            raise ContentRefused("554 5.6.0 Message contains a bare CR or LF")
        file = tempfile.TemporaryFile(dir=directory)
        try:
            size = _write_fixed(fd, size, file)
        except BaseException:
            file.close()
            raise
    window = os.pread(file.fileno(), min(HEADER_WINDOW, size), 0)
    end = window.find(b"\r\n\r\n")
    if end >= 0:
        cut = end + 4
    elif size <= len(window):  # no body at all: every line is header, as in memory
        cut = size
    else:
        cut = window.rfind(b"\r\n") + 2 if b"\r\n" in window else len(window)
    header = window[:cut]
    try:
        _count_hops(header, max_hops)
    except ContentRefused:
        if file is not raw:
            file.close()
        raise
    return CanonicalFile(header, file, cut, size - cut)


def _write_fixed(fd: int, size: int, out: BinaryIO) -> int:
    """The bytes of `fd` with bare CR and LF made CRLF, written to `out`; their size. A
    CR at the end of a piece waits for the next, which may start with its LF."""
    held = b""
    for piece in file_pieces(fd, 0, size):
        piece = held + piece
        held = piece[-1:] if piece.endswith(b"\r") else b""
        out.write(_BARE.sub(b"\r\n", piece[: len(piece) - len(held)]))
    if held:
        out.write(b"\r\n")
    out.flush()
    return out.tell()


_HELO_SAFE = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")


def helo_for_trace(name: str | None) -> str:
    """The client's EHLO name as it may go into a Received: field and the spool: a host
    name or address literal as given, anything else shown, quoted, as ASCII."""
    if name and _HELO_SAFE.match(name):
        return name
    shown = (name or "").encode("ascii", "backslashreplace").decode("ascii")
    return f'"{shown[:100]}"' if shown else "unknown"


def received(
    *,
    helo: str,
    client_ip: str | None,
    hostname: str,
    protocol: str,
    recipient: str | None,
    when: float,
) -> bytes:
    """RFC 5321 4.4 trace field, Postfix-like; `recipient` only when there is one."""
    literal = f"IPv6:{client_ip}" if client_ip and ":" in client_ip else client_ip
    source = f"from {helo} ([{literal}])" if client_ip else f"from {helo}"
    target = f"\r\n\tfor <{recipient}>" if recipient else ""
    line = (
        f"Received: {source}\r\n\tby {hostname} (smtpgate) with {protocol}{target};"
        f"\r\n\t{_trace_date(int(when))}\r\n"
    )
    return line.encode("utf-8", "surrogateescape")


@functools.lru_cache(maxsize=4)
def _trace_date(second: int) -> str:
    """The date of a trace field: it shows whole seconds, so one formatting a second."""
    return formatdate(second, localtime=True)
