"""`smtpgate check ROUTE`: try a route's upstream the way delivery would, one verdict a step.

Connect, TLS (with the certificate's subject and expiry), AUTH, and optionally one test
message sent straight to the upstream, so a wrong setting shows before mail waits on it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable
from email.utils import formatdate, make_msgid

from smtpgate.config import Config, ConfigError
from smtpgate.spool.base import Delivery, LeasedRecipient
from smtpgate.transports.session import Endpoint, SessionError, UpstreamSession, tls_context

Say = Callable[[str, bool, str], None]  # step, ok, detail


def sample_message(config: Config, sender: str, recipient: str, route: str) -> bytes:
    """A small, well-formed message that says where it came from."""
    host = config.server.hostname
    return (
        f"Date: {formatdate(localtime=True)}\r\n"
        f"From: {sender}\r\n"
        f"To: {recipient}\r\n"
        f"Subject: smtpgate test message (route {route})\r\n"
        f"Message-ID: {make_msgid(domain=host)}\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        f"This message was sent by smtpgate on {host} to test the route {route!r}.\r\n"
    ).encode()


async def check_route(
    config: Config,
    route: str,
    say: Say,
    *,
    send_to: str | None = None,
    sender: str | None = None,
) -> bool:
    """Run the steps, reporting each through `say`; True when every step passed."""
    if route not in config.routes:
        raise ConfigError(f"no route {route!r} (defined: {', '.join(config.routes)})")
    settings = config.routes[route]
    if settings.mode != "relay" or not settings.relay:
        say(
            "route",
            False,
            f"{route} sends {settings.mode}; this version can check relay routes only",
        )
        return False
    relay = config.relays[settings.relay]
    password = relay.resolve_password(os.environ)
    say(
        "route",
        True,
        f"{route} relays through {settings.relay}"
        f" ({relay.host}:{relay.effective_port}, tls = {relay.tls})",
    )
    try:
        session = await UpstreamSession.open(
            Endpoint.relay(relay),
            helo_name=config.server.hostname,
            context=tls_context(relay),
            password=password,
            progress=lambda stage, detail: say(stage, True, detail),
        )
    except SessionError as error:
        say(error.stage or "connect", False, error.outcome.reply)
        return False
    try:
        if send_to is None:
            return True
        sender = sender or f"smtpgate-check@{config.server.hostname}"
        delivery = Delivery(
            queue_id="CHECK-" + secrets.token_hex(4).upper(),
            route=route,
            sender=sender,
            content=sample_message(config, sender, send_to, route),
            smtputf8=False,
            received_at=time.time(),
            recipients=(LeasedRecipient(0, send_to, 0),),
        )
        outcome = (await session.send(delivery, pipelined=False))[0]
        ok = outcome.verdict.value == "delivered"
        say("send", ok, f"to {send_to}: {outcome.reply}")
        return ok
    finally:
        await session.quit()
