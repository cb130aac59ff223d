"""Outcome: the one place that turns an SMTP reply or a network error into a verdict.

Transports report an `Outcome` per recipient; the scheduler turns it into a state with
`retry.RetryPolicy`. Like Postfix, every outcome carries its scope, so a failure of the
session (connection, greeting) never counts against the message or the recipient.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"  # try again later
    FAILED = "failed"  # permanent: do not try again
    POSTPONED = "postponed"  # not tried: its destination is busy; not an attempt


class Scope(enum.StrEnum):
    SESSION = "session"  # connection, greeting, EHLO: nothing to do with this message
    MESSAGE = "message"  # MAIL FROM or DATA: every recipient of the transaction
    RECIPIENT = "recipient"  # RCPT TO: this recipient alone


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    reply: str
    scope: Scope
    uncertain: bool = False  # the connection died after the final dot: it may have arrived
    via: str | None = None  # the server it went to, its address, and the TLS used

    @classmethod
    def from_reply(cls, code: int, text: str, scope: Scope) -> Outcome:
        """2xx delivered, 4xx deferred, 5xx failed. A 5xx to the session is deferred:
        an upstream refusing every client is a fault to fix, not a verdict on the mail."""
        reply = format_reply(code, text)
        if 200 <= code < 300:
            return cls(Verdict.DELIVERED, reply, scope)
        if 500 <= code < 600 and scope is not Scope.SESSION:
            return cls(Verdict.FAILED, reply, scope)
        return cls(Verdict.DEFERRED, reply, scope)

    @classmethod
    def deferred(cls, reason: str, scope: Scope, *, uncertain: bool = False) -> Outcome:
        """Network errors, timeouts, drops: try again."""
        return cls(Verdict.DEFERRED, reason, scope, uncertain)

    @classmethod
    def failed(cls, reason: str, scope: Scope) -> Outcome:
        return cls(Verdict.FAILED, reason, scope)

    @classmethod
    def postponed(cls, reason: str) -> Outcome:
        return cls(Verdict.POSTPONED, reason, Scope.RECIPIENT)


def format_reply(code: int, text: str) -> str:
    """A multi-line reply as one line, as `smtpgate queue` and the logs show it."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{code} {' / '.join(lines)}".strip()


def describe_error(error: BaseException) -> str:
    """A network error in words a person reading `smtpgate queue` understands.

    Looks through the wrappers (aiosmtplib raises SMTPConnectError from the OSError)."""
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, ConnectionRefusedError):
        return "connection refused"
    if isinstance(root, ConnectionResetError):
        return "connection reset by peer"
    if isinstance(root, TimeoutError) or isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(root, OSError) and root.strerror:
        return root.strerror.lower()
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


_SLOW_DOWN = re.compile(
    r"\b(too many|rate[sd]?|rate-?limit\w*|slow down|throttl\w*|limit\w*|try again later)\b",
    re.IGNORECASE,
)


def asks_to_slow_down(reply: str) -> bool:
    """421, or a 4.7.x reply about volume: the upstream wants fewer connections or messages."""
    if reply.startswith("421"):
        return True
    return reply[:1] == "4" and reply[4:8] == "4.7." and bool(_SLOW_DOWN.search(reply))
