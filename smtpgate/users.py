"""Users who may AUTH on the listener: a file of `name:hash` lines with scrypt hashes.

`smtpgate user add/remove` writes it (atomically, mode 0600); the listener reads it at
each AUTH (through `smtpgate.auth`), so a new password needs no restart.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import functools
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path

# scrypt with N = 2**15, r = 8: 32 MiB and about 0.1 s per check, so a stolen file is
# slow to attack and a flood of AUTH attempts costs the attacker as much as us.
SCRYPT_LOG_N = 15
SCRYPT_R = 8
SCRYPT_P = 1
_SALT_BYTES = 16
_KEY_BYTES = 32
# Parameters read from a file are bounded: a hand-edited ln=30 must not eat the machine.
_MAX_LOG_N, _MAX_R, _MAX_P = 20, 32, 16
_SCHEME = "scrypt"


class UsersFileError(Exception):
    """The users file cannot be used as it is; the message names the file and line."""


class UserExistsError(UsersFileError):
    """`user add` of a name that already has a password."""


def hash_password(password: bytes) -> str:
    """A self-describing hash in the PHC string format: $scrypt$ln=15,r=8,p=1$salt$key
    (base64 without padding), so the parameters can be raised later without breaking
    the hashes already written."""
    salt = secrets.token_bytes(_SALT_BYTES)
    key = _scrypt(password, salt, SCRYPT_LOG_N, SCRYPT_R, SCRYPT_P, _KEY_BYTES)
    parameters = f"ln={SCRYPT_LOG_N},r={SCRYPT_R},p={SCRYPT_P}"
    return f"${_SCHEME}${parameters}${_b64(salt)}${_b64(key)}"


def verify_password(password: bytes, encoded: str) -> bool:
    """Whether the password matches the hash; compares in constant time."""
    log_n, r, p, salt, key = _parse_hash(encoded)
    return hmac.compare_digest(_scrypt(password, salt, log_n, r, p, len(key)), key)


@functools.cache
def _nobody() -> str:
    """A hash no password matches, checked for unknown names so that the time an AUTH
    takes does not tell which names exist."""
    return hash_password(secrets.token_bytes(16))


def verify(path: Path, name: str, password: bytes) -> bool:
    """Check a name and password against the users file (blocking: call it off the loop).
    OSError or UsersFileError when the file cannot be read or parsed."""
    encoded = read(path).get(name)
    if encoded is None:
        verify_password(password, _nobody())
        return False
    return verify_password(password, encoded)


def name_problem(name: str) -> str | None:
    """Why a user name cannot be stored, or None. Names are what clients send as the
    AUTH login, often an address: anything printable but ':' and white space."""
    if not name:
        return "the user name is empty"
    if len(name) > 256:
        return "the user name is longer than 256 characters"
    if ":" in name or any(c.isspace() or not c.isprintable() for c in name):
        return "a user name cannot contain ':', white space or control characters"
    return None


def read(path: Path) -> dict[str, str]:
    """Names and hashes. Blank lines and lines starting with '#' are skipped."""
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        entry = _entry(path, number, line)
        if entry is not None:
            users[entry[0]] = entry[1]
    return users


def add(path: Path, name: str, password: bytes, *, replace: bool = False) -> bool:
    """Store a user's password hash; True when the file was new. UserExistsError for a
    known name unless `replace`."""
    if problem := name_problem(name):
        raise UsersFileError(problem)
    encoded = hash_password(password)
    with _locked(path):
        new = not path.exists()
        lines = [] if new else path.read_text(encoding="utf-8").splitlines()
        index = _find(path, lines, name)
        if index is not None and not replace:
            raise UserExistsError(f"user {name} already exists in {path}")
        if index is None:
            lines.append(f"{name}:{encoded}")
        else:
            lines[index] = f"{name}:{encoded}"
        _write(path, lines)
    return new


def remove(path: Path, name: str) -> bool:
    """Remove a user; False when there was no such user."""
    with _locked(path):
        if not path.exists():
            return False
        lines = path.read_text(encoding="utf-8").splitlines()
        index = _find(path, lines, name)
        if index is None:
            return False
        del lines[index]
        _write(path, lines)
    return True


def _entry(path: Path, number: int, line: str) -> tuple[str, str] | None:
    text = line.strip()
    if not text or text.startswith("#"):
        return None
    name, colon, encoded = text.partition(":")
    if not colon or name_problem(name):
        raise UsersFileError(f"{path}:{number}: not a 'name:hash' line")
    try:
        _parse_hash(encoded)
    except ValueError as error:
        raise UsersFileError(f"{path}:{number}: user {name}: {error}") from None
    return name, encoded


def _find(path: Path, lines: list[str], name: str) -> int | None:
    """The index of the user's line; every line is checked, so a damaged file is never
    rewritten as if it were fine."""
    found = None
    for index, line in enumerate(lines):
        entry = _entry(path, index + 1, line)
        if entry is not None and entry[0] == name:
            found = index
    return found


def _parse_hash(encoded: str) -> tuple[int, int, int, bytes, bytes]:
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != _SCHEME:
        raise ValueError("not a $scrypt$ hash written by `smtpgate user add`")
    try:
        parameters = dict(item.split("=", 1) for item in parts[2].split(","))
        log_n, r, p = int(parameters["ln"]), int(parameters["r"]), int(parameters["p"])
        salt, key = _unb64(parts[3]), _unb64(parts[4])
    except (ValueError, KeyError, binascii.Error):
        raise ValueError("a damaged $scrypt$ hash") from None
    if not (1 <= log_n <= _MAX_LOG_N and 1 <= r <= _MAX_R and 1 <= p <= _MAX_P) or not key:
        raise ValueError("scrypt parameters out of range")
    return log_n, r, p, salt, key


def _scrypt(password: bytes, salt: bytes, log_n: int, r: int, p: int, size: int) -> bytes:
    n = 1 << log_n
    room = 128 * r * (n + p + 2) + (1 << 20)  # OpenSSL's own need, plus slack
    return hashlib.scrypt(password, salt=salt, n=n, r=r, p=p, maxmem=room, dklen=size)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One writer at a time: two `user add` at once must not lose either user."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(f".{path.name}.lock")
    descriptor = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _write(path: Path, lines: list[str]) -> None:
    """Replace the file at once (readers see the old or the new one, never half), mode
    0600 from the start so the hashes are never readable by others."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write("".join(f"{line}\n" for line in lines))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
