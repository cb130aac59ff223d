"""smtpgate.policy: who may relay, and configs that would make smtpgate an open relay."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from smtpgate import configfile
from smtpgate.auth import auth_file
from smtpgate.config import Config, ConfigError
from smtpgate.policy import RelayPolicy, refuse_open_relay


def config(**server: Any) -> Config:
    return configfile.validate({"server": {"state_dir": "/nonexistent/smtpgate", **server}})


def policy(*networks: str) -> RelayPolicy:
    return RelayPolicy([ipaddress.ip_network(n) for n in networks])


# --- may_relay ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "client", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1", "::ffff:7f00:1"]
)
def test_loopback_may_relay_with_the_default_trusted_networks(client: str) -> None:
    defaults = config().server.trusted_networks
    assert RelayPolicy(defaults).may_relay(client)


def test_only_the_listed_networks_are_trusted() -> None:
    """As Postfix's mynetworks: a list without loopback trusts no loopback client."""
    narrow = policy("127.0.0.1/32")
    assert narrow.may_relay("127.0.0.1")
    assert not narrow.may_relay("127.0.0.2")
    assert not policy().may_relay("127.0.0.1")


@pytest.mark.parametrize(
    ("client", "allowed"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),  # an IPv4 client seen through a dual-stack socket
        ("fd12:3456::1", True),
        ("fe80::1%eth0", False),  # link-local is not in the list; the zone is ignored
        ("11.0.0.1", False),
        ("::ffff:11.0.0.1", False),
        ("192.168.1.1", False),
        ("2001:db8::1", False),
    ],
)
def test_trusted_networks(client: str, allowed: bool) -> None:
    assert policy("10.0.0.0/8", "fd12:3456::/32").may_relay(client) is allowed


@pytest.mark.parametrize("client", [None, "", "localhost", "not an address", "1.2.3.4.5"])
def test_unknown_client_may_not_relay(client: str | None) -> None:
    assert not policy("0.0.0.0/1").may_relay(client)


def test_default_config_trusts_only_this_machine() -> None:
    relay = RelayPolicy(config().server.trusted_networks)
    assert relay.may_relay("127.0.0.1")
    assert relay.may_relay("::1")
    assert not relay.may_relay("192.168.1.20")
    assert not relay.may_relay("203.0.113.5")


# --- refuse_open_relay --------------------------------------------------------------


def test_default_config_starts() -> None:
    refuse_open_relay(config())


@pytest.mark.parametrize(
    "listen", [["127.0.0.1:2525"], ["[::1]:2525"], ["localhost:2525", "127.0.0.2:25"]]
)
def test_loopback_listeners_start(listen: list[str]) -> None:
    refuse_open_relay(config(listen=listen))


@pytest.mark.parametrize("listen", ["0.0.0.0:2525", "[::]:2525", "mail.example.com:25"])
def test_exposed_listener_with_only_loopback_trusted_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError) as caught:
        refuse_open_relay(config(listen=["127.0.0.1:2525", listen]))
    message = str(caught.value)
    assert listen in message
    assert "127.0.0.1:2525 " not in message  # only the exposed one is named
    assert "server.trusted_networks" in message


@pytest.mark.parametrize(
    "trusted",
    [["127.0.0.0/8", "172.16.0.0/12"], ["192.168.0.0/16"], ["fd00::/8"], ["203.0.113.0/24"]],
)
def test_exposed_listener_with_a_remote_trusted_network_starts(trusted: list[str]) -> None:
    refuse_open_relay(config(listen=["0.0.0.0:2525"], trusted_networks=trusted))


@pytest.mark.parametrize(
    "trusted", ["0.0.0.0/0", "::/0", "0.0.0.0/1", "128.0.0.0/1", "2000::/3", "64.0.0.0/4"]
)
def test_trusting_the_internet_is_an_open_relay(trusted: str) -> None:
    # Refused whatever the listener: even on loopback it is a mistake waiting to happen.
    for listen in (["127.0.0.1:2525"], ["0.0.0.0:2525"]):
        with pytest.raises(ConfigError, match="open relay") as caught:
            refuse_open_relay(config(listen=listen, trusted_networks=["127.0.0.0/8", trusted]))
        assert trusted in str(caught.value)


# --- AUTH opens a public listener -----------------------------------------------------


def test_an_authenticated_user_may_relay_from_anywhere() -> None:
    relay = policy("127.0.0.0/8")
    assert not relay.may_relay("203.0.113.5")
    assert relay.may_relay("203.0.113.5", user="alice")


def _with_auth(tmp_path: Path, *, users: bool, certificate: bool) -> Config:
    cert = tmp_path / "cert.pem"
    cert.write_text("not checked here")
    if users:
        (tmp_path / "users").write_text("")
    return configfile.validate(
        {
            "server": {
                "state_dir": str(tmp_path),
                "listen": ["0.0.0.0:587"],
                "tls": {"cert_file": str(cert)} if certificate else {},
            }
        }
    )


def test_exposed_listener_with_auth_over_tls_starts(tmp_path: Path) -> None:
    refuse_open_relay(_with_auth(tmp_path, users=True, certificate=True))


@pytest.mark.parametrize(
    ("users", "certificate", "why"),
    [
        (False, True, "there is no users file"),
        (True, False, "[server.tls] has no certificate, and AUTH is offered only over TLS"),
    ],
)
def test_exposed_listener_with_half_an_auth_setup_is_refused(
    tmp_path: Path, users: bool, certificate: bool, why: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        refuse_open_relay(_with_auth(tmp_path, users=users, certificate=certificate))
    message = str(caught.value)
    assert message.startswith("server.listen: 0.0.0.0:587 is reachable from other hosts")
    assert why in message
    assert "smtpgate user add NAME" in message


def test_a_users_file_named_in_the_config_must_exist(tmp_path: Path) -> None:
    config = configfile.validate(
        {"server": {"state_dir": str(tmp_path), "auth": {"users_file": str(tmp_path / "u")}}}
    )
    with pytest.raises(ConfigError, match=r"server\.auth\.users_file: .*/u does not exist"):
        auth_file(config)
