"""Direct transport: smtpgate is the sending mail server, delivering to each recipient's MX.

Recipients of a message are grouped by domain; each domain's MX hosts are tried in
order (next one on a refused connection, a timeout or a 4xx greeting). At most `workers`
connections are open in all, idle pooled ones included, and at most `per_domain` to one
domain; a domain with a backlog has its extra messages postponed a moment, so one slow
domain never holds every worker while the others wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import replace

from smtpgate import logs
from smtpgate.config import DirectConfig
from smtpgate.delivery.outcome import Outcome, Scope, Verdict
from smtpgate.router import domain_of
from smtpgate.spool.base import Delivery, LeasedRecipient
from smtpgate.transports.mx import DnsTrouble, MxResolver
from smtpgate.transports.pipelining import PipelineBroken
from smtpgate.transports.session import (
    Endpoint,
    SessionError,
    StaleConnection,
    TlsMode,
    UpstreamSession,
)

log = logs.get(__name__)

IDLE_SECONDS = 5.0  # a pooled connection nobody needs is closed after this
MAX_MX_ADDRESSES = 5  # addresses tried per delivery, as Postfix's smtp_mx_address_limit


def tls_setup(config: DirectConfig) -> tuple[TlsMode, ssl.SSLContext]:
    """MTAs encrypt when they can but do not verify by default: a certificate that does not
    match would otherwise turn into mail sent in plaintext or not at all (RFC 7435)."""
    context = ssl.create_default_context()
    if config.tls == "verify":
        return "starttls", context
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return ("starttls" if config.tls == "require" else "opportunistic"), context


class DirectTransport:
    name = "direct"

    def __init__(self, config: DirectConfig, resolver: MxResolver, *, helo_name: str) -> None:
        self.concurrency = config.workers
        self._config = config
        self._resolver = resolver
        self._helo_name = helo_name
        self._tls, self._context = tls_setup(config)
        self._open = 0  # connections open, busy or idle
        self._room = asyncio.Event()
        self._idle: OrderedDict[UpstreamSession, tuple[str, str, int, str]] = OrderedDict()
        self._timers: dict[UpstreamSession, asyncio.TimerHandle] = {}
        self._domain_busy: dict[str, int] = {}
        self._domain_waiting: dict[str, int] = {}
        self._domain_free: dict[str, asyncio.Event] = {}
        self._no_pipelining: set[str] = set()  # addresses that failed pipelined
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for session in list(self._idle):
            self._take_idle(session)
            await session.quit()
        await asyncio.gather(*self._background, return_exceptions=True)  # QUITs under way

    def connections_for(self, delivery: Delivery) -> int:
        """One per domain: each has its own MX hosts, and they are sent to at once."""
        return len({domain_of(r.address) for r in delivery.recipients})

    async def deliver(
        self, delivery: Delivery, part_sent: Callable[[], None] | None = None
    ) -> dict[int, Outcome]:
        """Every domain at once; `part_sent` hears of each as it is done, so the
        scheduler leases more while a slow domain holds only its own connection."""
        by_domain: dict[str, list[LeasedRecipient]] = {}
        for recipient in delivery.recipients:
            by_domain.setdefault(domain_of(recipient.address), []).append(recipient)
        groups = list(by_domain.items())
        results = await asyncio.gather(
            *(self._part(delivery, d, rs, part_sent) for d, rs in groups),
            return_exceptions=True,
        )
        outcomes: dict[int, Outcome] = {}
        for (domain, recipients), result in zip(groups, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):  # a bug for one domain: not for the rest
                log.error("delivery to a domain failed", domain=domain, exc_info=result)
                result = dict.fromkeys(
                    (r.id for r in recipients),
                    Outcome.deferred("451 4.3.0 internal error in smtpgate", Scope.SESSION),
                )
            outcomes.update(result)
        return outcomes

    # --- one destination domain ------------------------------------------------------

    async def _part(
        self,
        delivery: Delivery,
        domain: str,
        recipients: list[LeasedRecipient],
        part_sent: Callable[[], None] | None,
    ) -> dict[int, Outcome]:
        try:
            return await self._to_domain(delivery, domain, recipients)
        finally:
            if part_sent is not None:
                part_sent()

    async def _to_domain(
        self, delivery: Delivery, domain: str, recipients: list[LeasedRecipient]
    ) -> dict[int, Outcome]:
        async with self._domain_turn(domain) as turn:
            if not turn:
                busy = Outcome.postponed(
                    f"{domain}: all {self._config.per_domain} connections busy"
                )
                return dict.fromkeys((r.id for r in recipients), busy)
            return await self._via_mx(delivery, domain, recipients)

    @contextlib.asynccontextmanager
    async def _domain_turn(self, domain: str) -> AsyncIterator[bool]:
        """One of the domain's `per_domain` connections; False (at once) when as many
        deliveries already wait for one, or when waiting would leave no delivery for
        the other domains (the scheduler hands over `workers` at a time): those wait in
        the queue instead, so a slow domain never holds the capacity the others need,
        even one that is in every message. Counts change without awaiting, so a
        cancellation can never lose one."""
        limit = self._config.per_domain
        held = self._domain_busy.get(domain, 0) + self._domain_waiting.get(domain, 0)
        if held >= max(limit, min(2 * limit, self.concurrency - 1)):
            yield False
            return
        free = self._domain_free.setdefault(domain, asyncio.Event())
        self._domain_waiting[domain] = self._domain_waiting.get(domain, 0) + 1
        try:
            while self._domain_busy.get(domain, 0) >= limit:
                free.clear()
                await free.wait()
        finally:
            self._domain_waiting[domain] -= 1
        self._domain_busy[domain] = self._domain_busy.get(domain, 0) + 1
        try:
            yield True
        finally:
            self._domain_busy[domain] -= 1
            free.set()
            if not self._domain_busy[domain] and not self._domain_waiting[domain]:
                del self._domain_busy[domain], self._domain_waiting[domain]
                del self._domain_free[domain]

    async def _via_mx(
        self, delivery: Delivery, domain: str, recipients: Sequence[LeasedRecipient]
    ) -> dict[int, Outcome]:
        bound = log.bind(queue_id=delivery.queue_id, domain=domain)
        try:
            hosts = await self._resolver.hosts(domain)
        except DnsTrouble as trouble:
            bound.info("attempt", mx=None, reply=trouble.outcome.reply)
            return dict.fromkeys((r.id for r in recipients), trouble.outcome)
        part = replace(delivery, recipients=tuple(recipients))
        last: Outcome | None = None
        targets = [(host, address) for host in hosts for address in host.addresses]
        for host, address in targets[:MAX_MX_ADDRESSES]:
            endpoint = Endpoint(
                host=host.name,
                port=self._config.port,
                tls=self._tls,
                timeout=self._config.timeout,
                data_timeout=self._config.data_timeout,
                max_recipients=self._config.max_recipients,
                address=address,
            )
            started = time.monotonic()
            outcomes, via = await self._try(endpoint, part)
            for recipient in recipients:
                outcome = outcomes[recipient.id]
                bound.info(
                    "attempt",
                    recipient=recipient.address,
                    mx=host.name,
                    ip=address,
                    via=via,
                    verdict=outcome.verdict.value,
                    reply=outcome.reply,
                    seconds=round(time.monotonic() - started, 3),
                )
            if any(o.uncertain for o in outcomes.values()):
                bound.warning(
                    "outcome unknown",
                    mx=host.name,
                    ip=address,
                    detail="the connection died after the final dot; it will be sent again",
                )
            if not _try_next(outcomes):
                return {rid: replace(o, via=via) for rid, o in outcomes.items()}
            last = next(iter(outcomes.values()))
        unreachable = last or Outcome.deferred(
            f"451 4.4.1 no MX host of {domain} could be reached", Scope.SESSION
        )
        return dict.fromkeys((r.id for r in recipients), unreachable)

    async def _try(
        self, endpoint: Endpoint, delivery: Delivery
    ) -> tuple[dict[int, Outcome], str | None]:
        """Deliver over one address, reconnecting once for a stale pooled connection, a
        failed opportunistic TLS (then in plaintext, as MTAs do) or broken pipelining."""
        for _ in range(3):
            try:
                session = await self._checkout(endpoint)
            except SessionError as error:
                if error.stage == "tls" and endpoint.tls == "opportunistic":
                    endpoint = replace(endpoint, tls="none")
                    continue
                return dict.fromkeys((r.id for r in delivery.recipients), error.outcome), None
            pipelined = session.offers_pipelining and endpoint.address not in self._no_pipelining
            try:
                outcomes = await session.send(delivery, pipelined=pipelined)
                if session.pipelining_failed:
                    self._no_pipelining_for(endpoint, "it broke off mid-delivery")
                return outcomes, session.via
            except StaleConnection:
                continue
            except PipelineBroken as error:
                self._no_pipelining_for(endpoint, str(error))
            except BaseException:
                session.close()  # cancelled mid-transaction: never back into the pool
                raise
            finally:
                self._checkin(endpoint, session)
        lost = Outcome.deferred(f"could not keep a connection to {endpoint.where}", Scope.SESSION)
        return dict.fromkeys((r.id for r in delivery.recipients), lost), None

    def _no_pipelining_for(self, endpoint: Endpoint, why: str) -> None:
        log.warning(
            "MX host is not safe for pipelining", mx=endpoint.host, ip=endpoint.address, reason=why
        )
        self._no_pipelining.add(str(endpoint.address))

    # --- the connection pool ----------------------------------------------------------

    async def _checkout(self, endpoint: Endpoint) -> UpstreamSession:
        # The name and TLS mode are part of the key: a connection verified for one MX
        # name is no proof for another name on the same address.
        key = _pool_key(endpoint)
        for session, where in reversed(self._idle.items()):
            if where == key:
                self._take_idle(session)
                if session.is_connected:
                    return session
                self._forget()
                break
        while self._open >= self._config.workers:
            if self._idle:  # make room: close the connection idle the longest
                oldest = next(iter(self._idle))
                self._take_idle(oldest)
                self._quit_later(oldest)
                self._open -= 1
                break
            self._room.clear()
            await self._room.wait()
        self._open += 1
        try:
            return await UpstreamSession.open(
                endpoint, helo_name=self._helo_name, context=self._context, password=None
            )
        except BaseException:
            self._forget()
            raise

    def _checkin(self, endpoint: Endpoint, session: UpstreamSession) -> None:
        if not session.is_connected:
            self._forget()
            return
        self._idle[session] = _pool_key(endpoint)
        self._timers[session] = asyncio.get_running_loop().call_later(
            IDLE_SECONDS, self._expire, session
        )
        self._room.set()  # one waiting for another host may close this one now

    def _expire(self, session: UpstreamSession) -> None:
        if session in self._idle:
            self._take_idle(session)
            self._quit_later(session)
            self._forget()

    def _take_idle(self, session: UpstreamSession) -> None:
        self._idle.pop(session, None)
        timer = self._timers.pop(session, None)
        if timer is not None:
            timer.cancel()

    def _forget(self) -> None:
        """One connection fewer: wake a delivery waiting for room."""
        self._open -= 1
        self._room.set()

    def _quit_later(self, session: UpstreamSession) -> None:
        self._keep(asyncio.get_running_loop().create_task(session.quit()))

    def _keep(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _pool_key(endpoint: Endpoint) -> tuple[str, str, int, str]:
    return (endpoint.host, str(endpoint.address), endpoint.port, endpoint.tls)


def _try_next(outcomes: dict[int, Outcome]) -> bool:
    """RFC 5321 5.1: when the session failed before any recipient got an answer of its
    own (refused, timed out, 4xx greeting, lost before DATA), try the next MX address."""
    return all(
        o.scope is Scope.SESSION and o.verdict is Verdict.DEFERRED and not o.uncertain
        for o in outcomes.values()
    )
