"""What every detector shares: where it looks, what it finds, what it had to skip.

A detector reads one mail program's own files through a `Scan`, which records every path
tried (for "nothing found, looked in ...") and a note for every file or line it skipped,
so bad input never becomes a traceback. `survey.py` merges and ranks the `Finding`s.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Tls = Literal["none", "ssl", "starttls"]

# RFC 8314: 465 is implicit TLS; RFC 6409 / RFC 3207: 587 is submission with STARTTLS.
TLS_BY_PORT: dict[int, Tls] = {465: "ssl", 587: "starttls"}
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*\.?$")


@dataclass(frozen=True)
class Finding:
    """One outgoing SMTP server as one program has it set up.

    `port` is the port the program would use (its default when none is written); `tls` is
    None when the program does not say and the port does not tell. `default` marks the
    server the program uses unless told otherwise. Passwords are never part of it.
    """

    program: str
    account: str
    path: str
    host: str
    port: int
    tls: Tls | None
    user: str | None
    default: bool = False
    caveat: str | None = None  # a sign-in smtpgate cannot do (OAuth2, Kerberos, ...)


@dataclass
class Scan:
    """The home directory the detectors read, and their record of what they looked at."""

    home: Path
    config_home: Path  # $XDG_CONFIG_HOME
    environ: Mapping[str, str]
    looked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, home: Path | None, environ: Mapping[str, str]) -> Scan:
        """The user's home and XDG config dir; with `home` given, that dir and its .config."""
        if home is not None:
            return cls(home, home / ".config", environ)
        user_home = Path(environ.get("HOME") or Path.home())
        xdg = environ.get("XDG_CONFIG_HOME", "")
        # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
        config_home = Path(xdg) if os.path.isabs(xdg) else user_home / ".config"
        return cls(user_home, config_home, environ)

    def note(self, path: Path | str, text: str) -> None:
        self.notes.append(f"{path}: {text}")

    def read(self, path: Path) -> str | None:
        """The file's text, or None when it is absent or unreadable (with a note).

        Bytes that are not UTF-8 are replaced, with a note: the lines that matter are
        usually ASCII, and a host name with a replaced byte is refused later.
        """
        self.looked.append(str(path))
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            self.note(path, "is a directory, not a file; skipped")
            return None
        except OSError as error:
            self.note(path, f"cannot read it ({error.strerror}); skipped")
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            line = data[: error.start].count(b"\n") + 1
            self.note(path, f"not UTF-8 (line {line}); undecodable bytes were replaced")
            return data.decode("utf-8", "replace")

    def listing(self, directory: Path, pattern: str) -> list[Path]:
        """The files in `directory` matching `pattern`, sorted; none when it is absent."""
        self.looked.append(str(directory / pattern))
        try:
            return sorted(entry for entry in directory.iterdir() if entry.match(pattern))
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as error:
            self.note(directory, f"cannot list it ({error.strerror}); skipped")
            return []


def tls_or_port_guess(stated: Tls | None, port: int) -> Tls | None:
    """The mode the program states; else the one the port implies; else None (unknown)."""
    return stated or TLS_BY_PORT.get(port)


def valid_host(host: str) -> bool:
    """A host name or an IP address literal, so nothing odd ends up in the config."""
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return bool(_HOST_NAME.match(host)) and len(host) <= 253


def port_number(text: object) -> int | None:
    """A TCP port from an int or digits, or None when it is not one."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int):
        number = text
    elif isinstance(text, str) and re.fullmatch(r"[0-9]{1,5}", text.strip()):
        number = int(text.strip())
    else:
        return None
    return number if 1 <= number <= 65535 else None
