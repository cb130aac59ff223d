"""Transport interface, between the scheduler and an upstream or MX server."""

from __future__ import annotations

from typing import Protocol

from smtpgate.delivery.outcome import Outcome
from smtpgate.spool.base import Delivery


class Transport(Protocol):
    """Sends one message to some of its recipients and says what became of each.

    `deliver` never raises for SMTP or network trouble: it returns an Outcome for every
    recipient id of the delivery. `concurrency` caps simultaneous deliveries.
    """

    name: str
    concurrency: int

    async def deliver(self, delivery: Delivery) -> dict[int, Outcome]: ...
