"""Relay transport: every message of a route goes to one upstream SMTP server (smarthost).

Keeps up to `concurrency` connections and hands each up to `chunk_size` messages before
QUIT, waiting `chunk_delay` before the next connection; pipelines when `turbo` is on and
the server is safe for it; honours `rate` and slows down when the upstream asks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import structlog

from smtpgate import logs
from smtpgate.config import RelayConfig
from smtpgate.delivery.outcome import Outcome, Scope, Verdict, asks_to_slow_down
from smtpgate.spool.base import Delivery
from smtpgate.transports.base import RelayLedger
from smtpgate.transports.pipelining import PipelineBroken
from smtpgate.transports.session import (
    Endpoint,
    SessionError,
    StaleConnection,
    UpstreamSession,
    tls_context,
)
from smtpgate.transports.throttle import Backoff, RateLimiter

log = logs.get(__name__)

IDLE_SECONDS = 5.0  # an idle connection is closed after this (Postfix keeps them 2 s)


class RelayTransport:
    def __init__(
        self,
        name: str,
        config: RelayConfig,
        *,
        helo_name: str,
        password: str | None,
        ledger: RelayLedger,
    ) -> None:
        self.name = name
        self.concurrency = config.concurrency
        self._config = config
        self._helo_name = helo_name
        self._password = password
        self._ledger = ledger
        self._context = tls_context(config)
        self._endpoint = Endpoint.relay(config)
        self._idle: list[UpstreamSession] = []
        self._idle_timers: dict[UpstreamSession, asyncio.TimerHandle] = {}
        self._next_connect_at = 0.0
        self._pipelining_safe = config.turbo
        self._backoff = Backoff(config.concurrency, config.backoff)
        self._rate = RateLimiter(config.rate)
        self._in_use = 0
        self._slot_free = asyncio.Event()
        self._failing: tuple[float, Outcome] | None = None  # until, why: no storm of retries
        self._background: set[asyncio.Task[None]] = set()
        self._log = log.bind(relay=name, upstream=f"{config.host}:{config.effective_port}")

    async def start(self) -> None:
        """Load the send times still inside the rate windows, so limits hold across restarts."""
        if self._config.rate:
            since = time.time() - self._rate.longest_window
            self._rate = RateLimiter(
                self._config.rate, await self._ledger.sends_since(self.name, since)
            )

    async def close(self) -> None:
        for session in list(self._idle):
            self._forget_idle(session)
            await session.quit()
        await asyncio.gather(*self._background, return_exceptions=True)  # QUITs under way

    async def dedicated_session(self) -> UpstreamSession:
        """A connection of its own for a passthrough transaction, counted in the rate.
        Raises SessionError when it cannot be set up."""
        at = await self._rate.acquire()
        if self._config.rate:
            await self._ledger.log_send(self.name, at)
        return await UpstreamSession.open(
            self._endpoint,
            helo_name=self._helo_name,
            context=self._context,
            password=self._password,
        )

    def connections_for(self, delivery: Delivery) -> int:
        return 1

    async def deliver(
        self, delivery: Delivery, part_sent: Callable[[], None] | None = None
    ) -> dict[int, Outcome]:
        """One connection, done when this returns: `part_sent` is not needed."""
        started = time.monotonic()
        bound = self._log.bind(queue_id=delivery.queue_id)
        if self._failing and self._failing[0] > time.time():
            outcome = self._failing[1]  # the last connection attempt failed moments ago
            outcomes = {r.id: outcome for r in delivery.recipients}
        else:
            async with self._slot():
                at = await self._rate.acquire()
                if self._config.rate:
                    await self._ledger.log_send(self.name, at)
                outcomes = await self._hand_over(delivery, bound)
        await self._observe(outcomes)
        if any(o.uncertain for o in outcomes.values()):
            bound.warning(
                "outcome unknown",
                detail="the connection died after the final dot;"
                " the upstream may have the message, it will be sent again",
            )
        for recipient in delivery.recipients:
            outcome = outcomes[recipient.id]
            bound.info(
                "attempt",
                recipient=recipient.address,
                verdict=outcome.verdict.value,
                reply=outcome.reply,
                scope=outcome.scope.value,
                seconds=round(time.monotonic() - started, 3),
            )
        return outcomes

    async def _hand_over(
        self, delivery: Delivery, bound: structlog.stdlib.BoundLogger
    ) -> dict[int, Outcome]:
        for _ in range(3):  # a stale pooled connection, then a pipelining fallback
            try:
                session = await self._checkout()
            except SessionError as error:
                self._failing = (time.time() + self._config.backoff, error.outcome)
                if error.auth_failed:
                    bound.error(
                        "the upstream refused our credentials; mail stays deferred"
                        " until the relay's username or password is fixed",
                        reply=error.outcome.reply,
                    )
                return {r.id: error.outcome for r in delivery.recipients}
            self._failing = None
            pipelined = self._pipelining_safe and session.offers_pipelining
            try:
                outcomes = await session.send(delivery, pipelined=pipelined)
                if session.pipelining_failed:
                    await self._no_more_pipelining(bound, "it broke off mid-delivery")
                return {rid: replace(o, via=session.via) for rid, o in outcomes.items()}
            except StaleConnection:
                bound.debug("pooled connection was closed by the upstream; reconnecting")
            except PipelineBroken as error:
                await self._no_more_pipelining(bound, str(error))
            except BaseException:
                session.close()  # cancelled mid-transaction: never back into the pool
                raise
            finally:
                self._checkin(session)
        lost = Outcome.deferred("could not keep a connection to the upstream", Scope.SESSION)
        return {r.id: lost for r in delivery.recipients}

    async def _no_more_pipelining(self, bound: structlog.stdlib.BoundLogger, why: str) -> None:
        self._pipelining_safe = False
        bound.warning(
            "upstream is not safe for pipelining; sending one command at a time from now on",
            reason=why,
        )
        await self._ledger.set_relay_status(self.name, f"turbo off: {why}", time.time())

    # --- connections ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        """One of the connections the backoff allows, after any pause it asks for. The
        count changes without awaiting, so a cancellation can never lose a release."""
        while self._in_use >= self._backoff.allowed:
            self._slot_free.clear()
            await self._slot_free.wait()
        self._in_use += 1
        try:
            pause = self._backoff.paused_until - time.time()
            if pause > 0:
                await asyncio.sleep(pause)
            yield
        finally:
            self._in_use -= 1
            self._slot_free.set()

    async def _checkout(self) -> UpstreamSession:
        while self._idle:
            session = self._idle.pop()
            self._forget_idle(session)
            if session.is_connected:
                return session
        wait = self._next_connect_at - time.time()
        if wait > 0:  # chunk_delay after the previous chunk's QUIT
            await asyncio.sleep(wait)
        session = await UpstreamSession.open(
            self._endpoint,
            helo_name=self._helo_name,
            context=self._context,
            password=self._password,
        )
        self._log.debug("connected", tls=str(session.tls_info() or "none"))
        return session

    def _checkin(self, session: UpstreamSession) -> None:
        if not session.is_connected:
            return
        if session.transactions >= self._config.chunk_size:
            self._next_connect_at = time.time() + self._config.chunk_delay
            task = asyncio.get_running_loop().create_task(session.quit())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            return
        self._idle.append(session)
        self._idle_timers[session] = asyncio.get_running_loop().call_later(
            IDLE_SECONDS, self._expire, session
        )

    def _expire(self, session: UpstreamSession) -> None:
        if session in self._idle:
            self._idle.remove(session)
            self._idle_timers.pop(session, None)
            task = asyncio.get_running_loop().create_task(session.quit())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _forget_idle(self, session: UpstreamSession) -> None:
        if session in self._idle:
            self._idle.remove(session)
        timer = self._idle_timers.pop(session, None)
        if timer is not None:
            timer.cancel()

    # --- adaptive slow-down ---------------------------------------------------------

    async def _observe(self, outcomes: dict[int, Outcome]) -> None:
        now = time.time()
        slow = next((o.reply for o in outcomes.values() if asks_to_slow_down(o.reply)), None)
        if slow is not None:
            self._backoff.slow_down(slow, now)
            self._log.warning(
                "upstream asks to slow down",
                reply=slow,
                connections=self._backoff.allowed,
                pause=self._backoff.pause,
            )
            await self._ledger.set_relay_status(self.name, self._backoff.describe(now), now)
        elif any(o.verdict is Verdict.DELIVERED for o in outcomes.values()):
            if self._backoff.success():
                self._log.info(
                    "recovering from slow-down",
                    connections=self._backoff.allowed,
                    pause=self._backoff.pause,
                )
                await self._ledger.set_relay_status(self.name, self._backoff.describe(now), now)
