"""Faults a review found in the pools, pipelining and passthrough, kept from coming back."""

from __future__ import annotations

import smtplib
import time

from conftest import (
    GatewayFactory,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)
from test_e2e_passthrough import MESSAGE, passthrough_config
from test_listener import Dialogue


def test_silence_after_the_dot_on_a_reused_connection_is_not_resent_at_once(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(drop_data_number=2)
    gateway = gateway_factory(
        relay_config(upstream.port, retry='["1h"]'), server=with_default_route("upstream")
    )
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail("a@example.org", ["one@example.com"], b"Subject: 1\r\n\r\nb\r\n")
        gateway.wait_for_state("one@example.com", "delivered")
        client.sendmail("a@example.org", ["two@example.com"], b"Subject: 2\r\n\r\nb\r\n")

    second = gateway.wait_for_state("two@example.com", "deferred")
    assert "outcome unknown" in second["last_reply"]
    assert any(e["event"] == "outcome unknown" for e in gateway.events())
    assert upstream.handler.connections == 1  # not sent again on a new connection
    assert len(upstream.messages) == 1


def test_pipelining_that_breaks_after_the_first_transaction_keeps_its_results(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    trap = upstreams.start_trap("stall_second")
    gateway = gateway_factory(
        relay_config(trap.port, relay='turbo = true\nmax_recipients = 2\ntimeout = "1s"'),
        server=with_default_route("upstream"),
    )
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail(
            "a@example.org", [f"r{n}@example.com" for n in range(4)], b"Subject: s\r\n\r\nb\r\n"
        )

    wait_until(
        lambda: all(r["state"] == "delivered" for r in gateway.recipients().values()),
        what="every recipient delivered",
    )
    received = sorted(r for m in trap.messages for r in m.rcpt_tos)
    assert received == [f"r{n}@example.com" for n in range(4)]  # each exactly once


def test_passthrough_client_waits_for_a_slow_upstream_without_idle_timeout(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(data_delay=2.0)
    gateway = gateway_factory(
        passthrough_config(upstream.port),
        server='default_route = "upstream"\nidle_timeout = "1s"\n',
    )
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        client.rcpt("bob@example.com")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    assert gateway.recipients()["bob@example.com"]["state"] == "delivered"


def test_passthrough_client_that_leaves_during_data_leaves_nothing_in_flight(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(data_delay=1.0)
    gateway = gateway_factory(
        passthrough_config(upstream.port), server=with_default_route("upstream")
    )
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO client.test\r\n")
    talk.send(b"MAIL FROM:<a@example.org>\r\n")
    talk.send(b"RCPT TO:<bob@example.com>\r\n")
    talk.send(b"DATA\r\n")
    talk.sock.sendall(MESSAGE + b".\r\n")
    time.sleep(0.2)
    talk.close()  # gone before the upstream answers

    recipient = gateway.wait_for_state("bob@example.com", "delivered")
    assert recipient["attempts"] == 1
    assert len(upstream.messages) == 1
    wait_until(lambda: upstream.handler.open_connections == 0, what="the upstream session closed")


def test_a_stalled_relay_does_not_hold_back_another_route(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    slow, fast = upstreams.start(), upstreams.start()
    gateway = gateway_factory(
        relay_config(slow.port, route="slow", relay='rate = "1/min"')
        + relay_config(fast.port, route="fast")
        + '[[rules]]\nrecipient_domain = "slow.example"\nroute = "slow"\n',
        server=with_default_route("fast"),
    )
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(10):
            client.sendmail("a@example.org", [f"s{n}@slow.example"], b"Subject: s\r\n\r\nb\r\n")
        client.sendmail("a@example.org", ["f@fast.example"], b"Subject: f\r\n\r\nb\r\n")

    gateway.wait_for_state("f@fast.example", "delivered", timeout=10)
    assert len(slow.messages) == 1  # the rate holds: one a minute


def test_recipients_past_the_limit_are_not_client_errors(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server="max_recipients = 2\nmax_errors = 3\n")
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        codes = [client.rcpt(f"r{n}@example.com")[0] for n in range(6)]
        assert codes == [250, 250, 452, 452, 452, 452]
        assert client.data(b"Subject: s\r\n\r\nb\r\n")[0] == 250
