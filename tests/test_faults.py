"""The fault-injection suite: smuggling byte sequences, open-relay tricks, hard limits,
a fault proxy between smtpgate and its upstream, and SIGKILL at every crash point.

docs/faults.md lists which fault each test covers.
"""

from __future__ import annotations

import asyncio
import re
import signal
import smtplib
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import (
    Certificates,
    GatewayFactory,
    Upstream,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)
from test_listener import Dialogue, submit

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


class Client(Dialogue):
    """A raw client, optionally from another loopback address (an "outside" client when
    the gateway trusts only 127.0.0.1)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 10, (source, 0))
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()


# --- smuggling --------------------------------------------------------------------------

SMUGGLED = (
    b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
    b"From: ceo@example.com\r\n\r\nsmuggled\r\n"
)


@pytest.mark.parametrize(
    "fake_end",
    [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r"],
    ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF", "CRLF.CR"],
)
def test_smuggling_sequences_become_one_canonical_message(
    gateway_factory: GatewayFactory, upstreams: Upstreams, fake_end: bytes
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    client = Client(gateway.port)

    reply = client.transaction(
        "a@example.org",
        "b@example.com",
        b"Subject: hi\r\n\r\nbody" + fake_end + SMUGGLED + b".\r\n",
    )
    client.close()

    assert reply.startswith("250 2.0.0")
    wait_until(lambda: upstream.messages, what="the message upstream")
    [message] = upstream.messages  # one message, from the real sender only
    assert message.mail_from == "a@example.org"
    assert not BARE.search(message.content)  # nothing left for a laxer server to split on
    assert b"evil@attacker.example" in message.content  # the "commands" are body text


def test_nul_in_the_message_is_refused(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    client = Client(gateway.port)
    reply = client.transaction("a@example.org", "b@example.com", b"x\r\n\x00.\r\nmore\r\n.\r\n")
    client.close()
    assert reply.startswith("554 5.6.0")
    assert gateway.queue() == []


def test_bare_line_ends_can_be_refused(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server='bare_line_ends = "refuse"\n')
    client = Client(gateway.port)
    reply = client.transaction("a@example.org", "b@example.com", b"a\nb\r\n.\r\n")
    client.close()
    assert reply.startswith("554 5.6.0 Message contains a bare CR or LF")


def test_trace_field_added_and_loops_refused(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    hops = b"Received: from x by y; Sun, 29 Nov 2026 00:00:00 +0000\r\n"
    client = Client(gateway.port)
    looping = client.transaction("a@example.org", "b@example.com", hops * 51 + b"\r\nb\r\n.\r\n")
    assert looping.startswith("554 5.4.0 Too many hops")
    fine = client.transaction("a@example.org", "c@example.com", hops * 2 + b"\r\nb\r\n.\r\n")
    client.close()

    assert fine.startswith("250")
    wait_until(lambda: upstream.messages, what="the message upstream")
    content = upstream.messages[0].content
    assert re.match(
        rb"Received: from client\.test \(\[127\.0\.0\.1\]\)\r\n\tby gateway\.test \(smtpgate\)"
        rb" with ESMTP\r\n\tfor <c@example\.com>;\r\n\t",
        content,
    )
    assert content.count(b"Received:") == 3


# --- addresses and open-relay tricks ------------------------------------------------------

OUTSIDE_TRICKS = [
    "victim@example.com",
    "victim%example.com@gateway.test",
    "example.com!victim@gateway.test",
    '"victim@example.com"@gateway.test',
    "@gateway.test:victim@example.com",
    "victim@example.com@gateway.test",
    "victim@[127.0.0.1]",
    "postmaster",
]


def test_open_relay_tricks_from_an_outside_address_get_5xx(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server='trusted_networks = ["127.0.0.1/32"]\n')
    client = Client(gateway.port, source="127.0.0.2")
    client.send(b"EHLO outside.test\r\n")
    assert client.send(b"MAIL FROM:<spammer@outside.test>\r\n").startswith("250")
    for trick in OUTSIDE_TRICKS:
        reply = client.send(f"RCPT TO:<{trick}>\r\n".encode())
        assert reply.startswith("5"), (trick, reply)
    assert client.send(b"DATA\r\n").startswith("503")
    client.close()
    assert gateway.queue() == []


@pytest.mark.parametrize(
    ("command", "reply"),
    [
        (b"RCPT TO:<>", "501 5.1.3 The null address"),
        (b"RCPT TO:<user>", "553 5.1.3 Address must be local-part@domain"),
        (b"RCPT TO:<a%b.example@c.example>", "553 5.1.3 Routing characters"),
        (b"RCPT TO:<b.example!a@c.example>", "553 5.1.3 Routing characters"),
        (b"RCPT TO:<@relay.example:a@b.example>", "553 5.1.0 Source routes"),
        (b"RCPT TO:<a@-bad-.example>", "553 5.1.3 Bad domain"),
        (b"RCPT TO:<a\x01b@example.com>", "501 5.1.3 Bad address syntax: control"),
        (b"RCPT TO:<a@b@example.com>", "553 5.1.3"),
    ],
)
def test_bad_addresses_are_refused_at_the_command(
    gateway_factory: GatewayFactory, command: bytes, reply: str
) -> None:
    gateway = gateway_factory()
    client = Client(gateway.port)
    client.send(b"EHLO client.test\r\n")
    client.send(b"MAIL FROM:<a@example.org>\r\n")
    assert client.send(command + b"\r\n").startswith(reply)
    client.close()


def test_percent_hack_only_when_allowed(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server="allow_percent_hack = true\n")
    client = Client(gateway.port)
    client.send(b"EHLO client.test\r\n")
    client.send(b"MAIL FROM:<a@example.org>\r\n")
    assert client.send(b"RCPT TO:<a%b.example@c.example>\r\n").startswith("250")
    client.close()


# --- limits -------------------------------------------------------------------------------


def test_connections_per_client_address(gateway_factory: GatewayFactory) -> None:
    """Untrusted clients (here 127.0.0.2 and .3) are limited; trusted ones are not."""
    gateway = gateway_factory(
        server='max_connections_per_client = 2\ntrusted_networks = ["127.0.0.1/32"]\n'
    )
    trusted = [Client(gateway.port) for _ in range(4)]
    assert all(c.greeting.startswith("220") for c in trusted)
    for client in trusted:
        client.close()
    first, second = Client(gateway.port, "127.0.0.2"), Client(gateway.port, "127.0.0.2")
    third = Client(gateway.port, "127.0.0.2")
    assert third.greeting == "421 4.7.0 Too many connections from your address"
    other = Client(gateway.port, source="127.0.0.3")  # another client is still welcome
    assert other.greeting.startswith("220")
    for client in (first, second, third, other):
        client.close()


def test_too_many_errors_close_the_session(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server="max_errors = 3\n")
    client = Client(gateway.port)
    client.send(b"BOGUS\r\n")
    client.send(b"BOGUS\r\n")
    assert client.send(b"BOGUS\r\n").startswith("500")
    assert client.reply() == "421 4.7.0 Too many errors, closing connection"
    assert client.file.readline() == b""
    client.close()


def test_junk_commands_are_limited(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    client = Client(gateway.port)
    replies = [client.send(b"NOOP\r\n") for _ in range(100)]
    assert all(r.startswith("250") for r in replies)
    assert client.send(b"NOOP\r\n").startswith("421 4.7.0 NOOP sent too many times")
    assert client.file.readline() == b""
    client.close()


def test_a_session_that_sends_no_mail_is_cut_off_after_max_commands(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server="max_commands = 30\n")
    client = Client(gateway.port)
    client.send(b"EHLO client.test\r\n")
    for _ in range(9):  # transactions begun and abandoned: 28 commands with the EHLO
        assert client.send(b"MAIL FROM:<a@example.org>\r\n").startswith("250")
        assert client.send(b"RCPT TO:<b@example.com>\r\n").startswith("250")
        assert client.send(b"RSET\r\n").startswith("250")
    assert client.send(b"RSET\r\n").startswith("250")
    assert client.send(b"RSET\r\n").startswith("250")  # the 30th
    assert client.send(b"RSET\r\n") == "421 4.7.0 Too many commands, closing connection"
    assert client.file.readline() == b""
    client.close()
    assert gateway.queue() == []


def test_a_client_sending_many_messages_on_one_connection_is_never_cut_off(
    gateway_factory: GatewayFactory,
) -> None:
    """The count starts again at each accepted message, junk commands too: a pooled
    client that sends NOOP and RSET before each of its 120 messages (600 commands,
    120 NOOPs) is served to the end; the same session idling afterwards is not."""
    gateway = gateway_factory(server="max_commands = 10\n")
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        for n in range(120):
            assert client.noop()[0] == 250
            assert client.rset()[0] == 250
            client.mail("a@example.org")
            client.rcpt(f"r{n}@example.com")
            code, reply = client.data(b"Subject: s\r\n\r\nb\r\n")
            assert code == 250, (n, reply)
        assert [client.noop()[0] for _ in range(10)] == [250] * 10
        assert client.noop() == (421, b"4.7.0 Too many commands, closing connection")
    assert len(gateway.queue()) == 120


def test_a_full_disk_is_refused_at_mail(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server='min_free_space = "1000000GB"\n')
    client = Client(gateway.port)
    client.send(b"EHLO client.test\r\n")
    assert client.send(b"MAIL FROM:<a@example.org>\r\n").startswith("452 4.3.1")
    client.close()


# --- a fault proxy between smtpgate and its upstream -------------------------------------


@dataclass
class FaultProxy:
    """Forwards to the upstream, doing to the traffic what `mode` says:
    pass, delay (each chunk 0.2 s late), trickle (one byte at a time), cut (close after
    `limit` bytes from smtpgate), reset_after_ok (abort right after the upstream's reply
    to the final dot), striptls (hide STARTTLS in the upstream's EHLO reply)."""

    upstream_port: int
    mode: str = "pass"
    limit: int = 0
    port: int = 0
    cuts: int = 0
    servers: list[asyncio.Server] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        sent = 0
        in_data = False

        async def downstream() -> None:
            nonlocal in_data
            while data := await up_reader.read(65536):
                if self.mode == "striptls":
                    data = data.replace(b"250-STARTTLS", b"250-XSTARTTLS")
                if self.mode == "delay":
                    await asyncio.sleep(0.2)
                writer.write(data)
                await writer.drain()
                if self.mode == "reset_after_ok" and in_data and data.startswith(b"250"):
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
            writer.close()

        async def upstream() -> None:
            nonlocal sent, in_data
            while data := await reader.read(65536):
                if data.endswith(b"\r\n.\r\n"):
                    in_data = True
                if self.mode == "cut" and sent + len(data) > self.limit:
                    up_writer.write(data[: max(0, self.limit - sent)])
                    self.cuts += 1
                    writer.transport.abort()
                    up_writer.transport.abort()
                    return
                sent += len(data)
                if self.mode == "trickle":
                    for i in range(len(data)):
                        up_writer.write(data[i : i + 1])
                        await up_writer.drain()
                        await asyncio.sleep(0)
                else:
                    up_writer.write(data)
                    await up_writer.drain()
            up_writer.close()

        await asyncio.gather(downstream(), upstream(), return_exceptions=True)


@pytest.fixture
def fault_proxy(
    upstreams: Upstreams, background_loop: asyncio.AbstractEventLoop
) -> Iterator[tuple[FaultProxy, Upstream]]:
    upstream = upstreams.start()
    proxy = FaultProxy(upstream.port)

    async def start() -> asyncio.Server:
        return await asyncio.start_server(proxy.handle, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), background_loop).result(10)
    proxy.port = server.sockets[0].getsockname()[1]
    yield proxy, upstream

    async def stop() -> None:
        server.close()
        await asyncio.sleep(0.01)

    asyncio.run_coroutine_threadsafe(stop(), background_loop).result(10)


@pytest.mark.parametrize("mode", ["delay", "trickle"])
def test_slow_upstream_paths_still_deliver(
    gateway_factory: GatewayFactory, fault_proxy: tuple[FaultProxy, Upstream], mode: str
) -> None:
    proxy, upstream = fault_proxy
    proxy.mode = mode
    gateway = gateway_factory(relay_config(proxy.port), server=with_default_route("upstream"))
    submit(gateway.port)
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1


def test_cut_in_the_middle_of_data_is_retried_and_delivered_once(
    gateway_factory: GatewayFactory, fault_proxy: tuple[FaultProxy, Upstream]
) -> None:
    proxy, upstream = fault_proxy
    proxy.mode, proxy.limit = "cut", 120  # past MAIL and RCPT, inside the message
    gateway = gateway_factory(relay_config(proxy.port), server=with_default_route("upstream"))
    body = b"Subject: s\r\n\r\n" + b"line of the message\r\n" * 20 + b".\r\n"
    submit(gateway.port, body)

    wait_until(lambda: proxy.cuts, what="the proxy to cut the connection")
    proxy.mode = "pass"
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1


def test_250_then_reset_counts_as_delivered(
    gateway_factory: GatewayFactory, fault_proxy: tuple[FaultProxy, Upstream]
) -> None:
    proxy, upstream = fault_proxy
    proxy.mode = "reset_after_ok"
    gateway = gateway_factory(relay_config(proxy.port), server=with_default_route("upstream"))
    submit(gateway.port)
    recipient = gateway.wait_for_state("b@example.com", "delivered")
    assert recipient["attempts"] == 1
    assert len(upstream.messages) == 1


def test_stripped_starttls_defers_instead_of_plaintext(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
    background_loop: asyncio.AbstractEventLoop,
) -> None:
    upstream = upstreams.start(starttls=certificates.server_context)
    proxy = FaultProxy(upstream.port, mode="striptls")

    async def start() -> asyncio.Server:
        return await asyncio.start_server(proxy.handle, "127.0.0.1", 0)

    server = asyncio.run_coroutine_threadsafe(start(), background_loop).result(10)
    proxy_port = server.sockets[0].getsockname()[1]
    gateway = gateway_factory(
        relay_config(
            proxy_port,
            relay=f'tls = "starttls"\nca_file = "{certificates.ca_file}"',
            retry='["1h"]',
        ),
        server=with_default_route("upstream"),
    )
    submit(gateway.port)
    recipient = gateway.wait_for_state("b@example.com", "deferred")
    assert "does not offer STARTTLS; not sending in plaintext" in recipient["last_reply"]
    assert upstream.messages == []
    background_loop.call_soon_threadsafe(server.close)


# --- SIGKILL at every crash point ---------------------------------------------------------


@pytest.mark.parametrize("point", ["after_commit", "before_reply", "after_upstream_ok"])
def test_killed_at_a_crash_point_loses_nothing(
    gateway_factory: GatewayFactory, upstreams: Upstreams, point: str
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(
        relay_config(upstream.port),
        server=with_default_route("upstream"),
        env={"SMTPGATE_CRASH_AT": point},
    )
    client = Client(gateway.port)
    try:
        reply = client.transaction("a@example.org", "b@example.com", b"s\r\n\r\nb\r\n.\r\n")
    except ConnectionError:
        reply = ""  # died before it could answer
    client.close()
    assert gateway.process is not None
    # 137 from the server's own crash; SIGKILL from its delivery process's, which takes
    # the server down with it, as the power cut it stands for would.
    assert gateway.process.wait(15) in (137, -signal.SIGKILL)
    got_250 = reply.startswith("250")
    assert got_250 == (point == "after_upstream_ok")  # 250 only after the commit

    gateway.env.pop("SMTPGATE_CRASH_AT")
    gateway.start()
    gateway.wait_for_state("b@example.com", "delivered")
    copies = len(upstream.messages)
    # Stored before any reply: delivered at least once. Twice only when the process died
    # between the upstream's 250 and recording it, and the restart says so.
    assert copies == (2 if point == "after_upstream_ok" else 1)
    if copies == 2:
        assert any(
            e["event"] == "released recipients left in flight by a previous run"
            for e in gateway.events()
        )
