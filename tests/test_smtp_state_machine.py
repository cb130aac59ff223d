"""A Hypothesis state machine over SMTP commands, against `smtpgate serve`.

Random sessions of EHLO, MAIL, RCPT, DATA (with stray CR, LF, dots and NUL), RSET, NOOP,
garbage and reconnects. The invariant: every 250 to DATA names a queue id that is in the
spool at that moment, every other DATA reply leaves nothing behind, and the server never
answers with a traceback or a 500 that leaks one.
"""

from __future__ import annotations

import re
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Gateway, free_port
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

ADDRESSES = st.sampled_from(
    [
        "a@example.org",
        "b@example.com",
        "",
        "bad",
        "x%y@example.com",
        "@r.example:a@b.example",
        "j\u00f6rg@example.com",
        "a@-bad-.example",
    ]
)
BODY_PIECES = st.lists(
    st.sampled_from(
        [b"Subject: s\r\n", b"\r\n", b"text", b"\n", b"\r", b".", b"..", b"\x00", b" ", b"\xff"]
    ),
    max_size=12,
)


class Session:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.reply()

    def reply(self) -> str:
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                return "closed"
            lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
            if line[3:4] != b"-":
                return "\n".join(lines)

    def send(self, data: bytes) -> str:
        try:
            self.sock.sendall(data)
        except OSError:
            return "closed"
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One gateway for every example: starting one per example would take minutes."""
    workdir = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    config = (
        f'[server]\nlisten = ["127.0.0.1:{port}"]\nstate_dir = "{workdir / "state"}"\n'
        'hostname = "gateway.test"\nmax_errors = 1000\ndefault_route = "nowhere"\n'
        # Relayed to a port where nothing listens: the spool keeps everything accepted.
        '[relays.nowhere]\nhost = "127.0.0.1"\nport = 9\ntls = "none"\n'
        '[routes.nowhere]\nmode = "relay"\nrelay = "nowhere"\nretry_schedule = ["1h"]\n'
    )
    gateway = Gateway(workdir, config, port)
    gateway.start()
    yield gateway
    gateway.stop()


def test_no_250_without_a_durable_message(shared_gateway: Gateway) -> None:
    spool = shared_gateway.state_dir / "spool.db"
    accepted: list[str] = []

    class SMTPMachine(RuleBasedStateMachine):
        @initialize()
        def connect(self) -> None:
            self.session = Session(shared_gateway.port)
            self.in_data_allowed = False

        def teardown(self) -> None:
            self.session.close()

        @rule(name=st.sampled_from(["client.test", "", "x" * 300]))
        def ehlo(self, name: str) -> None:
            self.check(self.session.send(f"EHLO {name}\r\n".encode()))

        @rule(address=ADDRESSES, smtputf8=st.booleans())
        def mail(self, address: str, smtputf8: bool) -> None:
            extra = " SMTPUTF8" if smtputf8 else ""
            self.check(self.session.send(f"MAIL FROM:<{address}>{extra}\r\n".encode()))

        @rule(address=ADDRESSES)
        def rcpt(self, address: str) -> None:
            self.check(self.session.send(f"RCPT TO:<{address}>\r\n".encode()))

        @rule(pieces=BODY_PIECES)
        def data(self, pieces: list[bytes]) -> None:
            reply = self.session.send(b"DATA\r\n")
            self.check(reply)
            if not reply.startswith("354"):
                return
            final = self.session.send(b"".join(pieces) + b"\r\n.\r\n")
            self.check(final)
            match = re.search(r"queued as ([0-9A-F]+)", final)
            if final.startswith("250"):
                assert match, final
                assert stored(spool, match.group(1)), f"250 for {match.group(1)}, not stored"
                accepted.append(match.group(1))

        @rule(sender=ADDRESSES, recipient=ADDRESSES, pieces=BODY_PIECES)
        def transaction(self, sender: str, recipient: str, pieces: list[bytes]) -> None:
            """A whole transaction, so that random bodies reach the end of DATA often."""
            self.ehlo("client.test")
            self.mail(sender, smtputf8=True)
            self.rcpt(recipient)
            self.data(pieces)

        @rule(command=st.sampled_from([b"RSET", b"NOOP", b"HELP", b"VRFY x", b"BOGUS", b""]))
        def other(self, command: bytes) -> None:
            self.check(self.session.send(command + b"\r\n"))

        @rule()
        def reconnect(self) -> None:
            self.session.close()
            self.session = Session(shared_gateway.port)

        def check(self, reply: str) -> None:
            if reply == "closed":
                self.session.close()
                self.session = Session(shared_gateway.port)
                return
            assert re.match(r"^\d{3}[ -]", reply), reply
            assert "Traceback" not in reply and "Error: (" not in reply, reply

        @invariant()
        def server_alive(self) -> None:
            assert shared_gateway.process is not None
            assert shared_gateway.process.poll() is None

    SMTPMachine.TestCase.settings = settings(
        max_examples=40,
        derandomize=True,  # the same sessions every run: CI must not flake
        database=None,
        stateful_step_count=15,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    SMTPMachine.TestCase().runTest()
    assert len(accepted) >= 5, "too few transactions got through to test the invariant"


def stored(spool: Path, queue_id: str) -> bool:
    with sqlite3.connect(f"file:{spool}?mode=ro", uri=True) as db:
        row = db.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone()
    db.close()
    return row is not None
