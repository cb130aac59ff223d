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
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

STARTUP_SECONDS = 15.0


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A loopback port nothing listens on, never one given out before in this run: the
    kernel may hand the same port to two calls in a row (a gateway's SMTP and HTTP
    ports were once the same one, and it could not start)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port


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
    connection: int = 0  # which connection of this upstream it came over, from 1
    at: float = 0.0


@dataclass
class UpstreamHandler:
    """Records what arrives; answers as told. Replies are popped in order, then 250."""

    messages: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    data_replies: list[str] = field(default_factory=list)
    drop_after_data: int = 0  # close without a reply to the final dot, this many times
    drop_data_number: int = 0  # ...or only at the Nth final dot over all connections
    datas: int = 0
    stall_data: bool = False  # never answer the final dot
    pipelining: bool = False  # advertise PIPELINING (aiosmtpd reads pipelined commands fine)
    max_rcpts: int = 0  # answer "452 4.5.3" past this many recipients in a transaction
    drop_at_mail: int = 0  # drop the connection at the Nth MAIL FROM over all connections
    users: dict[str, str] = field(default_factory=dict)  # AUTH required when not empty
    auth_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN")  # offered when users are set
    smtputf8: bool = True  # advertise SMTPUTF8
    data_delay: float = 0.0  # seconds before answering the final dot (a slow server)
    connections: int = 0
    connected_at: list[float] = field(default_factory=list)
    open_connections: int = 0
    most_open: int = 0
    reads: list[bytes] = field(default_factory=list)  # every chunk read from the network
    mails: int = 0

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        self.mails += 1
        if self.drop_at_mail and self.mails == self.drop_at_mail:
            assert server.transport is not None
            server.transport.abort()
            await asyncio.sleep(3600)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        if self.max_rcpts and len(envelope.rcpt_tos) >= self.max_rcpts:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.stall_data:
            await asyncio.sleep(3600)
        self.datas += 1
        if self.drop_after_data > 0 or self.datas == self.drop_data_number:
            self.drop_after_data = max(0, self.drop_after_data - 1)
            assert server.transport is not None
            server.transport.abort()
            await asyncio.sleep(3600)  # cancelled by the lost connection
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("2"):
                return reply
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(
            Received(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                envelope.original_content,
                getattr(server, "number", 0),
                time.time(),
            )
        )
        return "250 2.0.0 Ok: stored by upstream"

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.users.get(auth_data.login.decode()) == auth_data.password.decode()
        )
        return AuthResult(success=ok, handled=False)


class UpstreamSMTP(SMTP):
    """aiosmtpd as an upstream, counting connections and what each read brought."""

    def __init__(
        self,
        handler: UpstreamHandler,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> None:
        with warnings.catch_warnings():  # "AUTH without TLS": the TLS is implicit here
            warnings.simplefilter("ignore", UserWarning)
            self._build(handler, tls_context, implicit_tls)
        handler.connections += 1
        self.number = handler.connections
        self._handler_ref = handler
        self._open = False

    def _build(
        self, handler: UpstreamHandler, tls_context: ssl.SSLContext | None, implicit_tls: bool
    ) -> None:
        super().__init__(
            handler,
            hostname="upstream.test",
            enable_SMTPUTF8=handler.smtputf8,
            tls_context=tls_context,
            require_starttls=tls_context is not None,
            auth_require_tls=not implicit_tls,  # aiosmtpd cannot see the implicit TLS
            auth_required=bool(handler.users),
            authenticator=handler.authenticate,
            auth_exclude_mechanism=[
                m for m in ("CRAM-MD5", "LOGIN", "PLAIN") if m not in handler.auth_mechanisms
            ],
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        handler = self._handler_ref
        if not self._open:  # STARTTLS calls this a second time
            self._open = True
            handler.connected_at.append(time.time())
            handler.open_connections += 1
            handler.most_open = max(handler.most_open, handler.open_connections)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._open:
            self._open = False
            self._handler_ref.open_connections -= 1
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        self._handler_ref.reads.append(data)
        super().data_received(data)


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


class PipelineTrap(asyncio.Protocol):
    """Advertises PIPELINING but misbehaves when commands arrive together: "stall" answers
    MAIL and the first RCPT, then never again; "stall_second" does so only for the second
    pipelined transaction; "out_of_step" sends one reply too many.
    One command at a time it is a correct server that records what it receives."""

    def __init__(self, mode: str, messages: list[Received], counter: list[int]) -> None:
        self.mode = mode
        self.messages = messages
        counter[0] += 1
        self.number = counter[0]
        self.buffer = b""
        self.hung = False
        self.groups = 0
        self.envelope: tuple[str, list[str]] = ("", [])
        self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 trap.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.hung:
            return
        self.buffer += data
        if self.in_data:
            self._collect()
            return
        lines = self.buffer.split(b"\r\n")
        self.buffer = lines.pop()
        if len(lines) > 1 and lines[0].upper().startswith(b"MAIL"):
            self.groups += 1
            if self.mode == "stall":
                self.transport.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n")
                self.hung = True
                return
            if self.mode == "stall_second" and self.groups == 2:
                self.hung = True  # the first pipelined transaction went through
                return
            if self.mode == "out_of_step":
                self.transport.write(b"250 2.0.0 an extra reply\r\n")
        for line in lines:
            self._command(line)
            if self.in_data:
                self._collect()
                return

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self.transport.write(b"250-trap.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
        elif verb == b"MAIL":
            self.envelope = (line.decode()[10:].strip("<> "), [])
            self.transport.write(b"250 2.1.0 ok\r\n")
        elif verb == b"RCPT":
            self.envelope[1].append(line.decode()[8:].strip("<> "))
            self.transport.write(b"250 2.1.5 ok\r\n")
        elif verb == b"DATA":
            self.transport.write(b"354 go ahead\r\n")
            self.in_data = True
        elif verb == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()
        else:
            self.transport.write(b"250 ok\r\n")

    def _collect(self) -> None:
        end = self.buffer.find(b"\r\n.\r\n")
        if end < 0:
            return
        content = self.buffer[: end + 2].replace(b"\r\n..", b"\r\n.")
        self.buffer = self.buffer[end + 5 :]
        self.in_data = False
        self.messages.append(
            Received(self.envelope[0], self.envelope[1], content, self.number, time.time())
        )
        self.transport.write(b"250 2.0.0 taken\r\n")


class Upstreams:
    """Starts servers on the background loop; stops them all at the end of the test."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._servers: dict[asyncio.Server, list[asyncio.BaseProtocol]] = {}

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        *,
        starttls: ssl.SSLContext | None = None,
        implicit_tls: ssl.SSLContext | None = None,
        **behaviour: Any,
    ) -> Upstream:
        """An aiosmtpd upstream; `starttls` offers (and requires) STARTTLS with that
        server context, `implicit_tls` speaks TLS from the first byte."""
        handler = UpstreamHandler(**behaviour)
        return self.start_protocol(
            lambda: UpstreamSMTP(handler, starttls, implicit_tls is not None),
            port,
            handler,
            ssl_context=implicit_tls,
            host=host,
        )

    def start_trap(self, mode: str) -> Upstream:
        handler = UpstreamHandler()
        counter = [0]

        def build() -> asyncio.BaseProtocol:
            trap = PipelineTrap(mode, handler.messages, counter)
            handler.connections = counter[0]
            return trap

        return self.start_protocol(build, None, handler)

    def start_protocol(
        self,
        factory: Callable[[], asyncio.BaseProtocol],
        port: int | None = None,
        handler: UpstreamHandler | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        host: str = "127.0.0.1",
    ) -> Upstream:
        port = port or free_port()
        protocols: list[asyncio.BaseProtocol] = []

        def tracked() -> asyncio.BaseProtocol:
            protocols.append(factory())
            return protocols[-1]

        server = self._run(
            self._loop.create_server(tracked, host, port, reuse_address=True, ssl=ssl_context)
        )
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


@dataclass
class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1 and localhost."""

    server_context: ssl.SSLContext
    ca_file: Path
    untrusted_context: ssl.SSLContext  # signed by a CA the gateway does not know
    misnamed_context: ssl.SSLContext  # the trusted CA, but for another host name
    cert_file: Path  # the server certificate as PEM files, for smtpgate's own listener
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """What a mail client trusting this CA uses to reach 127.0.0.1."""
        return ssl.create_default_context(cafile=str(self.ca_file))


@pytest.fixture(scope="session")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    issued = ca.issue_cert("127.0.0.1", "localhost")
    issued.configure_cert(server)
    directory = tmp_path_factory.mktemp("tls")
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert_file))
    issued.private_key_pem.write_to_path(str(key_file))
    stranger = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("127.0.0.1").configure_cert(stranger)
    misnamed = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("mail.example.net").configure_cert(misnamed)
    return Certificates(server, ca_file, stranger, misnamed, cert_file, key_file)


# --- a DNS server on loopback ----------------------------------------------------------


class DnsZone(asyncio.DatagramProtocol):
    """An authoritative DNS server for the test domains, built on dnspython's messages.
    Names it does not know are NXDOMAIN, so nothing a test sends leaves this machine."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.servfail: set[str] = set()
        self.silent: set[str] = set()  # never answered: a DNS timeout
        self.queries: list[tuple[str, str]] = []
        self.port = 0

    def add(self, name: str, rdtype: str, *values: str) -> None:
        self.records.setdefault((name.lower(), rdtype), []).extend(values)

    def mx(self, domain: str, *hosts: tuple[int, str, str]) -> None:
        """MX records for `domain`: (preference, host name, IPv4 address) each."""
        for preference, host, address in hosts:
            self.add(domain, "MX", f"{preference} {host}.")
            self.add(host, "A", address)

    def clear(self) -> None:
        self.records.clear()
        self.servfail.clear()
        self.silent.clear()
        self.queries.clear()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # room for bursts of queries, as real servers
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries.append((name, rdtype))
        if name in self.silent:
            return
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        if name in self.servfail:
            response.set_rcode(dns.rcode.SERVFAIL)
        elif (name, rdtype) in self.records:
            response.answer.append(
                dns.rrset.from_text(f"{name}.", 60, "IN", rdtype, *self.records[(name, rdtype)])
            )
        elif not any(known == name for known, _ in self.records):
            response.set_rcode(dns.rcode.NXDOMAIN)
        self.transport.sendto(response.to_wire(), addr)  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def dns_server(background_loop: asyncio.AbstractEventLoop) -> Iterator[DnsZone]:
    zone = DnsZone()

    async def start() -> asyncio.DatagramTransport:
        transport, _ = await background_loop.create_datagram_endpoint(
            lambda: zone, local_addr=("127.0.0.1", 0)
        )
        return transport

    transport = asyncio.run_coroutine_threadsafe(start(), background_loop).result(10)
    zone.port = transport.get_extra_info("sockname")[1]
    yield zone

    async def stop() -> None:
        transport.close()
        await asyncio.sleep(0.01)  # the socket closes on a later turn of the loop

    asyncio.run_coroutine_threadsafe(stop(), background_loop).result(10)


@pytest.fixture
def dns_zone(dns_server: DnsZone) -> Iterator[DnsZone]:
    """The loopback DNS server, emptied after the test."""
    yield dns_server
    dns_server.clear()


# --- smtpgate as a user runs it ---------------------------------------------------------


class Gateway:
    """`smtpgate serve` in a subprocess with a config written by the test."""

    def __init__(
        self, workdir: Path, config_text: str, port: int, env: dict[str, str] | None = None
    ) -> None:
        self.workdir = workdir
        # Its HTTP interface on a port of its own: 8025 may be taken on a shared machine.
        self.http_port = free_port()
        self.env = {
            **_clean_env(),
            "SMTPGATE_HTTP__LISTEN": f'["127.0.0.1:{self.http_port}"]',
            **(env or {}),
        }
        self.port = port
        self.state_dir = workdir / "state"
        self.config_path = workdir / "smtpgate.toml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "smtpgate.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # runs `serve` under another program (strace)

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "smtpgate", *args, "--config", str(self.config_path)]

    def start(self) -> Gateway:
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the fd
            self.process = subprocess.Popen(
                [
                    *self.prefix,
                    *self.command("serve", "--log-format", "json", "--log-level", "debug"),
                ],
                stdout=log,
                stderr=log,
                env=self.env,
            )
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"smtpgate exited with {self.process.returncode}:\n{self.log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
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
        """SIGKILL the server and its delivery process at once, as a power cut would."""
        assert self.process is not None
        children = [
            int(child)
            for task in Path(f"/proc/{self.process.pid}/task").glob("*")
            for child in (task / "children").read_text().split()
        ]
        self.process.send_signal(signal.SIGKILL)
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
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
        result = subprocess.run(
            self.command(*args), capture_output=True, text=True, env=self.env, timeout=60
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"smtpgate {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
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

    def wait_for_state(self, address: str, state: str, timeout: float = 15.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            recipient = self.recipients().get(address)
            return recipient if recipient and recipient["state"] == state else None

        result: dict[str, Any] = wait_until(
            reached, timeout, f"{address} to be {state}; queue: {self.recipients()}"
        )
        return result


def _clean_env() -> dict[str, str]:
    """The test runner's environment without SMTPGATE_* that could leak into the gateway."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}


GatewayFactory = Callable[..., Gateway]


@pytest.fixture
def gateway_factory(tmp_path: Path, dns_zone: DnsZone) -> Iterator[GatewayFactory]:
    """gateway_factory(config: str = "", start=True) -> Gateway. The [server] table with
    listen and state_dir is written for the test (`listen` adds more listeners after the
    one the test talks to); `config` adds any other TOML. The
    gateway resolves through the loopback DNS server (environment overrides), so direct
    delivery never looks anything up beyond this machine."""
    started: list[Gateway] = []
    count = 0

    def make(
        config: str = "",
        *,
        start: bool = True,
        server: str = "",
        env: dict[str, str] | None = None,
        listen: tuple[str, ...] = (),
    ) -> Gateway:
        nonlocal count
        count += 1
        workdir = tmp_path / f"gateway{count}"
        workdir.mkdir()
        port = free_port()
        listeners = json.dumps([f"127.0.0.1:{port}", *listen])
        text = (
            textwrap.dedent(f"""\
            [server]
            listen = {listeners}
            state_dir = "{workdir / "state"}"
            hostname = "gateway.test"
            """)
            + textwrap.dedent(server)
            + "\n"
            + textwrap.dedent(config)
        )
        resolver = {
            "SMTPGATE_DNS__NAMESERVERS": f'["127.0.0.1:{dns_zone.port}"]',
            "SMTPGATE_DNS__TIMEOUT": '"1s"',
        }
        gateway = Gateway(workdir, text, port, {**resolver, **(env or {})})
        started.append(gateway)
        return gateway.start() if start else gateway

    yield make
    for gateway in started:
        if gateway.process is not None and gateway.process.poll() is None:
            gateway.stop()


def relay_config(
    port: int,
    *,
    route: str = "upstream",
    retry: str = '["1s"]',
    give_up_after: str = '"5d"',
    relay: str = "",
) -> str:
    """A relay route named `route` to 127.0.0.1:port. `relay` holds more [relays.x] keys;
    unless it says otherwise: plain SMTP, 5 s timeouts, 1 s backoff."""
    lines = [line.strip() for line in relay.strip().splitlines() if line.strip()]
    given = {line.split("=")[0].strip() for line in lines}
    defaults = {"tls": '"none"', "timeout": '"5s"', "backoff": '"1s"'}
    lines += [f"{key} = {value}" for key, value in defaults.items() if key not in given]
    body = "\n".join(lines)
    return (
        f'[relays.{route}]\nhost = "127.0.0.1"\nport = {port}\n{body}\n\n'
        f'[routes.{route}]\nmode = "relay"\nrelay = "{route}"\n'
        f"retry_schedule = {retry}\ngive_up_after = {give_up_after}\n\n"
    )


def own_trace_removed(content: bytes) -> bytes:
    """The content without the Received: field smtpgate puts on top (which must be there)."""
    assert content.startswith(b"Received: from "), content[:80]
    lines = content.split(b"\r\n")
    rest = 1
    while lines[rest][:1] in (b" ", b"\t"):
        rest += 1
    return b"\r\n".join(lines[rest:])


def with_default_route(route: str) -> str:
    return f'default_route = "{route}"\n'
