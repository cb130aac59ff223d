"""mutt and neomutt: `smtp_url` ("smtp://user@host:port/" or "smtps://...") in their rc
files, set at the top level or inside a hook; the password in the URL is never kept.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

from smtpgate.suggest.scan import Finding, Scan, Tls, tls_or_port_guess, valid_host

_ASSIGNMENT = r"\s*=\s*(?:\"((?:[^\"\\]|\\.)*)\"|'([^']*)'|([^\s;'\"]+))"
_SMTP_URL = re.compile(r"\bsmtp_url" + _ASSIGNMENT)
_FROM = re.compile(r"^set\s.*?\bfrom" + _ASSIGNMENT)
# smtps:// is TLS from the first byte; smtp:// says nothing (mutt tries STARTTLS if offered).
SCHEMES: dict[str, tuple[Tls | None, int]] = {"smtps": ("ssl", 465), "smtp": (None, 25)}


def rc_files(scan: Scan) -> list[tuple[str, Path]]:
    config = scan.config_home
    return [
        ("mutt", scan.home / ".muttrc"),
        ("mutt", scan.home / ".mutt" / "muttrc"),
        ("mutt", config / "mutt" / "muttrc"),
        ("neomutt", scan.home / ".neomuttrc"),
        ("neomutt", config / "neomutt" / "neomuttrc"),
    ]


def detect(scan: Scan) -> list[Finding]:
    findings: list[Finding] = []
    for program, path in rc_files(scan):
        text = scan.read(path)
        if text is not None:
            findings += _rc(scan, program, path, text)
    return findings


def _rc(scan: Scan, program: str, path: Path, text: str) -> list[Finding]:
    sender = None
    found: list[tuple[Finding, bool]] = []  # and whether a top-level `set` made it
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#"):
            continue
        if (match := _FROM.match(line)) is not None:
            sender = _value(match)
        for match in _SMTP_URL.finditer(line):
            url = _value(match)
            top_level = line.startswith("set ")
            account = "smtp_url" if top_level else f"{line.split()[0]}, line {number}"
            finding = _from_url(scan, str(path), number, url, program, account)
            if finding is not None:
                found.append((finding, top_level))
    # The last top-level `set smtp_url` is the one mutt starts with.
    top = [finding for finding, top_level in found if top_level]
    default = top[-1] if top else None
    return [
        replace(finding, default=True, account=sender or finding.account)
        if finding is default
        else finding
        for finding, _ in found
    ]


def _value(match: re.Match[str]) -> str:
    """The assigned value: "double quoted" (with backslash escapes), 'single', or bare."""
    double, single, bare = match.groups()
    if double is not None:
        return re.sub(r"\\(.)", r"\1", double)
    return single if single is not None else bare


def _from_url(
    scan: Scan, path: str, number: int, url: str, program: str, account: str
) -> Finding | None:
    if "$" in url or "`" in url:
        scan.note(path, f"line {number}: smtp_url is computed (a variable or command); skipped")
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # the URL itself is never printed: it may hold a password
        scan.note(path, f"line {number}: smtp_url is not a valid URL; skipped")
        return None
    scheme = SCHEMES.get(parts.scheme.lower())
    if scheme is None:
        scan.note(path, f"line {number}: smtp_url is not smtp:// or smtps://; skipped")
        return None
    host = parts.hostname
    if not host or not valid_host(host):
        scan.note(path, f"line {number}: smtp_url has no valid host; skipped")
        return None
    stated, default_port = scheme
    port = port or default_port
    return Finding(
        program=program,
        account=account,
        path=path,
        host=host,
        port=port,
        tls=tls_or_port_guess(stated, port),
        user=unquote(parts.username) if parts.username else None,
    )
