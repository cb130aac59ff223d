"""Every relay option end to end: TLS modes, certificates, AUTH, chunks, delay, rate,
slow-down, turbo pipelining and its fallbacks, against real servers on loopback."""

from __future__ import annotations

import itertools
import smtplib
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    Certificates,
    Gateway,
    GatewayFactory,
    Upstream,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)


def submit(gateway: Gateway, count: int, recipients_each: int = 1, prefix: str = "r") -> None:
    """`count` messages over one client connection, distinct recipients throughout."""
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        for n in range(count):
            rcpts = [f"{prefix}{n}-{k}@example.com" for k in range(recipients_each)]
            refused = client.sendmail(
                "a@example.org", rcpts, f"Subject: message {n}\r\n\r\nbody {n}\r\n".encode()
            )
            assert refused == {}


def through(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    relay: str,
    env: dict[str, str] | None = None,
    **options: str,
) -> Gateway:
    return gateway_factory(
        relay_config(upstream.port, relay=relay, **options),
        server=with_default_route("upstream"),
        env=env,
    )


def states(gateway: Gateway) -> Counter[str]:
    return Counter(r["state"] for r in gateway.recipients().values())


def all_delivered(gateway: Gateway, count: int, timeout: float = 20.0) -> None:
    wait_until(
        lambda: states(gateway)["delivered"] == count,
        timeout,
        f"{count} recipients delivered; now {states(gateway)}",
    )


# --- TLS and AUTH -------------------------------------------------------------------------


def test_starttls_with_a_private_ca_and_auth_from_the_environment(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(
        starttls=certificates.server_context, users={"me@example.org": "s3cret"}
    )
    gateway = through(
        gateway_factory,
        upstream,
        f"""
        tls = "starttls"
        ca_file = "{certificates.ca_file}"
        username = "me@example.org"
        password_env = "TEST_RELAY_PASSWORD"
    """,
        env={"TEST_RELAY_PASSWORD": "s3cret"},
    )

    submit(gateway, 1)

    all_delivered(gateway, 1)
    assert len(upstream.messages) == 1
    # aiosmtpd requires STARTTLS before anything else, so arriving proves TLS was used.
    assert any(b"STARTTLS" in read for read in upstream.handler.reads)
    assert not any(b"s3cret" in read for read in upstream.handler.reads)  # only under TLS


def test_implicit_tls_with_auth_from_a_file(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
    tmp_path: Path,
) -> None:
    upstream = upstreams.start(implicit_tls=certificates.server_context, users={"me": "pa ss"})
    secret = tmp_path / "password"
    secret.write_text("pa ss\n")
    gateway = through(
        gateway_factory,
        upstream,
        f"""
        tls = "ssl"
        ca_file = "{certificates.ca_file}"
        username = "me"
        password_file = "{secret}"
    """,
    )

    submit(gateway, 2)

    all_delivered(gateway, 2)
    assert [m.connection for m in upstream.messages] == [1, 1]  # one connection, reused


def test_starttls_refuses_plaintext_when_the_server_does_not_offer_it(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()  # plain SMTP, no STARTTLS
    gateway = through(gateway_factory, upstream, 'tls = "starttls"', retry='["1h"]')

    submit(gateway, 1)

    recipient = gateway.wait_for_state("r0-0@example.com", "deferred")
    assert "does not offer STARTTLS; not sending in plaintext" in recipient["last_reply"]
    assert upstream.messages == []
    assert not any(b"MAIL FROM" in read for read in upstream.handler.reads)


@pytest.mark.parametrize(
    ("context", "says"),
    [
        ("untrusted_context", ["TLS certificate not trusted", "set ca_file"]),
        (
            "misnamed_context",
            ["TLS certificate is for another name", "Set host to a name the certificate is for"],
        ),
    ],
    ids=["untrusted", "another_name"],
)
def test_certificate_trouble_defers_and_names_the_fix(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
    context: str,
    says: list[str],
) -> None:
    upstream = upstreams.start(starttls=getattr(certificates, context))
    gateway = through(
        gateway_factory,
        upstream,
        f'tls = "starttls"\nca_file = "{certificates.ca_file}"',
        retry='["1h"]',
    )

    submit(gateway, 1)

    recipient = gateway.wait_for_state("r0-0@example.com", "deferred")
    for text in says:
        assert text in recipient["last_reply"]
    assert upstream.messages == []


def test_auth_login_when_the_server_offers_only_login(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(
        starttls=certificates.server_context, users={"me": "pw"}, auth_mechanisms=("LOGIN",)
    )
    gateway = through(
        gateway_factory,
        upstream,
        f"""
        tls = "starttls"
        ca_file = "{certificates.ca_file}"
        username = "me"
        password = "pw"
    """,
    )
    submit(gateway, 1)
    all_delivered(gateway, 1)
    assert any(b"AUTH LOGIN" in read for read in upstream.handler.reads)


def test_inline_password_works_but_config_check_warns_and_masks(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    gateway = gateway_factory(
        relay_config(
            1,
            relay="""
        tls = "starttls"
        username = "me"
        password = "hunter2"
    """,
        ),
        start=False,
    )
    result = gateway.cli("config", "check")
    assert "warning: relays.upstream.password is written in the config file" in result.stderr
    assert "hunter2" not in result.stdout
    assert 'password = "********"' in result.stdout


def test_auth_over_plaintext_needs_an_explicit_yes(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(
        relay_config(
            1,
            relay="""
        tls = "none"
        username = "me"
        password_env = "PW"
    """,
        ),
        start=False,
    )
    result = gateway.cli("config", "check", check=False)
    assert result.returncode == 2
    assert "would send the password in the clear" in result.stderr
    assert "allow_plaintext_auth = true" in result.stderr


def test_verify_false_accepts_any_certificate(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(starttls=certificates.untrusted_context)
    gateway = through(gateway_factory, upstream, 'tls = "starttls"\nverify = false')
    submit(gateway, 1)
    all_delivered(gateway, 1)


def test_wrong_password_defers_names_the_relay_and_does_not_storm(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(starttls=certificates.server_context, users={"me": "right"})
    gateway = through(
        gateway_factory,
        upstream,
        f"""
        tls = "starttls"
        ca_file = "{certificates.ca_file}"
        username = "me"
        password = "wrong"
    """,
        retry='["1h"]',
    )

    submit(gateway, 5)

    for n in range(5):
        recipient = gateway.wait_for_state(f"r{n}-0@example.com", "deferred")
        assert recipient["last_reply"].startswith("535 ")
        assert "AUTH as me refused" in recipient["last_reply"]
    errors = [e for e in gateway.events() if e["level"] == "error"]
    assert errors and errors[0]["relay"] == "upstream"
    assert "credentials" in errors[0]["event"]
    # Five messages, but the relay stopped trying after the refusal: no retry storm.
    assert upstream.handler.connections <= 2
    assert upstream.messages == []


def test_password_env_that_is_not_set_stops_startup(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    gateway = gateway_factory(
        relay_config(1, relay='tls = "starttls"\nusername = "me"\npassword_env = "NOPE_PW"'),
        start=False,
    )
    result = gateway.cli("serve", check=False)
    assert result.returncode == 2
    assert "relays.upstream.password_env: $NOPE_PW is not set" in result.stderr


# --- chunks, delay, concurrency -----------------------------------------------------------


def test_chunks_reuse_a_connection_then_reconnect_after_a_delay(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = through(gateway_factory, upstream, 'tls = "none"\nchunk_size = 3\nchunk_delay = "1s"')

    submit(gateway, 7)

    all_delivered(gateway, 7)
    per_connection = Counter(m.connection for m in upstream.messages)
    assert sorted(per_connection.values(), reverse=True) == [3, 3, 1]
    starts = upstream.handler.connected_at
    assert len(starts) == 3
    assert all(later - earlier >= 0.9 for earlier, later in itertools.pairwise(starts))


def test_concurrency_caps_the_connections(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = through(gateway_factory, upstream, 'tls = "none"\nconcurrency = 2')
    submit(gateway, 20)
    all_delivered(gateway, 20)
    assert upstream.handler.most_open <= 2
    assert len(upstream.messages) == 20


def test_upstream_dropping_mid_chunk_loses_and_repeats_nothing(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(drop_at_mail=3)
    gateway = through(gateway_factory, upstream, 'tls = "none"\nchunk_size = 10')

    submit(gateway, 5)

    all_delivered(gateway, 5)
    received = sorted(r for m in upstream.messages for r in m.rcpt_tos)
    assert received == sorted(f"r{n}-0@example.com" for n in range(5))


def test_452_too_many_recipients_sends_the_rest_in_another_transaction(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(max_rcpts=2)
    gateway = through(gateway_factory, upstream, 'tls = "none"')

    submit(gateway, 1, recipients_each=5)

    all_delivered(gateway, 5)
    assert [len(m.rcpt_tos) for m in upstream.messages] == [2, 2, 1]
    assert len({m.connection for m in upstream.messages}) == 1


# --- rate and slow-down -------------------------------------------------------------------


def test_rate_limit_spaces_messages_and_holds_across_a_restart(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = through(gateway_factory, upstream, 'tls = "none"\nrate = "2/min"')

    submit(gateway, 3)

    wait_until(lambda: len(upstream.messages) == 2, what="the first two messages")
    time.sleep(2)
    assert len(upstream.messages) == 2  # the third waits for the minute to pass
    assert gateway.stop() == 0
    gateway.start()
    time.sleep(2)
    assert len(upstream.messages) == 2  # a restart does not reset the count
    assert states(gateway)["delivered"] == 2


def test_slow_down_reply_backs_off_shows_in_queue_and_recovers(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(data_replies=["421 4.7.0 Too many messages, slow down"])
    gateway = through(gateway_factory, upstream, 'tls = "none"\nconcurrency = 2')

    submit(gateway, 1)

    status = wait_until(
        lambda: gateway.relay_statuses().get("upstream"), what="the relay to report backing off"
    )
    assert status["status"].startswith("backing off:")
    assert "1 of 2 connections" in status["status"]
    assert "421 4.7.0 Too many messages, slow down" in status["status"]
    assert "relay upstream: backing off" in gateway.cli("queue").stdout
    all_delivered(gateway, 1)


# --- turbo --------------------------------------------------------------------------------


def test_turbo_pipelines_and_splits_by_max_recipients(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(pipelining=True)
    gateway = through(gateway_factory, upstream, 'tls = "none"\nturbo = true\nmax_recipients = 100')

    submit(gateway, 1, recipients_each=250)

    all_delivered(gateway, 250)
    assert [len(m.rcpt_tos) for m in upstream.messages] == [100, 100, 50]
    pipelined = [
        read
        for read in upstream.handler.reads
        if read.startswith(b"MAIL FROM") and b"RCPT TO" in read
    ]
    assert pipelined, "MAIL and RCPT never arrived in one read"
    assert all(read.endswith(b"DATA\r\n") for read in pipelined)


def test_without_turbo_commands_go_one_at_a_time(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start(pipelining=True)
    gateway = through(gateway_factory, upstream, 'tls = "none"')
    submit(gateway, 1, recipients_each=3)
    all_delivered(gateway, 3)
    assert not any(b"MAIL FROM" in read and b"RCPT TO" in read for read in upstream.handler.reads)


def test_server_that_stalls_when_pipelined_falls_back_without_loss(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    trap = upstreams.start_trap("stall")
    gateway = gateway_factory(
        relay_config(trap.port, relay='tls = "none"\nturbo = true\ntimeout = "1s"'),
        server=with_default_route("upstream"),
    )

    submit(gateway, 2, recipients_each=3)

    all_delivered(gateway, 6)
    received = sorted(r for m in trap.messages for r in m.rcpt_tos)
    assert received == sorted(f"r{n}-{k}@example.com" for n in range(2) for k in range(3))
    assert any(
        e["event"].startswith("upstream is not safe for pipelining") for e in gateway.events()
    )
    assert "turbo off" in gateway.relay_statuses()["upstream"]["status"]


def test_server_that_answers_out_of_step_is_detected(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    trap = upstreams.start_trap("out_of_step")
    gateway = through(gateway_factory, trap, 'tls = "none"\nturbo = true')

    submit(gateway, 1, recipients_each=2)

    all_delivered(gateway, 2)
    assert [sorted(m.rcpt_tos) for m in trap.messages] == [["r0-0@example.com", "r0-1@example.com"]]
    warning = next(
        e for e in gateway.events() if e["event"].startswith("upstream is not safe for pipelining")
    )
    assert "does not answer" in warning["reason"]
