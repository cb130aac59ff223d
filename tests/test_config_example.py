"""config/smtpgate.toml is the documented example of every key: it must load, and miss none."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

from smtpgate.config import (
    AuthConfig,
    Config,
    DeliveryConfig,
    DirectConfig,
    DnsConfig,
    HttpConfig,
    ListenerTlsConfig,
    LogConfig,
    RelayConfig,
    RouteConfig,
    RuleConfig,
    ServerConfig,
    SpoolConfig,
)
from smtpgate.configfile import load

EXAMPLE = Path(__file__).parent.parent / "config" / "smtpgate.toml"
TABLES: dict[tuple[str, ...], type] = {  # the tables that document each model
    ("server",): ServerConfig,
    ("server.tls",): ListenerTlsConfig,
    ("server.auth",): AuthConfig,
    ("spool",): SpoolConfig,
    ("log",): LogConfig,
    ("delivery",): DeliveryConfig,
    ("direct",): DirectConfig,
    ("dns",): DnsConfig,
    ("http",): HttpConfig,
    ("relays.corp",): RelayConfig,
    ("routes.corp", "routes.newsletter"): RouteConfig,
    ("[rules]",): RuleConfig,
}


def _sections(text: str) -> dict[str, str]:
    """The text under each [table] / [[table]] header, commented lines included."""
    sections: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        header = re.match(r"^\[(\[?[\w.]+\]?)\]\s*$", line)
        if header:
            name = header.group(1)
            sections.setdefault(name, "")
        else:
            sections[name] = sections.get(name, "") + line + "\n"
    return sections


def test_example_loads_and_passes_config_check(tmp_path: Path) -> None:
    config = load(EXAMPLE, environ={}, state_dir=str(tmp_path))
    assert config.relays["corp"].host == "smtp.example.com"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "smtpgate",
            "config",
            "check",
            "--config",
            str(EXAMPLE),
            "--state-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_example_documents_every_key() -> None:
    sections = _sections(EXAMPLE.read_text())
    assert {f.name for f in dataclasses.fields(Config)} == {
        "server",
        "spool",
        "log",
        "delivery",
        "direct",
        "dns",
        "http",
        "relays",
        "routes",
        "rules",
    }
    for tables, model in TABLES.items():
        for table in tables:
            assert table in sections, f"[{table}] is missing from {EXAMPLE.name}"
        body = "".join(sections[table] for table in tables)
        for key in (f.name for f in dataclasses.fields(model)):
            if (f"{tables[0]}.{key}",) in TABLES:
                continue  # a table of its own, such as [server.tls]
            assert re.search(rf"^#? ?{key} = ", body, re.MULTILINE), (
                f"{' or '.join(tables)}.{key} is not documented in {EXAMPLE.name}"
            )


def test_example_defaults_are_the_real_defaults(tmp_path: Path) -> None:
    """Keys the example sets without saying 'example' must equal the embedded defaults."""
    example = load(EXAMPLE, environ={}, state_dir=str(tmp_path))
    defaults = load(None, environ={}, state_dir=str(tmp_path))
    assert example.server == defaults.server
    assert example.log == defaults.log
    assert example.delivery == defaults.delivery
    assert example.spool == defaults.spool
    assert example.direct == defaults.direct
    assert example.dns == defaults.dns
    assert example.http == defaults.http
