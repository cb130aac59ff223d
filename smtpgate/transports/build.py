"""Which transport carries each route: built the same way in the server and in its
delivery process, so a route behaves alike wherever it runs."""

from __future__ import annotations

import socket
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING

from smtpgate.config import Config
from smtpgate.transports.base import RelayLedger, Transport
from smtpgate.transports.relay import RelayTransport

if TYPE_CHECKING:
    from smtpgate.transports.direct import DirectTransport


def relay_of(config: Config, route: str) -> str | None:
    """The relay a route sends through: its own (relay mode) or its `via` (track mode);
    None for direct delivery."""
    settings = config.routes[route]
    relay = settings.relay if settings.mode == "relay" else settings.via
    return relay if relay and relay in config.relays else None


def build_transports(
    config: Config,
    routes: Collection[str],
    passwords: Mapping[str, str | None],
    ledger: RelayLedger,
) -> dict[str, Transport]:
    """Transports by route name. Routes naming the same relay share its transport, so
    its limits hold for all of them; every direct route shares the one direct transport."""
    transports: dict[str, Transport] = {}
    relays: dict[str, RelayTransport] = {}
    direct: DirectTransport | None = None
    for name in routes:
        relay = relay_of(config, name)
        if relay is not None:
            if relay not in relays:
                relays[relay] = RelayTransport(
                    relay,
                    config.relays[relay],
                    helo_name=config.server.hostname,
                    password=passwords[relay],
                    ledger=ledger,
                )
            transports[name] = relays[relay]
        else:
            if direct is None:
                # Imported only here: dnspython costs each process 4 MB, and a gateway
                # that only relays never resolves an MX.
                from smtpgate.transports.direct import DirectTransport
                from smtpgate.transports.mx import MxResolver

                direct = DirectTransport(
                    config.direct,
                    MxResolver(config.dns),
                    helo_name=config.direct.helo_name or socket.getfqdn(),
                )
            transports[name] = direct
    return transports
