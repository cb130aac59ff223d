"""Router: ordered rules pick a named route for each recipient.

Between the policy and the spool. The first rule whose every condition holds wins; with
none, `server.default_route`. Recipients of one message may take different routes.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from smtpgate.config import Config, RuleConfig
from smtpgate.policy import client_address


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a rule may look at, besides the recipient."""

    sender: str
    client_ip: str | None
    route_header: str | None  # the value of X-Smtpgate-Route, if the message had one
    auth_user: str | None = None  # who logged in with AUTH, if anyone


class Router:
    def __init__(self, config: Config) -> None:
        self._rules = list(config.rules)
        self._default = config.server.default_route
        self._routes = frozenset(config.routes)

    def route(self, envelope: Envelope, recipient: str) -> str:
        """An X-Smtpgate-Route header naming a route picks it (the listener passes it on
        from trusted clients only); else the first matching rule; else the default route."""
        if envelope.route_header in self._routes:
            return envelope.route_header
        for rule in self._rules:
            if _matches(rule, envelope, recipient):
                return rule.route
        return self._default


def _matches(rule: RuleConfig, envelope: Envelope, recipient: str) -> bool:
    if rule.sender is not None and not _glob_any(envelope.sender, rule.sender):
        return False
    if rule.recipient_domain is not None and not _glob_any(
        domain_of(recipient), rule.recipient_domain
    ):
        return False
    if rule.header is not None and (
        envelope.route_header is None or not _glob_any(envelope.route_header, rule.header)
    ):
        return False
    if rule.auth_user is not None and (
        envelope.auth_user is None or not _glob_any(envelope.auth_user, rule.auth_user)
    ):
        return False
    if rule.client is not None:
        address = client_address(envelope.client_ip)
        if address is None or not any(address in network for network in rule.client):
            return False
    return True


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].rstrip(".").lower()


def _glob_any(value: str, patterns: list[str]) -> bool:
    """Case-insensitive shell patterns: '*@news.example.com', '*.example.com'."""
    value = value.lower()
    return any(fnmatch.fnmatchcase(value, pattern.lower()) for pattern in patterns)
