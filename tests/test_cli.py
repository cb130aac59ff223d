"""The `smtpgate` command as a user types it: config errors, startup refusals, lifecycle."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DnsZone, GatewayFactory, free_port, wait_until


def smtpgate(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "smtpgate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=environment,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            '[server]\nlisten = ["127.0.0.1:2525"]\nlissen = 1\n',
            "server.lissen: unknown key (allowed: listen, hostname,",
        ),
        (
            '[relays.corp]\nhost = "smtp.example.com"\nport = "abc"\n',
            "relays.corp.port: Input should be a valid integer",
        ),
        (
            '[server]\nmax_message_size = "25 parsecs"\n',
            "server.max_message_size: unknown size unit 'parsecs'",
        ),
        (
            '[routes.corp]\nmode = "relay"\nrelay = "nope"\n',
            "routes.corp.relay: no [relays.nope] is defined",
        ),
        ("[server\nlisten = 1\n", "not valid TOML"),
    ],
    ids=["unknown key", "wrong type", "bad unit", "dangling reference", "bad toml"],
)
def test_bad_config_is_one_clear_message_and_exit_2(
    tmp_path: Path, config: str, expected: str
) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text(config)
    for command in (["serve"], ["config", "check"]):
        result = smtpgate(*command, "--config", str(path), cwd=tmp_path)
        assert result.returncode == 2, result
        assert result.stderr.startswith(f"smtpgate: config error: {path}: ")
        assert expected in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_config_file_is_exit_2(tmp_path: Path) -> None:
    result = smtpgate("serve", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "nope.toml: no such config file" in result.stderr


def test_config_check_without_a_file_prints_the_embedded_defaults(tmp_path: Path) -> None:
    result = smtpgate(
        "config",
        "check",
        "--json",
        cwd=tmp_path,
        env={
            "SMTPGATE_STATE_DIR": str(tmp_path / "state"),
            "SMTPGATE_RELAYS__CORP__HOST": "smtp.example.com",
            "SMTPGATE_RELAYS__CORP__PORT": "587",
        },
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["server"]["listen"] == [{"host": "127.0.0.1", "port": 2525, "tls": False}]
    assert effective["server"]["default_route"] == "direct"
    assert effective["server"]["state_dir"] == str(tmp_path / "state")
    assert effective["routes"]["direct"]["mode"] == "direct"
    assert effective["relays"]["corp"]["port"] == 587

    table = smtpgate(
        "config", "check", cwd=tmp_path, env={"SMTPGATE_STATE_DIR": str(tmp_path / "state")}
    )
    assert table.returncode == 0
    assert "[server]" in table.stdout and 'default_route = "direct"' in table.stdout
    assert "config is valid" in table.stderr


def test_serve_on_embedded_defaults_with_no_config_file(tmp_path: Path, dns_zone: DnsZone) -> None:
    """No smtpgate.toml anywhere: the state directory comes from SMTPGATE_STATE_DIR, the
    port from an environment override (2525 may be taken on a shared machine), and the
    resolver is the test's own, so the default direct route looks up nothing outside."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    environment.update(
        {
            "SMTPGATE_STATE_DIR": str(tmp_path / "state"),
            "SMTPGATE_SERVER__LISTEN": f'["127.0.0.1:{port}"]',
            "SMTPGATE_DNS__NAMESERVERS": f'["127.0.0.1:{dns_zone.port}"]',
            "SMTPGATE_HTTP__LISTEN": f'["127.0.0.1:{free_port()}"]',
        }
    )
    with subprocess.Popen(
        [sys.executable, "-m", "smtpgate", "serve"],
        cwd=tmp_path,
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            wait_until(lambda: _answers(port), what="the gateway to answer")
            with smtplib.SMTP("127.0.0.1", port) as client:
                refused = client.sendmail(
                    "a@example.org", ["b@example.com"], b"Subject: s\r\n\r\nb\r\n"
                )
            assert refused == {}
            assert (tmp_path / "state" / "spool.db").exists()
        finally:
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert '"event": "stopped"' in stderr


def _answers(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=1) as client:
            return client.noop()[0] == 250
    except OSError:
        return False


def test_listening_beyond_loopback_without_auth_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text(f'[server]\nlisten = ["0.0.0.0:{free_port()}"]\nstate_dir = "{tmp_path}"\n')
    result = smtpgate("serve", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "server.listen: 0.0.0.0:" in result.stderr
    assert "reachable from other hosts" in result.stderr
    assert not (tmp_path / "spool.db").exists()


def test_trusting_the_whole_internet_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "smtpgate.toml"
    path.write_text('[server]\ntrusted_networks = ["0.0.0.0/0"]\n')
    result = smtpgate(
        "config",
        "check",
        "--config",
        str(path),
        cwd=tmp_path,
        env={"SMTPGATE_STATE_DIR": str(tmp_path)},
    )
    assert result.returncode == 2
    assert "open relay" in result.stderr


def test_second_server_on_the_same_spool_refuses_to_start(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    other_port = free_port()
    config = gateway.config_path.read_text().replace(str(gateway.port), str(other_port))
    second = gateway.workdir / "second.toml"
    second.write_text(config)

    result = smtpgate(
        "serve", "--config", str(second), cwd=gateway.workdir, env={"SMTPGATE_HTTP__LISTEN": "[]"}
    )

    assert result.returncode == 1
    assert "is in use by smtpgate pid" in result.stderr
    assert gateway.process is not None and gateway.process.poll() is None


def test_a_taken_port_is_a_clear_error(gateway_factory: GatewayFactory, tmp_path: Path) -> None:
    gateway = gateway_factory()
    path = tmp_path / "other.toml"
    path.write_text(
        f'[server]\nlisten = ["127.0.0.1:{gateway.port}"]\n'
        f'state_dir = "{tmp_path / "other-state"}"\n'
    )
    no_http = {"SMTPGATE_HTTP__LISTEN": "[]"}  # its HTTP port is not what this is about
    result = smtpgate("serve", "--config", str(path), cwd=tmp_path, env=no_http)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{gateway.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_lets_an_open_session_finish_its_message(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    client = smtplib.SMTP("127.0.0.1", gateway.port)
    client.ehlo("client.test")
    client.mail("a@example.org")
    client.rcpt("b@example.com")
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    code, reply = client.data(b"Subject: last one\r\n\r\nb\r\n")
    client.quit()
    assert code == 250, reply
    assert gateway.process.wait(30) == 0
    queue_id = reply.split()[-1].decode()
    assert [m["queue_id"] for m in gateway.queue()] == [queue_id]


def test_queue_on_an_empty_state_dir(tmp_path: Path) -> None:
    result = smtpgate("queue", "--state-dir", str(tmp_path / "fresh"), cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == "0 messages, 0 recipients"
    assert "no spool at" in result.stderr


def test_a_spool_damaged_beyond_salvage_is_refused_with_how_to_recover(
    gateway_factory: GatewayFactory,
) -> None:
    """Salvage needs the list of tables; with the first page gone, the operator must
    recover by hand, and is told how. A lesser damage is salvaged: test_salvage.py."""
    gateway = gateway_factory()
    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(20):
            client.sendmail("a@example.org", [f"r{n}@example.com"], b"Subject: s\r\n\r\n" * 50)
    assert gateway.stop() == 0
    spool = gateway.state_dir / "spool.db"
    data = bytearray(spool.read_bytes())
    data[100:4096] = b"\xa5" * (4096 - 100)  # the schema page, after the file header
    spool.write_bytes(bytes(data))

    result = gateway.cli("serve", check=False)

    assert result.returncode == 1
    assert f"smtpgate: spool {spool}: the spool is damaged" in result.stderr
    assert "smtpgate cannot salvage it: its table list cannot be read" in result.stderr
    assert "sqlite3 damaged.db .recover | sqlite3 spool.db" in result.stderr
    assert "Traceback" not in result.stderr
    assert spool.read_bytes() == bytes(data)  # left where it was, untouched
    assert not (gateway.state_dir / "quarantine").exists()


def test_common_flags_work_before_the_command_too(tmp_path: Path) -> None:
    for args in (
        ["--state-dir", str(tmp_path), "config", "check", "--json"],
        ["config", "check", "--json", "--state-dir", str(tmp_path)],
    ):
        result = subprocess.run(
            [sys.executable, "-m", "smtpgate", *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["server"]["state_dir"] == str(tmp_path)
