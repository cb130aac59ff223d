"""`smtpgate check ROUTE` and `smtpgate send`, against real upstreams with real TLS."""

from __future__ import annotations

import re

from conftest import (
    Certificates,
    GatewayFactory,
    Upstreams,
    free_port,
    relay_config,
    wait_until,
    with_default_route,
)


def secure_relay(port: int, certificates: Certificates, password: str = "s3cret") -> str:
    return relay_config(
        port,
        relay=f"""
        tls = "starttls"
        ca_file = "{certificates.ca_file}"
        username = "me"
        password = "{password}"
    """,
    )


def test_check_reports_each_step_and_a_verdict(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(starttls=certificates.server_context, users={"me": "s3cret"})
    gateway = gateway_factory(secure_relay(upstream.port, certificates), start=False)

    result = gateway.cli("check", "upstream", "--send-to", "ops@example.com")

    lines = dict(re.findall(r"^(\w+)\s+(ok  |FAIL)", result.stdout, re.MULTILINE))
    assert lines == {
        "route": "ok  ",
        "connect": "ok  ",
        "tls": "ok  ",
        "auth": "ok  ",
        "send": "ok  ",
    }
    assert re.search(
        r"^tls\s+ok\s+TLSv1\.[23] .*valid until \d{4}-\d\d-\d\d", result.stdout, re.MULTILINE
    )
    assert "auth     ok    as me" in result.stdout
    assert result.stdout.rstrip().endswith("verdict  route upstream works")
    [message] = upstream.messages
    assert message.rcpt_tos == ["ops@example.com"]
    assert b"Subject: smtpgate test message (route upstream)" in message.content


def test_check_names_the_failing_step(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    certificates: Certificates,
) -> None:
    upstream = upstreams.start(starttls=certificates.server_context, users={"me": "s3cret"})
    wrong = gateway_factory(secure_relay(upstream.port, certificates, "guess"), start=False)
    result = wrong.cli("check", "upstream", check=False)
    assert result.returncode == 1
    assert re.search(r"^auth\s+FAIL\s+535 ", result.stdout, re.MULTILINE)
    assert "verdict  route upstream does NOT work" in result.stdout

    stranger = upstreams.start(starttls=certificates.untrusted_context)
    untrusted = gateway_factory(secure_relay(stranger.port, certificates), start=False)
    result = untrusted.cli("check", "upstream", check=False)
    assert re.search(
        r"^tls\s+FAIL\s+.*certificate not trusted.*set ca_file", result.stdout, re.MULTILINE
    )

    nobody = gateway_factory(relay_config(free_port()), start=False)
    result = nobody.cli("check", "upstream", check=False)
    assert re.search(r"^connect\s+FAIL\s+.*connection refused", result.stdout, re.MULTILINE)
    assert upstream.messages == []


def test_check_of_a_direct_or_unknown_route(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(start=False)
    direct = gateway.cli("check", "direct", check=False)
    assert direct.returncode == 1
    assert "relay routes only" in direct.stdout
    unknown = gateway.cli("check", "nope", check=False)
    assert unknown.returncode == 2
    assert "no route 'nope'" in unknown.stderr


def test_send_injects_a_test_message_through_the_gateway_by_route(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port))  # default route stays direct

    result = gateway.cli("send", "--to", "ops@example.com", "--route", "upstream")

    assert re.match(r"250 2\.0\.0 Ok: queued as [0-9A-F]+", result.stdout)
    wait_until(lambda: upstream.messages, what="the test message to arrive upstream")
    assert upstream.messages[0].rcpt_tos == ["ops@example.com"]
    assert b"X-Smtpgate" not in upstream.messages[0].content
    assert gateway.recipients()["ops@example.com"]["route"] == "upstream"


def test_send_without_route_follows_the_rules_and_reports_a_dead_gateway(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    gateway.cli("send", "--to", "a@example.com", "--to", "b@example.com")
    wait_until(lambda: upstream.messages, what="the test message")
    assert upstream.messages[0].rcpt_tos == ["a@example.com", "b@example.com"]

    gateway.stop()
    result = gateway.cli("send", "--to", "a@example.com", check=False)
    assert result.returncode == 1
    assert "cannot hand the message to the gateway" in result.stderr
