"""Addresses: the strict checks MAIL FROM and RCPT TO get at the listener.

An address smtpgate could not store or send on is refused at the command with a reply
that says why (501 syntax, 553 not acceptable), never discovered later in delivery.
RFC 5321 4.1.2 for the syntax, RFC 6531 for non-ASCII, RFC 1123 for host names.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Literal

Role = Literal["sender", "recipient"]

MAX_ADDRESS = 254  # RFC 5321 4.5.3.1.3: a 256-octet path, less the angle brackets
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def refusal(
    address: str, *, role: Role, smtputf8: bool, allow_percent_hack: bool = False
) -> str | None:
    """The reply refusing `address`, or None when it is acceptable."""
    code = "5.1.7" if role == "sender" else "5.1.3"
    if role == "sender" and address in ("", "<>"):
        return None  # the null sender of bounces (RFC 5321 4.5.5)
    if address in ("", "<>"):
        return f"501 {code} The null address can only be a sender"
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return f"501 {code} Bad address syntax: not valid UTF-8"
    if _CONTROL.search(address):
        return f"501 {code} Bad address syntax: control characters"
    if not smtputf8 and not address.isascii():
        return "553 5.6.7 Non-ASCII address without SMTPUTF8"
    if len(address.encode()) > MAX_ADDRESS:
        return f"501 {code} Address too long"
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return f"553 {code} Address must be local-part@domain"
    if not local.startswith('"') and ("%" in local or "!" in local) and not allow_percent_hack:
        # Old routing tricks (user%host@relay, host!user@relay) that make open relays.
        return f"553 {code} Routing characters (% or !) in the local part are not accepted"
    if not _valid_domain(domain):
        return f"553 {code} Bad domain {domain!r}"
    return None


@functools.lru_cache(maxsize=4096)  # the same few domains, over and over
def _valid_domain(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        # RFC 5321 4.1.3: [192.0.2.1] or [IPv6:2001:db8::1], nothing in between.
        literal = domain[1:-1]
        try:
            if literal.lower().startswith("ipv6:"):
                return ipaddress.ip_address(literal[5:]).version == 6
            return ipaddress.ip_address(literal).version == 4
        except ValueError:
            return False
    try:
        ascii_domain = domain.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = ascii_domain.split(".")
    return 0 < len(ascii_domain) <= 253 and all(_LABEL.match(label) for label in labels)
