"""Relay transport: every message of a route goes to one upstream SMTP server (smarthost).

Speaks through aiosmtplib one command at a time so that each RCPT gets its own reply and
each recipient its own outcome. TLS, AUTH, chunked connections and pipelining come later.
"""

from __future__ import annotations

import time

import aiosmtplib

from smtpgate import logs
from smtpgate.config import RelayConfig
from smtpgate.delivery.outcome import Outcome, Scope, describe_error
from smtpgate.spool.base import Delivery

log = logs.get(__name__)


class RelayTransport:
    def __init__(self, name: str, config: RelayConfig, *, helo_name: str) -> None:
        self.name = name
        self.concurrency = 1
        self._config = config
        self._helo_name = helo_name

    async def deliver(self, delivery: Delivery) -> dict[int, Outcome]:
        started = time.monotonic()
        bound = log.bind(queue_id=delivery.queue_id, relay=self.name,
                         upstream=f"{self._config.host}:{self._config.port}")
        client = aiosmtplib.SMTP(
            hostname=self._config.host, port=self._config.port, timeout=self._config.timeout,
            local_hostname=self._helo_name, use_tls=False, start_tls=False,
        )
        try:
            outcomes = await self._transaction(client, delivery)
        finally:
            if client.is_connected:
                try:
                    await client.quit()
                except aiosmtplib.SMTPException:
                    client.close()
        for recipient in delivery.recipients:
            outcome = outcomes[recipient.id]
            bound.info("attempt", recipient=recipient.address, verdict=outcome.verdict.value,
                       reply=outcome.reply, scope=outcome.scope.value,
                       seconds=round(time.monotonic() - started, 3))
        return outcomes

    async def _transaction(
        self, client: aiosmtplib.SMTP, delivery: Delivery
    ) -> dict[int, Outcome]:
        everyone = [r.id for r in delivery.recipients]
        try:
            await client.connect()
            await client.ehlo()
        except aiosmtplib.SMTPResponseException as error:
            return dict.fromkeys(everyone, Outcome.from_reply(
                error.code, error.message, Scope.SESSION))
        except (OSError, aiosmtplib.SMTPException) as error:
            return dict.fromkeys(everyone, Outcome.deferred(
                f"cannot talk to {self._config.host}:{self._config.port}: "
                f"{describe_error(error)}", Scope.SESSION))

        encoding = "ascii"
        if delivery.smtputf8:
            if not client.supports_extension("smtputf8"):
                # RFC 6531 3.4: an internationalized address cannot be downgraded.
                return dict.fromkeys(everyone, Outcome.failed(
                    "553 5.6.7 the upstream does not support SMTPUTF8, which the"
                    " internationalized addresses of this message need", Scope.MESSAGE))
            encoding = "utf-8"
        try:
            await client.mail(delivery.sender, options=self._mail_options(client, delivery),
                              encoding=encoding)
        except aiosmtplib.SMTPResponseException as error:
            return dict.fromkeys(everyone, Outcome.from_reply(
                error.code, error.message, Scope.MESSAGE))
        except (OSError, aiosmtplib.SMTPException) as error:
            return dict.fromkeys(everyone, Outcome.deferred(
                f"lost the connection at MAIL FROM: {describe_error(error)}", Scope.SESSION))

        outcomes: dict[int, Outcome] = {}
        accepted: list[int] = []
        for recipient in delivery.recipients:
            try:
                await client.rcpt(recipient.address, encoding=encoding)
            except aiosmtplib.SMTPResponseException as error:
                outcomes[recipient.id] = Outcome.from_reply(
                    error.code, error.message, Scope.RECIPIENT)
            except (OSError, aiosmtplib.SMTPException) as error:
                lost = Outcome.deferred(
                    f"lost the connection at RCPT TO: {describe_error(error)}", Scope.SESSION)
                return {rid: outcomes.get(rid, lost) for rid in everyone}
            else:
                accepted.append(recipient.id)
        if not accepted:
            return outcomes

        try:
            response = await client.data(delivery.content, timeout=self._config.data_timeout)
        except aiosmtplib.SMTPResponseException as error:
            outcomes.update(dict.fromkeys(accepted, Outcome.from_reply(
                error.code, error.message, Scope.MESSAGE)))
        except (OSError, aiosmtplib.SMTPException) as error:
            # The upstream may or may not have taken the message; sending again may
            # duplicate it, not sending may lose it. Postfix defers too.
            log.warning("outcome unknown", queue_id=delivery.queue_id, relay=self.name,
                        error=describe_error(error))
            outcomes.update(dict.fromkeys(accepted, Outcome.deferred(
                f"connection lost during DATA, outcome unknown: {describe_error(error)}",
                Scope.MESSAGE)))
        else:
            outcomes.update(dict.fromkeys(accepted, Outcome.from_reply(
                response.code, response.message, Scope.MESSAGE)))
        return outcomes

    @staticmethod
    def _mail_options(client: aiosmtplib.SMTP, delivery: Delivery) -> list[str]:
        options = []
        if client.supports_extension("8bitmime") and not delivery.content.isascii():
            options.append("BODY=8BITMIME")
        if delivery.smtputf8:
            options.append("SMTPUTF8")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(delivery.content)}")
        return options
