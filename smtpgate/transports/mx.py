"""MX resolution for direct delivery, as RFC 5321 section 5 says, with dnspython.

MX records by preference, shuffled among equal preferences; the domain's own A/AAAA
when it has no MX (the implicit MX); a null MX (RFC 7505) or a domain that does not
exist fails for good; a DNS timeout or SERVFAIL is temporary. dnspython's cache keeps
every answer for its TTL.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from smtpgate.config import DnsConfig
from smtpgate.delivery.outcome import Outcome, Scope


@dataclass(frozen=True, slots=True)
class MxHost:
    name: str
    addresses: tuple[str, ...]


class DnsTrouble(Exception):
    """Resolution failed; `outcome` says whether for good or for now."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reply)
        self.outcome = outcome


class MxResolver:
    def __init__(self, config: DnsConfig) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=not config.nameservers)
        if config.nameservers:
            self._resolver.nameservers = [
                dns.nameserver.Do53Nameserver(address.host, address.port)
                for address in config.nameservers
            ]
        # Ask again within the lifetime, as stub resolvers do: a lost UDP packet must cost
        # a retransmission, not a deferred delivery.
        self._resolver.lifetime = config.timeout
        self._resolver.timeout = max(config.timeout / 4, 0.25)
        self._resolver.cache = dns.resolver.Cache()

    async def hosts(self, domain: str) -> list[MxHost]:
        """The hosts to try for `domain`, best first, each with its addresses.
        Raises DnsTrouble when there is nowhere to deliver, or not yet."""
        domain = domain.rstrip(".").lower()
        if literal := _address_literal(domain):
            return [MxHost(literal, (literal,))]
        try:
            answer = await self._resolver.resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            raise DnsTrouble(
                Outcome.failed(
                    f"550 5.1.2 domain {domain} does not exist (NXDOMAIN)", Scope.RECIPIENT
                )
            ) from None
        except dns.resolver.NoAnswer:
            # RFC 5321 5.1: no MX, so the domain itself is the implicit MX.
            addresses = await self._addresses(domain, implicit=True)
            if not addresses:
                raise DnsTrouble(
                    Outcome.failed(
                        f"550 5.1.2 domain {domain} has no MX and no address", Scope.RECIPIENT
                    )
                ) from None
            return [MxHost(domain, addresses)]
        except (
            dns.exception.Timeout,
            dns.resolver.NoNameservers,
            dns.resolver.LifetimeTimeout,
        ) as error:
            raise DnsTrouble(_temporary(domain, "MX", error)) from None
        records = sorted(answer, key=lambda r: r.preference)
        if any(str(r.exchange) == "." for r in records):
            # RFC 7505: a null MX says the domain accepts no mail at all.
            raise DnsTrouble(
                Outcome.failed(
                    f"556 5.1.10 domain {domain} accepts no mail (null MX)", Scope.RECIPIENT
                )
            )
        hosts = []
        for preference in sorted({r.preference for r in records}):
            group = [
                str(r.exchange).rstrip(".").lower() for r in records if r.preference == preference
            ]
            random.shuffle(group)  # RFC 5321 5.1: spread the load among equals
            for name in group:
                addresses = await self._addresses(name, implicit=False)
                if addresses:
                    hosts.append(MxHost(name, addresses))
        if not hosts:
            raise DnsTrouble(
                Outcome.deferred(
                    f"451 4.4.3 no address found for any MX host of {domain}", Scope.RECIPIENT
                )
            )
        return hosts

    async def _addresses(self, name: str, *, implicit: bool) -> tuple[str, ...]:
        """A and AAAA of a host, IPv4 first. An MX host that does not resolve is skipped."""
        found: list[str] = []
        results = await asyncio.gather(
            self._resolver.resolve(name, "A"),
            self._resolver.resolve(name, "AAAA"),
            return_exceptions=True,
        )
        trouble = None
        for result in results:
            if isinstance(result, dns.resolver.Answer):
                found.extend(str(r) for r in result)
            elif isinstance(result, dns.resolver.NXDOMAIN | dns.resolver.NoAnswer):
                continue
            elif isinstance(result, Exception):
                trouble = result
        if not found and trouble is not None and implicit:
            raise DnsTrouble(_temporary(name, "A/AAAA", trouble))
        return tuple(found)


def _temporary(name: str, kind: str, error: BaseException) -> Outcome:
    what = "timed out" if isinstance(error, dns.exception.Timeout) else "failed"
    return Outcome.deferred(
        f"451 4.4.3 DNS lookup of {kind} for {name} {what}: {type(error).__name__}",
        Scope.RECIPIENT,
    )


def _address_literal(domain: str) -> str | None:
    """user@[192.0.2.1] and user@[IPv6:2001:db8::1] (RFC 5321 4.1.3): no DNS needed."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    text = domain[1:-1]
    tagged = text.lower().startswith("ipv6:")
    try:
        address = ipaddress.ip_address(text[5:] if tagged else text)
    except ValueError:
        return None
    return str(address) if (address.version == 6) == tagged else None
