"""Passthrough: a relay route that carries the client's transaction to the upstream live.

Between the listener and the relay transport. At the first RCPT for such a route the
listener opens an upstream transaction and answers RCPT and DATA with the upstream's own
replies, so the client sees a refused password, recipient or message at once. The
message still goes to the spool before the upstream gets DATA: until the upstream says
250, smtpgate holds it, and if the upstream falls silent smtpgate delivers it later.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from smtpgate import logs
from smtpgate.body import Content
from smtpgate.delivery.outcome import Outcome, Scope, Verdict, format_reply
from smtpgate.spool.base import RecipientState, RecipientUpdate, Spool
from smtpgate.transports.relay import RelayTransport
from smtpgate.transports.session import SessionError, UpstreamSession

log = logs.get(__name__)


@dataclass
class LiveTransaction:
    """One client transaction proxied to one upstream."""

    route: str
    session: UpstreamSession | None
    addresses: list[str] = field(default_factory=list)
    leased_ids: list[int] = field(default_factory=list)  # their spool rows, once stored


class Passthrough:
    def __init__(self, transports: Mapping[str, RelayTransport]) -> None:
        """`transports`: the relay transport of every passthrough route, by route."""
        self._transports = dict(transports)

    def handles(self, route: str) -> bool:
        return route in self._transports

    async def start(
        self, route: str, sender: str, *, smtputf8: bool, eight_bit: bool
    ) -> tuple[LiveTransaction, str | None]:
        """Open the upstream transaction. Returns it, and a reply for the client when the
        upstream could not be reached or refused the sender."""
        transaction = LiveTransaction(route, None)
        try:
            session = await self._transports[route].dedicated_session()
        except SessionError as error:
            log.warning("passthrough upstream unavailable", route=route, reply=error.outcome.reply)
            return transaction, f"451 4.4.0 {route}: {error.outcome.reply}"
        transaction.session = session
        try:
            reply = await session.begin(sender, smtputf8=smtputf8, eight_bit=eight_bit)
        except SessionError as error:
            return transaction, f"451 4.4.0 {route}: {error.outcome.reply}"
        if reply.code >= 300:
            await self.close(transaction)
            return transaction, format_reply(reply.code, reply.text)
        return transaction, None

    async def recipient(
        self, transaction: LiveTransaction, address: str, *, smtputf8: bool
    ) -> tuple[bool, str]:
        """RCPT upstream; whether it was accepted, and the upstream's reply for the client."""
        if transaction.session is None:
            return False, f"451 4.4.0 {transaction.route}: the upstream is not reachable"
        try:
            reply = await transaction.session.add(address, smtputf8=smtputf8)
        except SessionError as error:
            transaction.session = None
            return False, f"451 4.4.0 {transaction.route}: {error.outcome.reply}"
        accepted = 200 <= reply.code < 300
        if accepted:
            transaction.addresses.append(address)
        return accepted, format_reply(reply.code, reply.text)

    async def finish(
        self,
        transaction: LiveTransaction,
        spool: Spool,
        queue_id: str,
        content: Content,
        *,
        alone: bool,
    ) -> str | None:
        """Send the stored message upstream and record what became of its passthrough
        recipients. Returns the upstream's reply for the client when that is the whole
        answer, or None when the client is to hear "250 queued": other recipients were
        queued with it (not `alone`), or the upstream's verdict is not known.

        Runs to its end even when the client goes away meanwhile (the caller shields
        it): a result left unrecorded would send the message again after a restart."""
        session = transaction.session
        try:
            if session is None:
                outcome = Outcome.deferred("the upstream went away before DATA", Scope.SESSION)
            else:
                outcome = await session.finish(content)
        except Exception:
            log.exception("passthrough DATA failed", queue_id=queue_id)
            outcome = Outcome.deferred(
                "internal error during passthrough, outcome unknown", Scope.MESSAGE, uncertain=True
            )
        finally:
            await self.close(transaction)
        owned = not alone or session is None or outcome.uncertain
        state, note = _settle(outcome, owned)
        await _record(spool, queue_id, transaction.leased_ids, state, outcome.reply + note)
        log.info(
            "passthrough",
            queue_id=queue_id,
            route=transaction.route,
            reply=outcome.reply,
            state=state.value,
        )
        code, _, text = outcome.reply.partition(" ")
        if owned or not code.isdigit():
            return None
        return format_reply(int(code), f"{text} [smtpgate {queue_id}]")

    async def close(self, transaction: LiveTransaction) -> None:
        if transaction.session is not None:
            await transaction.session.quit()
            transaction.session = None


async def _record(
    spool: Spool, queue_id: str, ids: list[int], state: RecipientState, reply: str
) -> None:
    """Write the passthrough recipients' results, retrying a busy spool a few times."""
    for wait in (0.1, 0.5, 1.0, 2.0, 5.0):
        now = time.time()
        next_attempt = now if state is RecipientState.DEFERRED else None
        try:
            await spool.record([RecipientUpdate(i, state, reply, next_attempt) for i in ids], now)
            return
        except Exception:
            log.exception("cannot record passthrough results; trying again", queue_id=queue_id)
            await asyncio.sleep(wait)
    log.error("passthrough results not recorded; sent again after a restart", queue_id=queue_id)


def _settle(outcome: Outcome, owned: bool) -> tuple[RecipientState, str]:
    """The spool state of passthrough recipients after the upstream's DATA reply.
    `owned`: the client hears 250 from smtpgate, so smtpgate must finish the job."""
    if outcome.verdict is Verdict.DELIVERED:
        return RecipientState.DELIVERED, ""
    if outcome.verdict is Verdict.FAILED:
        return RecipientState.FAILED, "" if owned else " (refused to the client at once)"
    if owned:
        return RecipientState.DEFERRED, " (smtpgate retries)"
    return RecipientState.CANCELLED, " (returned to the client, which retries)"
