"""The HTTP interface as the server holds it: its sockets bound at startup, the app
behind them loaded at the first connection.

aiohttp and the app are about 12 MB of the server's memory, and on most gateways nobody
opens the page or scrapes /metrics. Binding at startup keeps what matters of eager
serving: an address that is taken is a startup error (or, for the default one, a
warning), and a request waits in the socket's backlog until the app answers it.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from typing import TYPE_CHECKING

from smtpgate import logs
from smtpgate.config import Config, ListenAddress
from smtpgate.spool.base import Spool
from smtpgate.web.metrics import Metrics

if TYPE_CHECKING:
    from smtpgate.web.app import WebServer

log = logs.get(__name__)

BACKLOG = 128  # connections the kernel holds while the app loads


class HttpInterface:
    def __init__(self, config: Config, spool: Spool, metrics: Metrics, token: str | None) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._token = token
        self._sockets: list[socket.socket] = []
        self._loading: asyncio.Task[None] | None = None
        self._server: WebServer | None = None

    def listen(self, address: ListenAddress) -> None:
        """Bind one more address now; OSError when it cannot be bound."""
        bound = _bind(address)
        loop = asyncio.get_running_loop()
        for sock in bound:
            self._sockets.append(sock)
            loop.add_reader(sock.fileno(), self._first_connection)
        log.info("serving HTTP", address=str(address))

    def _first_connection(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
        self._loading = asyncio.create_task(self._load(), name="http interface")

    async def _load(self) -> None:
        try:
            # Imported in a thread: the SMTP sessions on this loop go on meanwhile.
            app = await asyncio.to_thread(importlib.import_module, "smtpgate.web.app")
            from smtpgate.web.state import Monitor

            monitor = Monitor(self._config, self._spool, self._metrics, self._token)
            server: WebServer = app.WebServer(app.build_app(monitor))
            self._server = server
            for sock in self._sockets:
                await server.serve(sock)
        except Exception:
            # Mail goes on; the waiting requests get a closed connection, not a hang.
            log.exception("cannot start the HTTP interface; SMTP goes on without it")
            await self._close()

    async def stop(self) -> None:
        if self._loading is not None:
            await self._loading
        await self._close()

    async def _close(self) -> None:
        if self._server is not None:
            await self._server.stop()  # closes the sockets it serves
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            if self._loading is None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self._server, self._sockets = None, []


def _bind(address: ListenAddress) -> list[socket.socket]:
    """A listening socket for each address the host name has (asyncio's create_server
    does the same): 'localhost' is 127.0.0.1 and ::1."""
    infos = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    addresses = dict.fromkeys((family, sockaddr[:2]) for family, _, _, _, sockaddr in infos)
    bound: list[socket.socket] = []
    try:
        for family, sockaddr in addresses:
            bound.append(socket.create_server(sockaddr, family=family, backlog=BACKLOG))
    except OSError:
        for sock in bound:
            sock.close()
        raise
    return bound
