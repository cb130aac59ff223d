"""Evolution: the SMTP mail transports among its ESource key files
($XDG_CONFIG_HOME/evolution/sources/*.source), named by the identities that send through them.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import replace
from pathlib import Path

from smtpgate.suggest.scan import Finding, Scan, Tls, port_number, tls_or_port_guess, valid_host

PROGRAM = "Evolution"
# CamelNetworkSecurityMethod nicks, as [Security] Method stores them.
SECURITY: dict[str, Tls] = {
    "none": "none",
    "starttls-on-standard-port": "starttls",
    "ssl-on-alternate-port": "ssl",
}
_KEYFILE_ESCAPE = re.compile(r"\\(.)")
_KEYFILE_CONTROL = {"s": " ", "n": "\n", "t": "\t", "r": "\r"}

Source = configparser.ConfigParser


def detect(scan: Scan) -> list[Finding]:
    sources: dict[str, tuple[Path, Source]] = {}
    for path in scan.listing(scan.config_home / "evolution" / "sources", "*.source"):
        source = _key_file(scan, path)
        if source is not None:
            sources[path.stem] = (path, source)  # a source's UID is its file name
    senders: dict[str, list[str]] = {}
    for _, source in sources.values():
        transport = value(source, "Mail Submission", "TransportUid")
        address = value(source, "Mail Identity", "Address")
        if transport and address:
            senders.setdefault(transport, []).append(address)
    findings = [
        finding
        for uid, (path, source) in sources.items()
        if value(source, "Mail Transport", "BackendName") == "smtp"
        and (finding := _transport(scan, path, source, senders.get(uid) or [_name(source, uid)]))
        is not None
    ]
    # Evolution keeps its default account in GSettings, not in these files: one transport
    # is the default by being the only one.
    if len(findings) == 1:
        findings = [replace(findings[0], default=True)]
    return findings


def _transport(scan: Scan, path: Path, source: Source, senders: list[str]) -> Finding | None:
    if value(source, "Data Source", "Enabled") == "false":
        scan.note(path, "this mail transport is disabled in Evolution; skipped")
        return None
    # The transport's server is in [Authentication]; [Network] HostName is read as well.
    host = value(source, "Authentication", "Host") or value(source, "Network", "HostName")
    if host is None:
        scan.note(path, "mail transport without a host (an online account?); skipped")
        return None
    if not valid_host(host):
        scan.note(path, f"{host!r} is not a host name; skipped")
        return None
    method = value(source, "Security", "Method")
    stated = SECURITY.get(method or "")
    if method is not None and stated is None:
        scan.note(path, f"unknown [Security] Method {method!r}; TLS mode unknown")
    raw_port = value(source, "Authentication", "Port") or value(source, "Network", "Port")
    port = port_number(raw_port)
    if raw_port not in (None, "0") and port is None:
        scan.note(path, f"port {raw_port!r} is not a port; skipped")
        return None
    port = port or (465 if stated == "ssl" else 25)
    user = value(source, "Authentication", "User") or value(source, "Network", "User")
    sign_in = (value(source, "Authentication", "Method") or "").upper()
    foreign = "OAuth2" if "OAUTH" in sign_in else "Kerberos (GSSAPI)" if sign_in == "GSSAPI" else ""
    return Finding(
        program=PROGRAM,
        account=", ".join(senders),
        path=str(path),
        host=host,
        port=port,
        tls=tls_or_port_guess(stated, port),
        user=user,
        caveat=f"Evolution signs in with {foreign} there" if foreign else None,
    )


def _name(source: Source, uid: str) -> str:
    return value(source, "Data Source", "DisplayName") or uid


def _key_file(scan: Scan, path: Path) -> Source | None:
    text = scan.read(path)
    if text is None:
        return None
    parser = configparser.ConfigParser(
        interpolation=None, strict=False, delimiters=("=",), comment_prefixes=("#",)
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # GKeyFile keys keep case
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as error:
        scan.note(path, f"not a key file ({str(error).splitlines()[0]}); skipped")
        return None
    return parser


def value(source: Source, section: str, key: str) -> str | None:
    """A GKeyFile value with its escapes undone; None when absent or empty."""
    raw = source.get(section, key, fallback=None)
    if raw is None:
        return None
    text = _KEYFILE_ESCAPE.sub(lambda m: _KEYFILE_CONTROL.get(m.group(1), m.group(1)), raw)
    return text.strip() or None
