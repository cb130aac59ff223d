"""Scheduler: takes due recipients from the spool and hands them to their route's transport.

Between the spool and the transports. It leases work (state `sending`), keeps a few
messages in hand per connection a transport may hold (a transport does not wait for the
results of its last message to be written before it takes the next), and writes every
recipient's result back through the route's RetryPolicy. What is in hand is counted in
connections: a direct message to ten domains takes ten, each given back as its domain
is done, so a slow domain holds one connection's share, not the whole message's.

Work leased by a process that died is released at the next start
(`Spool.release_leases`). A spool error never stops it: it logs, waits, and tries
again, and a result it could not write is kept until it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from smtpgate import clock, crashpoints, logs
from smtpgate.bounce import Bouncer
from smtpgate.config import Config
from smtpgate.delivery.outcome import Outcome, Scope, Verdict
from smtpgate.delivery.retry import RetryPolicy
from smtpgate.pacing import RoutePace
from smtpgate.router import Router
from smtpgate.spool.base import (
    Delivery,
    JobControl,
    NewMessage,
    RecipientState,
    RecipientUpdate,
    Spool,
)
from smtpgate.transports.base import Transport
from smtpgate.windows import SendingWindows

log = logs.get(__name__)

POLL_SECONDS = 1.0  # also how soon `smtpgate queue retry` from another process takes effect
MESSAGES_PER_CONNECTION = 2  # leased ahead per connection: the next one is ready at once
# In the delivery process, whose spool writes wait their turn behind the listener's, up
# to this many: enough that a fast connection never idles while a lease is written. It
# leases what its connections send in AHEAD_SECONDS (measured), never fewer than two, so
# a slow relay does not have a queue of one campaign's mail leased before a reset, and
# mail of another job waits behind at most that much work.
MESSAGES_PER_CONNECTION_APART = 16
AHEAD_SECONDS = 0.2
# Work per connection in hand at all, counting deliveries whose results are being
# written (twice what is leased ahead): the transport does not wait for the spool's
# commit before its next message.
DELIVERIES_PER_MESSAGE_AHEAD = 2
SPOOL_RETRY_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)  # waits after a spool error; the last repeats
DRAIN_SECONDS = 10.0  # at shutdown, how long deliveries under way may finish


def build_scheduler(
    config: Config,
    spool: Spool,
    transports: Mapping[str, Transport],
    waiting: Mapping[str, str],
    *,
    on_recorded: Callable[[Sequence[RecipientUpdate]], None] | None = None,
    messages_per_connection: int = MESSAGES_PER_CONNECTION,
) -> Scheduler:
    """The scheduler of these transports' routes, with their retry policies, the paces
    of the track routes among them and the bounces the config asks for."""
    paces = {
        name: RoutePace(SendingWindows(route.window, route.timezone), route.rate, POLL_SECONDS)
        for name, route in config.routes.items()
        if route.mode == "track" and name in transports
    }
    return Scheduler(
        spool,
        transports,
        {name: RetryPolicy.of(*config.retry_policy(name)) for name in transports},
        waiting,
        paces,
        Bouncer(config, Router(config)),
        on_recorded=on_recorded,
        messages_per_connection=messages_per_connection,
    )


class Scheduler:
    def __init__(
        self,
        spool: Spool,
        transports: Mapping[str, Transport],
        retry_policies: Mapping[str, RetryPolicy],
        waiting: Mapping[str, str],
        paces: Mapping[str, RoutePace] | None = None,
        bouncer: Bouncer | None = None,
        on_recorded: Callable[[Sequence[RecipientUpdate]], None] | None = None,
        messages_per_connection: int = MESSAGES_PER_CONNECTION,
    ) -> None:
        """`transports` and `retry_policies` by route name (routes may share a transport);
        `waiting` names the routes that cannot send, with the reason `smtpgate queue` shows;
        `paces` holds the windows and rates of track routes; `on_recorded` sees every
        result once it is written (the metrics count them); `messages_per_connection`
        are leased ahead for each connection a transport may hold."""
        self._spool = spool
        self._most_ahead = messages_per_connection
        self._on_recorded = on_recorded
        self._paces = dict(paces or {})
        self._bouncer = bouncer
        self._controls: dict[str, JobControl] = {}
        self._transports = dict(transports)
        self._retry = dict(retry_policies)
        self._waiting = dict(waiting)
        shared = {id(t): asyncio.Semaphore(t.concurrency) for t in transports.values()}
        self._slots = {name: shared[id(t)] for name, t in transports.items()}
        # Routes grouped by the transport they share, each group leased on its own, so a
        # stalled or rate-limited relay never holds the capacity of the others.
        self._groups: dict[int, tuple[Transport, list[str]]] = {}
        for name, transport in sorted(transports.items()):
            self._groups.setdefault(id(transport), (transport, []))[1].append(name)
        # Per transport group, in connections: those of deliveries still under way in
        # their transport; and those again, plus one per delivery whose results are
        # being written (a message with one slow domain left counts one, not ten).
        self._sending_of = dict.fromkeys(self._groups, 0)
        self._in_flight_of = dict.fromkeys(self._groups, 0)
        self._hands: dict[asyncio.Task[None], _Hand] = {}
        # Connections a delivery takes, on average over recent leases (direct: one per
        # domain), to turn free connections into a number of messages to lease; None
        # until the first lease, which takes a message per connection.
        self._fan_out: dict[int, float | None] = dict.fromkeys(self._groups)
        self._group_of = {name: id(t) for name, t in transports.items()}
        self._seconds_each = dict.fromkeys(self._groups, 0.0)  # a delivery takes (average)
        self._turns = dict.fromkeys(self._groups, 0)  # which route of a transport goes first
        self._wake = asyncio.Event()
        self._in_flight: set[asyncio.Task[None]] = set()
        self._stopping = False

    def wake(self) -> None:
        """Something new is due (a message was stored): look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        for route, reason in self._waiting.items():
            log.warning("route cannot send; its mail stays queued", route=route, reason=reason)
        await self._restore_paces()
        errors = 0
        while not self._stopping:
            self._wake.clear()
            try:
                await self._lease_and_start()
            except Exception:  # the spool is busy or failing: never give up on the queue
                wait = SPOOL_RETRY_SECONDS[min(errors, len(SPOOL_RETRY_SECONDS) - 1)]
                errors += 1
                log.exception("cannot lease due work from the spool; trying again", seconds=wait)
                await asyncio.sleep(wait)
                continue
            errors = 0
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that arrives as the event fires, and the scheduler would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    async def _lease_and_start(self) -> None:
        now = clock.now()
        for route, reason in self._waiting.items():
            await self._spool.note_waiting(route, reason)
        self._controls = await self._spool.job_controls()
        for group, (transport, routes) in self._groups.items():
            room = self._ahead(group) * transport.concurrency
            free = min(
                room - self._sending_of[group],
                DELIVERIES_PER_MESSAGE_AHEAD * room - self._in_flight_of[group],
            )
            # Leased in batches: while a message per connection is still in hand, wait
            # until as many are free, so one lease query serves many deliveries.
            if free >= transport.concurrency and not self._stopping:
                fan_out = self._fan_out[group]
                messages = (
                    transport.concurrency if fan_out is None else int(free / max(1.0, fan_out))
                )
                await self._lease_group(group, routes, max(1, messages), now)

    def _ahead(self, group: int) -> int:
        """Messages to lease ahead per connection: what it sends in AHEAD_SECONDS."""
        seconds = self._seconds_each[group]
        if self._most_ahead <= MESSAGES_PER_CONNECTION or seconds <= 0:
            return MESSAGES_PER_CONNECTION
        return max(MESSAGES_PER_CONNECTION, min(self._most_ahead, int(AHEAD_SECONDS / seconds)))

    async def _lease_group(
        self,
        group: int,
        routes: list[str],
        free: int,
        now: float,
    ) -> None:
        """Share a transport's free slots between its routes: each track route (within
        its window and rate) and the other routes together first get an equal share,
        whoever goes first this turn, then what is left, so a big campaign on a relay
        never holds back the password resets sharing it."""
        contenders: list[tuple[list[str], int | None]] = []
        for route in routes:
            pace = self._paces.get(route)
            if pace is None:
                continue
            # A closed window is not written into every waiting recipient (a campaign of a
            # million rows, and stale by next week): `smtpgate jobs` says it, live.
            allowance = pace.allowance(now)
            if allowance == 0:
                continue
            contenders.append(([route], allowance))
        unpaced = [route for route in routes if route not in self._paces]
        if unpaced:
            contenders.append((unpaced, None))
        if not contenders:
            return
        self._turns[group] += 1  # per transport: another group's turns must not skew it
        first = self._turns[group] % len(contenders)
        contenders = contenders[first:] + contenders[:first]
        share = -(-free // len(contenders))  # ceiling: every contender gets a turn
        wanting = []
        for names, allowance in contenders:
            cap = min(share, free) if allowance is None else min(share, free, allowance)
            leased = await self._lease(group, names, cap, now) if cap > 0 else 0
            free -= leased
            if leased == cap and (allowance is None or allowance > leased):
                wanting.append((names, None if allowance is None else allowance - leased))
        for names, allowance in wanting:  # what the others left
            cap = free if allowance is None else min(free, allowance)
            if cap > 0:
                free -= await self._lease(group, names, cap, now)

    async def _lease(self, group: int, routes: list[str], limit: int, now: float) -> int:
        leased = await self._spool.lease_due(routes, now, limit)
        pace = self._paces.get(routes[0]) if len(routes) == 1 else None
        if pace is not None and pace.rate is not None and leased:
            pace.took(len(leased), now)
            # So that the rate holds across a restart, which needs only the last send.
            await self._spool.log_send(pace.ledger_key(routes[0]), now)
        return self._start(group, leased)

    async def _restore_paces(self) -> None:
        now = clock.now()
        for route, pace in self._paces.items():
            if pace.rate is None:
                continue
            try:
                sent = await self._spool.sends_since(pace.ledger_key(route), now - pace.rate.window)
            except Exception:
                log.exception("cannot read the route's last sends; its rate starts afresh")
                continue
            if sent:
                pace.sent_at(sent[-1])

    def _start(self, group: int, deliveries: Sequence[Delivery]) -> int:
        if not deliveries:
            return 0
        transport = self._groups[group][0]
        taken = 0
        for delivery in deliveries:
            hand = _Hand(group, max(1, transport.connections_for(delivery)))
            taken += hand.connections
            task = asyncio.create_task(self._deliver(delivery, hand))
            self._in_flight.add(task)
            self._hands[task] = hand
            self._sending_of[group] += hand.connections
            self._in_flight_of[group] += hand.connections
            task.add_done_callback(self._finished)
        # Weighted by the lease's share of a round of connections: one small lease (a
        # bounce to one domain) does not reset what a campaign's messages take.
        fan_out, previous = taken / len(deliveries), self._fan_out[group]
        weight = min(1.0, len(deliveries) / transport.concurrency)
        self._fan_out[group] = (
            fan_out if previous is None else previous + (fan_out - previous) * weight
        )
        return len(deliveries)

    def _part_sent(self, hand: _Hand) -> None:
        """One of a delivery's connections is done: its share may be leased again."""
        self._release(hand, 1)

    def _sent(self, hand: _Hand) -> None:
        """The transport is done with the delivery: its next may be leased while this
        one's results are written."""
        self._release(hand, hand.sending)

    def _release(self, hand: _Hand, parts: int) -> None:
        parts = min(parts, hand.sending)
        if parts <= 0:
            return
        held = hand.held
        hand.sending -= parts
        self._sending_of[hand.group] -= parts
        self._in_flight_of[hand.group] -= held - hand.held
        self._wake.set()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        hand = self._hands.pop(task, None)
        if hand is not None:  # also for a task cancelled before it ever ran
            self._sent(hand)
            self._in_flight_of[hand.group] -= hand.held
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())
        self._wake.set()  # a slot is free

    async def drain(self, grace: float) -> None:
        """Shutdown: lease nothing more, let deliveries under way finish for up to `grace`
        seconds, then cancel them. Cancelled ones stay `sending` and are released at the
        next start (their outcome is unknown, so they are sent again)."""
        self._stopping = True
        self._wake.set()
        if not self._in_flight:
            return
        log.info("waiting for deliveries under way", count=len(self._in_flight))
        _, pending = await asyncio.wait(set(self._in_flight), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _deliver(self, delivery: Delivery, hand: _Hand) -> None:
        transport = self._transports[delivery.route]
        async with self._slots[delivery.route]:
            control = self._controls.get(delivery.job)
            pace = self._paces.get(delivery.route)
            if control is None and pace is not None and not pace.windows.is_open(clock.now()):
                control = JobControl.PAUSED  # leased before its window closed: it waits
            if control is not None:  # paused, held or cancelled since it was leased
                self._sent(hand)
                await self._record(delivery, _stopped(delivery, control), clock.now())
                return
            started = time.monotonic()
            try:
                outcomes = await transport.deliver(delivery, lambda: self._part_sent(hand))
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in a transport must not lose or stall the mail
                log.exception("transport failed", queue_id=delivery.queue_id, route=delivery.route)
                outcomes = {}
            group = self._group_of[delivery.route]
            took, average = time.monotonic() - started, self._seconds_each[group]
            self._seconds_each[group] = took if average <= 0 else 0.9 * average + 0.1 * took
        self._sent(hand)
        if any(o.verdict is Verdict.DELIVERED for o in outcomes.values()):
            crashpoints.reached("after_upstream_ok")
        policy = self._retry[delivery.route]
        now = clock.now()
        internal = Outcome.deferred("451 4.3.0 internal error in smtpgate", Scope.SESSION)
        updates = [
            policy.decide(
                r.id,
                outcomes.get(r.id, internal),
                attempts_before=r.attempts,
                received_at=delivery.lifetime_from,
                now=now,
            )
            for r in delivery.recipients
        ]
        failures = []
        for recipient, update in zip(delivery.recipients, updates, strict=True):
            if update.state is not RecipientState.FAILED:
                continue
            failures.append((recipient.address, update.reply or ""))
            if (update.reply or "").startswith("gave up"):
                log.warning(
                    "recipient failed: retry lifetime over",
                    queue_id=delivery.queue_id,
                    job=delivery.job,
                    route=delivery.route,
                    recipient=recipient.address,
                    reply=update.reply,
                )
        notices = []
        if failures and self._bouncer is not None and self._bouncer.wants(delivery):
            try:
                notices.append(self._bouncer.notice(delivery, failures))
            except Exception:  # a notice that cannot be written must not hold the results
                log.exception("cannot write the bounce", queue_id=delivery.queue_id)
        stored = await self._record(delivery, updates, now, notices)
        for queue_id in stored:
            log.info(
                "bounce queued",
                queue_id=queue_id,
                original=delivery.queue_id,
                job=delivery.job,
                to=delivery.sender,
                failed=len(failures),
            )
        if stored:
            self._wake.set()

    async def _record(
        self,
        delivery: Delivery,
        updates: Sequence[RecipientUpdate],
        now: float,
        notices: Sequence[NewMessage] = (),
    ) -> list[str]:
        """Write the results (and the bounces about them, in the same transaction),
        retrying while the spool refuses: a delivered recipient left `sending` would be
        sent again at the next start. Returns the bounces' queue ids."""
        for errors in range(len(SPOOL_RETRY_SECONDS) * 20):
            try:
                stored = await self._spool.record(updates, now, notices)
            except Exception:
                wait = SPOOL_RETRY_SECONDS[min(errors, len(SPOOL_RETRY_SECONDS) - 1)]
                log.exception(
                    "cannot record delivery results; trying again",
                    queue_id=delivery.queue_id,
                    seconds=wait,
                )
                await asyncio.sleep(wait)
            else:
                if self._on_recorded is not None:
                    self._on_recorded(updates)
                return stored
        log.error(
            "giving up recording delivery results; the recipients stay leased and"
            " are sent again after a restart",
            queue_id=delivery.queue_id,
        )
        return []


@dataclass(slots=True)
class _Hand:
    """A delivery's share of its transport group's room, in connections."""

    group: int
    connections: int  # it takes in all
    sending: int = field(init=False)  # of them not done yet

    def __post_init__(self) -> None:
        self.sending = self.connections

    @property
    def held(self) -> int:
        """What it counts in flight: its connections still sending, else one while its
        results are written."""
        return max(1, self.sending)


def _stopped(delivery: Delivery, control: JobControl) -> list[RecipientUpdate]:
    """A leased delivery whose job was stopped before it went out: cancelled ones end
    here; paused or held ones go back, no attempt counted, until the job goes on."""
    if control is JobControl.CANCELLED:
        return [
            RecipientUpdate(
                r.id,
                RecipientState.CANCELLED,
                "cancelled by smtpgate job cancel",
                counts_as_attempt=False,
            )
            for r in delivery.recipients
        ]
    return [
        RecipientUpdate(
            r.id,
            RecipientState.DEFERRED if r.attempts else RecipientState.QUEUED,
            None,
            next_attempt=delivery.send_at or 0.0,
            counts_as_attempt=False,
        )
        for r in delivery.recipients
    ]
