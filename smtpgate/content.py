"""Content: what the listener makes of the bytes a client sent after DATA.

Stored content is canonical, so nothing that leaves smtpgate can smuggle a second message
past a server with a laxer idea of where a line ends (the 2023 SMTP smuggling research):
every line ends in CRLF, no NUL, and the trace fields show where the message has been.
"""

from __future__ import annotations

import re
from email.utils import formatdate
from typing import Literal

BareLineEnds = Literal["fix", "refuse"]

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
    header = raw if end < 0 else raw[: end + 2]
    if len(_RECEIVED.findall(header)) > max_hops:
        # RFC 5321 6.3: a message with this many trace fields is in a loop.
        raise ContentRefused(f"554 5.4.0 Too many hops ({max_hops} Received: fields)")
    return raw


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
        f"\r\n\t{formatdate(when, localtime=True)}\r\n"
    )
    return line.encode("utf-8", "surrogateescape")
