"""The listener as clients see it: extensions, limits, bad input, and the replies to them."""

from __future__ import annotations

import asyncio
import logging
import smtplib
import socket
import time
from pathlib import Path

import aiosmtpd.smtp
import aiosmtplib
import pytest
import structlog
from conftest import GatewayFactory, wait_until

from smtpgate import configfile
from smtpgate.config import Config
from smtpgate.eventloop import new_event_loop
from smtpgate.listener import Connections, Handler, protocol_factory
from smtpgate.policy import RelayPolicy
from smtpgate.router import Envelope, Router
from smtpgate.spool import NewMessage, SqliteSpool


class Dialogue:
    """A raw SMTP client: send exact bytes, read whole replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("closed: " + " | ".join(lines))
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> str:
        self.sock.sendall(data)
        return self.reply()

    def transaction(self, sender: str, recipient: str, data: bytes) -> str:
        """EHLO, MAIL, RCPT, DATA; `data` must end with the final dot. The last reply."""
        self.send(b"EHLO client.test\r\n")
        self.send(f"MAIL FROM:<{sender}>\r\n".encode())
        self.send(f"RCPT TO:<{recipient}>\r\n".encode())
        assert self.send(b"DATA\r\n").startswith("354")
        return self.send(data)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def submit(port: int, body: bytes = b"Subject: s\r\n\r\nb\r\n.\r\n") -> str:
    """One message from a@example.org to b@example.com over a raw connection."""
    talk = Dialogue(port)
    try:
        return talk.transaction("a@example.org", "b@example.com", body)
    finally:
        talk.close()


def messages_in_queue(gateway: object) -> int:
    return len(gateway.queue())  # type: ignore[attr-defined]


def test_command_lines_aiosmtpd_would_not_log_are_not_masked_and_logged_ones_are(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The listener spares aiosmtpd masking command lines its logger drops (mail.log
    stays at warning); a line it does write (mail.log lowered to debug by hand) still
    hides the AUTH argument."""
    masked: list[bytes] = []
    mask = aiosmtpd.smtp.sanitize
    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", lambda text: masked.append(text) or mask(text))
    mail_log = logging.getLogger("mail.log")
    line = b"AUTH PLAIN AGFsaWNlAHMzY3JldA==\r\n"
    caplog.set_level(logging.WARNING, logger="mail.log")
    for write in (mail_log.debug, mail_log.info):
        aiosmtpd.smtp.sanitized_log(write, "%r >> %r", ("127.0.0.1", 5), line)
    assert masked == []
    assert caplog.text == ""

    caplog.set_level(logging.DEBUG, logger="mail.log")
    for write in (mail_log.debug, mail_log.info):
        aiosmtpd.smtp.sanitized_log(write, "%r >> %r", ("127.0.0.1", 5), line)
    assert masked == [line, line]
    assert caplog.text.count("AUTH PLAIN ********") == 2
    assert "AGFsaWNl" not in caplog.text


def test_ehlo_advertises_the_extensions(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server='max_message_size = "1MB"\n')
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        assert client.esmtp_features["size"] == str(1024 * 1024)
        for extension in ("8bitmime", "smtputf8", "enhancedstatuscodes"):
            assert extension in client.esmtp_features
        assert client.noop() == (250, b"2.0.0 OK")


def test_our_rcpt_and_data_hooks_are_the_ones_aiosmtpd_calls(
    gateway_factory: GatewayFactory,
) -> None:
    """aiosmtpd answers 250 and stores nothing when it finds no handle_DATA; prove ours ran:
    the RCPT reply is ours, and the DATA reply's queue id is in the spool."""
    gateway = gateway_factory()
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        assert client.mail("a@example.org") == (250, b"2.1.0 Sender OK")
        assert client.rcpt("b@example.com") == (250, b"2.1.5 Recipient OK")
        code, reply = client.data(b"Subject: hooks\r\n\r\nbody\r\n")
    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    queue_id = reply.split()[-1].decode()
    assert [m["queue_id"] for m in gateway.queue()] == [queue_id]


def test_oversize_message_is_refused_with_552_and_not_stored(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server='max_message_size = "10KB"\n')
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        # Declared too big at MAIL (RFC 1870):
        code, reply = client.mail("a@example.org", ["SIZE=20000"])
        assert (code, reply[:5]) == (552, b"5.3.4")
        # Not declared, but too big when it arrives:
        client.mail("a@example.org")
        client.rcpt("b@example.com")
        code, reply = client.data(
            b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 20 + (b"y" * 500 + b"\r\n") * 30
        )
        assert (code, reply[:5]) == (552, b"5.3.4")
        assert b"10240 bytes" in reply
        # The session is still usable afterwards:
        client.mail("a@example.org")
        client.rcpt("b@example.com")
        assert client.data(b"Subject: small\r\n\r\nok\r\n")[0] == 250
    assert len(gateway.queue()) == 1


def test_too_many_recipients_get_452_and_the_rest_are_kept(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server="max_recipients = 3\n")
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        replies = [client.rcpt(f"r{n}@example.com") for n in range(5)]
        assert [code for code, _ in replies] == [250, 250, 250, 452, 452]
        assert replies[3][1] == b"4.5.3 Too many recipients"
        assert client.data(b"Subject: s\r\n\r\nb\r\n")[0] == 250
    [message] = gateway.queue()
    assert [r["address"] for r in message["recipients"]] == [
        "r0@example.com",
        "r1@example.com",
        "r2@example.com",
    ]


def test_overlong_line_is_refused_and_nothing_stored(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    talk.send(b"MAIL FROM:<a@example.org>\r\n")
    talk.send(b"RCPT TO:<b@example.com>\r\n")
    assert talk.send(b"DATA\r\n").startswith("354")
    # RFC 5321 4.5.3.1.6: 998 octets + CRLF is the most a line may hold.
    reply = talk.send(b"Subject: long\r\n\r\n" + b"z" * 2000 + b"\r\n.\r\n")
    assert reply.startswith("500 5.5.2 Line too long")
    assert talk.send(b"QUIT\r\n").startswith("221")
    talk.close()
    assert gateway.queue() == []


def test_commands_out_of_order_get_503(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n").startswith("503 5.5.1")
    talk.send(b"EHLO client.test\r\n")
    assert talk.send(b"RCPT TO:<b@example.com>\r\n").startswith("503 5.5.1")
    assert talk.send(b"DATA\r\n").startswith("503 5.5.1")
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n").startswith("250")
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n").startswith("503 5.5.1")
    assert talk.send(b"BOGUS\r\n").startswith("500 5.5.2")
    talk.close()


def test_client_that_disconnects_mid_data_leaves_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    talk.send(b"MAIL FROM:<a@example.org>\r\n")
    talk.send(b"RCPT TO:<b@example.com>\r\n")
    talk.send(b"DATA\r\n")
    talk.sock.sendall(b"Subject: half\r\n\r\nhalf a message\r\n")
    talk.close()
    time.sleep(0.5)
    assert gateway.queue() == []
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:  # still serving
        assert client.noop()[0] == 250


def test_idle_client_gets_421_and_is_disconnected(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server='idle_timeout = "1s"\n')
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    started = time.monotonic()
    assert talk.reply().startswith("421 4.4.2")
    assert talk.file.readline() == b""
    assert time.monotonic() - started < 10
    talk.close()


def test_connections_over_the_limit_get_421(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server="max_connections = 2\n")
    first, second = Dialogue(gateway.port), Dialogue(gateway.port)
    assert first.greeting.startswith("220") and second.greeting.startswith("220")
    third = Dialogue(gateway.port)
    assert third.greeting == "421 4.7.0 Too many connections, try again later"
    assert third.file.readline() == b""  # and closed
    third.close()
    first.send(b"QUIT\r\n")
    first.close()
    wait_until(lambda: _greets(gateway.port), what="a free slot after a client left")
    second.close()


def _greets(port: int) -> bool:
    talk = Dialogue(port)
    talk.close()
    return talk.greeting.startswith("220")


def test_smtputf8_and_null_sender_are_accepted(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    assert talk.send("MAIL FROM:<j\u00f6rg@b\u00fccher.example> SMTPUTF8\r\n".encode()).startswith(
        "250"
    )
    assert talk.send("RCPT TO:<\u00e4nne@example.com>\r\n".encode()).startswith("250")
    talk.send(b"DATA\r\n")
    assert talk.send(b"Subject: utf8\r\n\r\nb\r\n.\r\n").startswith("250 2.0.0")
    assert talk.send(b"MAIL FROM:<>\r\n").startswith("250")
    talk.send(b"RCPT TO:<bounce@example.com>\r\n")
    talk.send(b"DATA\r\n")
    assert talk.send(b"Subject: bounce\r\n\r\nb\r\n.\r\n").startswith("250 2.0.0")
    talk.close()
    senders = sorted(m["sender"] for m in gateway.queue())
    assert senders == ["", "j\u00f6rg@b\u00fccher.example"]


# --- in-process: faults inside smtpgate -------------------------------------------------


class ExplodingRouter(Router):
    def route(self, envelope: Envelope, recipient: str) -> str:
        raise RuntimeError("secret internals")


class FullDiskSpool(SqliteSpool):
    async def store(self, message: NewMessage) -> str:
        raise OSError(28, "No space left on device")


def in_process_handler(config: Config, spool: SqliteSpool, router: Router | None = None) -> Handler:
    """The listener's handler as the server builds it, on this process's event loop."""
    return Handler(
        config,
        spool,
        router or Router(config),
        RelayPolicy(config.server.trusted_networks),
        on_stored=lambda: None,
    )


async def _one_transaction(config: Config, handler: Handler) -> tuple[int, str]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        protocol_factory(config, handler, Connections(10, 10)), "127.0.0.1", 0
    )
    port = server.sockets[0].getsockname()[1]
    try:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        async with client:
            await client.mail("a@example.org")
            await client.rcpt("b@example.com")
            try:
                response = await client.data(b"Subject: s\r\n\r\nb\r\n")
            except aiosmtplib.SMTPDataError as error:
                return error.code, error.message
            return response.code, response.message
    finally:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("fault", ["router raises", "disk full"])
def test_faults_inside_smtpgate_answer_451_without_leaking(tmp_path: Path, fault: str) -> None:
    config = configfile.validate(
        {"server": {"state_dir": str(tmp_path), "hostname": "gateway.test"}}
    )

    async def scenario() -> tuple[int, str]:
        spool_class = FullDiskSpool if fault == "disk full" else SqliteSpool
        spool = spool_class.open(tmp_path / "spool.db")
        router = ExplodingRouter(config) if fault == "router raises" else Router(config)
        try:
            return await _one_transaction(config, in_process_handler(config, spool, router))
        finally:
            await spool.close()

    with structlog.testing.capture_logs() as logged:
        code, message = asyncio.run(scenario())

    assert code == 451
    assert message.startswith("4.3.0 ")
    assert "secret internals" not in message and "No space" not in message
    [error] = [e for e in logged if e["log_level"] == "error"]
    assert error.get("exc_info"), error  # the traceback goes to the log, not the client


def test_commands_pipelined_after_the_final_dot_are_answered(
    gateway_factory: GatewayFactory,
) -> None:
    """RFC 2920: a client may send the next transaction's commands right behind the final
    dot. The DATA reader reads past the dot in large pieces and must give them back."""
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    talk.send(b"MAIL FROM:<a@example.org>\r\n")
    talk.send(b"RCPT TO:<b@example.com>\r\n")
    assert talk.send(b"DATA\r\n").startswith("354")
    first = talk.send(
        b"Subject: one\r\n\r\n.first\r\n.\r\n"
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<c@example.com>\r\nDATA\r\n"
    )
    assert first.startswith("250 2.0.0 Ok: queued as")
    assert talk.reply().startswith("250 2.1.0")
    assert talk.reply().startswith("250 2.1.5")
    assert talk.reply().startswith("354")
    assert talk.send(b"Subject: two\r\n\r\nsecond\r\n.\r\nQUIT\r\n").startswith("250 2.0.0")
    assert talk.reply().startswith("221")
    talk.close()
    assert sorted(r["address"] for m in gateway.queue() for r in m["recipients"]) == [
        "b@example.com",
        "c@example.com",
    ]


def _hang_up_at_once(port: int) -> None:
    """Connect and close while the event loop is not looking (a port probe): the
    gateway accepts the connection and reads its end in the same turn."""
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    time.sleep(0.2)


def test_a_client_gone_before_its_session_began_is_not_counted_open(tmp_path: Path) -> None:
    """Otherwise shutdown waits the whole grace period (10 s) for a session that will
    never end: seen with a probe that connected while the gateway was starting."""
    config = configfile.validate(
        {"server": {"state_dir": str(tmp_path), "hostname": "gateway.test"}}
    )
    connections = Connections(10, 10)

    async def scenario() -> None:
        spool = SqliteSpool.open(tmp_path / "spool.db")
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            protocol_factory(config, in_process_handler(config, spool), connections),
            "127.0.0.1",
            0,
        )
        try:
            _hang_up_at_once(server.sockets[0].getsockname()[1])
            await asyncio.sleep(0.1)  # the loop accepts it
            async with asyncio.timeout(5):
                await connections.idle.wait()
            assert connections.open == 0
        finally:
            server.close()
            await server.wait_closed()
            await spool.close()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(scenario())
