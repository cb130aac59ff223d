"""Scheduler: takes due recipients from the spool and hands them to their route's transport.

Between the spool and the transports. It leases work (state `sending`), lets each
transport run at most `concurrency` deliveries at once, and writes every recipient's
result back through the route's RetryPolicy. Work leased by a process that died is
released at the next start (`Spool.release_leases`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from smtpgate import logs
from smtpgate.delivery.outcome import Outcome, Scope
from smtpgate.delivery.retry import RetryPolicy
from smtpgate.spool.base import Delivery, Spool
from smtpgate.transports.base import Transport

log = logs.get(__name__)

POLL_SECONDS = 1.0  # also how soon `smtpgate queue retry` from another process takes effect
MAX_IN_FLIGHT = 64  # deliveries leased at once, over all routes
LEASE_RECIPIENTS = 100  # recipients leased per free delivery slot


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        transports: Mapping[str, Transport],
        retry_policies: Mapping[str, RetryPolicy],
        waiting: Mapping[str, str],
    ) -> None:
        """`transports` and `retry_policies` by route name; `waiting` names the routes that
        cannot send in this version, with the reason `smtpgate queue` shows."""
        self._spool = spool
        self._transports = dict(transports)
        self._retry = dict(retry_policies)
        self._waiting = dict(waiting)
        self._slots = {name: asyncio.Semaphore(t.concurrency) for name, t in transports.items()}
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def wake(self) -> None:
        """Something new is due (a message was stored): look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        routes = sorted(self._transports)
        for route, reason in self._waiting.items():
            log.warning("route cannot send yet; its mail stays queued", route=route,
                        reason=reason)
        while not self._stopping:
            self._wake.clear()
            for route, reason in self._waiting.items():
                await self._spool.note_waiting(route, reason)
            free = MAX_IN_FLIGHT - len(self._in_flight)
            if free > 0 and routes:
                for delivery in await self._spool.lease_due(
                    routes, time.time(), free * LEASE_RECIPIENTS
                ):
                    task = asyncio.create_task(self._deliver(delivery))
                    self._in_flight.add(task)
                    task.add_done_callback(self._finished)
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives as the event fires, and the scheduler would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        self._wake.set()  # a slot is free

    async def drain(self, grace: float) -> None:
        """Shutdown: let deliveries under way finish for up to `grace` s, then cancel them.
        Cancelled ones stay `sending` and are released at the next start."""
        self._stopping = True  # lease nothing more
        self._wake.set()
        if not self._in_flight:
            return
        log.info("waiting for deliveries under way", count=len(self._in_flight))
        _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, delivery: Delivery) -> None:
        transport = self._transports[delivery.route]
        async with self._slots[delivery.route]:
            try:
                outcomes = await transport.deliver(delivery)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a transport must not lose or stall the mail
                log.exception("transport failed", queue_id=delivery.queue_id,
                              route=delivery.route)
                outcomes = {}
        policy = self._retry[delivery.route]
        now = time.time()
        internal = Outcome.deferred("451 4.3.0 internal error in smtpgate", Scope.SESSION)
        updates = [
            policy.decide(
                r.id, outcomes.get(r.id, internal), attempts_before=r.attempts,
                received_at=delivery.received_at, now=now,
            )
            for r in delivery.recipients
        ]
        await self._spool.record(updates, now)
        for recipient, update in zip(delivery.recipients, updates, strict=True):
            log.info("recipient " + update.state.value, queue_id=delivery.queue_id,
                     route=delivery.route, recipient=recipient.address, reply=update.reply)
