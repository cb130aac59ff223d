"""Transport interface, between the scheduler and an upstream or MX server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from smtpgate.delivery.outcome import Outcome
from smtpgate.spool.base import Delivery


class Transport(Protocol):
    """Sends one message to some of its recipients and says what became of each.

    `deliver` never raises for SMTP or network trouble: it returns an Outcome for every
    recipient id of the delivery. `concurrency` caps the connections open at once;
    `connections_for` says how many of them a delivery takes, and `deliver` calls
    `part_sent` as each of those is done before it returns (the scheduler counts the
    work it has in hand in connections). `start` runs before the first delivery,
    `close` at shutdown.
    """

    name: str
    concurrency: int

    def connections_for(self, delivery: Delivery) -> int: ...

    async def start(self) -> None: ...

    async def deliver(
        self, delivery: Delivery, part_sent: Callable[[], None] | None = None
    ) -> dict[int, Outcome]: ...

    async def close(self) -> None: ...


class RelayLedger(Protocol):
    """What a relay keeps in the spool so that it survives a restart (see spool.base)."""

    async def log_send(self, relay: str, at: float) -> None: ...

    async def sends_since(self, relay: str, since: float) -> list[float]: ...

    async def set_relay_status(self, relay: str, status: str | None, now: float) -> None: ...
