"""A suggestion written into the config file: `[relays.NAME]`, a relay `[routes.NAME]`, and
on request `server.default_route`, with every other line and comment left as it was.

tomlkit keeps the file's layout: new tables go at the end, a replaced table keeps its
place and the comments that follow it, and the result must load as a valid config
before it atomically replaces the file.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import Item, Table

from smtpgate.config import BUILTIN_DIRECT_ROUTE, ConfigError
from smtpgate.configfile import load
from smtpgate.suggest.survey import Suggestion

# Host name labels that say "mail server" rather than whose server it is.
GENERIC_LABELS = frozenset(
    """smtp smtps mail email out outgoing send submission relay mx smtp-mail smtpout
    mailout securesmtp asmtp auth smtp-relay""".split()
)
SECOND_LEVEL = frozenset({"co", "com", "net", "org", "ac", "gov", "edu", "ne", "or"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def relay_name(host: str) -> str:
    """A short name for the relay: whose server it is ("smtp.gmail.com" -> "gmail")."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return "relay"
    except ValueError:
        pass
    labels = host.lower().rstrip(".").split(".")
    if len(labels) > 1:
        labels.pop()  # the top-level domain
    if len(labels) > 1 and labels[-1] in SECOND_LEVEL:
        labels.pop()  # example.co.uk
    meaningful = [label for label in labels if label not in GENERIC_LABELS] or labels
    name = re.sub(r"[^a-z0-9]+", "_", meaningful[-1]).strip("_") or "relay"
    if name[0].isdigit():
        name = f"relay_{name}"
    return f"{name}_relay" if name == BUILTIN_DIRECT_ROUTE else name


@dataclass(frozen=True)
class Proposal:
    """The relay and route a suggestion becomes, under one name."""

    name: str
    suggestion: Suggestion

    @classmethod
    def of(cls, suggestion: Suggestion, name: str | None = None) -> Proposal:
        if name is None:
            return cls(relay_name(suggestion.host), suggestion)
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--name {name!r}: use letters, digits, _ and -, starting a letter")
        if name == BUILTIN_DIRECT_ROUTE:
            raise ConfigError(f"--name {name!r} is the built-in direct route; choose another")
        return cls(name, suggestion)

    @property
    def password_env(self) -> str | None:
        """Where smtpgate will read the password: never in the file, never read here."""
        if self.suggestion.user is None:
            return None
        return f"SMTPGATE_{re.sub(r'[^A-Z0-9]+', '_', self.name.upper())}_PASSWORD"

    @property
    def tls(self) -> str:
        # Unknown: starttls, which never falls back to plaintext; `check` shows if it works.
        return self.suggestion.tls or "starttls"

    def relay_table(self) -> Table:
        suggestion = self.suggestion
        table = tomlkit.table()
        table.add(tomlkit.comment(f"found by smtpgate suggest in {self.sources()}"))
        table.add("host", suggestion.host)
        table.add("port", suggestion.port)
        table.add("tls", _commented(self.tls, None if suggestion.tls else _TLS_GUESSED))
        if suggestion.user is not None:
            table.add("username", suggestion.user)
            table.add("password_env", _commented(self.password_env, "set it where smtpgate runs"))
            if self.tls == "none":
                table.add("allow_plaintext_auth", _commented(True, _PLAINTEXT))
        return table

    def sources(self) -> str:
        """'Thunderbird (me@example.com), msmtp (work)': who had this server."""
        findings = self.suggestion.findings
        return ", ".join(
            f"{program} ({', '.join(f.account for f in findings if f.program == program)})"
            for program in self.suggestion.programs
        )

    def route_table(self) -> Table:
        table = tomlkit.table()
        table.add("mode", "relay")
        table.add("relay", self.name)
        return table


_TLS_GUESSED = "the program does not say; starttls never falls back to plaintext"
_PLAINTEXT = "as the program did: the password crosses the network unencrypted"


def write(path: Path, proposal: Proposal, *, make_default: bool, force: bool) -> bool:
    """Add the proposal to the config file at `path` (created when missing); True when it
    replaced tables of that name. Raises ConfigError, and writes nothing, when the name is
    taken without `force` or the result would not be a valid config."""
    path = path.resolve()  # a symlinked config is written where it points
    try:
        original = path.read_text(encoding="utf-8") if path.exists() else ""
        document = tomlkit.parse(original)
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except TOMLKitError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    name = proposal.name
    taken = [f"[{kind}.{name}]" for kind in ("relays", "routes") if name in _tables(document, kind)]
    if taken and not force:
        raise ConfigError(
            f"{path} already has {' and '.join(taken)}: --force replaces it,"
            " --name NAME writes it under another name"
        )
    appended = tomlkit.document()
    for kind, table in (("relays", proposal.relay_table()), ("routes", proposal.route_table())):
        existing = _tables(document, kind)
        if name in existing:
            _replace(existing, f"{kind}.{name}", name, table)
        else:
            appended.setdefault(kind, tomlkit.table(is_super_table=True))[name] = table
    if make_default:
        if "server" in document:
            _set(document["server"], "default_route", name)
        else:
            appended["server"] = tomlkit.table().add("default_route", name)
    text = tomlkit.dumps(document)
    if appended:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + tomlkit.dumps(appended)
    _replace_file(path, text)
    return bool(taken)


def _tables(document: tomlkit.TOMLDocument, kind: str) -> MutableMapping[str, Any]:
    tables = document.get(kind)
    return tables if isinstance(tables, MutableMapping) else {}


def _replace(container: MutableMapping[str, Any], where: str, name: str, table: Table) -> None:
    old = container[name]
    if not isinstance(old, Table):
        raise ConfigError(f"[{where}] is written inline; replace it by hand or use --name")
    for item in _pop_trailing_trivia(old):  # the comments above the next table stay there
        table.value.append(None, item)
    container[name] = table


def _set(table: object, key: str, value: str) -> None:
    """Set a key in a table, in place when present, else after its last key: appending
    would put it below the comments that belong to the next table."""
    if not isinstance(table, MutableMapping):
        raise ConfigError("server is not a table; cannot set server.default_route")
    if key in table or not isinstance(table, Table):
        table[key] = value
        return
    trailing = _pop_trailing_trivia(table)
    table.add(key, value)
    for item in trailing:
        table.value.append(None, item)


def _pop_trailing_trivia(table: Table) -> list[Item]:
    """Remove and return the comments and blank lines at the end of a table's body."""
    body = table.value.body  # the live list; trailing items have no key, so no index moves
    trailing: list[Item] = []
    while body and body[-1][0] is None:
        trailing.insert(0, body.pop()[1])
    return trailing


def _commented(value: Any, comment: str | None) -> Item:
    item: Item = tomlkit.item(value)
    if comment:
        item.comment(comment)
        item.trivia.comment_ws = "  "
    return item


def _replace_file(path: Path, text: str) -> None:
    """Write beside the file, load it as smtpgate would, then rename it over the file."""
    temporary = path.with_name(f".{path.name}.suggest-{os.getpid()}.tmp")
    try:
        with temporary.open("x", encoding="utf-8") as handle:  # mode from the umask
            handle.write(text)
        if path.exists():
            shutil.copymode(path, temporary)
        try:
            load(temporary)
        except ConfigError as error:
            message = str(error).replace(str(temporary), str(path))
            raise ConfigError(f"{message}\n  (nothing was written)") from None
        os.replace(temporary, path)
    except OSError as error:
        raise ConfigError(f"{path}: cannot write: {error.strerror}") from None
    finally:
        temporary.unlink(missing_ok=True)
