"""The users file and `smtpgate user`, and the throttle on failed logins."""

from __future__ import annotations

import base64
import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from smtpgate import users
from smtpgate.auth import Throttle
from smtpgate.config import AuthConfig


def smtpgate(tmp_path: Path, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpgate", *args, "--state-dir", str(tmp_path)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")},
        cwd=tmp_path,
    )


def test_user_add_writes_a_salted_hash_readable_only_by_its_owner(tmp_path: Path) -> None:
    result = smtpgate(
        tmp_path, "user", "add", "alice@example.org", "--password-stdin", stdin="s3cret pw\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"added alice@example.org to {tmp_path / 'users'}\n"
    assert "[server.tls]" in result.stderr  # no certificate yet: AUTH would not be offered
    path = tmp_path / "users"
    text = path.read_text()
    assert "s3cret" not in text
    assert text.startswith("alice@example.org:$scrypt$ln=15,r=8,p=1$")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert users.verify(path, "alice@example.org", b"s3cret pw")
    assert not users.verify(path, "alice@example.org", b"s3cret pw ")
    assert not users.verify(path, "bob", b"s3cret pw")


def test_an_existing_user_needs_replace(tmp_path: Path) -> None:
    smtpgate(tmp_path, "user", "add", "alice", "--password-stdin", stdin="first\n")
    again = smtpgate(tmp_path, "user", "add", "alice", "--password-stdin", stdin="second\n")
    assert again.returncode == 1
    assert "user alice already exists" in again.stderr
    assert "--replace" in again.stderr
    assert users.verify(tmp_path / "users", "alice", b"first")

    replaced = smtpgate(
        tmp_path, "user", "add", "alice", "--replace", "--password-stdin", stdin="second\n"
    )
    assert replaced.returncode == 0, replaced.stderr
    assert users.verify(tmp_path / "users", "alice", b"second")
    assert not users.verify(tmp_path / "users", "alice", b"first")


@pytest.mark.parametrize("stdin", ["", "\n"])
def test_an_empty_password_is_refused(tmp_path: Path, stdin: str) -> None:
    result = smtpgate(tmp_path, "user", "add", "alice", "--password-stdin", stdin=stdin)
    assert result.returncode == 1
    assert "empty password is not allowed" in result.stderr
    assert not (tmp_path / "users").exists()


@pytest.mark.parametrize("name", ["a:b", "a b", "tab\there"])
def test_names_that_cannot_be_stored_are_refused(tmp_path: Path, name: str) -> None:
    result = smtpgate(tmp_path, "user", "add", name, "--password-stdin", stdin="pw\n")
    assert result.returncode == 2
    assert "user name cannot contain" in result.stderr


def test_list_and_remove(tmp_path: Path) -> None:
    assert smtpgate(tmp_path, "user", "list").stdout == "no users\n"
    for name in ("bob", "alice"):
        smtpgate(tmp_path, "user", "add", name, "--password-stdin", stdin="pw\n")
    assert smtpgate(tmp_path, "user", "list").stdout == "alice\nbob\n"

    assert smtpgate(tmp_path, "user", "remove", "bob").returncode == 0
    assert smtpgate(tmp_path, "user", "list").stdout == "alice\n"
    missing = smtpgate(tmp_path, "user", "remove", "bob")
    assert missing.returncode == 1
    assert "no user bob" in missing.stderr


def test_comments_and_other_users_survive_an_edit(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users.add(path, "alice", b"pw")
    path.write_text("# the road warriors\n" + path.read_text())
    users.add(path, "bob", b"pw2")
    users.remove(path, "alice")
    lines = path.read_text().splitlines()
    assert lines[0] == "# the road warriors"
    assert [line.split(":")[0] for line in lines[1:]] == ["bob"]


def test_a_damaged_file_is_reported_by_line_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "users"
    users.add(path, "alice", b"pw")
    damaged = path.read_text() + "bob:plaintext-password\n"
    path.write_text(damaged)
    result = smtpgate(tmp_path, "user", "add", "carol", "--password-stdin", stdin="pw\n")
    assert result.returncode == 1
    assert f"{path}:2: user bob: not a $scrypt$ hash" in result.stderr
    assert path.read_text() == damaged
    with pytest.raises(users.UsersFileError, match=":2:"):
        users.verify(path, "alice", b"pw")


def test_hashes_are_salted_and_carry_their_parameters() -> None:
    first, second = users.hash_password(b"same"), users.hash_password(b"same")
    assert first != second
    # A hash with other parameters (as a later version may write) still verifies:
    key = hashlib.scrypt(b"pw", salt=b"saltsalt", n=16, r=8, p=1, dklen=32)
    cheap = "$scrypt$ln=4,r=8,p=1$c2FsdHNhbHQ$" + base64.b64encode(key).decode().rstrip("=")
    assert users.verify_password(b"pw", cheap)
    assert not users.verify_password(b"pW", cheap)
    with pytest.raises(ValueError, match="out of range"):
        users.verify_password(b"pw", cheap.replace("ln=4", "ln=40"))


# --- the throttle on failed logins ------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_are_forgotten_after_the_window() -> None:
    clock = Clock()
    throttle = Throttle(window=60, most=10, clock=clock)
    throttle.add("192.0.2.1")
    clock.now += 30
    throttle.add("192.0.2.1")
    assert throttle.count("192.0.2.1") == 2
    assert throttle.count("192.0.2.2") == 0
    clock.now += 31
    assert throttle.count("192.0.2.1") == 1
    clock.now += 30
    assert throttle.count("192.0.2.1") == 0


def test_an_ipv6_host_cannot_escape_by_changing_address() -> None:
    throttle = Throttle(window=60, most=10, clock=Clock())
    throttle.add("2001:db8:1:2::1")
    throttle.add("2001:db8:1:2:ffff::9")
    throttle.add("::ffff:192.0.2.1")
    assert throttle.count("2001:db8:1:2::77") == 2
    assert throttle.count("2001:db8:1:3::1") == 0
    assert throttle.count("192.0.2.1") == 1  # an IPv4 client seen through a v6 socket


def test_a_success_takes_back_only_its_own_try() -> None:
    clock = Clock()
    throttle = Throttle(window=60, most=10, clock=clock)
    throttle.add("192.0.2.1")
    clock.now += 1
    token = throttle.add("192.0.2.1")
    throttle.forgive("192.0.2.1", token)
    assert throttle.count("192.0.2.1") == 1


def test_tarpit_doubles_up_to_its_cap(tmp_path: Path) -> None:
    from smtpgate.auth import Authenticator

    settings = AuthConfig(
        tarpit_after=2, tarpit_delay=1.0, tarpit_max_delay=5.0, max_auth_failures=10
    )
    clock = Clock()
    authenticator = Authenticator(tmp_path / "users", settings, clock)
    delays = []
    for _ in range(7):
        delays.append(authenticator.delay("192.0.2.1"))
        authenticator._throttle.add("192.0.2.1")
    assert delays == [0, 0, 1, 2, 4, 5, 5]
    assert not authenticator.blocked("192.0.2.1")
    for _ in range(3):
        authenticator._throttle.add("192.0.2.1")
    assert authenticator.blocked("192.0.2.1")
    clock.now += settings.failure_window
    assert authenticator.delay("192.0.2.1") == 0 and not authenticator.blocked("192.0.2.1")


def test_config_check_warns_about_users_without_a_certificate(tmp_path: Path) -> None:
    smtpgate(tmp_path, "user", "add", "alice", "--password-stdin", stdin="pw\n")
    result = smtpgate(tmp_path, "config", "check")
    assert result.returncode == 0, result.stderr
    assert f"warning: {tmp_path / 'users'} has users, but AUTH is offered only over TLS" in (
        result.stderr
    )
