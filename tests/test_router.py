"""smtpgate.router: ordered rules pick a route per recipient; no match means default_route."""

from __future__ import annotations

from typing import Any

import pytest

from smtpgate import configfile
from smtpgate.router import Envelope, Router, domain_of

ROUTES = {
    "corp": {"mode": "direct"},
    "bulk": {"mode": "direct"},
    "lan": {"mode": "direct"},
    "fallback": {"mode": "direct"},
}


def router(*rules: dict[str, Any], default: str = "fallback") -> Router:
    config = configfile.validate(
        {
            "server": {"state_dir": "/nonexistent/smtpgate", "default_route": default},
            "routes": ROUTES,
            "rules": list(rules),
        }
    )
    return Router(config)


def envelope(
    sender: str = "app@example.net", client: str | None = "127.0.0.1", header: str | None = None
) -> Envelope:
    return Envelope(sender=sender, client_ip=client, route_header=header)


def test_no_rules_means_default_route() -> None:
    assert router().route(envelope(), "bob@example.org") == "fallback"


def test_default_route_is_direct_unless_configured() -> None:
    config = configfile.validate({"server": {"state_dir": "/nonexistent/smtpgate"}})
    assert Router(config).route(envelope(), "bob@example.org") == "direct"


def test_first_matching_rule_wins() -> None:
    r = router(
        {"route": "corp", "recipient_domain": "example.com"},
        {"route": "bulk", "recipient_domain": "*"},
        {"route": "lan", "recipient_domain": "example.com"},
    )
    assert r.route(envelope(), "bob@example.com") == "corp"
    assert r.route(envelope(), "bob@example.org") == "bulk"


def test_rule_without_conditions_matches_everything() -> None:
    r = router({"route": "corp"}, {"route": "bulk", "recipient_domain": "example.org"})
    assert r.route(envelope(), "bob@example.org") == "corp"


@pytest.mark.parametrize(
    ("sender", "route"),
    [
        ("news@news.example.com", "bulk"),
        ("NEWS@News.Example.COM", "bulk"),
        ("ann@example.com", "fallback"),
        ("news@news.example.com.evil.test", "fallback"),
        ("", "fallback"),  # the null sender of a bounce
    ],
)
def test_sender_glob(sender: str, route: str) -> None:
    r = router({"route": "bulk", "sender": "*@news.example.com"})
    assert r.route(envelope(sender=sender), "bob@example.org") == route


@pytest.mark.parametrize(
    ("recipient", "route"),
    [
        ("bob@mail.example.com", "corp"),
        ("bob@a.b.example.com", "corp"),
        ("bob@MAIL.Example.Com", "corp"),
        ("bob@mail.example.com.", "corp"),  # a trailing dot is the same domain
        ("bob@example.com", "fallback"),  # "*.example.com" is the subdomains only
        ("bob@notexample.com", "fallback"),
        ("bob@example.org", "lan"),
        ("bob@EXAMPLE.ORG", "lan"),
        ("bob@example.net", "fallback"),
    ],
)
def test_recipient_domain_globs(recipient: str, route: str) -> None:
    r = router(
        {"route": "corp", "recipient_domain": "*.example.com"},
        {"route": "lan", "recipient_domain": ["example.net.invalid", "Example.Org"]},
    )
    assert r.route(envelope(), recipient) == route


def test_recipients_of_one_message_may_take_different_routes() -> None:
    r = router({"route": "corp", "recipient_domain": "example.com"})
    sent = envelope()
    assert [r.route(sent, rcpt) for rcpt in ("a@example.com", "b@example.org")] == [
        "corp",
        "fallback",
    ]


@pytest.mark.parametrize(
    ("client", "route"),
    [
        ("10.1.2.3", "lan"),
        ("192.168.7.8", "lan"),
        ("fd00::5", "lan"),
        ("fe80::1%eth0", "lan"),  # a zone index is ignored
        ("127.0.0.1", "fallback"),
        ("8.8.8.8", "fallback"),
        (None, "fallback"),
        ("not-an-ip", "fallback"),
    ],
)
def test_client_network(client: str | None, route: str) -> None:
    r = router(
        {"route": "lan", "client": ["10.0.0.0/8", "192.168.0.0/16", "fd00::/8", "fe80::/10"]}
    )
    assert r.route(envelope(client=client), "bob@example.org") == route


def test_client_network_matches_ipv4_mapped_address() -> None:
    r = router({"route": "lan", "client": "10.0.0.0/8"})
    assert r.route(envelope(client="::ffff:10.1.2.3"), "bob@example.org") == "lan"


@pytest.mark.parametrize(
    ("header", "route"),
    [
        ("mass", "bulk"),
        ("MASS", "bulk"),
        ("newsletter-2024", "bulk"),
        ("other", "fallback"),
        (None, "fallback"),  # the message had no X-Smtpgate-Route
    ],
)
def test_route_header(header: str | None, route: str) -> None:
    r = router({"route": "bulk", "header": ["mass", "newsletter-*"]})
    assert r.route(envelope(header=header), "bob@example.org") == route


def test_route_header_naming_a_route_picks_it_before_any_rule() -> None:
    r = router({"route": "bulk", "recipient_domain": "example.org"})
    assert r.route(envelope(header="corp"), "bob@example.org") == "corp"
    assert r.route(envelope(header="no-such-route"), "bob@example.org") == "bulk"


@pytest.mark.parametrize(
    ("sender", "recipient", "client", "header", "route"),
    [
        ("news@example.com", "bob@example.org", "10.0.0.9", "mass", "bulk"),
        ("ann@example.com", "bob@example.org", "10.0.0.9", "mass", "fallback"),  # sender
        ("news@example.com", "bob@example.net", "10.0.0.9", "mass", "fallback"),  # domain
        ("news@example.com", "bob@example.org", "127.0.0.1", "mass", "fallback"),  # client
        ("news@example.com", "bob@example.org", "10.0.0.9", None, "fallback"),  # header
    ],
)
def test_every_condition_of_a_rule_must_hold(
    sender: str, recipient: str, client: str, header: str | None, route: str
) -> None:
    r = router(
        {
            "route": "bulk",
            "sender": "news@*",
            "recipient_domain": "example.org",
            "client": "10.0.0.0/8",
            "header": "mass",
        }
    )
    assert r.route(envelope(sender=sender, client=client, header=header), recipient) == route


def test_falls_through_non_matching_rules_to_a_later_one() -> None:
    r = router(
        {"route": "corp", "sender": "*@corp.example.com", "recipient_domain": "example.org"},
        {"route": "lan", "client": "10.0.0.0/8"},
    )
    assert (
        r.route(envelope(sender="x@corp.example.com", client="10.0.0.1"), "bob@example.net")
        == "lan"
    )


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("bob@Example.ORG", "example.org"),
        ("bob@example.org.", "example.org"),
        ('"a@b"@example.org', "example.org"),
    ],
)
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


def test_auth_user_matches_only_clients_that_logged_in() -> None:
    r = router(
        {"route": "corp", "auth_user": ["alice", "*@example.com"]},
        {"route": "bulk", "auth_user": "*"},
    )

    def as_user(user: str | None) -> str:
        return r.route(Envelope("app@example.net", "203.0.113.5", None, user), "bob@example.org")

    assert as_user("alice") == "corp"
    assert as_user("Bob@Example.com") == "corp"
    assert as_user("carol") == "bulk"  # "*": anyone who logged in
    assert as_user(None) == "fallback"  # nobody logged in: no auth_user rule matches
