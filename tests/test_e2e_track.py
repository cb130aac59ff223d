"""End to end, track mode: a real client -> `smtpgate serve` -> a real upstream, with the
gateway's clock in a file the test moves forward (SMTPGATE_TEST_CLOCK). Days of windows,
rates and retries run in seconds, and no assertion depends on how fast this machine is:
after each move of the clock the test waits for what must happen, and checks what must
not happen only after the scheduler has had several turns."""

from __future__ import annotations

import datetime as dt
import email
import json
import smtplib
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, GatewayFactory, Upstream, Upstreams, wait_until

# Monday 2030-01-07 10:00 UTC: outside the "mon-fri 22:00-06:00" window.
MONDAY_10 = dt.datetime(2030, 1, 7, 10, 0, tzinfo=dt.UTC).timestamp()
HOUR = 3600.0
TURNS = 2.5  # real seconds: more than two scheduler turns (one a second)


class Clock:
    """The gateway's "now", as a file it reads at every decision."""

    def __init__(self, path: Path, start: float) -> None:
        self.path = path
        self.set(start)

    def set(self, at: float) -> None:
        self.at = at
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(repr(at))
        tmp.replace(self.path)  # the gateway never reads a half-written time

    def advance(self, seconds: float) -> None:
        self.set(self.at + seconds)


@pytest.fixture
def clock(tmp_path: Path) -> Clock:
    return Clock(tmp_path / "clock", MONDAY_10)


def track_gateway(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    clock: Clock,
    route: str,
    *,
    server: str = "",
    bounces_by_relay: bool = True,
) -> Gateway:
    """A gateway whose default route is the track route `news` (body in `route`), sending
    via the relay `up`; mail from <> (bounces) takes the plain relay route `up` to the
    same upstream, unless `bounces_by_relay` is false."""
    config = (
        f'[relays.up]\nhost = "127.0.0.1"\nport = {upstream.port}\ntls = "none"\n'
        'timeout = "5s"\n\n'
        '[routes.up]\nmode = "relay"\nrelay = "up"\n\n'
        f'[routes.news]\nmode = "track"\nvia = "up"\ntimezone = "UTC"\n{route}\n\n'
    )
    if bounces_by_relay:
        config += '[[rules]]\nsender = ""\nroute = "up"\n'

    return gateway_factory(
        config,
        server='default_route = "news"\n' + server,
        env={"SMTPGATE_TEST_CLOCK": str(clock.path)},
    )


def submit(port: int, recipient: str, headers: str = "", sender: str = "app@example.net") -> str:
    """One message; returns the reply to the final dot."""
    body = (
        f"From: {sender or 'nobody@example.net'}\r\nTo: {recipient}\r\n"
        f"Subject: for {recipient}\r\n{headers}\r\nHello.\r\n"
    )
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("client.test")
        client.mail(sender)
        client.rcpt(recipient)
        code, reply = client.data(body.encode())
    return f"{code} {reply.decode()}"


def job_json(gateway: Gateway, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(gateway.cli("job", "show", name, "--json").stdout)
    return data


def arrived(upstream: Upstream) -> list[str]:
    """Recipients of the messages the upstream took, in order (bounces as 'bounce:TO')."""
    return [
        ("bounce:" if m.mail_from in ("", "<>") else "") + ",".join(m.rcpt_tos)
        for m in upstream.messages
    ]


def test_a_job_goes_through_its_window_its_rate_three_retries_and_a_bounce(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start(rcpt_replies={"busy@example.com": "450 4.2.1 mailbox busy"})
    gateway = track_gateway(
        gateway_factory,
        upstream,
        clock,
        'window = ["mon-fri 22:00-06:00"]\nrate = "60/h"\nretry_every = "1h"\n'
        'give_up_after = "4h"\nbounce = true\njob = "winter"',
    )
    for recipient in ("busy@example.com", "a@example.com", "b@example.com", "c@example.com"):
        assert submit(gateway.port, recipient).startswith("250 ")

    # Outside the window nothing goes out, and the job says when it will.
    time.sleep(TURNS)
    assert upstream.messages == []
    job = job_json(gateway, "winter")
    assert job["state"] == "queued"
    assert job["counts"]["queued"] == 4
    assert (
        job["waiting"] == "waiting for the sending window; sending resumes Mon 2030-01-07 22:00 UTC"
    )

    # 22:00: the window opens; 60/h lets one message out per minute, not four at once.
    clock.set(MONDAY_10 + 12 * HOUR)
    wait_until(lambda: gateway.recipients()["busy@example.com"]["attempts"] == 1, 15, "attempt 1")
    time.sleep(TURNS)
    assert arrived(upstream) == []  # the busy recipient was refused at RCPT: no message
    assert job_json(gateway, "winter")["counts"]["delivered"] == 0
    for expected in (["a@example.com"], ["a@example.com", "b@example.com"]):
        clock.advance(60)
        wait_until(lambda e=expected: arrived(upstream) == e, 15, f"{expected}")
        time.sleep(TURNS)
        assert arrived(upstream) == expected
    clock.advance(60)
    wait_until(lambda: len(arrived(upstream)) == 3, 15, "c@example.com")

    # Three retries an hour apart (23:03, 00:03, 01:03); then the 4 h since the job
    # started sending at 22:00 are over (time held back by the window does not count).
    busy = gateway.recipients()["busy@example.com"]
    assert (busy["state"], busy["attempts"]) == ("deferred", 1)
    for attempts in (2, 3):
        clock.advance(HOUR)
        wait_until(
            lambda n=attempts: gateway.recipients()["busy@example.com"]["attempts"] == n,
            15,
            f"attempt {attempts}",
        )
    clock.advance(HOUR)
    failed = gateway.wait_for_state("busy@example.com", "failed")
    assert failed["attempts"] == 4
    assert failed["last_reply"].startswith("gave up after 4h in the queue; last reply: 450")

    # The DSN goes to the sender from <>, by the rules, with the final status.
    wait_until(lambda: "bounce:app@example.net" in arrived(upstream), 15, "the bounce")
    bounce = email.message_from_bytes(upstream.messages[-1].content)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    status = bounce.get_payload()[1].as_string()
    assert "Final-Recipient: rfc822; busy@example.com" in status
    assert "Action: failed" in status
    assert "Status: 4.2.1" in status
    assert "Subject: for busy@example.com" in bounce.get_payload()[2].as_string()

    job = job_json(gateway, "winter")
    assert job["state"] == "done"
    assert job["counts"]["delivered"] == 3
    assert job["counts"]["failed"] == 1
    assert job["top_failures"][0]["count"] == 1
    assert "450 4.2.1 mailbox busy" in job["top_failures"][0]["reply"]
    table = gateway.cli("jobs").stdout
    assert "winter" in table and "done" in table and "100%" in table


def test_cancel_while_a_message_is_on_the_wire_sends_nothing_more(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start(data_delay=2.0)  # each message holds the one connection 2 s
    gateway = track_gateway(gateway_factory, upstream, clock, 'job = "spring"')
    addresses = [f"r{n}@example.com" for n in range(8)]
    for address in addresses:
        assert submit(gateway.port, address).startswith("250 ")
    wait_until(lambda: upstream.handler.datas >= 1, 15, "the first DATA")
    assert "cancelled" in gateway.cli("job", "cancel", "spring").stdout
    time.sleep(TURNS)  # a control acts within a second: what started by now may finish
    started = upstream.handler.datas
    assert started < len(addresses)

    states = {a: gateway.wait_for_state(a, "delivered")["state"] for a in addresses[:started]}
    states |= {a: gateway.wait_for_state(a, "cancelled")["state"] for a in addresses[started:]}
    time.sleep(TURNS)
    assert upstream.handler.datas == started  # nothing more went out
    assert arrived(upstream) == addresses[:started]  # what was confirmed stays delivered
    job = job_json(gateway, "spring")
    assert job["state"] == "cancelled"
    assert job["counts"]["delivered"] == started
    assert job["counts"]["cancelled"] == len(addresses) - started
    # A cancelled job takes no more mail, and the client is told why.
    reply = submit(gateway.port, "late@example.com", "X-Smtpgate-Job: spring\r\n")
    assert reply.startswith("554 5.7.0") and "cancelled" in reply


def test_a_restart_in_the_middle_of_a_job_goes_on_where_it_was(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start()
    gateway = track_gateway(gateway_factory, upstream, clock, 'rate = "1/min"\njob = "summer"')
    for n in range(4):
        assert submit(gateway.port, f"s{n}@example.com").startswith("250 ")
    wait_until(lambda: len(upstream.messages) == 1, 15, "the first message")
    clock.advance(60)
    wait_until(lambda: len(upstream.messages) == 2, 15, "the second message")
    assert gateway.stop() == 0

    gateway.start()
    assert job_json(gateway, "summer")["counts"]["delivered"] == 2
    for count in (3, 4):
        clock.advance(60)
        wait_until(lambda c=count: len(upstream.messages) == c, 15, f"message {count}")
    assert sorted(arrived(upstream)) == [f"s{n}@example.com" for n in range(4)]
    job = json.loads(gateway.cli("jobs", "--json").stdout)
    assert [(j["name"], j["state"], j["counts"]["delivered"]) for j in job] == [
        ("summer", "done", 4)
    ]


def test_held_jobs_wait_for_release_and_pause_stops_sending(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start()
    gateway = track_gateway(gateway_factory, upstream, clock, "hold = true")
    reply = submit(gateway.port, "h1@example.com", "X-Smtpgate-Job: campaign\r\n")
    queue_id = reply.rsplit(" ", 1)[1]
    submit(gateway.port, "h2@example.com", "X-Smtpgate-Job: campaign\r\n")
    time.sleep(TURNS)
    assert upstream.messages == []
    assert job_json(gateway, "campaign")["state"] == "held"
    assert gateway.recipients()["h1@example.com"]["state"] == "held"
    # The campaign can be inspected before it goes: the message as it will be sent.
    body = gateway.cli("queue", "show", queue_id, "--body").stdout
    assert "Subject: for h1@example.com" in body and "X-Smtpgate-Job" not in body

    refused = gateway.cli("job", "pause", "campaign", check=False)
    assert refused.returncode == 1 and "is held; it cannot pause" in refused.stderr
    assert "released: 2 held" in gateway.cli("job", "release", "campaign").stdout
    wait_until(lambda: len(upstream.messages) == 2, 15, "both messages")

    gateway.cli("job", "pause", "campaign")
    submit(gateway.port, "h3@example.com", "X-Smtpgate-Job: campaign\r\n")
    time.sleep(TURNS)
    assert len(upstream.messages) == 2
    assert job_json(gateway, "campaign")["state"] == "paused"
    gateway.cli("job", "resume", "campaign")
    wait_until(lambda: len(upstream.messages) == 3, 15, "the third message")


def test_send_at_schedules_a_message_and_a_garbled_one_is_refused_at_data(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start()
    gateway = track_gateway(gateway_factory, upstream, clock, "")
    reply = submit(gateway.port, "x@example.com", "X-Smtpgate-Send-At: next tuesday\r\n")
    assert reply.startswith("554 5.6.0 X-Smtpgate-Send-At:")
    assert "RFC 3339" in reply

    later = "Mon, 07 Jan 2030 12:00:00 +0000"  # RFC 5322; two hours from the clock's now
    assert submit(gateway.port, "y@example.com", f"X-Smtpgate-Send-At: {later}\r\n")[:3] == "250"
    time.sleep(TURNS)
    assert upstream.messages == []
    clock.set(MONDAY_10 + 2 * HOUR)
    wait_until(lambda: arrived(upstream) == ["y@example.com"], 15, "the scheduled message")
    assert b"X-Smtpgate-Send-At" not in upstream.messages[0].content


def test_a_garbled_send_at_can_be_sent_now_with_a_warning(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start()
    gateway = track_gateway(
        gateway_factory, upstream, clock, "", server='invalid_send_at = "send_now"\n'
    )
    reply = submit(gateway.port, "x@example.com", "X-Smtpgate-Send-At: soonish\r\n")
    assert reply.startswith("250 ")
    wait_until(lambda: arrived(upstream) == ["x@example.com"], 15, "the message")
    warnings = [e for e in gateway.events() if "Send-At ignored" in e.get("event", "")]
    assert warnings and "soonish" in warnings[0]["reason"]


def test_a_bounce_is_never_bounced(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start(rcpt_replies={"gone@example.com": "550 5.1.1 no such user"})
    gateway = track_gateway(
        gateway_factory, upstream, clock, "bounce = true", bounces_by_relay=False
    )
    submit(gateway.port, "gone@example.com", sender="")  # a bounce itself: never bounced
    submit(gateway.port, "gone@example.com", "X-Smtpgate-Job: second\r\n")
    wait_until(lambda: "bounce:app@example.net" in arrived(upstream), 15, "the one bounce")
    time.sleep(TURNS)
    assert arrived(upstream) == ["bounce:app@example.net"]


def test_a_campaign_on_a_relay_does_not_hold_back_other_mail_through_it(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    upstream = upstreams.start(data_delay=0.3)  # one connection, busy with the campaign
    config = (
        f'[relays.up]\nhost = "127.0.0.1"\nport = {upstream.port}\ntls = "none"\n'
        'timeout = "5s"\n\n[routes.up]\nmode = "relay"\nrelay = "up"\n\n'
        '[routes.news]\nmode = "track"\nvia = "up"\njob = "big"\n\n'
        '[[rules]]\nrecipient_domain = "reset.test"\nroute = "up"\n'
    )
    gateway = gateway_factory(
        config,
        server='default_route = "news"\n',
        env={"SMTPGATE_TEST_CLOCK": str(clock.path)},
    )
    campaign = [f"c{n}@example.com" for n in range(20)]
    for address in campaign:
        submit(gateway.port, address)
    wait_until(lambda: len(upstream.messages) >= 2, 15, "the campaign to start")
    submit(gateway.port, "you@reset.test")
    wait_until(lambda: "you@reset.test" in arrived(upstream), 30, "the password reset")
    # It went out within a few turns, not after the twenty campaign messages.
    assert arrived(upstream).index("you@reset.test") < 8
    wait_until(lambda: len(upstream.messages) == 21, 30, "the rest of the campaign")


def test_a_bounce_takes_the_way_the_rules_chose_for_its_sender(
    gateway_factory: GatewayFactory, upstreams: Upstreams, clock: Clock
) -> None:
    """The office's mail goes out through the office relay by a client rule; the notice
    about a failure there goes the same way, not by the default route."""
    default = upstreams.start()
    office = upstreams.start(rcpt_replies={"gone@example.com": "550 5.1.1 no such user"})
    config = (
        f'[relays.up]\nhost = "127.0.0.1"\nport = {default.port}\ntls = "none"\n\n'
        f'[relays.office]\nhost = "127.0.0.1"\nport = {office.port}\ntls = "none"\n\n'
        '[routes.news]\nmode = "track"\nvia = "up"\n\n'
        '[routes.office]\nmode = "relay"\nrelay = "office"\nbounce = true\n\n'
        '[[rules]]\nclient = ["127.0.0.2/32"]\nroute = "office"\n'
    )
    gateway = gateway_factory(
        config,
        server='default_route = "news"\n',
        env={"SMTPGATE_TEST_CLOCK": str(clock.path)},
    )
    with smtplib.SMTP("127.0.0.1", gateway.port, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("clerk@office.example", ["gone@example.com"], b"Subject: s\r\n\r\nb\r\n")
    wait_until(lambda: arrived(office) == ["bounce:clerk@office.example"], 15, "the bounce")
    time.sleep(TURNS)
    assert default.messages == []
