"""The listener for laptops on the road: TLS (STARTTLS and ssl://), AUTH PLAIN and LOGIN,
relaying for logged-in users from any address, and the limits on guessing passwords.

Every test talks to `smtpgate serve` over loopback. The gateway trusts only 127.0.0.2,
and the tests connect from 127.0.0.1: to smtpgate they are a stranger on the internet.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import smtplib
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from conftest import (
    Certificates,
    Gateway,
    GatewayFactory,
    Upstreams,
    free_port,
    own_trace_removed,
    relay_config,
    wait_until,
    with_default_route,
)

from smtpgate import configfile, users
from smtpgate.auth import Authenticator, auth_file
from smtpgate.listener import Connections, Handler, protocol_factory, tls_context
from smtpgate.policy import RelayPolicy
from smtpgate.router import Router
from smtpgate.spool import NewMessage, SqliteSpool

PASSWORD = "correct horse battery staple"
MESSAGE = b"From: alice@example.org\r\nSubject: from the road\r\n\r\nSent from a hotel.\r\n"
STRANGER = 'trusted_networks = ["127.0.0.2/32"]\n'


def tls_config(certificates: Certificates, auth: str = "") -> str:
    return (
        f'[server.tls]\ncert_file = "{certificates.cert_file}"\n'
        f'key_file = "{certificates.key_file}"\n\n[server.auth]\n{auth}\n'
    )


def add_user(gateway: Gateway, name: str, password: str) -> subprocess.CompletedProcess[str]:
    """`smtpgate user add NAME --password-stdin`, as a user runs it."""
    return subprocess.run(
        gateway.command("user", "add", name, "--password-stdin"),
        input=password + "\n",
        capture_output=True,
        text=True,
        env=gateway.env,
        timeout=60,
    )


def road_gateway(
    gateway_factory: GatewayFactory,
    certificates: Certificates,
    *,
    config: str = "",
    auth: str = "",
    server: str = "",
    listen: tuple[str, ...] = (),
) -> Gateway:
    """A gateway with a certificate and the user alice, trusting only 127.0.0.2."""
    gateway = gateway_factory(
        tls_config(certificates, auth) + config,
        server=STRANGER + server,
        listen=listen,
        start=False,
    )
    added = add_user(gateway, "alice", PASSWORD)
    assert added.returncode == 0, added.stderr
    return gateway.start()


def secured(gateway: Gateway, certificates: Certificates) -> smtplib.SMTP:
    client = smtplib.SMTP("127.0.0.1", gateway.port, timeout=30)
    client.ehlo("laptop.test")
    client.starttls(context=certificates.client_context())
    client.ehlo("laptop.test")
    return client


def plain_response(name: str, password: str) -> str:
    return base64.b64encode(f"\0{name}\0{password}".encode()).decode()


def events(gateway: Gateway, name: str) -> list[dict[str, Any]]:
    return [e for e in gateway.events() if e.get("event") == name]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_starttls_then_auth_relays_to_the_upstream(
    gateway_factory: GatewayFactory,
    certificates: Certificates,
    upstreams: Upstreams,
    mechanism: str,
) -> None:
    upstream = upstreams.start()
    gateway = road_gateway(
        gateway_factory,
        certificates,
        config=relay_config(upstream.port),
        server=with_default_route("upstream"),
    )
    with secured(gateway, certificates) as client:
        assert client.esmtp_features["auth"].split() == ["LOGIN", "PLAIN"]
        client.user, client.password = "alice", PASSWORD
        authobject = client.auth_plain if mechanism == "PLAIN" else client.auth_login
        assert client.auth(mechanism, authobject) == (235, b"2.7.0 Authentication successful")
        assert client.docmd("AUTH", "PLAIN") == (503, b"5.5.1 Already authenticated")
        refused = client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
    assert refused == {}

    [arrived] = wait_until(lambda: upstream.messages, what="the upstream to get the message")
    assert (arrived.mail_from, arrived.rcpt_tos) == ("alice@example.org", ["bob@example.com"])
    assert own_trace_removed(arrived.content) == MESSAGE
    assert b"with ESMTPSA" in arrived.content.split(b"\r\n\r\n")[0]  # RFC 3848: TLS and AUTH
    [logged_in] = events(gateway, "authenticated")
    assert (logged_in["user"], logged_in["mechanism"]) == ("alice", mechanism)
    assert PASSWORD not in gateway.log()


def test_auth_is_neither_offered_nor_accepted_before_starttls(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates)
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.ehlo("laptop.test")
        assert "starttls" in client.esmtp_features
        assert "auth" not in client.esmtp_features
        reply = client.docmd("AUTH", "PLAIN " + plain_response("alice", PASSWORD))
        assert reply == (538, b"5.7.11 Encryption required for requested authentication mechanism")
        client.starttls(context=certificates.client_context())
        client.ehlo("laptop.test")
        assert "auth" in client.esmtp_features
        assert client.login("alice", PASSWORD)[0] == 235
    assert not events(gateway, "authentication failed")  # the password was never checked


def test_without_users_there_is_no_auth_even_over_tls(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = gateway_factory(tls_config(certificates))
    with secured(gateway, certificates) as client:
        assert "auth" not in client.esmtp_features
        reply = client.docmd("AUTH", "PLAIN " + plain_response("alice", PASSWORD))
        assert reply == (503, b"5.5.1 Authentication is not enabled")


def test_implicit_tls_listener(
    gateway_factory: GatewayFactory, certificates: Certificates, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    port = free_port()
    gateway = road_gateway(
        gateway_factory,
        certificates,
        config=relay_config(upstream.port),
        server=with_default_route("upstream"),
        listen=(f"ssl://127.0.0.1:{port}",),
    )
    with smtplib.SMTP_SSL(
        "127.0.0.1", port, context=certificates.client_context(), timeout=30
    ) as client:
        client.ehlo("laptop.test")
        assert "starttls" not in client.esmtp_features  # it is TLS already
        assert "auth" in client.esmtp_features
        client.login("alice", PASSWORD)
        assert client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE) == {}
    [arrived] = wait_until(lambda: upstream.messages, what="the upstream to get the message")
    assert b"with ESMTPSA" in arrived.content.split(b"\r\n\r\n")[0]
    [listening] = [e for e in events(gateway, "listening") if e["tls"] == "implicit"]
    assert listening["address"] == f"ssl://127.0.0.1:{port}"


def test_a_stranger_must_log_in_to_relay(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates)
    with secured(gateway, certificates) as client:
        client.mail("alice@example.org")
        code, reply = client.rcpt("bob@example.com")
        assert (code, reply) == (554, b"5.7.1 <bob@example.com>: Relay access denied")
        assert client.docmd("AUTH", "PLAIN " + plain_response("alice", PASSWORD))[0] == 503
        client.rset()  # RFC 4954: AUTH is not allowed in a mail transaction
        assert client.login("alice", PASSWORD)[0] == 235
        client.mail("alice@example.org")
        assert client.rcpt("bob@example.com") == (250, b"2.1.5 Recipient OK")
        code, reply = client.data(MESSAGE)
    assert code == 250, reply
    assert [r["address"] for m in gateway.queue() for r in m["recipients"]] == ["bob@example.com"]


def test_wrong_passwords_are_slowed_down_then_the_address_is_shut_out(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(
        gateway_factory,
        certificates,
        auth=(
            "max_auth_failures = 5\nmax_session_attempts = 10\ntarpit_after = 3\n"
            'tarpit_delay = "300ms"\ntarpit_max_delay = "1s"\n'
        ),
    )
    replies = []
    took = []
    with secured(gateway, certificates) as client:
        for attempt in range(5):
            started = time.monotonic()
            replies.append(
                client.docmd("AUTH", "PLAIN " + plain_response("alice", f"guess{attempt}"))
            )
            took.append(time.monotonic() - started)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert [code for code, _ in replies] == [535, 535, 535, 535, 421]
    assert replies[0][1] == b"5.7.8 Authentication credentials invalid"
    assert replies[4][1].startswith(b"4.7.0 ")
    assert min(took[3:]) >= 0.3  # the tarpit: past 3 failures every reply waits

    # The address stays shut out, even with the right password, until the window passes:
    with secured(gateway, certificates) as client:
        reply = client.docmd("AUTH", "PLAIN " + plain_response("alice", PASSWORD))
    assert reply[0] == 421

    failures = events(gateway, "authentication failed")
    assert [(e["client"], e["user"], e["failures"]) for e in failures] == [
        ("127.0.0.1", "alice", n) for n in range(1, 6)
    ]
    assert [e["delay"] for e in events(gateway, "authentication reply delayed")] == [0.3, 0.6]
    [blocked] = events(gateway, "client blocked after failed logins")
    assert blocked["client"] == "127.0.0.1"
    assert "guess" not in gateway.log() and PASSWORD not in gateway.log()


def test_a_session_gets_few_tries(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates, auth="max_session_attempts = 2\n")
    with secured(gateway, certificates) as client:
        first = client.docmd("AUTH", "PLAIN " + plain_response("alice", "guess"))
        second = client.docmd("AUTH", "PLAIN " + plain_response("mallory", "guess"))
        with pytest.raises(smtplib.SMTPServerDisconnected):
            client.noop()
    assert first[0] == 535
    assert second == (421, b"4.7.0 Too many authentication attempts")
    # The address is not shut out (2 of 5 failures): a new session may log in.
    with secured(gateway, certificates) as client:
        assert client.login("alice", PASSWORD)[0] == 235
    assert [e["user"] for e in events(gateway, "authentication failed")] == ["alice", "mallory"]


def test_the_auth_exchange_answers_each_misstep(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates, auth="max_session_attempts = 10\n")

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    with secured(gateway, certificates) as client:
        assert client.docmd("AUTH", "CRAM-MD5") == (
            504,
            b"5.5.4 Unrecognized authentication type; use LOGIN or PLAIN",
        )
        assert client.docmd("AUTH", "PLAIN not*base64") == (501, b"5.5.2 Cannot decode base64")
        assert client.docmd("AUTH", "LOGIN") == (334, b64("Username:").encode())
        assert client.docmd("*") == (501, b"5.7.0 Auth aborted")  # RFC 4954: the client cancels
        # Acting for another user (RFC 4616 authorization identity) is not supported:
        reply = client.docmd("AUTH", "PLAIN " + b64(f"bob\0alice\0{PASSWORD}"))
        assert reply == (535, b"5.7.8 Authentication credentials invalid")
        # PLAIN's response after an empty challenge, and LOGIN with an initial response:
        assert client.docmd("AUTH", "PLAIN") == (334, b"")
        assert client.docmd(plain_response("alice", "wrong"))[0] == 535
        assert client.docmd("AUTH", "LOGIN " + b64("alice")) == (334, b64("Password:").encode())
        assert client.docmd(b64(PASSWORD)) == (235, b"2.7.0 Authentication successful")


def test_users_change_without_a_restart(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates)
    assert add_user(gateway, "bob", "bob's secret").returncode == 0
    with secured(gateway, certificates) as client:
        assert client.login("bob", "bob's secret")[0] == 235
    gateway.cli("user", "remove", "bob")
    with secured(gateway, certificates) as client:
        reply = client.docmd("AUTH", "PLAIN " + plain_response("bob", "bob's secret"))
    assert reply == (535, b"5.7.8 Authentication credentials invalid")


def test_an_unreadable_users_file_is_a_temporary_failure(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = road_gateway(gateway_factory, certificates)
    users = gateway.state_dir / "users"
    saved = users.read_bytes()
    users.unlink()
    with secured(gateway, certificates) as client:
        reply = client.docmd("AUTH", "PLAIN " + plain_response("alice", PASSWORD))
        assert reply == (454, b"4.7.0 Temporary authentication failure, try again later")
        users.write_bytes(saved)
        assert client.login("alice", PASSWORD)[0] == 235  # the same session, once it is back
    [error] = events(gateway, "cannot read the users file")
    assert error["path"] == str(users)
    assert not events(gateway, "authentication failed")  # not the client's fault


def test_the_auth_user_can_pick_the_route(
    gateway_factory: GatewayFactory, certificates: Certificates, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = road_gateway(
        gateway_factory,
        certificates,
        config=relay_config(upstream.port) + '[[rules]]\nauth_user = "al*"\nroute = "upstream"\n',
    )
    with secured(gateway, certificates) as client:
        client.login("alice", PASSWORD)
        client.sendmail("alice@example.org", ["bob@example.com"], MESSAGE)
    wait_until(lambda: upstream.messages, what="alice's mail to take her route")
    # A trusted client that did not log in is no user: "al*" does not match it, and its
    # mail takes the default route (direct, where the test DNS knows no example.net).
    with smtplib.SMTP("127.0.0.1", gateway.port, source_address=("127.0.0.2", 0)) as client:
        client.sendmail("app@example.org", ["carol@example.net"], MESSAGE)
    assert gateway.wait_for_state("carol@example.net", "failed")["route"] == "direct"
    assert len(upstream.messages) == 1
    # The spool keeps who submitted each job's first message:
    jobs = json.loads(gateway.cli("jobs", "--json").stdout)
    assert {job["route"]: job["submitted_by"] for job in jobs} == {
        "upstream": "alice",
        "direct": None,
    }


def test_a_user_from_outside_cannot_route_around_the_rules_with_a_header(
    gateway_factory: GatewayFactory, upstreams: Upstreams, certificates: Certificates
) -> None:
    upstream = upstreams.start()
    gateway = road_gateway(
        gateway_factory,
        certificates,
        config=relay_config(upstream.port) + '[[rules]]\nauth_user = "*"\nroute = "upstream"\n',
    )
    header = b"X-Smtpgate-Route: direct\r\n"
    with secured(gateway, certificates) as client:
        client.login("alice", PASSWORD)
        client.sendmail("alice@example.org", ["bob@example.com"], header + MESSAGE)
    # The operator's rule for logged-in users holds; the header is removed all the same.
    wait_until(lambda: upstream.messages, what="alice's mail to take the rule's route")
    assert gateway.recipients()["bob@example.com"]["route"] == "upstream"
    assert b"X-Smtpgate-Route" not in upstream.messages[0].content
    assert events(gateway, "X-Smtpgate-Route ignored: the client is not trusted")


class RecordingSpool(SqliteSpool):
    """The real spool, keeping what the listener handed it."""

    handed: list[NewMessage]

    async def store(self, message: NewMessage) -> str:
        self.handed.append(message)
        return await super().store(message)


def test_the_spool_learns_who_submitted_a_message(
    tmp_path: Path, certificates: Certificates
) -> None:
    """NewMessage.submitted_by carries the AUTH user to the rest of the data path."""
    users.add(tmp_path / "users", "alice", PASSWORD.encode())
    config = configfile.validate(
        {
            "server": {
                "state_dir": str(tmp_path),
                "hostname": "gateway.test",
                "tls": {
                    "cert_file": str(certificates.cert_file),
                    "key_file": str(certificates.key_file),
                },
            }
        }
    )
    users_file = auth_file(config)
    assert users_file is not None

    async def scenario() -> list[NewMessage]:
        spool = RecordingSpool.open(tmp_path / "spool.db")
        spool.handed = []
        handler = Handler(
            config,
            spool,
            Router(config),
            RelayPolicy(config.server.trusted_networks),
            on_stored=lambda: None,
        )
        factory = protocol_factory(
            config,
            handler,
            Connections(10, 10),
            tls=tls_context(config),
            authenticator=Authenticator(users_file, config.server.auth),
        )
        server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for login in (True, False):  # loopback is trusted: both may send
                client = aiosmtplib.SMTP(
                    hostname="127.0.0.1",
                    port=port,
                    start_tls=True,
                    tls_context=certificates.client_context(),
                )
                async with client:
                    if login:
                        await client.login("alice", PASSWORD)
                    await client.sendmail("a@example.org", ["b@example.com"], MESSAGE)
        finally:
            server.close()
            await server.wait_closed()
            await spool.close()
        return spool.handed

    handed = asyncio.run(scenario())
    assert [message.submitted_by for message in handed] == ["alice", None]


# --- configuration errors a user sees at start ------------------------------------------


def serve(gateway: Gateway) -> subprocess.CompletedProcess[str]:
    return gateway.cli("serve", check=False)


def test_ssl_listener_without_a_certificate_is_a_config_error(
    gateway_factory: GatewayFactory,
) -> None:
    port = free_port()
    gateway = gateway_factory(listen=(f"ssl://127.0.0.1:{port}",), start=False)
    result = serve(gateway)
    assert result.returncode == 2
    assert f"server.listen: ssl://127.0.0.1:{port} speaks TLS, but there is no certificate" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_missing_certificate_file_is_a_config_error(
    gateway_factory: GatewayFactory, certificates: Certificates, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere" / "cert.pem"
    gateway = gateway_factory(
        f'[server.tls]\ncert_file = "{missing}"\nkey_file = "{certificates.key_file}"\n',
        start=False,
    )
    result = serve(gateway)
    assert result.returncode == 2
    assert f"server.tls.cert_file: {missing} is not a readable file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_key_that_does_not_fit_is_a_config_error(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    gateway = gateway_factory(
        f'[server.tls]\ncert_file = "{certificates.cert_file}"\n'
        f'key_file = "{certificates.ca_file}"\n',  # a certificate, not a key
        start=False,
    )
    for command in (("serve",), ("config", "check")):
        result = gateway.cli(*command, check=False)
        assert result.returncode == 2, result.stderr
        assert "server.tls: cannot use" in result.stderr
        assert "Traceback" not in result.stderr


def test_tls_sessions_give_back_their_connection_slot(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    """With room for one session (from one address): a failed TLS handshake, a STARTTLS
    session and an implicit TLS session each leave the room free for the next client."""
    port = free_port()
    gateway = road_gateway(
        gateway_factory,
        certificates,
        server="max_connections = 1\nmax_connections_per_client = 1\n",
        listen=(f"ssl://127.0.0.1:{port}",),
    )
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"EHLO not-speaking-tls.test\r\n")  # not a TLS ClientHello
            assert sock.recv(100) == b""  # the handshake fails; closed without a greeting
        with secured(gateway, certificates) as client:
            assert client.login("alice", PASSWORD)[0] == 235
        wait_until(lambda: _greets(gateway.port), what="the STARTTLS session's slot")
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, context=certificates.client_context(), timeout=30
        ) as client:
            assert client.login("alice", PASSWORD)[0] == 235
        wait_until(lambda: _greets(gateway.port), what="the implicit TLS session's slot")


def _greets(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        return sock.recv(100).startswith(b"220")


def test_smtpgate_send_reaches_an_ssl_only_gateway(
    gateway_factory: GatewayFactory, certificates: Certificates
) -> None:
    port = free_port()
    gateway = gateway_factory(tls_config(certificates), listen=(f"ssl://127.0.0.1:{port}",))
    ssl_only = gateway.workdir / "ssl-only.toml"
    ssl_only.write_text(
        re.sub(
            r"(?m)^listen = .*$",
            f'listen = ["ssl://127.0.0.1:{port}"]',
            gateway.config_path.read_text(),
        )
    )
    result = subprocess.run(
        [*gateway.command("send", "--to", "ops@example.com")[:-2], "--config", str(ssl_only)],
        capture_output=True,
        text=True,
        env=gateway.env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("250 2.0.0 Ok: queued as ")
    assert list(gateway.recipients()) == ["ops@example.com"]
