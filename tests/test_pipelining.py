"""Unit tests for pipelined transactions: reading replies off the wire (ReplyReader),
borrowing the transport, dot-stuffing, matching replies to commands, and the pure helpers
that turn upstream replies and errors into what a user sees.

No network: data is fed to the protocol by hand, as the event loop would.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import cast

import aiosmtplib
import pytest
import trustme

from smtpgate.delivery.outcome import asks_to_slow_down
from smtpgate.transports.pipelining import (
    MAX_REPLY_BYTES,
    ConnectionDropped,
    PipelineBroken,
    Reply,
    ReplyReader,
    borrowed,
    dot_stuffed,
    fits,
)
from smtpgate.transports.session import explain_connect_error


def fed(*chunks: bytes) -> ReplyReader:
    reader = ReplyReader()
    for chunk in chunks:
        reader.data_received(chunk)
    return reader


def take(reader: ReplyReader, count: int) -> list[Reply]:
    async def run() -> list[Reply]:
        return [await reader.next(within=1) for _ in range(count)]

    return asyncio.run(run())


# --- ReplyReader ------------------------------------------------------------------------

STREAM = (
    b"250 2.1.0 Sender ok\r\n"
    b"250-2.1.5 first line\r\n250-second line\r\n250 2.1.5 Recipient ok\r\n"
    b"550 5.1.1 No such user\r\n"
    b"354 End data with <CR><LF>.<CR><LF>\r\n"
)
STREAM_REPLIES = [
    Reply(250, "2.1.0 Sender ok"),
    Reply(250, "2.1.5 first line\nsecond line\n2.1.5 Recipient ok"),
    Reply(550, "5.1.1 No such user"),
    Reply(354, "End data with <CR><LF>.<CR><LF>"),
]


def test_a_reply_split_in_the_middle_of_a_line() -> None:
    reader = fed(b"25", b"0 2.1.0 O", b"k\r", b"\n")
    assert take(reader, 1) == [Reply(250, "2.1.0 Ok")]


def test_several_replies_in_one_chunk_come_out_in_order() -> None:
    reader = fed(b"250 2.1.0 Ok\r\n251 2.1.5 Forwarding\r\n354 Go ahead\r\n")
    assert take(reader, 3) == [
        Reply(250, "2.1.0 Ok"),
        Reply(251, "2.1.5 Forwarding"),
        Reply(354, "Go ahead"),
    ]


def test_a_multi_line_reply_is_one_reply() -> None:
    reader = fed(b"250-a\r\n250 b\r\n")
    assert take(reader, 1) == [Reply(250, "a\nb")]


def test_a_multi_line_reply_split_between_its_lines_waits_for_the_last() -> None:
    reader = fed(b"250-a\r\n250-b\r\n")

    async def run() -> Reply:
        with pytest.raises(TimeoutError):  # not a reply yet
            await reader.next(within=0.05)
        reader.data_received(b"250 c\r\n")
        return await reader.next(within=1)

    assert asyncio.run(run()) == Reply(250, "a\nb\nc")


@pytest.mark.parametrize("size", [1, 2, 3, 7, 22, 64, len(STREAM)])
def test_any_fragmentation_gives_the_same_replies(size: int) -> None:
    reader = fed(*(STREAM[i : i + size] for i in range(0, len(STREAM), size)))
    assert take(reader, len(STREAM_REPLIES)) == STREAM_REPLIES


def test_a_reply_with_no_text() -> None:
    assert take(fed(b"250\r\n"), 1) == [Reply(250, "")]


def test_next_waits_for_a_reply_that_arrives_later() -> None:
    reader = ReplyReader()

    async def run() -> Reply:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, reader.data_received, b"250 2.1")  # wakes it, not a reply
        loop.call_later(0.02, reader.data_received, b".0 Ok\r\n")
        return await reader.next(within=1)

    assert asyncio.run(run()) == Reply(250, "2.1.0 Ok")


def test_next_times_out_when_nothing_arrives() -> None:
    reader = ReplyReader()
    with pytest.raises(TimeoutError):
        asyncio.run(reader.next(within=0.05))


def test_next_times_out_when_only_part_of_a_reply_arrives() -> None:
    reader = fed(b"250 2.1.0 O")
    with pytest.raises(TimeoutError):
        asyncio.run(reader.next(within=0.05))


def test_a_reply_dripping_in_does_not_move_the_deadline_on() -> None:
    """A server sending a byte now and then, never a whole reply, is given `within`
    seconds in all, not `within` after each byte."""
    reader = ReplyReader()
    drips = 40

    async def run() -> int:
        loop = asyncio.get_running_loop()
        arrived = 0

        def drip() -> None:
            nonlocal arrived
            arrived += 1
            reader.data_received(b"2")

        for k in range(1, drips + 1):
            loop.call_later(0.02 * k, drip)
        with pytest.raises(TimeoutError):
            await reader.next(within=0.1)
        return arrived

    assert asyncio.run(run()) < drips


def test_a_malformed_line_breaks_the_pipeline() -> None:
    reader = fed(b"hello\r\n")
    with pytest.raises(PipelineBroken, match="malformed reply line"):
        take(reader, 1)
    assert reader.lost


@pytest.mark.parametrize("line", [b"hello\r\n", b"25 short\r\n", b"250x no separator\r\n", b"\r\n"])
def test_replies_before_a_malformed_line_are_still_returned(line: bytes) -> None:
    reader = fed(b"250 2.1.0 Ok\r\n" + line + b"250 2.1.5 Ok\r\n")
    assert take(reader, 1) == [Reply(250, "2.1.0 Ok")]
    with pytest.raises(PipelineBroken):
        take(reader, 1)


def test_a_malformed_line_arriving_while_waiting_breaks_the_pipeline() -> None:
    reader = ReplyReader()

    async def run() -> Reply:
        asyncio.get_running_loop().call_later(0.01, reader.data_received, b"hello\r\n")
        return await reader.next(within=1)

    with pytest.raises(PipelineBroken):
        asyncio.run(run())


def test_connection_lost_after_the_buffered_replies() -> None:
    reader = fed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n")
    reader.connection_lost(ConnectionResetError("reset by peer"))
    assert reader.lost
    assert take(reader, 2) == [Reply(250, "2.1.0 Ok"), Reply(250, "2.1.5 Ok")]
    with pytest.raises(ConnectionDropped, match="connection lost: reset by peer"):
        take(reader, 1)


def test_connection_lost_drops_a_partial_reply() -> None:
    reader = fed(b"250-2.1.0 first\r\n")
    reader.connection_lost(None)
    with pytest.raises(ConnectionDropped, match="connection lost"):
        take(reader, 1)


def test_eof_after_the_buffered_replies() -> None:
    reader = fed(b"221 2.0.0 Bye\r\n")
    assert reader.eof_received() is False  # let the transport close itself
    assert take(reader, 1) == [Reply(221, "2.0.0 Bye")]
    with pytest.raises(ConnectionDropped, match="closed by the server"):
        take(reader, 1)


def test_connection_lost_while_waiting_raises_at_once_not_at_the_timeout() -> None:
    reader = ReplyReader()

    async def run() -> Reply:
        asyncio.get_running_loop().call_later(0.01, reader.connection_lost, None)
        return await reader.next(within=30)

    with pytest.raises(ConnectionDropped):
        asyncio.run(run())


def test_a_long_reply_under_the_limit_is_accepted() -> None:
    text = b"x" * (MAX_REPLY_BYTES - 10)
    reader = fed(b"250 " + text + b"\r\n")
    assert take(reader, 1) == [Reply(250, text.decode())]


def test_a_reply_line_over_the_limit_is_refused() -> None:
    reader = fed(b"250 ", *([b"x" * 4096] * (MAX_REPLY_BYTES // 4096 + 1)))
    reader.data_received(b"\r\n")
    with pytest.raises(PipelineBroken, match="too long"):
        take(reader, 1)


def test_a_multi_line_reply_over_the_limit_is_refused() -> None:
    line = b"250-" + b"y" * 60 + b"\r\n"
    reader = ReplyReader()
    for _ in range(MAX_REPLY_BYTES // len(line) + 1):
        reader.data_received(line)
    reader.data_received(b"250 end\r\n")
    with pytest.raises(PipelineBroken, match="too long"):
        take(reader, 1)


def test_many_short_replies_in_one_chunk_are_not_one_long_reply() -> None:
    reply = b"250 2.1.5 Recipient <someone@example.org> ok\r\n"
    count = MAX_REPLY_BYTES // len(reply) + 1  # each reply is tiny; together over 64 KiB
    reader = fed(reply * count)
    assert take(reader, count) == [Reply(250, "2.1.5 Recipient <someone@example.org> ok")] * count


# --- borrowed ---------------------------------------------------------------------------


class FakeTransport:
    """Just the protocol slot of an asyncio transport, and whether it was closed."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol
        self.closed = False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def test_borrowed_routes_data_to_the_reader_and_gives_it_back() -> None:
    original = asyncio.Protocol()
    transport = FakeTransport(original)
    with borrowed(cast(asyncio.Transport, transport)) as reader:
        assert transport.protocol is reader
        cast(asyncio.Protocol, transport.get_protocol()).data_received(b"250 ok\r\n")
        assert take(reader, 1) == [Reply(250, "ok")]
    assert transport.protocol is original


def test_borrowed_gives_it_back_when_the_block_fails() -> None:
    original = asyncio.Protocol()
    transport = FakeTransport(original)
    with pytest.raises(PipelineBroken), borrowed(cast(asyncio.Transport, transport)):
        raise PipelineBroken("reply 354 does not answer RCPT TO")
    assert transport.protocol is original


@pytest.mark.parametrize("how", ["connection_lost", "eof_received"])
def test_borrowed_does_not_give_back_a_lost_connection(how: str) -> None:
    original = asyncio.Protocol()
    transport = FakeTransport(original)
    with borrowed(cast(asyncio.Transport, transport)) as reader:
        if how == "connection_lost":
            reader.connection_lost(None)
        else:
            reader.eof_received()
    assert transport.protocol is reader


def test_borrowed_closes_a_connection_whose_reply_was_broken() -> None:
    """After a reply that is not SMTP nothing on the connection can be trusted: closed,
    so it never goes back to the pool with the reader still in its protocol slot."""
    original = asyncio.Protocol()
    transport = FakeTransport(original)
    with borrowed(cast(asyncio.Transport, transport)) as reader:
        reader.data_received(b"250 ok\r\nwhat is this\r\n")
    assert reader.lost
    assert transport.closed


# --- dot_stuffed ------------------------------------------------------------------------


def test_bare_line_ends_become_crlf() -> None:
    assert dot_stuffed(b"a\nb\rc\r\nd\r\n") == b"a\r\nb\r\nc\r\nd\r\n.\r\n"


def test_a_missing_final_line_end_is_added() -> None:
    assert dot_stuffed(b"Subject: x\r\n\r\nno newline") == b"Subject: x\r\n\r\nno newline\r\n.\r\n"


def test_leading_dots_are_doubled_on_every_line() -> None:
    content = b".first\r\nmiddle.dot\r\n.\r\n..two\n.bare-lf\r.bare-cr\r\n"
    assert dot_stuffed(content) == (
        b"..first\r\nmiddle.dot\r\n..\r\n...two\r\n..bare-lf\r\n..bare-cr\r\n.\r\n"
    )


def test_a_line_with_a_single_dot_does_not_end_the_message() -> None:
    assert dot_stuffed(b".") == b"..\r\n.\r\n"
    assert (
        dot_stuffed(b"Subject: x\r\n\r\nbefore\r\n.\r\nafter\r\n")
        == b"Subject: x\r\n\r\nbefore\r\n..\r\nafter\r\n.\r\n"
    )


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b".",
        b"\r\n.\r\n",
        b"a\n.\nb",
        b"x\r.\ry",
        b"...\n\n\r\r",
        b"line\r\n" * 3,
    ],
)
def test_the_end_of_data_marker_is_only_at_the_end(content: bytes) -> None:
    payload = dot_stuffed(content)
    assert payload.endswith(b"\r\n.\r\n")
    assert b"\r\n.\r\n" not in payload[:-3]  # no earlier terminator
    # What the server reads back: the lines with one leading dot removed.
    lines = payload[:-3].split(b"\r\n")[:-1]
    unstuffed = b"".join(line[1:] if line.startswith(b".") else line for line in lines)
    assert unstuffed == content.replace(b"\r", b"").replace(b"\n", b"")


# --- fits -------------------------------------------------------------------------------

MAIL = b"MAIL FROM:<a@example.org>\r\n"
RCPT = b"RCPT TO:<b@example.org>\r\n"
DATA = b"DATA\r\n"


@pytest.mark.parametrize(
    ("command", "code", "expected"),
    [
        (DATA, 354, True),
        (MAIL, 354, False),
        (RCPT, 354, False),
        (DATA, 250, False),
        (DATA, 221, False),
        (MAIL, 250, True),
        (RCPT, 250, True),
        (RCPT, 251, True),
        (MAIL, 421, True),
        (RCPT, 450, True),
        (RCPT, 452, True),
        (DATA, 451, True),
        (MAIL, 550, True),
        (RCPT, 553, True),
        (DATA, 554, True),
        (DATA, 503, True),
        (MAIL, 334, False),
        (RCPT, 334, False),
        (DATA, 334, False),
        (MAIL, 150, False),
        (RCPT, 199, False),
        (DATA, 150, False),
        (RCPT, 600, False),
        (DATA, 600, False),
    ],
)
def test_fits(command: bytes, code: int, expected: bool) -> None:
    assert fits(command, Reply(code, "text")) is expected


# --- asks_to_slow_down ------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        "421 4.7.0 Try again later, closing connection",
        "421 4.3.2 Service shutting down",  # any 421 closes the session
        "421 mx.example.org Service not available",
        "451 4.7.1 Too many messages",
        "450 4.7.0 rate limit exceeded",
        "451 4.7.1 Please SLOW DOWN",
        "450 4.7.1 Throttled: try again later",
        "450 4.7.0 sending rates exceeded",
        "451 4.7.1 ratelimited, come back later",
    ],
)
def test_asks_to_slow_down(reply: str) -> None:
    assert asks_to_slow_down(reply)


@pytest.mark.parametrize(
    "reply",
    [
        "450 4.2.1 mailbox busy",
        "550 5.7.1 too many",  # permanent: not a request to slow down
        "452 4.5.3 Too many recipients",  # not 4.7.x: the next transaction takes them
        "451 4.3.0 Too many messages in the queue",  # not 4.7.x
        "450 4.7.1 Client host rejected: cannot find your hostname",  # 4.7.x, not volume
        "250 2.0.0 Ok: queued as ABC, rate limit not reached",
        "",
    ],
)
def test_does_not_ask_to_slow_down(reply: str) -> None:
    assert not asks_to_slow_down(reply)


def test_a_policy_refusal_mentioning_corporate_is_not_a_slow_down() -> None:
    assert not asks_to_slow_down(
        "450 4.7.1 <bob@example.com>: Recipient address rejected: blocked by corporate policy"
    )


# --- explain_connect_error --------------------------------------------------------------


def untrusted_certificate_error() -> ssl.SSLCertVerificationError:
    """A real verification failure, from a TLS handshake in memory with a private CA."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    trustme.CA().issue_cert("mail.example.org").configure_cert(server_context)
    client_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies; trusts no CA
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(c_in, c_out, server_hostname="mail.example.org")
    server = server_context.wrap_bio(s_in, s_out, server_side=True)
    with pytest.raises(ssl.SSLCertVerificationError) as caught:
        for _ in range(10):
            for side in (client, server):
                try:
                    side.do_handshake()
                except ssl.SSLWantReadError:
                    pass
            s_in.write(c_out.read())
            c_in.write(s_out.read())
    return caught.value


def connect_error_from(cause: BaseException) -> aiosmtplib.SMTPConnectError:
    try:
        raise aiosmtplib.SMTPConnectError(
            "Error connecting to mail.example.org on port 465"
        ) from cause
    except aiosmtplib.SMTPConnectError as error:
        return error


def test_an_untrusted_certificate_says_so_and_names_the_fix() -> None:
    cause = untrusted_certificate_error()
    text = explain_connect_error(connect_error_from(cause))
    assert text.startswith("TLS certificate not trusted")
    assert cause.verify_message in text  # what OpenSSL found wrong
    assert "ca_file" in text


def test_a_refused_connection_says_connection_refused() -> None:
    cause = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 2525)")
    text = explain_connect_error(connect_error_from(cause))
    assert text == "connection refused"
    assert "TLS" not in text
