"""The environment, as a last resort: the SMTP_HOST / MAIL_HOST / EMAIL_HOST style variables
that scripts, Laravel, Django and nodemailer apps read. Only consulted when no mail
program's files had a server; *_PASSWORD variables are never read.
"""

from __future__ import annotations

from smtpgate.suggest.scan import Finding, Scan, Tls, port_number, tls_or_port_guess, valid_host

PROGRAM = "environment"
# One family of variables per prefix; the host variables in the order they are tried.
FAMILIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("SMTP_", ("SMTP_HOST", "SMTP_SERVER")),
    ("MAIL_", ("MAIL_HOST", "MAIL_SERVER", "MAIL_SMTP_HOST")),
    ("EMAIL_", ("EMAIL_HOST", "EMAIL_SMTP_HOST")),
)
USER_SUFFIXES = ("USER", "USERNAME", "HOST_USER", "LOGIN")
_TRUE = ("1", "true", "yes", "on")


def variables() -> list[str]:
    """Every variable name this detector may read, for "looked in"."""
    names = []
    for prefix, hosts in FAMILIES:
        names += [*hosts, f"{prefix}PORT", *(prefix + s for s in USER_SUFFIXES)]
    return names


def detect(scan: Scan) -> list[Finding]:
    scan.looked.append("environment: " + ", ".join(variables()))
    findings = []
    for prefix, hosts in FAMILIES:
        name = next((name for name in hosts if scan.environ.get(name, "").strip()), None)
        if name is None:
            continue
        host = scan.environ[name].strip()
        if not valid_host(host):
            scan.note(f"${name}", f"{host!r} is not a host name; skipped")
            continue
        stated = _tls(scan, prefix)
        raw_port = scan.environ.get(f"{prefix}PORT", "").strip()
        port = port_number(raw_port) if raw_port else (465 if stated == "ssl" else 25)
        if port is None:
            scan.note(f"${prefix}PORT", f"{raw_port!r} is not a port; skipped")
            continue
        user = next(
            (v for s in USER_SUFFIXES if (v := scan.environ.get(prefix + s, "").strip())), None
        )
        tls = tls_or_port_guess(stated, port)
        findings.append(Finding(PROGRAM, f"${name}", "environment", host, port, tls, user))
    return findings


def _tls(scan: Scan, prefix: str) -> Tls | None:
    """The mode the variables state. A false flag is not "plaintext": most tools still try
    STARTTLS then (nodemailer's secure=false), so it states nothing."""
    environ = scan.environ
    encryption = environ.get(f"{prefix}ENCRYPTION", "").strip().lower()  # Laravel
    if encryption in ("ssl", "smtps"):
        return "ssl"
    if encryption in ("tls", "starttls"):
        return "starttls"
    for suffix in ("SSL", "USE_SSL", "SECURE"):
        if environ.get(prefix + suffix, "").strip().lower() in _TRUE:
            return "ssl"
    for suffix in ("TLS", "USE_TLS", "STARTTLS"):
        if environ.get(prefix + suffix, "").strip().lower() in _TRUE:
            return "starttls"
    return None
