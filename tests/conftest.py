"""Fixtures: real SMTP servers as upstreams, and smtpgate itself as `smtpgate serve`.

Upstreams are aiosmtpd servers on 127.0.0.1 that record every message byte for byte and
can be told how to answer (as aiosmtplib's own test suite does). They run on one event
loop in a background thread; smtpgate runs as a subprocess, exactly as a user starts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

STARTUP_SECONDS = 15.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll until predicate() is truthy; returns its value. Fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


# --- upstream SMTP servers --------------------------------------------------------------


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes


@dataclass
class UpstreamHandler:
    """Records what arrives; answers as told. Replies are popped in order, then 250."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_replies: list[str] = field(default_factory=list)
    drop_after_data: int = 0  # close without a reply to the final dot, this many times
    stall_data: bool = False  # never answer the final dot
    connections: int = 0

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.stall_data:
            await asyncio.sleep(3600)
        if self.drop_after_data > 0:
            self.drop_after_data -= 1
            assert server.transport is not None
            server.transport.abort()
            await asyncio.sleep(3600)  # cancelled by the lost connection
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      envelope.original_content))
        return "250 2.0.0 Ok: stored by upstream"


class UpstreamSMTP(SMTP):
    def __init__(self, handler: UpstreamHandler) -> None:
        super().__init__(handler, hostname="upstream.test", enable_SMTPUTF8=True)
        handler.connections += 1


class RawScript(asyncio.Protocol):
    """A server that is not quite SMTP: writes `greeting`, then closes (e.g. a 421)."""

    def __init__(self, greeting: bytes) -> None:
        self.greeting = greeting

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.greeting)
        transport.close()


class MidDataDrop(asyncio.Protocol):
    """Speaks SMTP until DATA, takes a few bytes of the message, then drops the connection."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        self.buffer = b""
        self.in_data = False
        transport.write(b"220 flaky.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self.transport.abort()
            return
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-flaky.test\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.transport.write(b"354 go ahead\r\n")
                self.in_data = True
                if self.buffer:
                    self.transport.abort()
                return
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
            else:
                self.transport.write(b"250 ok\r\n")


class Upstreams:
    """Starts servers on the background loop; stops them all at the end of the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._servers: dict[asyncio.Server, list[asyncio.BaseProtocol]] = {}

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(self, port: int | None = None, **behaviour: Any) -> Upstream:
        handler = UpstreamHandler(**behaviour)
        return self.start_protocol(lambda: UpstreamSMTP(handler), port, handler)

    def start_protocol(self, factory: Callable[[], asyncio.BaseProtocol],
                       port: int | None = None, handler: UpstreamHandler | None = None
                       ) -> Upstream:
        port = port or free_port()
        protocols: list[asyncio.BaseProtocol] = []

        def tracked() -> asyncio.BaseProtocol:
            protocols.append(factory())
            return protocols[-1]

        server = self._run(self._loop.create_server(tracked, "127.0.0.1", port,
                                                    reuse_address=True))
        self._servers[server] = protocols
        return Upstream(port, handler or UpstreamHandler(), server, self)

    def stop(self, server: asyncio.Server) -> None:
        """Close the listening socket and every connection it accepted."""
        protocols = self._servers.pop(server, None)
        if protocols is None:
            return

        async def close() -> None:
            server.close()
            for protocol in protocols:
                transport = getattr(protocol, "transport", None)
                if transport is not None:
                    transport.abort()
            await server.wait_closed()

        self._run(close())

    def stop_all(self) -> None:
        for server in list(self._servers):
            self.stop(server)


@dataclass
class Upstream:
    port: int
    handler: UpstreamHandler
    server: asyncio.Server
    owner: Upstreams

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def stop(self) -> None:
        self.owner.stop(self.server)


@pytest.fixture(scope="session")
def background_loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="upstreams", daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


@pytest.fixture
def upstreams(background_loop: asyncio.AbstractEventLoop) -> Iterator[Upstreams]:
    servers = Upstreams(background_loop)
    yield servers
    servers.stop_all()


# --- smtpgate as a user runs it ---------------------------------------------------------


class Gateway:
    """`smtpgate serve` in a subprocess with a config written by the test."""

    def __init__(self, workdir: Path, config_text: str, port: int) -> None:
        self.workdir = workdir
        self.port = port
        self.state_dir = workdir / "state"
        self.config_path = workdir / "smtpgate.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "smtpgate.log"
        self.process: subprocess.Popen[bytes] | None = None

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "smtpgate", *args, "--config", str(self.config_path)]

    def start(self) -> Gateway:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                self.command("serve", "--log-format", "json", "--log-level", "debug"),
                stdout=log, stderr=log, env=_clean_env(),
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"smtpgate exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as sock:
                if sock.recv(100).startswith(b"220"):
                    return self
            time.sleep(0.05)
        pytest.fail(f"smtpgate did not answer on port {self.port}:\n{self.log()}")

    def stop(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"smtpgate did not stop on SIGTERM:\n{self.log()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
        return events

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(self.command(*args), capture_output=True, text=True,
                                env=_clean_env(), timeout=60)
        if check and result.returncode != 0:
            pytest.fail(f"smtpgate {' '.join(args)} exited {result.returncode}:\n"
                        f"{result.stdout}\n{result.stderr}")
        return result

    def queue(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = json.loads(self.cli("queue", "--json").stdout)["messages"]
        return data

    def relay_statuses(self) -> dict[str, dict[str, Any]]:
        data: dict[str, dict[str, Any]] = json.loads(self.cli("queue", "--json").stdout)["relays"]
        return data

    def recipients(self) -> dict[str, dict[str, Any]]:
        """Every recipient in the spool by address (the tests use distinct addresses)."""
        return {r["address"]: r for m in self.queue() for r in m["recipients"]}

    def wait_for_state(self, address: str, state: str, timeout: float = 15.0
                       ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            recipient = self.recipients().get(address)
            return recipient if recipient and recipient["state"] == state else None

        result: dict[str, Any] = wait_until(
            reached, timeout, f"{address} to be {state}; queue: {self.recipients()}")
        return result


def _clean_env() -> dict[str, str]:
    """The test runner's environment without SMTPGATE_* that could leak into the gateway."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[GatewayFactory]:
    """gateway_factory(config: str = "", start=True) -> Gateway. The [server] table with
    listen and state_dir is written for the test; `config` adds any other TOML."""
    started: list[Gateway] = []
    count = 0

    def make(config: str = "", *, start: bool = True, server: str = "") -> Gateway:
        nonlocal count
        count += 1
        workdir = tmp_path / f"gateway{count}"
        workdir.mkdir()
        port = free_port()
        text = textwrap.dedent(f"""\
            [server]
            listen = ["127.0.0.1:{port}"]
            state_dir = "{workdir / 'state'}"
            hostname = "gateway.test"
            """) + textwrap.dedent(server) + "\n" + textwrap.dedent(config)
        gateway = Gateway(workdir, text, port)
        started.append(gateway)
        return gateway.start() if start else gateway

    yield make
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def relay_config(port: int, *, route: str = "upstream", retry: str = '["1s"]',
                 give_up_after: str = '"5d"') -> str:
    """A relay route named `route` to 127.0.0.1:port."""
    text = f"""
        [relays.{route}]
        host = "127.0.0.1"
        port = {port}
        tls = "none"
        timeout = "5s"
        backoff = "1s"

        [routes.{route}]
        mode = "relay"
        relay = "{route}"
        retry_schedule = {retry}
        give_up_after = {give_up_after}
        """
    return textwrap.dedent(text)


def with_default_route(route: str) -> str:
    return f'default_route = "{route}"\n'
