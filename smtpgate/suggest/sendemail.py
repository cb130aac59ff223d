"""git send-email: `sendemail.smtpServer`, `smtpServerPort`, `smtpEncryption` and `smtpUser`
in the user's git config ($XDG_CONFIG_HOME/git/config, then ~/.gitconfig, which wins), with
`[sendemail "identity"]` sections and the identity `sendemail.identity` picks.
"""

from __future__ import annotations

import re
from pathlib import Path

from smtpgate.suggest.scan import Finding, Scan, Tls, port_number, tls_or_port_guess, valid_host

PROGRAM = "git send-email"
# git's own words: "tls" is STARTTLS; any other value but "ssl" reverts to plain SMTP.
ENCRYPTION: dict[str, Tls] = {"ssl": "ssl", "tls": "starttls"}
SERVICES = {"smtp": 25, "submission": 587, "smtps": 465, "submissions": 465, "ssmtp": 465}
SERVER_KEYS = ("smtpserver", "smtpserverport", "smtpencryption", "smtpuser", "smtpssl")
KEPT = frozenset({*SERVER_KEYS, "smtpauth", "identity"})  # never smtpPass

# Section names and keys are case-insensitive in git; "subsection" names are not.
_SECTION = re.compile(r'\[\s*([A-Za-z0-9.-]+)(?:\s+"((?:[^"\\]|\\.)*)")?\s*\](.*)')
_KEY = re.compile(r"([A-Za-z][A-Za-z0-9-]*)\s*(?:=(.*))?")
_ESCAPES = {"n": "\n", "t": "\t", "b": "\b"}

Values = dict[str, tuple[str, str]]  # key -> (value, the file it came from)


def detect(scan: Scan) -> list[Finding]:
    sections: dict[str | None, Values] = {}  # [sendemail] is None, [sendemail "x"] is "x"
    for path in (scan.config_home / "git" / "config", scan.home / ".gitconfig"):
        text = scan.read(path)
        if text is None:
            continue
        for section, subsection, key, value in entries(scan, path, text):
            if section == "sendemail" and key in KEPT:
                sections.setdefault(subsection, {})[key] = (value, str(path))
    base = sections.pop(None, {})
    picked = base.get("identity", ("", ""))[0]
    candidates: list[tuple[str, Values, bool]] = []
    if "smtpserver" in base:
        uses_base = picked not in sections or not _has_server(sections[picked])
        candidates.append(("[sendemail]", base, uses_base))
    for name, own in sections.items():
        if _has_server(own):  # an identity that only sets `from` sends as [sendemail] does
            candidates.append((f'[sendemail "{name}"]', {**base, **own}, name == picked))
    if len(candidates) == 1:
        candidates = [(candidates[0][0], candidates[0][1], True)]
    findings = []
    for account, values, default in candidates:
        finding = _finding(scan, account, values, default)
        if finding is not None:
            findings.append(finding)
    return findings


def _has_server(values: Values) -> bool:
    return any(key in values for key in SERVER_KEYS)


def _finding(scan: Scan, account: str, values: Values, default: bool) -> Finding | None:
    server, path = values.get("smtpserver", ("", ""))
    if not server:
        return None  # git sends with sendmail then
    if server.startswith(("/", "~")):
        scan.note(path, f"{account} smtpServer is a program, not an SMTP server; skipped")
        return None
    host, _, suffix = server.rpartition(":")
    if not host or ":" in host or not suffix.isdigit():  # "host:port" is read as git once did
        host, suffix = server, ""
    if not valid_host(host):
        scan.note(path, f"{account} smtpServer {host!r} is not a host name; skipped")
        return None
    encryption = values.get("smtpencryption", ("", ""))[0].strip().lower()
    stated: Tls | None = ENCRYPTION.get(encryption, "none") if encryption else None
    if stated is None and values.get("smtpssl", ("", ""))[0].lower() in ("true", "yes", "1"):
        stated = "ssl"  # the deprecated sendemail.smtpssl
    raw_port = values.get("smtpserverport", (suffix, ""))[0]
    port = SERVICES.get(raw_port.lower()) or port_number(raw_port)
    if raw_port and port is None:
        scan.note(path, f"{account} smtpServerPort {raw_port!r} is not a port; skipped")
        return None
    port = port or (465 if stated == "ssl" else 25)
    user = values.get("smtpuser", ("", ""))[0] or None
    if values.get("smtpauth", ("", ""))[0].lower() == "none":
        user = None  # sendemail.smtpAuth = none: no SMTP AUTH at all
    return Finding(
        program=PROGRAM,
        account=account,
        path=path,
        host=host,
        port=port,
        tls=tls_or_port_guess(stated, port),
        user=user,
        default=default,
    )


def entries(scan: Scan, path: Path, text: str) -> list[tuple[str, str | None, str, str]]:
    """(section, subsection, key, value) of a git config file, read as git reads it:
    quotes, escapes, # and ; comments, backslash continuations. Lines it cannot read are
    skipped with one note."""
    found = []
    section: str | None = None
    subsection: str | None = None
    bad = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        number, line = index + 1, lines[index].strip()
        index += 1
        if header := _SECTION.match(line):
            name, quoted, line = header.groups()
            section, _, legacy = name.lower().partition(".")  # [section.sub] is old syntax
            subsection = _unescape(quoted) if quoted is not None else (legacy or None)
            line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key = _KEY.fullmatch(line)
        if key is None or section is None:
            bad.append(number)
            continue
        raw = key.group(2)
        if raw is None:
            found.append((section, subsection, key.group(1).lower(), "true"))  # a bare key
            continue
        value, continued = _value(raw)
        while continued and index < len(lines):
            more, continued = _value(lines[index])
            value += more
            index += 1
        found.append((section, subsection, key.group(1).lower(), value))
    if bad:
        scan.note(path, f"{len(bad)} line(s) are not git config (first: line {bad[0]}); skipped")
    return found


def _value(raw: str) -> tuple[str, bool]:
    """A value, and whether a trailing backslash continues it on the next line."""
    out: list[str] = []
    quoted = False
    index = 0
    while index < len(raw):
        char = raw[index]
        index += 1
        if char == "\\":
            if index == len(raw):
                return "".join(out).strip(), True
            out.append(_ESCAPES.get(raw[index], raw[index]))
            index += 1
        elif char == '"':
            quoted = not quoted
        elif char in "#;" and not quoted:
            break
        else:
            out.append(char)
    return "".join(out).strip(), False


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", r"\1", text)
