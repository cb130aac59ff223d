"""Policy: who may relay through smtpgate, checked per session and at startup.

Between the listener and the router. Clients in `trusted_networks` (by default loopback
only, as Postfix's mynetworks) and clients that authenticated (AUTH over TLS) may relay;
every other client is refused at RCPT TO. smtpgate must never become an open relay,
whatever the config omits, so startup refuses configurations that would make it one.
"""

from __future__ import annotations

import functools
import ipaddress

from smtpgate.auth import auth_file
from smtpgate.config import Config, ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# A trusted network broader than this outside private space is "the internet".
_BROADEST_PUBLIC_PREFIX = {4: 8, 6: 16}


class RelayPolicy:
    def __init__(self, trusted_networks: list[Network]) -> None:
        self._trusted = list(trusted_networks)
        self._trusted_ip = functools.lru_cache(maxsize=4096)(self._in_trusted_network)

    def may_relay(self, client_ip: str | None, *, user: str | None = None) -> bool:
        """An authenticated user may relay from anywhere (the laptop on the road);
        anyone else only from a trusted network."""
        if user is not None:
            return True
        return self._trusted_ip(client_ip)  # asked at every RCPT: parsed once per client

    def _in_trusted_network(self, client_ip: str | None) -> bool:
        address = client_address(client_ip)
        if address is None:
            return False
        return any(address in net for net in self._trusted)


def client_address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A peer's address as networks compare it: zone id dropped, ::ffff:a.b.c.d unmapped
    (a dual-stack listener reports IPv4 clients that way)."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def refuse_open_relay(config: Config) -> None:
    """Raise ConfigError for a config that would let strangers relay.

    A listener other hosts can reach is allowed only when the config says who may use it:
    AUTH (a users file and a certificate, so passwords travel only over TLS), or a
    non-loopback trusted network. A trusted network spanning the internet is refused
    outright.
    """
    server = config.server
    for network in server.trusted_networks:
        broadest = _BROADEST_PUBLIC_PREFIX[network.version]
        if network.prefixlen < broadest and not network.is_private:
            raise ConfigError(
                f"server.trusted_networks: {network} would let most of the internet relay"
                f" through smtpgate (an open relay); list your own networks instead"
            )
    exposed = [str(a) for a in server.listen if not a.is_loopback()]
    remote_trusted = [n for n in server.trusted_networks if not n.is_loopback]
    if not exposed or remote_trusted or auth_file(config) is not None:
        return
    why_no_auth = (
        "[server.tls] has no certificate, and AUTH is offered only over TLS"
        if config.users_path().is_file()
        else f"there is no users file {config.users_path()}"
    )
    raise ConfigError(
        f"server.listen: {', '.join(exposed)} is reachable from other hosts, but"
        " server.trusted_networks allows only this machine to relay and AUTH is off"
        f" ({why_no_auth}), so no other host could send through it. Listen on 127.0.0.1,"
        " list the networks that may relay in server.trusted_networks, or set up AUTH:"
        " a certificate in [server.tls] and users from `smtpgate user add NAME`."
    )
