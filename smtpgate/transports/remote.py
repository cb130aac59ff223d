"""Delivery process: the transports run in a child process, so that talking SMTP to the
upstreams has a CPU core of its own and the listener keeps the other.

Between the scheduler and the transports. The scheduler, the spool and every decision
stay in the server; the child only sends: it gets a leased Delivery and answers with an
Outcome per recipient, exactly what an in-process transport would return. Its relay
limits read and write the spool's ledger through the server, so the spool keeps one
writer. If the child dies, the deliveries it had fail as temporary errors (sent again
later, as after any crash) and a new child is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from smtpgate import logs
from smtpgate.config import Config
from smtpgate.delivery.outcome import Outcome
from smtpgate.spool.base import Delivery
from smtpgate.transports.base import RelayLedger, Transport
from smtpgate.transports.channel import Channel, ChannelClosedError

log = logs.get(__name__)

START_SECONDS = 30.0  # for the child to import, build and start its transports
STOP_SECONDS = 15.0  # for the child to finish its QUITs after the channel closes
RESTART_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits before starting a dead child again
STEADY_SECONDS = 60.0  # a child that ran this long died of something new: restart at once


@dataclass(frozen=True, slots=True)
class Setup:
    """The first call to the child: what it needs to build the same transports."""

    config: Config
    routes: tuple[str, ...]
    passwords: Mapping[str, str | None]
    log_level: str
    log_format: logs.Format


@dataclass(frozen=True, slots=True)
class TransportInfo:
    """A transport the child built, as the scheduler needs to know it."""

    name: str
    concurrency: int
    routes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Deliver:
    delivery: Delivery


@dataclass(frozen=True, slots=True)
class LedgerCall:
    method: Literal["log_send", "sends_since", "set_relay_status"]
    args: tuple[Any, ...]


class DeliveryProcess:
    def __init__(
        self,
        config: Config,
        routes: Collection[str],
        passwords: Mapping[str, str | None],
        ledger: RelayLedger,
    ) -> None:
        self._setup = Setup(config, tuple(routes), dict(passwords), *logs.settings())
        self._ledger = ledger
        self._channel: Channel | None = None  # the child's that is set up, if any
        self._child: asyncio.subprocess.Process | None = None
        self._up = asyncio.Event()  # a child is running and set up
        self._closing = False
        self._restarts = 0
        self._started_at = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> dict[str, Transport]:
        """Start the child and return a transport by route for the scheduler. Raises
        RuntimeError when the child cannot start (its own error is on stderr)."""
        infos = await self._spawn()
        transports: dict[str, Transport] = {}
        for info in infos:
            remote = RemoteTransport(self, info)
            transports.update(dict.fromkeys(info.routes, remote))
        return transports

    async def deliver(self, delivery: Delivery) -> dict[int, Outcome]:
        await self._up.wait()  # a child that died is being replaced
        if self._channel is None:
            raise ChannelClosedError("the delivery process went away")
        outcomes: dict[int, Outcome] = await self._channel.call(Deliver(delivery))
        return outcomes

    async def close(self) -> None:
        """Close the channel: the child finishes its QUITs and exits."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._channel is not None:
            await self._channel.close()
        if self._child is not None:
            try:
                async with asyncio.timeout(STOP_SECONDS):
                    await self._child.wait()
            except TimeoutError:
                log.warning("delivery process did not stop; killing it", pid=self._child.pid)
                with contextlib.suppress(ProcessLookupError):
                    self._child.kill()
                await self._child.wait()

    async def _spawn(self) -> list[TransportInfo]:
        ours, theirs = socket.socketpair()
        try:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtpgate.transports.worker",
                str(theirs.fileno()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        channel = Channel(reader, writer)
        self._keep(self._watch(channel, self._child))
        try:
            async with asyncio.timeout(START_SECONDS):
                infos: list[TransportInfo] = await channel.call(self._setup)
            if channel.closed:  # it answered, then died at once
                raise ChannelClosedError("the delivery process exited after starting")
        except (Exception, asyncio.CancelledError):
            await channel.close()
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
            await self._child.wait()
            raise
        log.info("delivery process started", pid=self._child.pid, transports=len(infos))
        self._started_at = time.monotonic()
        self._channel = channel
        self._up.set()
        return infos

    async def _watch(self, channel: Channel, child: asyncio.subprocess.Process) -> None:
        """Serve the child's ledger calls while it runs; start another if it dies."""
        try:
            await channel.serve(self._ledger_call)
        except Exception:  # a frame that cannot be read: the child is as good as dead
            log.exception("the delivery process's channel failed")
            await channel.close()
        if self._closing or channel is not self._channel:
            return  # stopping, or a child that never got set up (its starter says why)
        self._up.clear()
        self._channel = None
        with contextlib.suppress(ProcessLookupError):
            child.kill()  # it closed the channel but may still be alive: make sure
        code = await child.wait()
        if time.monotonic() - self._started_at > STEADY_SECONDS:
            self._restarts = 0
        log.error(
            "delivery process died; its deliveries under way are retried, starting another",
            pid=child.pid,
            exit_code=code,
        )
        self._keep(self._restart())

    async def _restart(self) -> None:
        while not self._closing:
            wait = (0.0, *RESTART_SECONDS)[min(self._restarts, len(RESTART_SECONDS))]
            self._restarts += 1
            await asyncio.sleep(wait)
            try:
                await self._spawn()
            except Exception:
                log.exception("cannot start the delivery process; trying again")
            else:
                return

    async def _ledger_call(self, request: Any) -> Any:
        if not isinstance(request, LedgerCall):
            raise TypeError(f"the delivery process may not ask for {request!r}")
        return await getattr(self._ledger, request.method)(*request.args)

    def _keep(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class RemoteTransport:
    """Stands in the server for a transport that runs in the delivery process."""

    def __init__(self, process: DeliveryProcess, info: TransportInfo) -> None:
        self.name = info.name
        self.concurrency = info.concurrency
        self._process = process

    async def start(self) -> None:
        """Started in the child already."""

    async def deliver(self, delivery: Delivery) -> dict[int, Outcome]:
        return await self._process.deliver(delivery)

    async def close(self) -> None:
        await self._process.close()
