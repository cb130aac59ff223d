"""Suggestions: every detector's findings, merged and ranked with the likely default first.

Identical findings from several programs become one suggestion naming every source.
Findings that disagree about one host (its port or TLS mode) stay apart, each flagged as
conflicting: which one is right is for the person to say, not for a merge to guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from smtpgate.suggest import environment, evolution, msmtp, mutt, sendemail, thunderbird
from smtpgate.suggest.scan import Finding, Scan, Tls

Detector = Callable[[Scan], list[Finding]]
DETECTORS: tuple[tuple[str, Detector], ...] = (
    ("Thunderbird and Betterbird", thunderbird.detect),
    ("Evolution", evolution.detect),
    ("msmtp", msmtp.detect),
    ("mutt and neomutt", mutt.detect),
    ("git send-email", sendemail.detect),
)
# Among equals, a mail program people send from by hand before tools that borrow a server.
PROGRAM_ORDER = (
    thunderbird.PROGRAM,
    "Betterbird",
    evolution.PROGRAM,
    msmtp.PROGRAM,
    "mutt",
    "neomutt",
    sendemail.PROGRAM,
    environment.PROGRAM,
)


@dataclass(frozen=True)
class Suggestion:
    """One server setting (host, port, TLS mode, user) and every program that has it."""

    findings: tuple[Finding, ...]
    conflicting: bool = False  # another suggestion has the same host with another port or TLS

    @property
    def host(self) -> str:
        return self.findings[0].host

    @property
    def port(self) -> int:
        return self.findings[0].port

    @property
    def tls(self) -> Tls | None:
        return self.findings[0].tls

    @property
    def user(self) -> str | None:
        return self.findings[0].user

    @property
    def default(self) -> bool:
        return any(finding.default for finding in self.findings)

    @property
    def programs(self) -> list[str]:
        return list(dict.fromkeys(finding.program for finding in self.findings))

    @property
    def accounts(self) -> list[str]:
        return list(dict.fromkeys(finding.account for finding in self.findings))

    @property
    def caveats(self) -> list[str]:
        return list(dict.fromkeys(f.caveat for f in self.findings if f.caveat))

    def row(self) -> list[str]:
        """Program, account, host, port, TLS, user, note: a row of the table people read."""
        return [
            ", ".join(self.programs),
            ", ".join(self.accounts),
            self.host,
            str(self.port),
            self.tls or "?",
            self.user or "",
            "conflicting" if self.conflicting else "",
        ]

    def as_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "tls": self.tls,
            "user": self.user,
            "default": self.default,
            "conflicting": self.conflicting,
            "sources": [
                {
                    "program": finding.program,
                    "account": finding.account,
                    "path": finding.path,
                    "default": finding.default,
                    "caveat": finding.caveat,
                }
                for finding in self.findings
            ],
        }


def survey(scan: Scan) -> list[Suggestion]:
    """Run every detector; the environment only when the files had nothing."""
    findings = [finding for name, detect in DETECTORS for finding in _run(scan, name, detect)]
    if not findings:
        findings = _run(scan, "the environment", environment.detect)
    return rank(merge(findings))


def merge(findings: list[Finding]) -> list[Suggestion]:
    """One suggestion per distinct setting, in the order first found; conflicts flagged."""
    groups: dict[tuple[str, int, Tls | None, str | None], list[Finding]] = {}
    for finding in findings:
        groups.setdefault(_setting(finding), []).append(finding)
    shapes: dict[str, set[tuple[int, Tls | None]]] = {}
    for host, port, tls, _ in groups:
        shapes.setdefault(host, set()).add((port, tls))
    return [
        Suggestion(tuple(group), conflicting=len(shapes[setting[0]]) > 1)
        for setting, group in groups.items()
    ]


def rank(suggestions: list[Suggestion]) -> list[Suggestion]:
    """A program's default first; then what more programs agree on; then program order.
    Conflicting suggestions for a host follow its most likely one, to be compared."""

    def likelihood(item: tuple[int, Suggestion]) -> tuple[bool, int, int, int]:
        index, suggestion = item
        order = min(_program_rank(program) for program in suggestion.programs)
        return (not suggestion.default, -len(suggestion.programs), order, index)

    ranked = [suggestion for _, suggestion in sorted(enumerate(suggestions), key=likelihood)]
    by_host: dict[str, list[Suggestion]] = {}
    for suggestion in ranked:
        by_host.setdefault(_setting(suggestion.findings[0])[0], []).append(suggestion)
    return [suggestion for group in by_host.values() for suggestion in group]


def _setting(finding: Finding) -> tuple[str, int, Tls | None, str | None]:
    return finding.host.lower().rstrip("."), finding.port, finding.tls, finding.user


def _program_rank(program: str) -> int:
    return PROGRAM_ORDER.index(program) if program in PROGRAM_ORDER else len(PROGRAM_ORDER)


def _run(scan: Scan, name: str, detect: Detector) -> list[Finding]:
    try:
        return detect(scan)
    except Exception as error:  # a reader's bug must not hide what the other readers found
        scan.notes.append(f"reading {name} failed ({type(error).__name__}: {error}); skipped")
        return []


def footnotes(suggestions: list[Suggestion], *, writing: bool) -> list[str]:
    """What a person should know about the table: unknown TLS, conflicts, sign-in caveats."""
    lines = []
    if any(s.tls is None for s in suggestions):
        lines.append(
            "TLS ?: the program does not say; --write writes starttls, which never falls"
            " back to plaintext"
        )
    if any(s.conflicting for s in suggestions):
        lines.append(
            "conflicting: programs disagree about this host's port or TLS mode; try each"
            " with --write --pick N --test"
        )
    for number, suggestion in enumerate(suggestions, 1):
        lines += [
            f"#{number}: {caveat}; smtpgate signs in with a password (an app password"
            " where the provider offers one)"
            for caveat in suggestion.caveats
        ]
    if not writing:
        lines.append(
            "write #1 as a relay: smtpgate suggest --write [--pick N] [--default] [--test]"
        )
    return ["", *lines] if lines else []
