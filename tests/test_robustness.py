"""Faults around the data path: shutdown mid-delivery, a locked spool, slow clients,
bursts of connections, and addresses that could not be stored or sent on."""

from __future__ import annotations

import datetime as dt
import signal
import socket
import sqlite3
import time

from conftest import (
    GatewayFactory,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)
from test_listener import Dialogue, submit


def test_sigterm_during_a_stalled_delivery_stops_and_the_restart_sends_it(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    stalling = upstreams.start(stall_data=True)
    gateway = gateway_factory(relay_config(stalling.port), server=with_default_route("upstream"))
    assert submit(gateway.port).startswith("250")
    gateway.wait_for_state("b@example.com", "sending")

    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    assert gateway.process.wait(40) == 0  # the grace period, then the stalled one is cut

    stalling.stop()
    upstream = upstreams.start(port=stalling.port)
    gateway.start()
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1


def test_a_spool_locked_by_another_process_delays_but_does_not_stop_delivery(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    # Due in a moment: what is due is read without the lock, then leased with it.
    due = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.8)).isoformat()
    body = f"X-Smtpgate-Send-At: {due}\r\nSubject: s\r\n\r\nb\r\n.\r\n".encode()
    assert submit(gateway.port, body).startswith("250")
    blocker = sqlite3.connect(gateway.state_dir / "spool.db", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # longer than the gateway's 10 s busy timeout
    time.sleep(13)
    assert upstream.messages == []
    blocker.execute("ROLLBACK")
    blocker.close()

    wait_until(lambda: upstream.messages, timeout=15, what="delivery after the lock")
    assert any(
        e["event"] == "cannot lease due work from the spool; trying again" for e in gateway.events()
    )
    assert submit(gateway.port).startswith("250")  # and what comes after goes on as usual
    wait_until(lambda: len(upstream.messages) == 2, timeout=15, what="the next delivery")


def test_slow_steady_upload_is_not_cut_off_by_the_idle_timer(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server='idle_timeout = "1s"\n')
    talk = Dialogue(gateway.port)
    for command in (
        b"EHLO c.test\r\n",
        b"MAIL FROM:<a@example.org>\r\n",
        b"RCPT TO:<b@example.com>\r\n",
    ):
        talk.send(command)
    assert talk.send(b"DATA\r\n").startswith("354")
    for n in range(6):  # 2.4 s of DATA, never 1 s silent
        talk.sock.sendall(b"line %d\r\n" % n)
        time.sleep(0.4)
    assert talk.send(b".\r\n").startswith("250 2.0.0")
    talk.close()


def test_a_burst_of_connections_respects_the_limit(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(server="max_connections = 2\n")
    sockets = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(20)]
    greetings = []
    for sock in sockets:  # all kept open: uvloop may accept a burst in several batches
        sock.settimeout(5)
        greetings.append(sock.recv(100))
    for sock in sockets:
        sock.close()
    assert sum(g.startswith(b"220") for g in greetings) <= 2
    assert sum(g.startswith(b"421 4.7.0") for g in greetings) >= 18


def test_addresses_that_cannot_go_on_are_refused_at_the_command(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO c.test\r\n")
    assert talk.send("MAIL FROM:<j\u00f6rg@example.org>\r\n".encode()).startswith("553 5.6.7")
    assert talk.send(b"MAIL FROM:<a@example.org>\r\n").startswith("250")
    assert talk.send("RCPT TO:<\u00e4nne@example.com>\r\n".encode()).startswith("553 5.6.7")
    talk.send(b"RSET\r\n")
    talk.send(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    assert talk.send(b"RCPT TO:<c\xe91@example.com>\r\n").startswith("501 5.1.3")
    talk.close()
    assert gateway.queue() == []


def test_smtputf8_flag_with_ascii_addresses_reaches_an_upstream_without_it(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(smtputf8=False)
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    talk = Dialogue(gateway.port)
    talk.send(b"EHLO c.test\r\n")
    talk.send(b"MAIL FROM:<a@example.org> SMTPUTF8\r\n")
    talk.send(b"RCPT TO:<b@example.com>\r\n")
    talk.send(b"DATA\r\n")
    assert talk.send(b"Subject: s\r\n\r\nb\r\n.\r\n").startswith("250")
    talk.close()
    gateway.wait_for_state("b@example.com", "delivered")
    assert len(upstream.messages) == 1
