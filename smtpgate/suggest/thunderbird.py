"""Thunderbird and Betterbird: each profile in profiles.ini, and the outgoing servers in
its prefs.js (`mail.smtpserver.smtpN.*`), the one the default account sends through first.
"""

from __future__ import annotations

import configparser
import re
from dataclasses import replace
from pathlib import Path

from smtpgate.suggest.scan import Finding, Scan, Tls, port_number, tls_or_port_guess, valid_host

PROGRAM = "Thunderbird"
# Betterbird is a drop-in Thunderbird and uses ~/.thunderbird too; its own dirs come last.
PROFILE_ROOTS: tuple[tuple[str, str], ...] = (
    (PROGRAM, ".thunderbird"),
    (PROGRAM, ".mozilla-thunderbird"),  # Debian's old Icedove path, often a symlink
    (PROGRAM, "snap/thunderbird/common/.thunderbird"),
    (PROGRAM, ".var/app/org.mozilla.Thunderbird/.thunderbird"),  # Flatpak
    ("Betterbird", ".betterbird"),
    ("Betterbird", ".var/app/eu.betterbird.Betterbird/.thunderbird"),
)
# nsMsgSocketType, stored as try_ssl: 1 was "STARTTLS if offered", later migrated to 2.
SOCKET_TYPES: dict[int, Tls] = {0: "none", 1: "starttls", 2: "starttls", 3: "ssl"}
# nsMsgAuthMethod: 1 is "no authentication"; these sign in without a password.
AUTH_NONE = 1
FOREIGN_SIGN_IN = {5: "Kerberos (GSSAPI)", 6: "NTLM", 7: "a TLS client certificate", 10: "OAuth2"}

Prefs = dict[str, str | int | bool]
_PREF = re.compile(
    r'\s*(?:user_|sticky_)?pref\s*\(\s*"((?:[^"\\]|\\.)*)"\s*,'
    r'\s*("(?:[^"\\]|\\.)*"|-?[0-9]+|true|false)\s*\)\s*;\s*'
)
_BLOCK_COMMENT = re.compile(r"/\*.*?\*/", re.DOTALL)
_JS_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|x[0-9a-fA-F]{2}|.)", re.DOTALL)
_JS_CONTROL = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}
_SERVER_KEY = re.compile(r"^mail\.smtpserver\.([^.]+)\.hostname$")


def detect(scan: Scan) -> list[Finding]:
    findings: list[Finding] = []
    seen: set[Path] = set()
    for program, relative in PROFILE_ROOTS:
        for profile, is_default in profiles(scan, scan.home / relative):
            try:
                real = profile.resolve()
            except (OSError, RuntimeError):  # a symlink loop: read it as it is named
                real = profile
            if real not in seen:  # the same profile reached through a symlinked root
                seen.add(real)
                findings += servers(scan, program, profile, default_profile=is_default)
    return findings


def profiles(scan: Scan, root: Path) -> list[tuple[Path, bool]]:
    """The profile directories that root/profiles.ini lists, the default one first."""
    ini = root / "profiles.ini"
    text = scan.read(ini)
    if text is None:
        return []
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    try:
        parser.read_string(text, source=str(ini))
    except configparser.Error as error:
        scan.note(ini, f"not a valid profiles.ini ({str(error).splitlines()[0]}); skipped")
        return []
    # Since Thunderbird 68 an [Install...] section names the default profile per install.
    installed = [parser[s].get("Default") for s in parser.sections() if s.startswith("Install")]
    found: list[tuple[Path, bool]] = []
    for section in parser.sections():
        if not section.startswith("Profile"):
            continue
        entry = parser[section]
        where = entry.get("Path")
        if not where:
            scan.note(ini, f"[{section}] has no Path; skipped")
            continue
        path = root / where if entry.get("IsRelative", "1") == "1" else Path(where)
        default = where in installed if any(installed) else entry.get("Default") == "1"
        found.append((path, default))
    if len(found) == 1:
        found = [(found[0][0], True)]
    return sorted(found, key=lambda item: not item[1])


def servers(scan: Scan, program: str, profile: Path, *, default_profile: bool) -> list[Finding]:
    """The outgoing servers of one profile, the one its default identity uses first."""
    prefs_js = profile / "prefs.js"
    if not profile.is_dir():
        scan.looked.append(str(prefs_js))
        scan.note(profile, "profile directory named in profiles.ini is missing; skipped")
        return []
    text = scan.read(prefs_js)
    if text is None:
        return []
    prefs, bad_lines = parse_prefs(text)
    if bad_lines:
        scan.note(
            prefs_js,
            f"{len(bad_lines)} line(s) are not prefs (first: line {bad_lines[0]});"
            " skipped them (a half-written file?)",
        )
    used_by, default_key = identities(prefs)
    keys = _list(prefs, "mail.smtpservers") or sorted(
        {m.group(1) for name in prefs if (m := _SERVER_KEY.match(name))} - {"default"}
    )
    default_key = default_key or (keys[0] if keys else None)  # as Thunderbird falls back
    order = [default_key, *used_by, *keys]  # first place of each key in this list wins
    findings = []
    for key in sorted(keys, key=order.index):
        finding = _server(scan, prefs, key, program, str(prefs_js), used_by.get(key, []))
        if finding is not None:
            findings.append(replace(finding, default=default_profile and key == default_key))
    return findings


def identities(prefs: Prefs) -> tuple[dict[str, list[str]], str | None]:
    """Which identities (by address) send through which server key, accounts in order with
    the default account first; and the server key of the default account's first identity."""
    fallback = _text(prefs, "mail.smtp.defaultserver")
    accounts = _list(prefs, "mail.accountmanager.accounts")
    default_account = _text(prefs, "mail.accountmanager.defaultaccount")
    if default_account in accounts:
        accounts.remove(default_account)
        accounts.insert(0, default_account)
    used_by: dict[str, list[str]] = {}
    default_key = None
    for account in accounts:
        for identity in _list(prefs, f"mail.account.{account}.identities"):
            key = _text(prefs, f"mail.identity.{identity}.smtpServer") or fallback
            if key is None:
                continue
            address = _text(prefs, f"mail.identity.{identity}.useremail") or identity
            if address not in used_by.setdefault(key, []):
                used_by[key].append(address)
            if default_key is None and account == default_account:
                default_key = key
    return used_by, default_key or fallback


def _server(
    scan: Scan, prefs: Prefs, key: str, program: str, path: str, addresses: list[str]
) -> Finding | None:
    base = f"mail.smtpserver.{key}."
    host = _text(prefs, base + "hostname")
    if host is None:
        scan.note(path, f"outgoing server {key} has no hostname (a half-written file?); skipped")
        return None
    if not valid_host(host):
        scan.note(path, f"outgoing server {key}: {host!r} is not a host name; skipped")
        return None
    try_ssl = prefs.get(base + "try_ssl")
    stated = SOCKET_TYPES.get(try_ssl) if isinstance(try_ssl, int) else None
    if try_ssl is not None and stated is None:
        scan.note(path, f"outgoing server {key}: unknown try_ssl {try_ssl!r}; TLS mode unknown")
    raw_port = prefs.get(base + "port", 0)
    port = port_number(raw_port)
    if raw_port != 0 and port is None:
        scan.note(path, f"outgoing server {key}: port {raw_port!r} is not a port; skipped")
        return None
    port = port or (465 if stated == "ssl" else 25)  # port 0: Thunderbird's default by type
    auth = prefs.get(base + "authMethod")
    user = None if auth == AUTH_NONE else _text(prefs, base + "username")
    foreign = FOREIGN_SIGN_IN.get(auth) if isinstance(auth, int) else None
    return Finding(
        program=program,
        account=", ".join(addresses) or _text(prefs, base + "description") or key,
        path=path,
        host=host,
        port=port,
        tls=tls_or_port_guess(stated, port),
        user=user,
        caveat=f"{program} signs in with {foreign} there" if foreign else None,
    )


def parse_prefs(text: str) -> tuple[Prefs, list[int]]:
    """The prefs of a prefs.js, and the numbers of the lines that are not prefs."""
    prefs: Prefs = {}
    bad_lines = []
    # Blank out /* ... */ comments (the file's header) but keep their lines for numbering.
    text = _BLOCK_COMMENT.sub(lambda match: "\n" * match.group().count("\n"), text)
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith(("//", "#")):
            continue
        match = _PREF.fullmatch(line)
        if match is None:
            bad_lines.append(number)
            continue
        value = match.group(2)
        if value.startswith('"'):
            prefs[_unescape(match.group(1))] = _unescape(value[1:-1])
        elif value in ("true", "false"):
            prefs[_unescape(match.group(1))] = value == "true"
        else:
            prefs[_unescape(match.group(1))] = int(value)
    return prefs, bad_lines


def _unescape(text: str) -> str:
    def substitute(match: re.Match[str]) -> str:
        escape = match.group(1)
        if len(escape) > 1:  # uXXXX or xXX
            return chr(int(escape[1:], 16))
        return _JS_CONTROL.get(escape, escape)

    return _JS_ESCAPE.sub(substitute, text)


def _text(prefs: Prefs, name: str) -> str | None:
    value = prefs.get(name)
    return value.strip() or None if isinstance(value, str) else None


def _list(prefs: Prefs, name: str) -> list[str]:
    return [item.strip() for item in (_text(prefs, name) or "").split(",") if item.strip()]
