"""Upstream session: one SMTP connection to a relay, set up with its TLS and AUTH settings,
that runs mail transactions one command at a time or pipelined.

aiosmtplib does the connection, TLS, EHLO and AUTH; `pipelining.py` does the pipelined
transaction on the same connection. Used by the relay transport and by `smtpgate check`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import aiosmtplib

from smtpgate.body import Body, Content, size_of
from smtpgate.config import RelayConfig
from smtpgate.delivery.outcome import Outcome, Scope, describe_error, format_reply
from smtpgate.spool.base import Delivery, LeasedRecipient
from smtpgate.transports.pipelining import (
    ConnectionDropped,
    PipelineBroken,
    Reply,
    ReplyReader,
    borrowed,
    dot_stuffed,
    fits,
)
from smtpgate.transports.streaming import write_body


class SessionError(Exception):
    """The session could not be set up or went away; `outcome` applies to every recipient
    still waiting. `auth_failed` marks a rejected password, a setting to fix."""

    def __init__(self, outcome: Outcome, *, auth_failed: bool = False, stage: str = "") -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome
        self.auth_failed = auth_failed
        # connect, tls or auth: where setting up failed; "MAIL FROM": the session went away
        # before a transaction began, so nothing was sent and another connection may try
        self.stage = stage


class StaleConnection(Exception):
    """A reused connection was closed by the server before this transaction began;
    nothing was sent, so the transaction may run again on a new connection."""


@dataclass(frozen=True, slots=True)
class TLSInfo:
    version: str
    cipher: str
    subject: str
    issuer: str
    not_after: dt.datetime | None

    def __str__(self) -> str:
        text = f"{self.version} {self.cipher}"
        if self.subject:
            text += f"; certificate {self.subject}, issued by {self.issuer}"
        if self.not_after:
            days = (self.not_after - dt.datetime.now(dt.UTC)).days
            text += f", valid until {self.not_after:%Y-%m-%d} ({days} days)"
        return text


TlsMode = Literal["none", "ssl", "starttls", "opportunistic"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where and how a session connects: a relay, or one address of an MX host."""

    host: str  # the server's name: for TLS verification and for people
    port: int
    tls: TlsMode  # starttls requires it; opportunistic uses it when offered
    timeout: float
    data_timeout: float
    max_recipients: int
    address: str | None = None  # connect here rather than resolve host (MX from DNS)
    username: str | None = None

    @classmethod
    def relay(cls, config: RelayConfig) -> Endpoint:
        return cls(
            host=config.host,
            port=config.effective_port,
            tls=config.tls,
            timeout=config.timeout,
            data_timeout=config.data_timeout,
            max_recipients=config.max_recipients,
            username=config.username,
        )

    @property
    def where(self) -> str:
        if self.address and self.address != self.host:
            return f"{self.host} [{self.address}]:{self.port}"
        return f"{self.host}:{self.port}"


def tls_context(config: RelayConfig) -> ssl.SSLContext | None:
    """Verification on unless `verify = false`; `ca_file` replaces the system's CAs with
    those of a private server."""
    if config.tls == "none":
        return None
    context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
    if not config.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class UpstreamSession:
    def __init__(self, client: aiosmtplib.SMTP, endpoint: Endpoint) -> None:
        self._client = client
        self._endpoint = endpoint
        self._tls = self._read_tls()
        self.pipelining_failed = False
        self.transactions = 0  # messages handed over on this connection (for chunks)

    @classmethod
    async def open(
        cls,
        endpoint: Endpoint,
        *,
        helo_name: str,
        context: ssl.SSLContext | None,
        password: str | None,
        progress: Callable[[str, str], None] | None = None,
    ) -> UpstreamSession:
        """Connect, TLS, EHLO, AUTH as configured. `progress(stage, detail)` hears of each
        stage that succeeded (for `smtpgate check`); a failure raises SessionError."""
        where = endpoint.where
        report = progress or (lambda stage, detail: None)
        stage = "connect"
        client: aiosmtplib.SMTP | None = None
        try:
            sock = None
            if endpoint.address:
                sock = await _connected_socket(endpoint.address, endpoint.port, endpoint.timeout)
            client = aiosmtplib.SMTP(
                hostname=endpoint.host,
                port=None if sock else endpoint.port,
                timeout=endpoint.timeout,
                local_hostname=helo_name,
                use_tls=endpoint.tls == "ssl",
                start_tls=False,
                tls_context=context,
                sock=sock,
            )
            greeting = await client.connect()
            report("connect", f"{where}: {format_reply(greeting.code, greeting.message)}")
            await _greet(client)
            offered = client.supports_extension("starttls")
            if endpoint.tls == "starttls" and not offered:
                raise SessionError(
                    Outcome.deferred(
                        f"{where} does not offer STARTTLS; not sending in plaintext"
                        " (the config requires TLS)",
                        Scope.SESSION,
                    )
                )
            if endpoint.tls == "starttls" or (endpoint.tls == "opportunistic" and offered):
                stage = "tls"
                await client.starttls(tls_context=context)
                await client.ehlo()
            session = cls(client, endpoint)
            if session.tls_info() is not None:
                report("tls", str(session.tls_info()))
            if endpoint.username:
                stage = "auth"
                await _login(client, endpoint.username, password or "", where)
                report("auth", f"as {endpoint.username}")
        except SessionError as error:
            if client is not None:
                client.close()
            error.stage = stage
            raise
        except aiosmtplib.SMTPAuthenticationError as error:
            if client is not None:
                client.close()
            raise SessionError(
                Outcome.deferred(
                    f"{format_reply(error.code, error.message)} (AUTH as {endpoint.username}"
                    f" refused by {where}: check the username and password)",
                    Scope.SESSION,
                ),
                auth_failed=True,
                stage=stage,
            ) from None
        except aiosmtplib.SMTPResponseException as error:
            if client is not None:
                client.close()
            raise SessionError(
                Outcome.from_reply(error.code, error.message, Scope.SESSION), stage=stage
            ) from None
        except (OSError, aiosmtplib.SMTPException) as error:
            if client is not None:
                client.close()
            raise SessionError(
                Outcome.deferred(
                    f"cannot talk to {where}: {explain_connect_error(error)}", Scope.SESSION
                ),
                stage="tls" if _is_tls_error(error) else stage,
            ) from None
        except BaseException:  # cancelled while setting up: leave no socket behind
            if client is not None:
                client.close()
            raise
        return session

    @property
    def is_connected(self) -> bool:
        return self._client.is_connected

    @property
    def via(self) -> str:
        """Where this session goes and how, for the spool and the logs."""
        info = self.tls_info()
        return f"{self._endpoint.where} {info.version if info else 'without TLS'}"

    @property
    def offers_pipelining(self) -> bool:
        return self._client.supports_extension("pipelining")

    def tls_info(self) -> TLSInfo | None:
        """The TLS in use, read when the session was set up (valid after it closed)."""
        return self._tls

    def _read_tls(self) -> TLSInfo | None:
        ssl_object = self._client.get_transport_info("ssl_object")
        if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
            return None
        cert = ssl_object.getpeercert() or {}
        not_after = cert.get("notAfter")
        return TLSInfo(
            version=ssl_object.version() or "?",
            cipher=(ssl_object.cipher() or ("?",))[0],
            subject=_name(cert.get("subject", ())),
            issuer=_name(cert.get("issuer", ())),
            not_after=dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(str(not_after)), dt.UTC)
            if not_after
            else None,
        )

    async def quit(self) -> None:
        try:
            await self._client.quit()
        except (OSError, aiosmtplib.SMTPException):
            self._client.close()

    def close(self) -> None:
        self._client.close()

    # --- transactions ---------------------------------------------------------------

    async def send(self, delivery: Delivery, *, pipelined: bool) -> dict[int, Outcome]:
        """Hand the message over for every leased recipient, in as few transactions as
        max_recipients and the server's "452 too many recipients" allow."""
        outcomes: dict[int, Outcome] = {}
        pending = list(delivery.recipients)
        first = True
        while pending:
            batch, pending = (
                pending[: self._endpoint.max_recipients],
                pending[self._endpoint.max_recipients :],
            )
            try:
                if pipelined:
                    result, postponed = await self._pipelined(delivery, batch)
                else:
                    result, postponed = await self._stepwise(delivery, batch)
            except SessionError as error:
                if first and self.transactions > 0 and error.stage == "MAIL FROM":
                    raise StaleConnection from error  # a pooled connection the server closed
                for recipient in [*batch, *pending]:
                    outcomes[recipient.id] = error.outcome
                return outcomes
            except PipelineBroken as error:
                if first:
                    raise  # nothing handed over: the caller goes one command at a time
                # Earlier transactions went through: keep their results, and try the rest
                # again soon, one command at a time (pipelining_failed tells the caller).
                self.pipelining_failed = True
                retry = Outcome.deferred(f"pipelining failed: {error}", Scope.SESSION)
                outcomes.update({r.id: retry for r in [*batch, *pending]})
                return outcomes
            first = False
            outcomes.update(result)
            if postponed and len(postponed) == len(batch):  # the server took none at all
                outcomes.update(
                    {
                        r.id: Outcome.deferred(
                            "452 4.5.3 too many recipients, and none accepted", Scope.RECIPIENT
                        )
                        for r in postponed
                    }
                )
                postponed = []
            pending = postponed + pending
        return outcomes

    async def _stepwise(
        self, delivery: Delivery, batch: Sequence[LeasedRecipient]
    ) -> tuple[dict[int, Outcome], list[LeasedRecipient]]:
        """MAIL, each RCPT and DATA, each awaiting its reply, on the borrowed transport:
        the commands are built once, as for pipelining, not parsed again per address by
        aiosmtplib (a quarter of the delivery process's CPU for a small message)."""
        mail, rcpts = self._envelope_commands(delivery, batch)
        transport = self._transport("MAIL FROM")
        timeout = self._endpoint.timeout
        with borrowed(transport) as reader:

            async def reply_to(command: bytes, stage: str, within: float = timeout) -> Reply:
                transport.write(command)
                try:
                    return await reader.next(within)
                except (TimeoutError, ConnectionDropped, PipelineBroken) as error:
                    raise self._lost(error, stage) from None

            reply = await reply_to(mail, "MAIL FROM")
            if not 200 <= reply.code < 300:
                self._lost_if_closing(reply, reader, "MAIL FROM")
                outcome = Outcome.from_reply(reply.code, reply.text, Scope.MESSAGE)
                return dict.fromkeys((r.id for r in batch), outcome), []
            outcomes: dict[int, Outcome] = {}
            accepted: list[LeasedRecipient] = []
            postponed: list[LeasedRecipient] = []
            for index, (recipient, command) in enumerate(zip(batch, rcpts, strict=True)):
                reply = await reply_to(command, "RCPT TO")
                if 200 <= reply.code < 300:
                    accepted.append(recipient)
                    continue
                self._lost_if_closing(reply, reader, "RCPT TO")
                if _too_many_recipients(reply.code, reply.text) and accepted:
                    postponed = list(batch[index:])  # RFC 5321 4.5.3.1.10: next transaction
                    break
                outcomes[recipient.id] = Outcome.from_reply(reply.code, reply.text, Scope.RECIPIENT)
            if not accepted:
                await self._reset_borrowed(transport, reader)
                return outcomes, postponed
            # DATA may wait for checks of the envelope (RFC 5321 4.5.3.2.2: 2 minutes).
            reply = await reply_to(b"DATA\r\n", "DATA", self._endpoint.data_timeout)
            if reply.code != 354:
                self._lost_if_closing(reply, reader, "DATA")
                self.transactions += 1
                # RFC 5321 does not say that a refused DATA ends the transaction.
                await self._reset_borrowed(transport, reader)
                final = Outcome.from_reply(reply.code, reply.text, Scope.MESSAGE)
            else:
                await self._write_content(transport, reader, delivery.content)
                try:
                    done = await reader.next(self._endpoint.data_timeout)
                except (TimeoutError, ConnectionDropped, PipelineBroken) as error:
                    raise self._lost(error, "DATA", unknown=True) from None
                if not 200 <= done.code < 300:
                    self._lost_if_closing(done, reader, "DATA")
                self.transactions += 1
                final = Outcome.from_reply(done.code, done.text, Scope.MESSAGE)
        outcomes.update(dict.fromkeys((r.id for r in accepted), final))
        return outcomes, postponed

    async def _pipelined(
        self, delivery: Delivery, batch: Sequence[LeasedRecipient]
    ) -> tuple[dict[int, Outcome], list[LeasedRecipient]]:
        """RFC 2920 section 3.1: MAIL, RCPTs and DATA in one write; replies in order.
        Raises PipelineBroken when the server stalls or answers out of step before any
        message data was sent, so the caller may safely retry one command at a time."""
        mail_command, rcpt_commands = self._envelope_commands(delivery, batch)
        commands = [mail_command, *rcpt_commands, b"DATA\r\n"]
        transport = self._transport("MAIL FROM")
        timeout = self._endpoint.timeout
        with borrowed(transport) as reader:
            transport.write(b"".join(commands))
            replies: list[Reply] = []
            try:
                for command in commands:
                    reply = await reader.next(timeout)
                    if not fits(command, reply):
                        raise PipelineBroken(
                            f"reply {reply.code} does not answer {command.split(b':')[0].decode()}"
                        )
                    replies.append(reply)
            except TimeoutError:
                self.close()
                raise PipelineBroken(
                    f"no reply within {timeout:g}s to pipelined commands"
                    f" ({len(replies)} of {len(commands)} answered)"
                ) from None
            except PipelineBroken:
                self.close()
                raise
            except ConnectionDropped as error:
                self.close()
                raise self._lost(error, "RCPT TO" if replies else "MAIL FROM") from None
            mail, *rcpts, data = replies
            outcomes: dict[int, Outcome] = {}
            accepted: list[LeasedRecipient] = []
            postponed: list[LeasedRecipient] = []
            if not 200 <= mail.code < 300:
                outcome = Outcome.from_reply(mail.code, mail.text, Scope.MESSAGE)
                outcomes = dict.fromkeys((r.id for r in batch), outcome)
            else:
                for recipient, reply in zip(batch, rcpts, strict=True):
                    if 200 <= reply.code < 300:
                        accepted.append(recipient)
                    elif _too_many_recipients(reply.code, reply.text):
                        postponed.append(recipient)
                    else:
                        outcomes[recipient.id] = Outcome.from_reply(
                            reply.code, reply.text, Scope.RECIPIENT
                        )
            if data.code != 354:
                # RFC 2920: DATA is refused when no recipient was accepted.
                if accepted:
                    outcome = Outcome.from_reply(data.code, data.text, Scope.MESSAGE)
                    outcomes.update(dict.fromkeys((r.id for r in accepted), outcome))
                if mail.code < 300:
                    await self._reset_borrowed(transport, reader)
                return outcomes, postponed
            if accepted:
                await self._write_content(transport, reader, delivery.content)
            else:
                transport.write(b".\r\n")
            try:
                final = await reader.next(self._endpoint.data_timeout)
            except (TimeoutError, ConnectionDropped, PipelineBroken) as error:
                self.close()
                raise self._lost(error, "DATA", unknown=bool(accepted)) from None
        if accepted:
            self.transactions += 1
            outcome = Outcome.from_reply(final.code, final.text, Scope.MESSAGE)
            outcomes.update(dict.fromkeys((r.id for r in accepted), outcome))
        return outcomes, postponed

    async def _write_content(
        self, transport: asyncio.Transport, reader: ReplyReader, content: Content
    ) -> None:
        """The message after 354, dot-stuffed, and the final dot: whole, or a Body
        chunk by chunk. A failure before the final dot closes the connection, so the
        server drops what it got, and defers the message (nothing was delivered)."""
        if isinstance(content, bytes):
            transport.write(dot_stuffed(content))
            return
        try:
            await write_body(transport, reader, content, self._endpoint.data_timeout)
        except (TimeoutError, ConnectionDropped) as error:
            raise self._lost(error, "DATA") from None
        except Exception as error:  # the spool could not be read: the server gets no dot
            self.close()
            raise SessionError(
                Outcome.deferred(
                    f"cannot read the message to send: {describe_error(error)}", Scope.MESSAGE
                )
            ) from None

    async def _streamed_data(self, body: Body) -> Outcome:
        """DATA, one command at a time, for a message read from the spool in chunks
        (aiosmtplib's data() wants it whole): on the borrowed transport, as pipelining."""
        transport = self._transport("DATA")
        with borrowed(transport) as reader:
            transport.write(b"DATA\r\n")
            try:
                reply = await reader.next(self._endpoint.timeout)
            except (TimeoutError, ConnectionDropped, PipelineBroken) as error:
                raise self._lost(error, "DATA") from None
            if reply.code != 354:
                self._lost_if_closing(reply, reader, "DATA")
                return Outcome.from_reply(reply.code, reply.text, Scope.MESSAGE)
            await self._write_content(transport, reader, body)
            try:
                final = await reader.next(self._endpoint.data_timeout)
            except (TimeoutError, ConnectionDropped, PipelineBroken) as error:
                raise self._lost(error, "DATA", unknown=True) from None
        return Outcome.from_reply(final.code, final.text, Scope.MESSAGE)

    async def _reset_borrowed(self, transport: asyncio.Transport, reader: ReplyReader) -> None:
        """RSET on the borrowed transport; a connection whose RSET fails is not reused."""
        transport.write(b"RSET\r\n")
        try:
            reply = await reader.next(self._endpoint.timeout)
        except (TimeoutError, ConnectionDropped, PipelineBroken):
            self.close()
            return
        if not 200 <= reply.code < 300:
            self.close()

    # --- one live transaction, step by step (passthrough) ----------------------------

    async def begin(self, sender: str, *, smtputf8: bool, eight_bit: bool) -> Reply:
        """MAIL FROM for a transaction whose content is not known yet."""
        options = (
            ["BODY=8BITMIME"] if eight_bit and self._client.supports_extension("8bitmime") else []
        ) + (["SMTPUTF8"] if smtputf8 else [])
        encoding = "utf-8" if smtputf8 else "ascii"
        try:
            response = await self._client.mail(sender, options=options, encoding=encoding)
        except aiosmtplib.SMTPResponseException as error:
            self._lost_unless_connected(error, "MAIL FROM")
            return Reply(error.code, error.message)
        except (OSError, aiosmtplib.SMTPException) as error:
            raise self._lost(error, "MAIL FROM") from None
        return Reply(response.code, response.message)

    async def add(self, address: str, *, smtputf8: bool) -> Reply:
        try:
            response = await self._client.rcpt(address, encoding="utf-8" if smtputf8 else "ascii")
        except aiosmtplib.SMTPResponseException as error:
            self._lost_unless_connected(error, "RCPT TO")
            return Reply(error.code, error.message)
        except (OSError, aiosmtplib.SMTPException) as error:
            raise self._lost(error, "RCPT TO") from None
        return Reply(response.code, response.message)

    async def finish(self, content: Content) -> Outcome:
        if isinstance(content, Body):
            try:
                outcome = await self._streamed_data(content)
            except SessionError as error:
                return error.outcome
            self.transactions += 1
            return outcome
        try:
            response = await self._client.data(content, timeout=self._endpoint.data_timeout)
        except aiosmtplib.SMTPResponseException as error:
            if error.code == 421:  # RFC 5321 3.8: the server is closing the session
                self.close()
            return Outcome.from_reply(error.code, error.message, Scope.MESSAGE)
        except (OSError, aiosmtplib.SMTPException) as error:
            return self._lost(error, "DATA", unknown=True).outcome
        self.transactions += 1
        return Outcome.from_reply(response.code, response.message, Scope.MESSAGE)

    # --- helpers --------------------------------------------------------------------

    def _envelope_commands(
        self, delivery: Delivery, batch: Sequence[LeasedRecipient]
    ) -> tuple[bytes, list[bytes]]:
        """MAIL FROM and one RCPT TO a recipient, as sent. The addresses were checked by
        the listener; a line break would still end a command early, so it fails here."""
        encoding = self._encoding(delivery)
        options = "".join(f" {o}" for o in self._mail_options(delivery, encoding))
        mail = f"MAIL FROM:<{delivery.sender}>{options}\r\n".encode(encoding)
        rcpts = [f"RCPT TO:<{r.address}>\r\n".encode(encoding) for r in batch]
        if any(b"\r" in c[:-2] or b"\n" in c[:-2] for c in (mail, *rcpts)):
            raise SessionError(Outcome.failed("555 5.5.4 line break in an address", Scope.MESSAGE))
        return mail, rcpts

    def _transport(self, stage: str) -> asyncio.Transport:
        # Not narrowed with isinstance: uvloop's transports do not derive from asyncio's.
        transport = cast(asyncio.Transport | None, self._client.transport)
        if transport is None or transport.is_closing():
            raise self._lost(ConnectionDropped("not connected"), stage)
        return transport

    def _lost_if_closing(self, reply: Reply, reader: ReplyReader, stage: str) -> None:
        """A refusal that ends the session: 421 (RFC 5321 3.8), or the server hung up
        after it. The rest of the recipients cannot go on it."""
        if reply.code == 421 or reader.lost:
            self.close()
            raise SessionError(
                Outcome.from_reply(reply.code, reply.text, Scope.SESSION), stage=stage
            )

    def _encoding(self, delivery: Delivery) -> str:
        """utf-8 when the transaction uses SMTPUTF8 (RFC 6531), else ascii."""
        if not delivery.smtputf8:
            return "ascii"
        if self._client.supports_extension("smtputf8"):
            return "utf-8"
        addresses = [delivery.sender, *(r.address for r in delivery.recipients)]
        if all(address.isascii() for address in addresses):
            return "ascii"  # the client asked for SMTPUTF8, but nothing here needs it
        # RFC 6531 3.4: an internationalized address cannot be downgraded.
        raise SessionError(
            Outcome.failed(
                "553 5.6.7 the upstream does not support SMTPUTF8, which the"
                " internationalized addresses of this message need",
                Scope.MESSAGE,
            )
        )

    def _mail_options(self, delivery: Delivery, encoding: str) -> list[str]:
        options = []
        content = delivery.content
        # A Body is not read through for this: 8BITMIME is declared for it, which RFC 6152
        # allows for 7-bit content too.
        if self._client.supports_extension("8bitmime") and not (
            isinstance(content, bytes) and content.isascii()
        ):
            options.append("BODY=8BITMIME")
        if encoding == "utf-8":
            options.append("SMTPUTF8")
        if self._client.supports_extension("size"):
            options.append(f"SIZE={size_of(content)}")
        return options

    def _lost_unless_connected(self, error: aiosmtplib.SMTPResponseException, stage: str) -> None:
        """A 421 reply closes the session (RFC 5321 3.8): the rest cannot go on it."""
        if error.code == 421 or not self.is_connected:
            self.close()
            raise SessionError(
                Outcome.from_reply(error.code, error.message, Scope.SESSION), stage=stage
            )

    def _lost(self, error: BaseException, stage: str, *, unknown: bool = False) -> SessionError:
        self.close()
        if unknown:
            # The upstream may or may not have taken the message: sending again may
            # duplicate it, not sending may lose it. Like Postfix, defer.
            return SessionError(
                Outcome.deferred(
                    f"connection lost during DATA, outcome unknown: {describe_error(error)}",
                    Scope.MESSAGE,
                    uncertain=True,
                )
            )
        return SessionError(
            Outcome.deferred(f"connection lost at {stage}: {describe_error(error)}", Scope.SESSION),
            stage=stage,
        )


async def _connected_socket(address: str, port: int, within: float) -> socket.socket:
    """A socket connected to one address of a host (aiosmtplib then speaks SMTP on it,
    and verifies TLS against the host's name, not the address)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(within):
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _greet(client: aiosmtplib.SMTP) -> None:
    """EHLO, or HELO for the rare server that knows no ESMTP (RFC 5321 3.2)."""
    try:
        await client.ehlo()
    except aiosmtplib.SMTPHeloError as error:
        if not 500 <= error.code < 600:
            raise
        await client.helo()


async def _login(client: aiosmtplib.SMTP, username: str, password: str, where: str) -> None:
    """AUTH PLAIN or LOGIN (whichever the server offers), never over plaintext unless the
    config allowed it (checked at load)."""
    methods = client.supported_auth_methods
    if "plain" in methods:
        await client.auth_plain(username, password)
    elif "login" in methods:
        await client.auth_login(username, password)
    elif methods:
        await client.login(username, password)
    else:
        raise SessionError(
            Outcome.deferred(
                f"{where} does not offer AUTH, but a username is configured", Scope.SESSION
            )
        )


def _is_tls_error(error: BaseException) -> bool:
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    return isinstance(root, ssl.SSLError)


def _too_many_recipients(code: int, text: str) -> bool:
    return code == 452 and ("4.5.3" in text or "too many recipients" in text.lower())


def explain_connect_error(error: BaseException) -> str:
    """TLS failures name their fix; the rest say what the network said."""
    root: BaseException = error
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, ssl.SSLCertVerificationError) and "mismatch" in str(root.verify_message):
        return (
            f"TLS certificate is for another name: {root.verify_message} Set host to a"
            " name the certificate is for"
        )
    if isinstance(root, ssl.SSLCertVerificationError):
        return (
            f"TLS certificate not trusted: {root.verify_message or root.reason}."
            " If the server uses a private or self-signed certificate, set ca_file to"
            " the PEM file of the CA that signed it (or verify = false, unsafe)"
        )
    if isinstance(root, ssl.SSLError):
        return f"TLS failed: {root.reason or root}"
    return describe_error(error)


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "countryName": "C"}


def _name(parts: object) -> str:
    """An X.509 name from getpeercert() as 'CN=..., O=...'."""
    items = []
    for rdn in parts if isinstance(parts, tuple) else ():
        for key, value in rdn:
            items.append(f"{_SHORT_NAMES.get(key, key)}={value}")
    return ", ".join(items)
