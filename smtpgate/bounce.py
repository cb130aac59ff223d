"""Bounces: an RFC 3464 delivery status notification when recipients finally fail.

Only for routes with `bounce = true`: a local gateway's clients usually learn of failures
from `smtpgate job show`, and a bounce to an address nobody reads is noise. The DSN has
the null sender and is routed by the rules like any other message, so it goes out the way
mail to the original sender would. A bounce is never bounced: mail with the null sender
gets none (RFC 5321 4.5.5), which also ends any loop.
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Sequence
from email.message import EmailMessage, Message
from email.policy import SMTP

from smtpgate import clock
from smtpgate.body import head_of
from smtpgate.config import Config
from smtpgate.router import Envelope, Router
from smtpgate.spool.base import Delivery, NewMessage, NewRecipient

# The enhanced code that follows a reply code ("450 4.2.1 ..."), not digits in an address.
_ENHANCED = re.compile(r"(?:^|\s)[245]\d\d[ -]([245]\.\d{1,3}\.\d{1,3})\b")
_HEADERS_QUOTED = 64 * 1024  # of the original message, in the DSN's third part


class Bouncer:
    def __init__(self, config: Config, router: Router) -> None:
        self._config = config
        self._router = router
        self._hostname = config.server.hostname

    def wants(self, delivery: Delivery) -> bool:
        return bool(delivery.sender) and self._config.routes[delivery.route].bounce

    def notice(self, delivery: Delivery, failures: Sequence[tuple[str, str]]) -> NewMessage:
        """The DSN for these (recipient, last reply) pairs, routed; the scheduler stores it
        with the failures it reports, in one transaction, so neither is kept without the
        other."""
        now = clock.now()
        # Routed as if the original client sent it: the rules that chose the way out for
        # its mail (client networks, auth_user) choose it for the notice about it too.
        envelope = Envelope(
            sender="",
            client_ip=delivery.client_address or None,
            route_header=None,
            auth_user=delivery.submitted_by,
        )
        return NewMessage(
            sender="",
            # The route's job of the day, never the campaign's: a DSN is not part of it,
            # and a cancelled or paused campaign must not hold its notices.
            recipients=[
                NewRecipient(delivery.sender, self._router.route(envelope, delivery.sender))
            ],
            content=dsn(delivery, failures, self._hostname, now),
            client_address="",
            helo=self._hostname,
            smtputf8=delivery.smtputf8,  # it quotes the original's header section
            received_at=now,
        )


def dsn(
    delivery: Delivery, failures: Sequence[tuple[str, str]], hostname: str, now: float
) -> bytes:
    """The multipart/report: a note for people, the machine-readable status per
    recipient, and the original message's header section."""
    report = EmailMessage(policy=SMTP)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = delivery.sender
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = email.utils.formatdate(now, usegmt=True)
    report["Message-ID"] = email.utils.make_msgid(domain=hostname)
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: never answered automatically
    listed = "\n".join(f"<{address}>: {reply}" for address, reply in failures)
    report.set_content(
        f"This is the mail system at {hostname}.\n\n"
        "Your message could not be delivered to one or more recipients; smtpgate has\n"
        f"stopped trying. Queue id {delivery.queue_id}, job {delivery.job}.\n\n{listed}\n"
    )
    per_message = _fields(
        ("Reporting-MTA", f"dns; {hostname}"),
        ("X-Smtpgate-Queue-ID", delivery.queue_id),
        ("Arrival-Date", email.utils.formatdate(delivery.received_at, usegmt=True)),
    )
    per_recipient = [
        _fields(
            ("Final-Recipient", f"rfc822; {address}"),
            ("Action", "failed"),
            ("Status", _status(reply)),
            ("Diagnostic-Code", f"smtp; {_one_line(reply)}"),
            ("Last-Attempt-Date", email.utils.formatdate(now, usegmt=True)),
        )
        for address, reply in failures
    ]
    status = EmailMessage(policy=SMTP)
    status.set_type("message/delivery-status")
    status.set_payload([per_message, *per_recipient])
    headers = head_of(delivery.content).split(b"\r\n\r\n", 1)[0]
    if len(headers) > _HEADERS_QUOTED:  # cut at a line end, never inside a field
        headers = headers[: headers.rfind(b"\r\n", 0, _HEADERS_QUOTED)]
    headers += b"\r\n"
    quoted = EmailMessage(policy=SMTP)
    quoted.set_content(headers, "text", "rfc822-headers", cte="8bit")
    report.make_mixed()
    report.attach(status)
    report.attach(quoted)
    report.replace_header("Content-Type", "multipart/report")
    report.set_param("report-type", "delivery-status")
    return report.as_bytes()


def _fields(*fields: tuple[str, str]) -> Message:
    """One block of a delivery-status part (RFC 3464 2.1): fields, then an empty line."""
    block = Message(policy=SMTP)
    for name, value in fields:
        block[name] = value
    return block


def _status(reply: str) -> str:
    """The enhanced status code of the last reply (RFC 3463), else a generic one."""
    match = _ENHANCED.search(reply)
    if match and match.group(1)[0] in "45":
        return match.group(1)
    return "4.4.7" if reply.startswith("gave up") else "5.0.0"


def _one_line(reply: str) -> str:
    return " ".join(reply.split())
