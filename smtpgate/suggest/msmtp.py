"""msmtp: the accounts of ~/.msmtprc or $XDG_CONFIG_HOME/msmtp/config, with `defaults`,
inheritance (`account NAME : PARENT`) and the `default` account it uses without `-a`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from smtpgate.suggest.scan import Finding, Scan, Tls, port_number, tls_or_port_guess, valid_host

PROGRAM = "msmtp"
# Every command of msmtp 1.8, so that a typo is named rather than silently ignored.
COMMANDS = frozenset(
    """
    defaults account host port source_ip proxy_host proxy_port socket timeout protocol
    domain auth user password passwordeval ntlmdomain tls tls_starttls tls_trust_file
    tls_crl_file tls_fingerprint tls_key_file tls_cert_file tls_certcheck tls_nocertcheck
    tls_min_dh_prime_bits tls_priorities tls_host_override tls_force_sslv3 from
    from_full_name allow_from_override set_from_header set_date_header set_msgid_header
    remove_bcc_headers undisclosed_recipients dsn_return dsn_notify logfile
    logfile_time_format syslog aliases auto_from maildomain add_missing_from_header
    add_missing_date_header keepbcc eval
    """.split()
)
# What a suggestion needs; the password and passwordeval lines are never kept.
KEPT = frozenset({"host", "port", "tls", "tls_starttls", "auth", "user", "protocol", "from"})
FOREIGN_SIGN_IN = {
    "oauthbearer": "OAuth2",
    "xoauth2": "OAuth2",
    "gssapi": "Kerberos (GSSAPI)",
    "ntlm": "NTLM",
    "external": "a TLS client certificate",
}
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Account:
    name: str
    line: int
    parents: list[str]
    settings: dict[str, str]
    own_commands: int = 0

    def is_alias(self) -> bool:
        """`account default : NAME` and nothing more: another name for NAME."""
        return self.own_commands == 0 and len(self.parents) == 1


@dataclass
class Rc:
    """One msmtp config file, read: its accounts in order of definition."""

    accounts: dict[str, Account] = field(default_factory=dict)

    def default_name(self) -> str | None:
        """The account msmtp uses without `-a`: `account default`, which is usually an alias
        (`account default : NAME`); one account alone is the default in all but name."""
        default = self.accounts.get("default")
        if default is not None and default.is_alias():
            return default.parents[0]
        if default is not None:
            return "default"
        return next(iter(self.accounts)) if len(self.accounts) == 1 else None


def detect(scan: Scan) -> list[Finding]:
    findings: list[Finding] = []
    in_use = True  # msmtp reads ~/.msmtprc, and the XDG file only when there is none
    for path in (scan.home / ".msmtprc", scan.config_home / "msmtp" / "config"):
        text = scan.read(path)
        if text is None:
            continue
        rc = parse(scan, path, text)
        default = rc.default_name() if in_use else None
        for account in rc.accounts.values():
            if account.name == "default" and account.is_alias():
                continue  # the account it names is listed itself
            finding = _finding(scan, path, account, default=account.name == default)
            if finding is not None:
                findings.append(finding)
        in_use = False
    return findings


def parse(scan: Scan, path: Path, text: str) -> Rc:
    rc = Rc()
    defaults: dict[str, str] = {}
    current = defaults  # commands before any `account` act as defaults
    owner: Account | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        command, *rest = line.split(maxsplit=1)
        argument = _argument(rest[0] if rest else "")
        if command == "defaults":
            current, owner = defaults, None
        elif command == "account":
            name, _, inherits = argument.partition(":")
            parents = [p.strip() for p in inherits.split(",") if p.strip()]
            settings = dict(defaults)
            for parent in parents:
                if parent in rc.accounts:
                    settings.update(rc.accounts[parent].settings)
                else:
                    scan.note(path, f"line {number}: account {parent!r} is not defined above")
            owner = Account(name.strip(), number, parents, settings)
            rc.accounts[owner.name] = owner
            current = settings
        elif command not in COMMANDS:
            scan.note(path, f"line {number}: unknown command {command!r}; ignored")
        else:
            if owner is not None:
                owner.own_commands += 1
            if command in KEPT:
                current[command] = argument
    return rc


def _finding(scan: Scan, path: Path, account: Account, *, default: bool) -> Finding | None:
    settings = account.settings
    where = f"account {account.name} (line {account.line})"
    if settings.get("protocol", "smtp") != "smtp":
        scan.note(path, f"{where} speaks {settings['protocol']}, not SMTP; skipped")
        return None
    host = settings.get("host")
    if not host:
        scan.note(path, f"{where} has no host; skipped")
        return None
    if not valid_host(host):
        scan.note(path, f"{where}: {host!r} is not a host name; skipped")
        return None
    stated: Tls | None = None
    if "tls" in settings:
        stated = "none"
        if _on(settings["tls"]):
            stated = "starttls" if _on(settings.get("tls_starttls", "on")) else "ssl"
    port = port_number(settings.get("port", 465 if stated == "ssl" else 25))
    if port is None:
        scan.note(path, f"{where}: port {settings['port']!r} is not a port; skipped")
        return None
    auth = settings.get("auth", "off").lower()
    user = settings.get("user") or None
    if user and not _on(auth):
        scan.note(path, f"{where} has a user but auth is off, so msmtp does not sign in")
        user = None
    foreign = FOREIGN_SIGN_IN.get(auth)
    return Finding(
        program=PROGRAM,
        account=account.name,
        path=str(path),
        host=host,
        port=port,
        tls=tls_or_port_guess(stated, port),
        user=user,
        default=default,
        caveat=f"msmtp signs in with {foreign} there" if foreign else None,
    )


def _argument(rest: str) -> str:
    """An argument: in double quotes (with backslash escapes), or up to a # comment."""
    rest = rest.strip()
    quoted = _QUOTED.match(rest)
    if quoted:
        return re.sub(r"\\(.)", r"\1", quoted.group(1))
    return re.split(r"\s+#", rest, maxsplit=1)[0].strip()


def _on(flag: str) -> bool:
    """msmtp's on/off; an empty argument means on, and `auth` may also name a method."""
    return flag.strip().lower() not in ("off", "false", "no", "0")
