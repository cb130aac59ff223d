"""Listener: the SMTP server every client talks to (aiosmtpd), first box of the data path.

It asks the policy who may relay, the router where each recipient goes, and answers 250 to
DATA only after the spool has made the message durable, quoting the queue id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import logging
import math
import os
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AnyStr, BinaryIO, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import MISSING, SMTP, Envelope, Session, syntax

from smtpgate import addresses, clock, crashpoints, data, logs
from smtpgate.addresses import Role
from smtpgate.auth import MECHANISMS, Authenticator, Verdict
from smtpgate.body import Body, Content, FileBody, size_of
from smtpgate.config import Config, ConfigError, valid_job_name
from smtpgate.content import (
    CanonicalFile,
    ContentRefused,
    canonical,
    canonical_file,
    helo_for_trace,
    received,
)
from smtpgate.headers import split_controls
from smtpgate.jobs import SendAtError, day_job, job_of, parse_send_at
from smtpgate.passthrough import LiveTransaction, Passthrough
from smtpgate.policy import RelayPolicy
from smtpgate.router import Envelope as RouteEnvelope
from smtpgate.router import Router
from smtpgate.spool.base import (
    JobCancelledError,
    JobControl,
    NewMessage,
    NewRecipient,
    Spool,
)

log = logs.get(__name__)

_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO}


def _sanitized_log_if_written(
    func: Callable[..., None], msg: AnyStr, *args: Any, **kwargs: Any
) -> None:
    """aiosmtpd masks AUTH arguments in each command line it logs, at debug and at info,
    before its logger says whether it writes that level: two passes a command, under
    load a few per cent of the event loop, for lines smtpgate never writes (mail.log
    stays at warning, see logs.configure). Ask the logger first; a line it does write
    is masked by aiosmtpd as before."""
    logger = getattr(func, "__self__", None)
    level = _LOG_LEVELS.get(getattr(func, "__name__", ""))
    if isinstance(logger, logging.Logger) and level is not None and not logger.isEnabledFor(level):
        return
    _aiosmtpd_sanitized_log(func, msg, *args, **kwargs)


_aiosmtpd_sanitized_log = aiosmtpd.smtp.sanitized_log
aiosmtpd.smtp.sanitized_log = _sanitized_log_if_written

# RFC 3463 codes for aiosmtpd's own replies, which carry none (RFC 2034 asks for one on
# every reply except the greeting, EHLO/HELO and 354).
_ENHANCED = {
    250: "2.0.0",
    221: "2.0.0",
    252: "2.0.0",
    421: "4.3.0",
    451: "4.3.0",
    500: "5.5.2",
    501: "5.5.4",
    502: "5.5.1",
    503: "5.5.1",
    504: "5.5.4",
    530: "5.7.0",
    552: "5.3.4",
    553: "5.1.3",
    554: "5.0.0",
    555: "5.5.4",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?:\s|$)")

# Commands that move no mail, limited per session (Postfix: smtpd_junk_command_limit),
# then "421 4.7.0 NOOP sent too many times" and close. As Postfix does, the count starts
# again after each accepted message: pooled clients (JavaMail) send NOOP before each one.
JUNK_COMMANDS = frozenset({"NOOP", "VRFY", "EXPN", "HELP"})
JUNK_COMMAND_LIMIT = 100
FREE_SPACE_SECONDS = 0.25  # how old the spool disk's free space may be when MAIL asks
TEMPORARY_FAILURE = "451 4.3.0 Local error in processing; the message was not accepted, try again"

# The usual MAIL/RCPT argument, <dot-atom@dot-atom> then parameters (RFC 5321 4.1.2).
# aiosmtpd parses every address with the email package's header parser and defines a
# class on each call, a tenth of an accept's CPU; plain_path takes this form directly.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SOURCE_ROUTE = re.compile(r"<\s*@")  # <@relay:user@host>
_PLAIN_PATH = re.compile(
    rf"<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(?:[ \t]+(?=[^ \t(])|\Z)"
)


class Handler:
    """aiosmtpd hooks. aiosmtpd finds them by exact name (handle_DATA, not handle_data) and
    silently answers 250 without storing anything for a missing handle_DATA, so
    tests/test_listener.py proves these are the ones called."""

    def __init__(
        self,
        config: Config,
        spool: Spool,
        router: Router,
        policy: RelayPolicy,
        on_stored: Callable[[], None],
        passthrough: Passthrough | None = None,
    ) -> None:
        self._config = config
        self._free_space = FreeSpace(config.spool_path().parent)
        self._spool = spool
        self._router = router
        self._policy = policy
        self._on_stored = on_stored
        self._passthrough = passthrough
        self._live: weakref.WeakKeyDictionary[Session, LiveTransaction] = (
            weakref.WeakKeyDictionary()
        )
        self._closing: set[asyncio.Task[Any]] = set()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        # AUTH is ours to advertise: only when users exist, and only over TLS.
        kept = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")]
        if isinstance(server, GatewaySMTP) and server.offers_auth():
            kept.append(f"250-AUTH {' '.join(MECHANISMS)}")
        return [*kept, "250-ENHANCEDSTATUSCODES", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if refusal := self._refusal(address, "sender", envelope):
            return refusal
        if (room := self._free_space.available()) is not None and room < _needed(
            self._config, mail_options
        ):
            log.warning("refusing mail: the spool's disk is nearly full", free=room)
            return "452 4.3.1 Insufficient system storage, try again later"
        envelope.mail_from = address  # "<>" for the null sender: aiosmtpd needs it truthy
        envelope.mail_options.extend(mail_options)
        await self._end_live(session)  # a transaction abandoned by RSET or EHLO
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if refusal := self._refusal(address, "recipient", envelope):
            return refusal
        client_ip = _peer_ip(session)
        user = auth_user(session)
        if not self._policy.may_relay(client_ip, user=user):
            log.warning("relay denied", client=client_ip, recipient=address)
            return f"554 5.7.1 <{address}>: Relay access denied"
        if len(envelope.rcpt_tos) >= self._config.server.max_recipients:
            # RFC 5321 4.5.3.1.10: 452, and the client sends the rest in another transaction
            return "452 4.5.3 Too many recipients"
        if self._passthrough is not None:
            route = self._router.route(
                RouteEnvelope(_sender(envelope), client_ip, None, user), address
            )
            if self._passthrough.handles(route):
                accepted, reply = await self._live_recipient(
                    self._passthrough, session, envelope, route, address
                )
                if not accepted:
                    return reply
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Recipient OK"

    async def _live_recipient(
        self,
        passthrough: Passthrough,
        session: Session,
        envelope: Envelope,
        route: str,
        address: str,
    ) -> tuple[bool, str]:
        """RCPT for a passthrough route: the upstream's own reply goes to the client."""
        live = self._live.get(session)
        if live is None:
            live, refusal = await passthrough.start(
                route,
                _sender(envelope),
                smtputf8=envelope.smtp_utf8,
                eight_bit="BODY=8BITMIME" in envelope.mail_options,
            )
            self._live[session] = live
            if refusal is not None:
                return False, refusal
        elif live.route != route:
            return False, (
                "452 4.5.3 Recipients of another passthrough route go in a new transaction"
            )
        return await passthrough.recipient(live, address, smtputf8=envelope.smtp_utf8)

    async def _end_live(self, session: Session) -> None:
        live = self._live.pop(session, None)
        if live is not None and self._passthrough is not None:
            await self._passthrough.close(live)

    def session_ended(self, session: Session) -> None:
        """The client went away: close any upstream transaction opened for it."""
        live = self._live.pop(session, None)
        if live is not None and self._passthrough is not None:
            task = asyncio.get_running_loop().create_task(self._passthrough.close(live))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _refusal(self, address: str, role: Role, envelope: Envelope) -> str | None:
        return addresses.refusal(
            address,
            role=role,
            smtputf8=envelope.smtp_utf8,
            allow_percent_hack=self._config.server.allow_percent_hack,
        )

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        spilled = envelope.spilled if isinstance(envelope, GatewayEnvelope) else None
        try:
            header, body = await self._canonical(envelope, spilled)
        except ContentRefused as refused:
            log.warning("message refused", reason=refused.reply, client=_peer_ip(session))
            await self._end_live(session)  # the upstream transaction must not stay open
            return refused.reply
        except OSError as error:  # the file with its line ends fixed cannot be written
            log.warning("message not accepted", reason=str(error), client=_peer_ip(session))
            await self._end_live(session)
            return "452 4.3.1 Insufficient system storage"
        try:
            return await self._accept(server, session, envelope, header, body)
        finally:
            if body is not None and body.file is not spilled:
                body.file.close()  # a rewritten file; the DATA reader's caller closes its own

    async def _canonical(
        self, envelope: Envelope, spilled: BinaryIO | None
    ) -> tuple[bytes, CanonicalFile | None]:
        """The message made canonical: all of it, or, for one the DATA reader put in a
        file, its header section and where the rest is (read on a worker thread)."""
        server_config = self._config.server
        if spilled is None or not isinstance(envelope, GatewayEnvelope):
            raw = canonical(
                envelope.original_content or b"",
                bare_line_ends=server_config.bare_line_ends,
                max_hops=server_config.max_hops,
            )
            return raw, None
        made = await asyncio.to_thread(
            canonical_file,
            spilled,
            envelope.spilled_size,
            bare_line_ends=server_config.bare_line_ends,
            max_hops=server_config.max_hops,
            directory=self._config.state_dir(),
        )
        return made.header, made

    async def _accept(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        raw: bytes,
        rest: CanonicalFile | None,
    ) -> str:
        server_config = self._config.server
        content, controls = split_controls(raw)
        client_ip = _peer_ip(session)
        now = clock.now()
        try:
            send_at = self._send_at(controls.get("send-at"), client_ip, now)
            job = valid_job_name(controls["job"]) if "job" in controls else None
        except ValueError as error:  # SendAtError included
            header = "Send-At" if isinstance(error, SendAtError) else "Job"
            log.warning("message refused", reason=str(error), header=header, client=client_ip)
            await self._end_live(session)
            return f"554 5.6.0 X-Smtpgate-{header}: {error}"
        trace = received(
            helo=helo_for_trace(session.host_name),
            client_ip=client_ip,
            hostname=server_config.hostname,
            protocol=_protocol(session),
            recipient=envelope.rcpt_tos[0] if len(envelope.rcpt_tos) == 1 else None,
            when=now,
        )
        stored = Stored(controls.get("route"), job, send_at, now)
        if rest is None:
            return await self._store(server, session, envelope, trace + content, stored)
        body = FileBody.of(trace + content, rest.file, rest.offset, rest.length)
        try:
            return await self._store(server, session, envelope, body, stored)
        finally:
            body.close()  # a passthrough still sending it holds a handle of its own

    async def _store(
        self, server: SMTP, session: Session, envelope: Envelope, content: Content, how: Stored
    ) -> str:
        """Route, store, and (passthrough) send on; the reply to the final dot."""
        sender = _sender(envelope)
        client_ip = _peer_ip(session)
        job, send_at, now = how.job, how.send_at, how.now
        user = auth_user(session)
        route_header = how.route_header
        if route_header is not None and not self._policy.may_relay(client_ip):
            # A user logged in from outside is routed by the rules the operator wrote
            # (auth_user), not by a header that could send around the smarthost.
            log.info("X-Smtpgate-Route ignored: the client is not trusted", client=client_ip)
            route_header = None
        route_envelope = RouteEnvelope(sender, client_ip, route_header, user)
        live = self._live.pop(session, None)
        if live is not None and self._passthrough is not None:
            if await self._must_wait(live.route, job, send_at, now):
                await self._passthrough.close(live)  # stored below like any other mail
                live = None
        proxied = list(live.addresses) if live else []
        recipients = []
        for address in envelope.rcpt_tos:
            leased = live is not None and address in proxied
            if live is not None and leased:
                proxied.remove(address)  # the same address may be given twice
                route = live.route
            else:
                route = self._router.route(route_envelope, address)
            config = self._config.routes[route]
            recipients.append(
                NewRecipient(
                    address,
                    route,
                    leased=leased,
                    job=job_of(job, config),
                    hold=config.hold,
                )
            )
        message = NewMessage(
            sender=sender,
            recipients=recipients,
            content=content,
            client_address=client_ip or "",
            helo=helo_for_trace(session.host_name),
            smtputf8=envelope.smtp_utf8,
            received_at=now,
            send_at=send_at,
            submitted_by=user,
        )
        try:
            queue_id = await self._spool.store(message)
        except JobCancelledError as cancelled:
            log.warning("message refused", reason=str(cancelled), client=client_ip)
            if live is not None and self._passthrough is not None:
                await self._passthrough.close(live)
            return f"554 5.7.0 {cancelled}; name another with X-Smtpgate-Job"
        except Exception:
            log.exception(
                "spool write failed; message refused with 451", client=client_ip, sender=sender
            )
            if live is not None and self._passthrough is not None:
                await self._passthrough.close(live)
            return TEMPORARY_FAILURE
        log.info(
            "accepted",
            queue_id=queue_id,
            sender=sender,
            client=client_ip,
            user=user,
            size=size_of(content),
            recipients=len(message.recipients),
            routes=sorted({r.route for r in message.recipients}),
        )
        reply = None
        if live is not None and self._passthrough is not None:
            reply = await self._finish_live(
                self._passthrough, server, live, queue_id, recipients, content
            )
        self._on_stored()
        crashpoints.reached("before_reply")
        reply = reply or f"250 2.0.0 Ok: queued as {queue_id}"
        if reply.startswith("2") and isinstance(server, GatewaySMTP):
            server.message_accepted()
        return reply

    async def _finish_live(
        self,
        passthrough: Passthrough,
        server: SMTP,
        live: LiveTransaction,
        queue_id: str,
        recipients: list[NewRecipient],
        content: Content,
    ) -> str | None:
        """The stored message's passthrough DATA. Once stored, the client never hears 451:
        a failure here leaves the recipients to the scheduler instead."""
        try:
            ids = await self._spool.recipient_ids(queue_id)
        except Exception:
            log.exception("cannot read back the stored recipients", queue_id=queue_id)
            await passthrough.close(live)
            return None  # left `sending`: released and sent at the next start
        live.leased_ids = [ids[i] for i, r in enumerate(recipients) if r.leased]
        relay = self._config.routes[live.route].relay
        if relay and isinstance(server, GatewaySMTP):
            # The upstream may take data_timeout to answer: the client must wait as long.
            server.hold_idle_timer(self._config.relays[relay].data_timeout + 30)
        own = content.duplicate() if isinstance(content, FileBody) else content

        async def finish() -> str | None:
            try:
                return await passthrough.finish(
                    live, self._spool, queue_id, own, alone=all(r.leased for r in recipients)
                )
            finally:
                if isinstance(own, Body):
                    own.close()

        task = asyncio.ensure_future(finish())
        self._closing.add(task)  # shielded: it records the result even if the client leaves
        task.add_done_callback(self._closing.discard)
        return await asyncio.shield(task)

    async def _must_wait(
        self, route: str, job: str | None, send_at: float | None, now: float
    ) -> bool:
        """A passthrough transaction must not finish for a scheduled message or a job
        that is paused or held: those wait in the spool like mail on any other route."""
        if send_at is not None and send_at > now:
            return True
        name = job_of(job, self._config.routes[route]) or day_job(route, now)
        try:
            control = (await self._spool.job_controls()).get(name)
        except Exception:  # the spool decides at store; here it would only be a guess
            log.exception("cannot read job controls", job=name)
            return True
        # A cancelled job is not waited for: a named one is refused at store, and the
        # route's job of the day gives way to a fresh one that passes through as usual.
        return control in (JobControl.PAUSED, JobControl.HELD)

    def _send_at(self, header: str | None, client_ip: str | None, now: float) -> float | None:
        """The header's time; a garbled one raises SendAtError unless the config says to
        send such mail now (then it is logged)."""
        if header is None:
            return None
        try:
            return parse_send_at(header, now)
        except SendAtError as error:
            if self._config.server.invalid_send_at == "refuse":
                raise
            log.warning(
                "X-Smtpgate-Send-At ignored; sending now", reason=str(error), client=client_ip
            )
            return None

    async def handle_exception(self, error: Exception) -> str:
        log.error("unexpected error in an SMTP session", exc_info=error)
        return TEMPORARY_FAILURE


@dataclass(frozen=True, slots=True)
class Stored:
    """What the control headers say about storing a message, and when it arrived."""

    route_header: str | None
    job: str | None
    send_at: float | None
    now: float


def _protocol(session: Session) -> str:
    """RFC 3848 names: ESMTP, with S for TLS and A for AUTH."""
    if not session.extended_smtp:
        return "SMTP"
    return "ESMTP" + ("S" if session.ssl else "") + ("A" if session.authenticated else "")


def auth_user(session: Session) -> str | None:
    """The user name the session logged in with (set by GatewaySMTP.smtp_AUTH)."""
    if session.authenticated and isinstance(session.auth_data, str):
        return session.auth_data
    return None


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The listener's certificate as a server context, or None without one. ConfigError
    naming the key for a file that cannot be read or a certificate that does not fit."""
    tls = config.server.tls
    if tls.cert_file is None:
        return None
    for key, path in (("cert_file", tls.cert_file), ("key_file", tls.key_file)):
        if path is None:
            continue
        try:
            path.read_bytes()
        except OSError as error:
            raise ConfigError(f"server.tls.{key}: cannot read {path}: {error.strerror}") from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as error:
        files = f"{tls.cert_file}" + (f" and {tls.key_file}" if tls.key_file else "")
        raise ConfigError(
            f"server.tls: cannot use {files} as the listener's certificate and key"
            f" (PEM; key_file may be left out when cert_file holds the key too):"
            f" {error.reason or error}"
        ) from None
    return context


class FreeSpace:
    """The free bytes on the spool's disk, asked of the file system at most every
    FREE_SPACE_SECONDS: a statvfs at every MAIL cost 2% of the listener at 3,000 msg/s,
    and in a quarter second the mail fills far less than min_free_space keeps free."""

    def __init__(self, directory: Path) -> None:
        self._directory = str(directory)
        self._asked_at = -math.inf
        self._free: int | None = None

    def available(self) -> int | None:
        """None when the file system cannot say (then MAIL is not refused for it)."""
        now = time.monotonic()
        if now - self._asked_at >= FREE_SPACE_SECONDS:
            self._asked_at = now
            try:
                stats = os.statvfs(self._directory)
            except OSError:
                self._free = None
            else:
                self._free = stats.f_bavail * stats.f_frsize
        return self._free


def _needed(config: Config, mail_options: list[str]) -> int:
    """min_free_space plus the size the client declared (RFC 1870), if it did."""
    declared = next((o[5:] for o in mail_options if o.upper().startswith("SIZE=")), "0")
    return config.server.min_free_space + (int(declared) if declared.isdigit() else 0)


def _sender(envelope: Envelope) -> str:
    return "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)


def _peer_ip(session: Session) -> str | None:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


class Connections:
    """Counts open sessions, in all and per client address, so the listener can refuse
    past the limits with 421. As Postfix's smtpd_client_connection_count_limit, the
    per-client limit spares trusted clients: on a local gateway every app is 127.0.0.1."""

    def __init__(
        self, limit: int, per_client: int, exempt: Callable[[str], bool] = lambda ip: False
    ) -> None:
        self.limit = limit
        self.per_client_limit = per_client
        self.exempt = exempt
        self.open = 0
        self.by_client: dict[str, int] = {}
        self.idle = asyncio.Event()
        self.idle.set()

    def closed(self) -> None:
        self.open -= 1
        if self.open == 0:
            self.idle.set()


class GatewayEnvelope(Envelope):
    """aiosmtpd's Envelope, and where a message too big for memory was put: `spilled`
    (a temporary file of `spilled_size` bytes) instead of `original_content`."""

    def __init__(self) -> None:
        super().__init__()
        self.spilled: BinaryIO | None = None
        self.spilled_size = 0


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with enhanced status codes on its own replies, a 421 on idle
    timeout instead of a silent close, the idle timer running from the last byte, a
    count of open sessions, and our own AUTH (over TLS only, checked off the loop,
    throttled per client address)."""

    def __init__(
        self,
        handler: Handler,
        connections: Connections,
        max_errors: int,
        max_commands: int,
        *,
        counted: bool = True,
        implicit_tls: bool = False,
        authenticator: Authenticator | None = None,
        spill_dir: Path | None = None,
        **options: Any,
    ) -> None:
        super().__init__(handler, **options)
        self._spill_dir = spill_dir  # where a large message waits while it is stored
        # Counted by the factory, or (implicit TLS) once the handshake is done: a
        # handshake that fails never reaches connection_made or connection_lost.
        self._connections = connections
        self._in_greeting = False
        self._counted = counted
        self._client: str | None = None
        self._refused = False
        self._errors = 0
        self._max_errors = max_errors
        self._max_commands = max_commands
        self._commands = 0  # since the session began or its last accepted message
        self._junk: dict[str, int] = {}
        self._implicit_tls = implicit_tls
        self._auth_checker = authenticator
        self._auth_failures = 0
        self._idle_deadline = 0.0  # loop time; see _reset_timeout
        # aiosmtpd has no hook before each command: count in front of every smtp_* method.
        self._smtp_methods = {
            name: self._limited(name, method) for name, method in self._smtp_methods.items()
        }

    def _limited(
        self, command: str, method: Callable[[str | None], Awaitable[None]]
    ) -> Callable[[str | None], Awaitable[None]]:
        @functools.wraps(method)  # HELP shows each method's docstring
        async def run(arg: str | None) -> None:
            if not await self._over_limit(command):
                await method(arg)

        return run

    async def _over_limit(self, command: str) -> bool:
        """Past max_commands since the last accepted message (or a junk command past its
        limit): 421 and close. A session that keeps delivering mail is never cut off;
        one that talks without delivering anything is."""
        if self.transport is None or self.transport.is_closing():
            return True  # closed for a limit already: nothing more is answered
        if command == "QUIT":
            return False
        self._commands += 1
        if command in JUNK_COMMANDS:
            self._junk[command] = self._junk.get(command, 0) + 1
        if self._junk.get(command, 0) > JUNK_COMMAND_LIMIT:
            reply = f"421 4.7.0 {command} sent too many times"
        elif self._commands > self._max_commands:
            reply = "421 4.7.0 Too many commands, closing connection"
        else:
            return False
        log.warning("session closed", reason=reply[10:], client=self._client)
        await super().push(reply)
        if self.transport is not None:
            self.transport.close()
        return True

    def message_accepted(self) -> None:
        """The client delivered a message: its command counts start again."""
        self._commands = 0
        self._junk.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is not None:
            super().connection_made(transport)  # again, after STARTTLS: counted already
            return
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        connections = self._connections
        if not self._counted and connections.open >= connections.limit:
            log.warning("connection refused: too many connections", limit=connections.limit)
            self._refuse(transport, b"421 4.7.0 Too many connections, try again later\r\n")
            return
        by_client = connections.by_client
        if by_client.get(client, 0) >= connections.per_client_limit and not connections.exempt(
            client
        ):
            log.warning("connection refused: too many from one client", client=client)
            self._refuse(transport, b"421 4.7.0 Too many connections from your address\r\n")
            return
        if not self._counted:
            self._counted = True
            connections.open += 1
            connections.idle.clear()
        self._client = client
        by_client[client] = by_client.get(client, 0) + 1
        super().connection_made(transport)
        if self._implicit_tls and self.session is not None:
            # As aiosmtpd records a STARTTLS session, so Received: says ESMTPS.
            self.session.ssl = {
                name: transport.get_extra_info(name)
                for name in ("sslcontext", "peercert", "cipher", "compression", "ssl_object")
            }

    def _refuse(self, transport: asyncio.BaseTransport, reply: bytes) -> None:
        _write(transport, reply)
        transport.close()
        self._refused = True

    @property
    def encrypted(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    def offers_auth(self) -> bool:
        return self._auth_checker is not None and self.encrypted

    def hold_idle_timer(self, seconds: float) -> None:
        """Give the client this long before the idle timeout (smtpgate is the slow one)."""
        self._reset_timeout(seconds)

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd cancels and makes a timer at every command, and we restart it at every
        read: a noticeable share of the loop under load. Here the deadline moves and the
        one timer, when it fires before the deadline, waits again for the rest."""
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        timer = self._timeout_handle
        if timer is None or timer.cancelled() or timer.when() > self._idle_deadline:
            if timer is not None:
                timer.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
        else:
            self._timeout_cb()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # aiosmtpd restarts the idle timer on commands only: a slow but steady upload
        # must not be cut off in the middle of DATA.
        self._reset_timeout()
        super().data_received(data)

    def eof_received(self) -> bool | None:
        """The client is gone: the transport closes now. aiosmtpd cancels the session's
        task and leaves the closing to it, but a task cancelled before its first step
        (a client that hung up before the loop accepted it) never closes anything: the
        connection stayed counted open, and shutdown waited its grace period for it."""
        super().eof_received()
        return False

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted:
            self._counted = False
            self._connections.closed()
        if self._refused:
            return  # aiosmtpd never saw this connection
        if self._client is not None:
            by_client = self._connections.by_client
            by_client[self._client] -= 1
            if not by_client[self._client]:
                del by_client[self._client]
        if self.session is not None and isinstance(self.event_handler, Handler):
            self.event_handler.session_ended(self.session)
        super().connection_lost(error)

    @syntax("AUTH <mechanism> [initial-response]")
    async def smtp_AUTH(self, arg: str | None) -> None:
        """RFC 4954 AUTH PLAIN and LOGIN, replacing aiosmtpd's (which checks passwords
        on the event loop and cannot slow down or refuse a guessing client)."""
        if await self.check_helo_needed("EHLO"):
            return
        session, envelope = self.session, self.envelope
        if session is None or envelope is None:
            return
        authenticator = self._auth_checker
        words = (arg or "").split()
        if not session.extended_smtp:
            await self.push("503 5.5.1 Send EHLO first, then AUTH")
        elif authenticator is None:
            await self.push("503 5.5.1 Authentication is not enabled")
        elif not self.encrypted:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
        elif session.authenticated:
            await self.push("503 5.5.1 Already authenticated")
        elif envelope.mail_from:
            await self.push("503 5.5.1 AUTH is not allowed during a mail transaction")
        elif not 1 <= len(words) <= 2:
            await self.push("501 5.5.4 Syntax: AUTH mechanism [initial-response]")
        elif words[0].upper() not in MECHANISMS:
            await self.push(
                f"504 5.5.4 Unrecognized authentication type; use {' or '.join(MECHANISMS)}"
            )
        elif authenticator.blocked(client := self._client or "?"):
            log.warning("authentication refused: too many failures", client=client)
            await self._close("421 4.7.0 Too many failed logins from your address, try later")
        else:
            mechanism = words[0].upper()
            credentials = await self._credentials(mechanism, words[1] if len(words) > 1 else None)
            if credentials is None:  # cancelled by the client, or not base64: replied already
                await self._failed_in_session(authenticator, None)
                return
            login, password = credentials
            verdict = await authenticator.attempt(client, mechanism, login, password)
            await self._auth_verdict(verdict, authenticator, login)

    async def _auth_verdict(
        self, verdict: Verdict, authenticator: Authenticator, login: bytes
    ) -> None:
        session = self.session
        if session is None:
            return
        if verdict is Verdict.OK:
            session.authenticated = True
            session.auth_data = cast(Any, login.decode("utf-8"))  # aiosmtpd types it None
            await self.push("235 2.7.0 Authentication successful")
        elif verdict is Verdict.UNAVAILABLE:
            await self.push("454 4.7.0 Temporary authentication failure, try again later")
        elif verdict is Verdict.BLOCKED:
            await self._close("421 4.7.0 Too many failed logins from your address, try later")
        else:
            await self._failed_in_session(
                authenticator, "535 5.7.8 Authentication credentials invalid"
            )

    async def _failed_in_session(self, authenticator: Authenticator, reply: str | None) -> None:
        """Count a failed AUTH in this session; past max_session_attempts, 421 and close
        (else `reply`, unless the exchange has answered already)."""
        self._auth_failures += 1
        if self._auth_failures >= authenticator.settings.max_session_attempts:
            log.warning("session closed: too many failed logins", client=self._client)
            await self._close("421 4.7.0 Too many authentication attempts")
        elif reply is not None:
            await self.push(reply)

    async def _credentials(self, mechanism: str, initial: str | None) -> tuple[bytes, bytes] | None:
        """(login, password) from the initial response or the 334 challenges; None when
        the client cancelled ("*") or sent bad base64 (already answered with 501)."""
        if mechanism == "LOGIN":
            login = await self._response(initial, "Username:")
            if login is None:
                return None
            password = await self._response(None, "Password:")
            return None if password is None else (login, password)
        blob = await self._response(initial, "")
        if blob is None:
            return None
        parts = blob.split(b"\0")
        if len(parts) != 3:
            await self.push("501 5.5.2 Cannot split the PLAIN response")
            return None
        authorize, login, password = parts
        if authorize and authorize != login:
            # RFC 4616: acting for another user is not supported; no password matches.
            return login, b""
        return login, password

    async def _response(self, initial: str | None, challenge: str) -> bytes | None:
        if initial is None:
            answer = await self.challenge_auth(challenge)  # answers '*' and bad base64
            return answer if isinstance(answer, bytes) else None
        if initial == "=":  # RFC 4954 4: an empty initial response
            return b""
        try:
            return base64.b64decode(initial, validate=True)
        except binascii.Error:
            await self.push("501 5.5.2 Cannot decode base64")
            return None

    async def _close(self, reply: str) -> None:
        await self.push(reply)
        if self.transport is not None:
            self.transport.close()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        found = plain_path(arg)
        if found is None:
            return super()._getaddr(arg)
        address, rest = found
        if self.local_part_limit and len(address.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return address, rest

    def _create_envelope(self) -> GatewayEnvelope:
        return GatewayEnvelope()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, reading the message in large pieces rather than line by line,
        and putting a large one in a temporary file (smtpgate.data): the same replies,
        limits, envelope fields and handle_DATA call."""
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        if not isinstance(envelope, GatewayEnvelope):
            return  # made by _create_envelope at HELO
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        message = await data.receive(
            self._reader,
            size_limit=self.data_size_limit,
            line_limit=self.line_length_limit,
            spill_at=None if self._decode_data else data.SPILL_AT,  # a str is wanted whole
            directory=self._spill_dir,
        )
        if message.refusal is data.Refusal.TOO_LONG:
            await self.push("500 Line too long (see RFC5321 4.5.3.1.6)")
        elif message.refusal is data.Refusal.TOO_BIG:
            await self.push("552 Error: Too much mail data")
        elif message.refusal is data.Refusal.NO_ROOM:
            log.warning("message refused", reason=str(message.error), client=self._client)
            await self.push("452 4.3.1 Insufficient system storage, try again later")
        if message.refusal is not None:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        try:
            if message.spilled is not None:
                envelope.spilled = message.spilled
                envelope.spilled_size = message.size
            elif not await self._set_content(envelope, message.content):
                return
            status = MISSING
            if "DATA" in self._handle_hooks:
                status = await self._call_handler_hook("DATA")
        finally:
            if message.spilled is not None:
                message.spilled.close()
                envelope.spilled, envelope.spilled_size = None, 0  # no use after this DATA
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push("250 OK" if status is MISSING else status)

    async def _set_content(self, envelope: Envelope, content: bytes) -> bool:
        """The message on the envelope as aiosmtpd puts it there; False when it is not
        ASCII and neither SMTPUTF8 nor bytes were asked for (then answered already)."""
        envelope.original_content = content
        envelope.content = content
        if self._decode_data:
            if self.enable_SMTPUTF8:
                envelope.content = content.decode("utf-8", errors="surrogateescape")
            elif not content.isascii():
                await self.push("500 Error: strict ASCII mode")
                return False
            else:
                envelope.content = content.decode("ascii")
        return True

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self._source_route(arg):
            return
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self._source_route(arg):
            return
        await super().smtp_RCPT(arg)

    async def _source_route(self, arg: str | None) -> bool:
        """aiosmtpd drops a source route (<@relay:user@host>) silently; refuse it instead,
        as an old way to make a server relay."""
        if arg and _SOURCE_ROUTE.search(arg):
            await self.push("553 5.1.0 Source routes are not accepted")
            return True
        return False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_greeting = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_greeting = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._in_greeting = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._in_greeting = False

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._in_greeting:
            status = with_enhanced_code(status, self.data_size_limit)
        await super().push(status)
        text = status if isinstance(status, str) else status.decode("ascii", "replace")
        # 452 4.5.3 asks for the rest in another transaction: not the client's error.
        if text[:1] in ("4", "5") and not text.startswith(("421", "452 4.5.3")):
            self._errors += 1
            if self._errors >= self._max_errors:  # Postfix: smtpd_hard_error_limit
                await super().push("421 4.7.0 Too many errors, closing connection")
                if self.transport is not None:
                    self.transport.close()

    def _timeout_cb(self) -> None:
        _write(self.transport, b"421 4.4.2 Idle timeout, closing connection\r\n")
        super()._timeout_cb()  # type: ignore[no-untyped-call]


def plain_path(arg: str) -> tuple[str, str] | None:
    """The address and parameters of a plain `<local@domain> PARAMS`, as aiosmtpd's
    parser would give them; None for every other form, which goes to that parser."""
    found = _PLAIN_PATH.match(arg)
    return None if found is None else (found.group(1), arg[found.end() :])


def with_enhanced_code(status: str, size_limit: int | None) -> str:
    if _HAS_ENHANCED.match(status) or len(status) < 4 or not status[:3].isdigit():
        return status
    code = int(status[:3])
    if code == 552:
        return f"552 5.3.4 Message too big: the limit is {size_limit} bytes"
    enhanced = _ENHANCED.get(code)
    if enhanced is None:
        return status
    text = status[4:].removeprefix("Error: ")
    return f"{status[:3]}{status[3]}{enhanced} {text}"


def _write(transport: asyncio.BaseTransport | None, line: bytes) -> None:
    """Write to a session's stream transport unless it is closing. Not narrowed with
    isinstance: uvloop's transports do not derive from asyncio's classes."""
    if transport is not None and not transport.is_closing():
        cast(asyncio.WriteTransport, transport).write(line)


class _Refuse(asyncio.Protocol):
    """Answers a connection over the limit with 421 and closes it (RFC 5321 3.8)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _write(transport, b"421 4.7.0 Too many connections, try again later\r\n")
        transport.close()


def protocol_factory(
    config: Config,
    handler: Handler,
    connections: Connections,
    *,
    tls: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    authenticator: Authenticator | None = None,
) -> Callable[[], asyncio.BaseProtocol]:
    """Sessions for one kind of listener: plain (offering STARTTLS when there is a `tls`
    context) or, with `implicit_tls`, one the event loop wraps in TLS (no STARTTLS)."""
    server = config.server

    def build() -> asyncio.BaseProtocol:
        # Counted here, not in connection_made: asyncio builds every protocol of a burst
        # of accepts before it calls any connection_made. Implicit TLS is counted once
        # its handshake is done, since a failed one never reaches the protocol again.
        if not implicit_tls:
            if connections.open >= connections.limit:
                log.warning("connection refused: too many connections", limit=connections.limit)
                return _Refuse()
            connections.open += 1
            connections.idle.clear()
        return GatewaySMTP(
            handler,
            connections,
            server.max_errors,
            server.max_commands,
            counted=not implicit_tls,
            implicit_tls=implicit_tls,
            authenticator=authenticator,
            spill_dir=config.state_dir(),
            tls_context=None if implicit_tls else tls,
            data_size_limit=server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=server.hostname,
            ident="smtpgate",
            timeout=server.idle_timeout,
        )

    return build
