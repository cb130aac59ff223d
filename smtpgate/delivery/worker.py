"""The delivery process's side (`python -m smtpgate.delivery.worker FD`): opens the spool,
builds the scheduler and transports of the routes the server names, and runs them until
the server closes the channel (see process.py).

It ignores SIGINT and SIGTERM, which a terminal or a service manager sends to every
process of the group: the server decides when it stops, by closing the channel, so a
delivery under way is not cut off before the server's own grace period. A server that
dies closes the channel too: the child drains and exits, never orphaned, and until it
has, the spool's single-server lock it inherited keeps a new server from sending the
same mail again.
"""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import structlog

from smtpgate import crashpoints, logs
from smtpgate.delivery.process import Go, Recorded, Setup, Stored
from smtpgate.eventloop import hand_over_quickly, new_event_loop, set_startup_aside
from smtpgate.scheduler import (
    DRAIN_SECONDS,
    MESSAGES_PER_CONNECTION_APART,
    Scheduler,
    build_scheduler,
)
from smtpgate.spool import SqliteSpool
from smtpgate.spool.base import RecipientUpdate, attempt_results
from smtpgate.transports.base import Transport
from smtpgate.transports.build import build_transports
from smtpgate.transports.channel import Channel

log = logs.get(__name__)

REPORT_SECONDS = 0.05  # results are told to the server in batches at most this old
# After the server says it stored mail, the spool's write turn is held as briefly as it
# can be (its commits wait for it) rather than beside the sending (SqliteSpool.mail_arriving).
MAIL_ARRIVING_SECONDS = 1.0


class Worker:
    def __init__(self, channel: Channel) -> None:
        self._channel = channel
        self._spool: SqliteSpool | None = None
        self._transports: dict[str, Transport] = {}
        self._scheduler: Scheduler | None = None
        self._running: asyncio.Task[None] | None = None
        self._recorded: collections.Counter[str] = collections.Counter()

    async def handle(self, request: Any) -> Any:
        if isinstance(request, Setup):
            return await self._set_up(request)
        raise TypeError(f"unknown request {request!r}")

    def listen(self, notice: Any) -> None:
        if self._scheduler is None:
            return
        if isinstance(notice, Stored):
            if self._spool is not None:
                self._spool.mail_arriving(MAIL_ARRIVING_SECONDS)
            self._scheduler.wake()
        elif isinstance(notice, Go) and self._running is None:
            self._running = asyncio.create_task(self._scheduler.run(), name="scheduler")

    async def _set_up(self, setup: Setup) -> None:
        logs.configure(setup.log_level, setup.log_format)
        config = setup.config
        self._spool = SqliteSpool.open(config.spool_path(), on_loop=True)
        self._transports = build_transports(config, setup.routes, setup.passwords, self._spool)
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.start()
        self._scheduler = build_scheduler(
            config,
            self._spool,
            self._transports,
            setup.waiting,
            on_recorded=self._report,
            messages_per_connection=MESSAGES_PER_CONNECTION_APART,
        )
        set_startup_aside()
        hand_over_quickly()

    def _report(self, updates: Sequence[RecipientUpdate]) -> None:
        """Results for the server's metrics, gathered for a moment: one notice for many."""
        counted = attempt_results(updates)
        if not counted:
            return
        if not self._recorded:
            asyncio.get_running_loop().call_later(REPORT_SECONDS, self._send_report)
        self._recorded.update(counted)

    def _send_report(self) -> None:
        results, self._recorded = dict(self._recorded), collections.Counter()
        self._channel.notify(Recorded(results))

    async def close(self) -> None:
        """The server closed the channel: finish what is under way, then stop."""
        if self._scheduler is not None and self._running is not None:
            await self._scheduler.drain(DRAIN_SECONDS)
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)
        for transport in {id(t): t for t in self._transports.values()}.values():
            await transport.close()
        if self._spool is not None:
            await self._spool.close()


async def run(fd: int) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    channel = Channel(reader, writer)
    worker = Worker(channel)
    # Every task started from here copies this context: each line says where it is from.
    structlog.contextvars.bind_contextvars(process="delivery")
    try:
        await channel.serve(worker.handle, worker.listen)  # until the server closes it
    finally:
        await worker.close()


def main() -> None:
    crashpoints.also_kill(os.getppid())
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run(int(sys.argv[1])))


if __name__ == "__main__":
    main()
