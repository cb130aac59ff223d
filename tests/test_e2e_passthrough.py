"""Passthrough routes: the client hears the upstream's own replies, and nothing is lost."""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import re
import smtplib
import time

from conftest import (
    Certificates,
    Gateway,
    GatewayFactory,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)


def passthrough_config(port: int, relay: str = 'tls = "none"', retry: str = '["1s"]') -> str:
    return relay_config(port, relay=relay, retry=retry).replace(
        'mode = "relay"\n', 'mode = "relay"\npassthrough = true\n'
    )


MESSAGE = b"Subject: live\r\n\r\nbody\r\n"


def live_gateway(gateway_factory: GatewayFactory, port: int) -> Gateway:
    """A gateway whose default route passes through to the upstream on `port`."""
    return gateway_factory(passthrough_config(port), server=with_default_route("upstream"))


def send_live(port: int) -> tuple[int, bytes]:
    """One message to bob@example.com; the reply to DATA."""
    with smtplib.SMTP("127.0.0.1", port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        client.rcpt("bob@example.com")
        return client.data(MESSAGE)


def test_client_hears_the_upstreams_rcpt_and_data_replies(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(
        rcpt_replies={"gone@example.com": "550 5.1.1 <gone@example.com>: no such user here"}
    )
    gateway = gateway_factory(
        passthrough_config(upstream.port), server=with_default_route("upstream")
    )

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        assert client.rcpt("gone@example.com") == (
            550,
            b"5.1.1 <gone@example.com>: no such user here",
        )
        assert client.rcpt("bob@example.com")[0] == 250
        code, reply = client.data(MESSAGE)

    assert code == 250
    match = re.fullmatch(rb"2\.0\.0 Ok: stored by upstream \[smtpgate ([0-9A-F]+)\]", reply)
    assert match, reply
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.com"]]
    [message] = gateway.queue()
    assert message["queue_id"] == match.group(1).decode()
    assert [(r["address"], r["state"]) for r in message["recipients"]] == [
        ("bob@example.com", "delivered")
    ]


def test_wrong_password_is_seen_at_rcpt(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(starttls=certificates.server_context, users={"me": "right"})
    gateway = gateway_factory(
        passthrough_config(
            upstream.port,
            relay=f"""
            tls = "starttls"
            ca_file = "{certificates.ca_file}"
            username = "me"
            password = "wrong"
        """,
        ),
        server=with_default_route("upstream"),
    )

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        code, reply = client.rcpt("bob@example.com")

    assert code == 451
    assert b"535" in reply and b"check the username and password" in reply
    assert gateway.queue() == []


def test_refused_message_is_refused_to_the_client_and_not_retried(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(data_replies=["554 5.7.1 spam detected"])
    gateway = live_gateway(gateway_factory, upstream.port)

    code, reply = send_live(gateway.port)

    assert code == 554
    assert reply.startswith(b"5.7.1 spam detected [smtpgate ")
    recipient = gateway.recipients()["bob@example.com"]
    assert recipient["state"] == "failed"
    assert "refused to the client at once" in recipient["last_reply"]


def test_temporary_refusal_goes_back_to_the_client_which_keeps_the_message(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(data_replies=["451 4.3.0 try later"])
    gateway = live_gateway(gateway_factory, upstream.port)

    code, _ = send_live(gateway.port)

    assert code == 451
    assert gateway.recipients()["bob@example.com"]["state"] == "cancelled"
    assert upstream.messages == []  # smtpgate does not retry what the client will


def test_upstream_silent_after_data_means_250_and_smtpgate_delivers_later(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(drop_after_data=1)
    gateway = live_gateway(gateway_factory, upstream.port)

    code, reply = send_live(gateway.port)

    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    gateway.wait_for_state("bob@example.com", "delivered")
    assert len(upstream.messages) == 1


def test_mixed_transaction_is_queued_for_the_other_route(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    live, queued = upstreams.start(), upstreams.start()
    gateway = gateway_factory(
        passthrough_config(live.port)
        + relay_config(queued.port, route="other")
        + '[[rules]]\nrecipient_domain = "example.net"\nroute = "other"\n',
        server=with_default_route("upstream"),
    )

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.ehlo("client.test")
        client.mail("a@example.org")
        client.rcpt("bob@example.com")
        client.rcpt("eve@example.net")
        code, reply = client.data(MESSAGE)

    assert code == 250
    assert reply.startswith(b"2.0.0 Ok: queued as ")
    wait_until(lambda: queued.messages, what="the queued route to deliver")
    assert [m.rcpt_tos for m in live.messages] == [["bob@example.com"]]
    assert [m.rcpt_tos for m in queued.messages] == [["eve@example.net"]]


def test_a_scheduled_message_or_a_paused_job_waits_instead_of_passing_through(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = live_gateway(gateway_factory, upstream.port)
    tomorrow = email.utils.format_datetime(
        dt.datetime.now(dt.UTC) + dt.timedelta(days=1), usegmt=True
    )
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail(
            "a@example.org",
            ["bob@example.com"],
            f"X-Smtpgate-Send-At: {tomorrow}\r\nX-Smtpgate-Job: live-work\r\n".encode() + MESSAGE,
        )
    # The RCPT went through to the upstream, but the message waits in the spool.
    time.sleep(2.5)
    assert upstream.messages == []
    assert gateway.recipients()["bob@example.com"]["state"] == "queued"

    gateway.cli("job", "pause", "live-work")
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        client.sendmail(
            "a@example.org", ["carol@example.com"], b"X-Smtpgate-Job: live-work\r\n" + MESSAGE
        )
    assert upstream.messages == []
    gateway.cli("job", "resume", "live-work")
    gateway.wait_for_state("carol@example.com", "delivered")
    assert [m.rcpt_tos for m in upstream.messages] == [["carol@example.com"]]


def test_after_the_job_of_the_day_is_cancelled_mail_still_passes_through(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = live_gateway(gateway_factory, upstream.port)
    assert send_live(gateway.port)[0] == 250
    [today] = json.loads(gateway.cli("jobs", "--json").stdout)
    gateway.cli("job", "cancel", today["name"])

    code, reply = send_live(gateway.port)
    # The upstream's own verdict, at once: the next mail joins a fresh job of the day.
    assert (code, b"stored by upstream" in reply) == (250, True)
    assert len(upstream.messages) == 2
    names = [job["name"] for job in json.loads(gateway.cli("jobs", "--json").stdout)]
    assert f"{today['name']}-2" in names
