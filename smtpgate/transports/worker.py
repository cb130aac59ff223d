"""The delivery process's side (`python -m smtpgate.transports.worker FD`): builds the
transports the server asks for and runs the deliveries it hands over.

It never touches the spool: relay limits go through the server (see remote.py). It
ignores SIGINT and SIGTERM, which a terminal or a service manager sends to every
process of the group: the server decides when it stops, by closing the channel, so a
delivery under way is not cut off before the server's own grace period.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from typing import Any

import structlog

from smtpgate import logs
from smtpgate.delivery.outcome import Outcome
from smtpgate.eventloop import new_event_loop
from smtpgate.transports.base import Transport
from smtpgate.transports.build import build_transports
from smtpgate.transports.channel import Channel
from smtpgate.transports.remote import Deliver, LedgerCall, Setup, TransportInfo

log = logs.get(__name__)


class LedgerClient:
    """The relay ledger, kept in the server's spool, asked for over the channel."""

    def __init__(self, channel: Channel) -> None:
        self._channel = channel

    async def log_send(self, relay: str, at: float) -> None:
        await self._channel.call(LedgerCall("log_send", (relay, at)))

    async def sends_since(self, relay: str, since: float) -> list[float]:
        sends: list[float] = await self._channel.call(LedgerCall("sends_since", (relay, since)))
        return sends

    async def set_relay_status(self, relay: str, status: str | None, now: float) -> None:
        await self._channel.call(LedgerCall("set_relay_status", (relay, status, now)))


class Worker:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._transports: dict[str, Transport] = {}

    async def handle(self, request: Any) -> Any:
        if isinstance(request, Deliver):
            return await self._deliver(request)
        if isinstance(request, Setup):
            return await self._set_up(request)
        raise TypeError(f"unknown request {request!r}")

    async def _deliver(self, request: Deliver) -> dict[int, Outcome]:
        return await self._transports[request.delivery.route].deliver(request.delivery)

    async def _set_up(self, setup: Setup) -> list[TransportInfo]:
        logs.configure(setup.log_level, setup.log_format)
        self._transports = build_transports(
            setup.config, setup.routes, setup.passwords, LedgerClient(self._channel)
        )
        infos = []
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.start()
            routes = tuple(r for r, t in self._transports.items() if t is transport)
            infos.append(TransportInfo(transport.name, transport.concurrency, routes))
        return infos

    async def close(self) -> None:
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.close()


async def run(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    channel = Channel(reader, writer)
    worker = Worker(channel)
    # Every task the channel starts copies this context: each line says where it is from.
    structlog.contextvars.bind_contextvars(process="delivery")
    await channel.serve(worker.handle)  # until the server closes the channel
    await worker.close()


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run(int(sys.argv[1])))


if __name__ == "__main__":
    main()
