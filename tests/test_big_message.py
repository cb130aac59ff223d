"""Large messages end to end: a raw SMTP client sends 30 MB to `smtpgate serve`, which keeps
it in a temporary file, streams it into the spool and from there to a real SMTP server,
via a relay and directly to an MX. What arrives must be the same bytes."""

from __future__ import annotations

import contextlib
import hashlib
import random
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    DnsZone,
    Gateway,
    GatewayFactory,
    Upstreams,
    free_port,
    own_trace_removed,
    relay_config,
    wait_until,
    with_default_route,
)
from test_e2e_direct import direct
from test_e2e_passthrough import passthrough_config

from smtpgate.content import received

SIZE = 30_000_000  # under the 32 MiB aiosmtpd allows the upstream by default
SPOOL_CHUNK = 1 << 20  # the spool hands a stored message out in chunks of this size
ALIGNED = 512  # one line of the aligned part, CRLF included


def big_message(recipient: str, size: int = SIZE, seed: int = 6) -> bytes:
    """A message of about `size` bytes. First come lines of ALIGNED bytes that begin with
    a dot, placed (the Received: field smtpgate adds counted) so that the spool's chunks
    end exactly where such a line begins; then a mix of long, short, empty, dotted and
    8-bit lines, with a lone dot in a line of its own now and then."""
    trace = received(
        helo="client.test",
        client_ip="127.0.0.1",
        hostname="gateway.test",
        protocol="ESMTP",
        recipient=recipient,
        when=time.time(),  # its length does not depend on the time
    )
    fields = b"From: <a@example.org>\r\nTo: <" + recipient.encode() + b">\r\nSubject: big\r\n"
    pad = -(len(trace) + len(fields) + len(b"X-Pad: \r\n\r\n")) % ALIGNED
    header = fields + b"X-Pad: " + b"p" * pad + b"\r\n\r\n"
    assert (len(trace) + len(header)) % ALIGNED == 0
    count = min(3 * SPOOL_CHUNK, size // 2) // ALIGNED
    aligned = [b"." + bytes([65 + n % 26]) * (ALIGNED - 3) for n in range(count)]
    rng = random.Random(seed)
    shapes = [
        lambda: b"x" * 998,  # the longest a line may be (RFC 5321 4.5.3.1.6)
        lambda: b"." + b"y" * 997,  # as long, and stuffed to 999 + CRLF on the wire
        lambda: b"",
        lambda: b".",
        lambda: b"..",
        lambda: b". a line that starts with a dot",
        lambda: "Grüße aus Köln".encode(),
        lambda: bytes(rng.randrange(33, 127) for _ in range(rng.randrange(1, 80))),
    ]
    lines = [header[:-2], *aligned]
    total = sum(len(line) + 2 for line in lines)
    while total < size:
        line = rng.choice(shapes)()
        lines.append(line)
        total += len(line) + 2
    return b"\r\n".join(lines) + b"\r\n"


def send_raw(port: int, recipient: str, message: bytes) -> str:
    """EHLO, MAIL, RCPT, DATA, the dot-stuffed message in writes of odd sizes, the final
    dot split over three writes; the reply to it."""
    wire = message.replace(b"\r\n.", b"\r\n..")
    assert not wire.startswith(b".")
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = sock.makefile("rb")

        def reply() -> str:
            lines = []
            while (line := replies.readline())[3:4] == b"-":
                lines.append(line)
            return b"".join([*lines, line]).decode()

        assert reply().startswith("220")
        for command in (b"EHLO client.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<%b>"):
            sock.sendall(command.replace(b"%b", recipient.encode()) + b"\r\n")
            assert reply().startswith("250")
        sock.sendall(b"DATA\r\n")
        assert reply().startswith("354")
        step = 65_521
        for start in range(0, len(wire), step):
            sock.sendall(wire[start : start + step])
        for tail in (b".", b"\r", b"\n"):  # the final dot in three writes
            time.sleep(0.05)
            sock.sendall(tail)
        answer = reply()
        sock.sendall(b"QUIT\r\n")
        return answer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_big_message_is_relayed_byte_for_byte(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(pipelining=True)
    gateway = gateway_factory(
        relay_config(upstream.port, relay="turbo = true"),
        server=with_default_route("upstream") + 'max_message_size = "100MB"\n',
    )
    message = big_message("b@example.com")
    reply = send_raw(gateway.port, "b@example.com", message)
    assert reply.startswith("250 2.0.0 Ok: queued as"), reply
    gateway.wait_for_state("b@example.com", "delivered", timeout=120)
    [arrived] = upstream.messages
    assert sha(own_trace_removed(arrived.content)) == sha(message)
    [stored] = gateway.queue()
    assert stored["size"] == len(arrived.content)


def test_a_big_message_goes_direct_one_command_at_a_time(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    mx = upstreams.start(port, host="127.0.0.2")
    dns_zone.mx("big.test", (10, "mx.big.test", "127.0.0.2"))
    gateway = gateway_factory(direct(port), server='max_message_size = "100MB"\n')
    message = big_message("b@big.test", seed=7)
    assert send_raw(gateway.port, "b@big.test", message).startswith("250")
    gateway.wait_for_state("b@big.test", "delivered", timeout=120)
    [arrived] = mx.messages
    assert sha(own_trace_removed(arrived.content)) == sha(message)


def test_a_big_message_spooled_before_a_crash_is_delivered_after_restart(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    port = free_port()  # the upstream is down while the gateway accepts
    gateway = gateway_factory(
        relay_config(port, retry='["1s"]'),
        server=with_default_route("upstream") + 'max_message_size = "100MB"\n',
    )
    message = big_message("b@example.com", size=5_000_000, seed=8)
    assert send_raw(gateway.port, "b@example.com", message).startswith("250")
    gateway.kill()

    upstream = upstreams.start(port=port)
    gateway.start()
    gateway.wait_for_state("b@example.com", "delivered", timeout=60)
    [arrived] = upstream.messages
    assert sha(own_trace_removed(arrived.content)) == sha(message)


def test_an_oversize_message_gets_552_and_leaves_nothing(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory(server='max_message_size = "2MB"\n')
    before = sorted(p.name for p in Path(gateway.state_dir).iterdir())
    reply = send_raw(gateway.port, "b@example.com", big_message("b@example.com", 3_000_000))
    assert reply.startswith("552 5.3.4 Message too big: the limit is 2097152 bytes"), reply
    assert gateway.queue() == []
    after = sorted(p.name for p in Path(gateway.state_dir).iterdir())
    assert after == before  # the temporary file is gone too
    # A large message under the limit still goes through.
    fits = big_message("c@example.com", 1_500_000)
    assert send_raw(gateway.port, "c@example.com", fits).startswith("250")
    wait_until(lambda: len(gateway.queue()) == 1, what="the message in the queue")


def test_a_big_message_passes_through_and_the_client_hears_the_upstream(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(
        passthrough_config(upstream.port),
        server=with_default_route("upstream") + 'max_message_size = "100MB"\n',
    )
    message = big_message("b@example.com", size=5_000_000, seed=9)
    reply = send_raw(gateway.port, "b@example.com", message)
    assert reply.startswith("250 2.0.0 Ok: stored by upstream [smtpgate "), reply
    [arrived] = upstream.messages
    assert sha(own_trace_removed(arrived.content)) == sha(message)
    gateway.wait_for_state("b@example.com", "delivered")


@contextlib.contextmanager
def gateway_on_a_small_disk(gateway_factory: GatewayFactory, tmp_path: Path) -> Iterator[Gateway]:
    """A gateway whose state directory is an 8 MB tmpfs (skips where mounting is not
    allowed); any size of message is let in, and no free space is kept back."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {mounted.stderr.decode().strip()}")
    limits = 'min_free_space = "0B"\nmax_message_size = "100MB"\n'
    gateway = gateway_factory(start=False, server=limits)
    try:
        text = gateway.config_path.read_text()
        gateway.config_path.write_text(
            text.replace(f'state_dir = "{gateway.state_dir}"', f'state_dir = "{disk}"')
        )
        yield gateway.start()
    finally:
        gateway.stop()
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_data_gets_452_after_the_final_dot(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """The state directory on an 8 MB file system: a 12 MB message cannot be written to
    its temporary file. The client still sends it to the end, hears 452 4.3.1, and the
    session goes on: a small message is accepted next."""
    with gateway_on_a_small_disk(gateway_factory, tmp_path) as gateway:
        reply = send_raw(gateway.port, "b@example.com", big_message("b@example.com", 12_000_000))
        assert reply.startswith("452 4.3.1 Insufficient system storage"), reply
        small = big_message("c@example.com", 300_000)
        assert send_raw(gateway.port, "c@example.com", small).startswith("250")


def hang_up_after_the_final_dot(port: int, recipient: str, message: bytes) -> None:
    """Send the message and reset the connection at once, without waiting for the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        replies = sock.makefile("rb")
        assert replies.readline().startswith(b"220")
        for command in (b"HELO client.test", b"MAIL FROM:<a@example.org>", b"RCPT TO:<%b>"):
            sock.sendall(command.replace(b"%b", recipient.encode()) + b"\r\n")
            assert replies.readline().startswith(b"250")
        sock.sendall(b"DATA\r\n")
        assert replies.readline().startswith(b"354")
        sock.sendall(message.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_a_client_hanging_up_while_its_big_message_is_stored_gets_nothing_mixed_up(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """The session ends while the spool still copies the message from its temporary
    file, and another session spills a message of its own at that moment: whatever was
    stored is delivered as it was sent, never with bytes of another file."""
    upstream = upstreams.start(pipelining=True)
    gateway = gateway_factory(
        relay_config(upstream.port, relay="turbo = true"),
        server=with_default_route("upstream") + 'max_message_size = "100MB"\n',
    )
    gone = big_message("gone@example.com", size=20_000_000, seed=9)
    kept = big_message("kept@example.com", size=20_000_000, seed=10)
    other = threading.Thread(target=send_raw, args=(gateway.port, "kept@example.com", kept))
    hang_up_after_the_final_dot(gateway.port, "gone@example.com", gone)
    other.start()
    other.join(120)
    gateway.wait_for_state("kept@example.com", "delivered", timeout=120)
    wait_until(
        lambda: all(r["state"] != "sending" for r in gateway.recipients().values()),
        timeout=60,
        what="every stored message delivered",
    )
    sent = {"gone@example.com": sha(gone), "kept@example.com": sha(kept)}
    for arrived in upstream.messages:
        [recipient] = arrived.rcpt_tos
        assert sha(own_trace_removed(arrived.content)) == sent[recipient], recipient


def test_a_line_end_rewrite_that_does_not_fit_gets_452_and_the_session_goes_on(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    """On an 8 MB file system a 5 MB message with bare LFs fits in its temporary file,
    but its copy with the line ends fixed does not: 452, and the next message of the
    same session, a small one, is accepted (nothing of the big one is left behind)."""
    with gateway_on_a_small_disk(gateway_factory, tmp_path) as gateway:
        bare = b"Subject: bare\r\n\r\n" + b"a line with a bare LF\n in it\r\n" * 170_000
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=120) as sock:
            replies = sock.makefile("rb")
            assert replies.readline().startswith(b"220")

            def transaction(content: bytes) -> bytes:
                for command in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<b@example.com>"):
                    sock.sendall(command + b"\r\n")
                    assert replies.readline().startswith(b"250")
                sock.sendall(b"DATA\r\n")
                assert replies.readline().startswith(b"354")
                sock.sendall(content + b"\r\n.\r\n")
                return replies.readline()

            sock.sendall(b"HELO client.test\r\n")
            assert replies.readline().startswith(b"250")
            assert transaction(bare).startswith(b"452 4.3.1"), "the rewrite did not fit"
            assert transaction(b"Subject: small\r\n\r\nhello").startswith(b"250 2.0.0 Ok")
