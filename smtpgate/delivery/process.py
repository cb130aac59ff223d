"""Delivery process: the delivery side (scheduler and transports) in a child process, so
that it has a CPU core, and an interpreter lock, of its own while the listener keeps the
other.

Both processes work on the one spool: the listener stores, the child leases, sends and
records, each through its own connection; the spool's write turn (spool/writers.py) hands
the file from one writer to the other without SQLite's polling. The server tells the
child when mail was stored; the child tells the server what it recorded, for the
metrics. If the child dies, the recipients it had leased are released (its deliveries
under way are sent again, as after any crash) and a new child is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from smtpgate import clock, logs
from smtpgate.config import Config
from smtpgate.spool.base import Spool
from smtpgate.transports.channel import Channel, ChannelClosedError

log = logs.get(__name__)

START_SECONDS = 30.0  # for the child to import, open the spool and start its transports
STOP_SECONDS = 15.0  # for the child to drain its deliveries after the channel closes
RESTART_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)  # waits before starting a dead child again
STEADY_SECONDS = 60.0  # a child that ran this long died of something new: restart at once


@dataclass(frozen=True, slots=True)
class Setup:
    """The first call to the child: what it needs to build the same delivery side."""

    config: Config
    routes: tuple[str, ...]
    passwords: Mapping[str, str | None]
    waiting: Mapping[str, str]  # routes that cannot send, with the reason (see Scheduler)
    log_level: str
    log_format: logs.Format


@dataclass(frozen=True, slots=True)
class Go:
    """Notice to the child: the listeners are up, start delivering."""


@dataclass(frozen=True, slots=True)
class Stored:
    """Notice to the child: mail was stored, look for due work now."""


@dataclass(frozen=True, slots=True)
class Recorded:
    """Notice to the server: attempts the child recorded, by result, for the metrics
    (counts, not the results themselves: less to pickle on both sides)."""

    results: dict[str, int]


class DeliveryProcess:
    def __init__(
        self,
        config: Config,
        routes: Collection[str],
        passwords: Mapping[str, str | None],
        waiting: Mapping[str, str],
        spool: Spool,
        on_recorded: Callable[[Mapping[str, int]], None] | None = None,
        spool_lock: int | None = None,
    ) -> None:
        """`spool_lock`, the descriptor of the spool's single-server lock, is inherited
        by the child: a server that dies leaves the spool locked until the child has
        finished what it was sending, so a new server cannot send it a second time."""
        self._setup = Setup(config, tuple(routes), dict(passwords), dict(waiting), *logs.settings())
        self._spool = spool
        self._on_recorded = on_recorded
        self._spool_lock = spool_lock
        self._going = False  # the listeners are up: a child starts delivering at once
        self._channel: Channel | None = None  # the child's that is set up, if any
        self._child: asyncio.subprocess.Process | None = None
        self._closing = False
        self._restarts = 0
        self._started_at = 0.0
        self._woken = False
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Start the child, which builds its side but sends nothing until `go`. Raises
        when it cannot start (its own error is on stderr)."""
        await self._spawn()

    def go(self) -> None:
        """The listeners are up: deliver (a child started later goes at once)."""
        self._going = True
        if self._channel is not None:
            self._channel.notify(Go())

    def wake(self) -> None:
        """Mail was stored: one notice per turn of the event loop, however many came."""
        if self._woken or self._channel is None:
            return
        self._woken = True
        asyncio.get_running_loop().call_soon(self._send_wake)

    def _send_wake(self) -> None:
        self._woken = False
        if self._channel is not None:
            self._channel.notify(Stored())

    async def close(self) -> None:
        """Close the channel: the child drains its deliveries and exits."""
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

    async def _spawn(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            self._child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "smtpgate.delivery.worker",
                str(theirs.fileno()),
                pass_fds=(
                    theirs.fileno(),
                    *([] if self._spool_lock is None else [self._spool_lock]),
                ),
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
                await channel.call(self._setup)
            if channel.closed:  # it answered, then died at once
                raise ChannelClosedError("the delivery process exited after starting")
        except (Exception, asyncio.CancelledError):
            await channel.close()
            with contextlib.suppress(ProcessLookupError):
                self._child.kill()
            await self._child.wait()
            raise
        log.info("delivery process started", pid=self._child.pid, routes=len(self._setup.routes))
        self._started_at = time.monotonic()
        self._channel = channel
        if self._going:
            channel.notify(Go())

    async def _watch(self, channel: Channel, child: asyncio.subprocess.Process) -> None:
        """Take the child's notices while it runs; when it dies, release what it had
        leased and start another."""
        try:
            await channel.serve(self._refuse, self._notice)
        except Exception:  # a frame that cannot be read: the child is as good as dead
            log.exception("the delivery process's channel failed")
            await channel.close()
        if self._closing or channel is not self._channel:
            return  # stopping, or a child that never got set up (its starter says why)
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
        released = False
        while not self._closing:
            wait = (0.0, *RESTART_SECONDS)[min(self._restarts, len(RESTART_SECONDS))]
            self._restarts += 1
            await asyncio.sleep(wait)
            try:
                if not released:  # the dead child can no longer write: its leases are free
                    count = await self._spool.release_leases(clock.now(), self._setup.routes)
                    released = True
                    log.warning("released recipients the delivery process had", count=count)
                await self._spawn()
            except Exception:
                log.exception("cannot start the delivery process; trying again")
            else:
                return

    async def _refuse(self, request: Any) -> Any:
        raise TypeError(f"the delivery process may not ask for {request!r}")

    def _notice(self, notice: Any) -> None:
        if isinstance(notice, Recorded) and self._on_recorded is not None:
            self._on_recorded(notice.results)

    def _keep(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
