"""End to end: a real client -> `smtpgate serve` -> a real upstream SMTP server."""

from __future__ import annotations

import asyncio
import re
import smtplib
import time

from conftest import (
    GatewayFactory,
    MidDataDrop,
    RawScript,
    Upstreams,
    free_port,
    own_trace_removed,
    relay_config,
    wait_until,
    with_default_route,
)

MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"X-Smtpgate-Job: q3-report\r\n"
    b"x-smtpgate-note: folded\r\n"
    b"  continuation line\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    b"..a line that starts with a dot\r\n"
    b"X-Smtpgate-Route: this is body text, not a header\r\n"
)
EXPECTED = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"\r\n"
    b"Gr\xc3\xbc\xc3\x9fe aus K\xc3\xb6ln.\r\n"
    b"..a line that starts with a dot\r\n"
    b"X-Smtpgate-Route: this is body text, not a header\r\n"
)


def send(
    port: int, sender: str, recipients: list[str], content: bytes = MESSAGE
) -> tuple[int, bytes]:
    """One transaction over smtplib; returns the reply to the final dot."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        for recipient in recipients:
            code, reply = client.rcpt(recipient)
            assert code == 250, reply
        code, reply = client.data(content)
        return code, reply


def queue_id_of(reply: bytes) -> str:
    match = re.search(rb"queued as ([0-9A-F]+)", reply)
    assert match, reply
    return match.group(1).decode()


def test_message_arrives_byte_for_byte_without_control_headers(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))

    code, reply = send(gateway.port, "ann@example.org", ["bob@example.com"])

    assert code == 250
    queue_id = queue_id_of(reply)
    wait_until(lambda: upstream.messages, what="the upstream to receive the message")
    received = upstream.messages[0]
    assert received.mail_from == "ann@example.org"
    assert received.rcpt_tos == ["bob@example.com"]
    assert own_trace_removed(received.content) == EXPECTED
    recipient = gateway.wait_for_state("bob@example.com", "delivered")
    assert recipient["attempts"] == 1
    assert recipient["last_reply"] == "250 2.0.0 Ok: stored by upstream"
    assert [m["queue_id"] for m in gateway.queue()] == [queue_id]
    assert any(e.get("queue_id") == queue_id and e["event"] == "accepted" for e in gateway.events())


def test_null_sender_is_relayed_as_null_sender(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    send(gateway.port, "", ["postmaster@example.com"], b"Subject: bounce\r\n\r\nb\r\n")
    wait_until(lambda: upstream.messages, what="the bounce to arrive")
    assert upstream.messages[0].mail_from == "<>"


def test_rules_send_each_recipient_its_own_way(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    corp, news, other = upstreams.start(), upstreams.start(), upstreams.start()
    gateway = gateway_factory(
        relay_config(corp.port, route="corp")
        + relay_config(news.port, route="news")
        + relay_config(other.port, route="other")
        + """
        [[rules]]
        sender = "*@news.example.org"
        route = "news"

        [[rules]]
        recipient_domain = ["example.com", "*.example.com"]
        route = "corp"
        """,
        server=with_default_route("other"),
    )

    send(
        gateway.port,
        "ann@example.org",
        ["bob@example.com", "eve@sales.EXAMPLE.com", "zed@example.net"],
    )
    send(gateway.port, "list@news.example.org", ["bob@example.com"], b"Subject: news\r\n\r\nx\r\n")

    wait_until(
        lambda: len(corp.messages) == 1 and len(other.messages) == 1 and len(news.messages) == 1,
        what="every route to deliver",
    )
    assert corp.messages[0].rcpt_tos == ["bob@example.com", "eve@sales.EXAMPLE.com"]
    assert other.messages[0].rcpt_tos == ["zed@example.net"]
    assert news.messages[0].mail_from == "list@news.example.org"
    routes = {(r["address"], r["route"]) for m in gateway.queue() for r in m["recipients"]}
    assert ("zed@example.net", "other") in routes
    assert ("eve@sales.EXAMPLE.com", "corp") in routes


def test_route_header_selects_a_rule_and_is_removed(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    main, bulk = upstreams.start(), upstreams.start()
    gateway = gateway_factory(
        relay_config(main.port, route="main")
        + relay_config(bulk.port, route="bulk")
        + """
        [[rules]]
        header = "bulk"
        route = "bulk"
        """,
        server=with_default_route("main"),
    )
    send(
        gateway.port,
        "a@example.org",
        ["b@example.com"],
        b"X-Smtpgate-Route: bulk\r\nSubject: s\r\n\r\nbody\r\n",
    )

    wait_until(lambda: bulk.messages, what="the bulk upstream to receive the message")
    assert own_trace_removed(bulk.messages[0].content) == b"Subject: s\r\n\r\nbody\r\n"
    assert main.messages == []


def test_each_recipient_gets_its_own_result(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(
        rcpt_replies={
            "gone@example.com": "550 5.1.1 <gone@example.com>: no such user",
            "full@example.com": "452 4.2.2 mailbox full",
        }
    )
    gateway = gateway_factory(
        relay_config(upstream.port, retry='["1h"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["ok@example.com", "gone@example.com", "full@example.com"])

    gateway.wait_for_state("ok@example.com", "delivered")
    failed = gateway.wait_for_state("gone@example.com", "failed")
    deferred = gateway.wait_for_state("full@example.com", "deferred")
    assert failed["last_reply"] == "550 5.1.1 <gone@example.com>: no such user"
    assert deferred["last_reply"] == "452 4.2.2 mailbox full"
    assert deferred["next_attempt"] is not None
    assert [m.rcpt_tos for m in upstream.messages] == [["ok@example.com"]]


def test_refused_connection_is_deferred_then_delivered(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    port = free_port()  # nothing listens here yet
    gateway = gateway_factory(
        relay_config(port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["b@example.com"])
    deferred = gateway.wait_for_state("b@example.com", "deferred")
    assert "connection refused" in deferred["last_reply"]

    upstream = upstreams.start(port=port)
    delivered = gateway.wait_for_state("b@example.com", "delivered")
    assert delivered["attempts"] >= 2
    assert len(upstream.messages) == 1


def test_421_greeting_is_deferred_then_delivered(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    busy = upstreams.start_protocol(lambda: RawScript(b"421 4.3.2 Service shutting down\r\n"))
    gateway = gateway_factory(
        relay_config(busy.port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["b@example.com"])
    deferred = gateway.wait_for_state("b@example.com", "deferred")
    assert deferred["last_reply"].startswith("421 4.3.2 Service shutting down")

    busy.stop()
    upstream = upstreams.start(port=busy.port)
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1


class ClosesAtSecondRcpt(asyncio.Protocol):
    """Takes MAIL and one RCPT, then answers the next RCPT with 421 and hangs up, as a
    server going down for maintenance does (RFC 5321 3.8)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        self.transport = transport
        self.rcpts = 0
        transport.write(b"220 closing.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        for line in data.split(b"\r\n")[:-1]:
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-closing.test\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT" and self.rcpts == 1:
                self.transport.write(b"421 4.3.2 Shutting down for maintenance\r\n")
                self.transport.close()
                return
            else:
                self.rcpts += verb == b"RCPT"
                self.transport.write(b"250 ok\r\n")


def test_421_to_a_recipient_defers_the_whole_message_then_delivers_it_once(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    closing = upstreams.start_protocol(ClosesAtSecondRcpt)
    gateway = gateway_factory(
        relay_config(closing.port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["first@example.com", "second@example.com"])
    for address in ("first@example.com", "second@example.com"):
        deferred = gateway.wait_for_state(address, "deferred")
        assert deferred["last_reply"] == "421 4.3.2 Shutting down for maintenance"

    closing.stop()
    upstream = upstreams.start(port=closing.port)
    gateway.wait_for_state("first@example.com", "delivered")
    gateway.wait_for_state("second@example.com", "delivered")
    assert [m.rcpt_tos for m in upstream.messages] == [["first@example.com", "second@example.com"]]


class RefusesFirstData(asyncio.Protocol):
    """Refuses the first DATA of each connection with 451 and keeps the transaction
    open, as RFC 5321 allows: MAIL before RSET then gets "503 nested MAIL", as Postfix
    answers. Records the recipients of what it takes, and the connections it saw."""

    connections = 0

    def __init__(self, delivered: list[list[str]]) -> None:
        self.delivered = delivered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        RefusesFirstData.connections += 1
        self.transport = transport
        self.buffer = b""
        self.rcpts: list[str] | None = None  # in a transaction
        self.refused = False
        self.in_data = False
        transport.write(b"220 picky.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.delivered.append(self.rcpts or [])
                self.rcpts = None
                self.transport.write(b"250 2.0.0 taken\r\n")
                continue
            line, found, rest = self.buffer.partition(b"\r\n")
            if not found:
                return
            self.buffer = rest
            self.transport.write(self.reply(line))

    def reply(self, line: bytes) -> bytes:
        verb = line[:4].upper()
        if verb == b"EHLO":
            return b"250-picky.test\r\n250 8BITMIME\r\n"
        if verb == b"MAIL":
            if self.rcpts is not None:
                return b"503 5.5.1 Error: nested MAIL command\r\n"
            self.rcpts = []
        elif verb == b"RCPT" and self.rcpts is not None:
            self.rcpts.append(line.decode().split("<")[1].rstrip(">"))
        elif verb == b"RSET":
            self.rcpts = None
        elif verb == b"DATA":
            if not self.refused:
                self.refused = True
                return b"451 4.3.0 Try again later\r\n"
            self.in_data = True
            return b"354 go ahead\r\n"
        return b"250 ok\r\n"


def test_a_refused_data_is_reset_so_the_next_message_goes_on_the_same_connection(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    delivered: list[list[str]] = []
    RefusesFirstData.connections = 0
    picky = upstreams.start_protocol(lambda: RefusesFirstData(delivered))
    gateway = gateway_factory(
        relay_config(picky.port, retry='["2s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["first@example.com"])
    deferred = gateway.wait_for_state("first@example.com", "deferred")
    assert deferred["last_reply"] == "451 4.3.0 Try again later"
    send(gateway.port, "a@example.org", ["second@example.com"])

    gateway.wait_for_state("second@example.com", "delivered")
    gateway.wait_for_state("first@example.com", "delivered")
    assert sorted(delivered) == [["first@example.com"], ["second@example.com"]]
    assert RefusesFirstData.connections == 1


def test_450_to_data_is_deferred_then_delivered_once(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(data_replies=["450 4.7.1 greylisted, try again later"])
    gateway = gateway_factory(
        relay_config(upstream.port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["b@example.com"])

    delivered = gateway.wait_for_state("b@example.com", "delivered")
    assert delivered["attempts"] == 2
    assert len(upstream.messages) == 1
    assert any(e.get("reply") == "450 4.7.1 greylisted, try again later" for e in gateway.events())


def test_connection_dropped_mid_data_is_deferred_then_delivered(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    flaky = upstreams.start_protocol(MidDataDrop)
    gateway = gateway_factory(
        relay_config(flaky.port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["b@example.com"])
    deferred = gateway.wait_for_state("b@example.com", "deferred")
    assert "connection lost during DATA" in deferred["last_reply"]

    flaky.stop()
    upstream = upstreams.start(port=flaky.port)
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1


def test_dropped_after_final_dot_is_logged_as_outcome_unknown(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(drop_after_data=1)
    gateway = gateway_factory(
        relay_config(upstream.port, retry='["1s"]'), server=with_default_route("upstream")
    )

    send(gateway.port, "a@example.org", ["b@example.com"])

    gateway.wait_for_state("b@example.com", "delivered")
    assert any(e["event"] == "outcome unknown" for e in gateway.events())
    assert len(upstream.messages) == 1


def test_sigkill_right_after_250_then_restart_delivers_once(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    port = free_port()  # the upstream is down while the gateway accepts
    gateway = gateway_factory(
        relay_config(port, retry='["1s"]'), server=with_default_route("upstream")
    )

    code, reply = send(gateway.port, "a@example.org", ["b@example.com"])
    assert code == 250
    gateway.kill()

    upstream = upstreams.start(port=port)
    gateway.start()
    gateway.wait_for_state("b@example.com", "delivered")
    time.sleep(2)  # two more retry periods: nothing is sent twice
    assert len(upstream.messages) == 1
    assert own_trace_removed(upstream.messages[0].content) == EXPECTED
    assert [m["queue_id"] for m in gateway.queue()] == [queue_id_of(reply)]


def test_killed_while_sending_is_sent_again_after_restart(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    stalling = upstreams.start(stall_data=True)
    gateway = gateway_factory(
        relay_config(stalling.port, retry='["1s"]'), server=with_default_route("upstream")
    )
    send(gateway.port, "a@example.org", ["b@example.com"])
    wait_until(lambda: stalling.handler.connections, what="the delivery to start")
    gateway.wait_for_state("b@example.com", "sending")
    gateway.kill()

    stalling.stop()
    upstream = upstreams.start(port=stalling.port)
    gateway.start()
    recipient = gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1
    assert recipient["attempts"] == 1  # the interrupted attempt left no result
    assert any(
        e["event"] == "released recipients left in flight by a previous run"
        for e in gateway.events()
    )


def test_queue_retry_sends_deferred_mail_now_on_a_running_server(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    port = free_port()
    gateway = gateway_factory(
        relay_config(port, retry='["1h"]'), server=with_default_route("upstream")
    )
    _, reply = send(gateway.port, "a@example.org", ["b@example.com"])
    gateway.wait_for_state("b@example.com", "deferred")
    upstream = upstreams.start(port=port)

    time.sleep(1.5)  # the retry is an hour away: nothing happens by itself
    assert upstream.messages == []
    result = gateway.cli("queue", "retry", queue_id_of(reply))

    assert result.stdout.startswith("1 deferred recipients are due now")
    gateway.wait_for_state("b@example.com", "delivered", timeout=5)
    assert len(upstream.messages) == 1


def test_gives_up_when_the_retry_lifetime_is_over(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    gateway = gateway_factory(
        relay_config(free_port(), retry='["1s"]', give_up_after='"2s"'),
        server=with_default_route("upstream"),
    )
    send(gateway.port, "a@example.org", ["b@example.com"])

    failed = gateway.wait_for_state("b@example.com", "failed")
    assert failed["last_reply"].startswith("gave up after 2s in the queue; last reply:")
    assert "connection refused" in failed["last_reply"]


def test_queue_show_prints_the_stored_message(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    _, reply = send(gateway.port, "a@example.org", ["b@example.com", "c@example.com"])
    queue_id = queue_id_of(reply)

    shown = gateway.cli("queue", "show", queue_id, "--body").stdout

    assert f"queue id:  {queue_id}" in shown
    assert "b@example.com" in shown and "c@example.com" in shown
    assert "Subject: quarterly numbers" in shown
    assert "X-Smtpgate-Job" not in shown
    missing = gateway.cli("queue", "show", "NOSUCHID", check=False)
    assert missing.returncode == 1
    assert "no message 'NOSUCHID'" in missing.stderr
