"""The pieces that carry a message in chunks agree with the simple whole-message code:
the DATA reader's parser with a line-by-line reading of RFC 5321 4.5.2, the chunked
dot-stuffer with `dot_stuffed`, and a message in a file with `canonical`."""

from __future__ import annotations

import itertools
import tempfile

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from smtpgate.body import CHUNK, FileBody
from smtpgate.content import ContentRefused, canonical, canonical_file
from smtpgate.data import DataParser, Refusal
from smtpgate.headers import split_controls
from smtpgate.transports.pipelining import dot_stuffed
from smtpgate.transports.streaming import DotStuffer

# Lines as a client means them: anything but CRLF, which ends them (bare CR and LF too).
LINE = st.lists(st.sampled_from([b".", b"a", b"\r", b"\n", b" ", b"\xe9"]), max_size=8).map(
    b"".join
)
LINES = st.lists(LINE.filter(lambda line: b"\r\n" not in line), max_size=12)


def stuffed(lines: list[bytes]) -> list[bytes]:
    """RFC 5321 4.5.2 by the letter: each line that begins with a dot gets another."""
    return [b"." + line if line.startswith(b".") else line for line in lines]


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """`data` in pieces, cut at these offsets."""
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(
    lines=LINES,
    after=st.binary(max_size=10),
    points=st.lists(st.integers(min_value=0), max_size=8),
    size_limit=st.none() | st.integers(min_value=1, max_value=60),
    line_limit=st.integers(min_value=3, max_value=14),
)
def test_data_parser_agrees_with_a_line_by_line_reading(
    lines: list[bytes],
    after: bytes,
    points: list[int],
    size_limit: int | None,
    line_limit: int,
) -> None:
    wire_lines = [line + b"\r\n" for line in stuffed(lines)]
    wire = b"".join(wire_lines) + b".\r\n" + after
    parser = DataParser(size_limit, line_limit)
    kept = b""
    unread = b""  # pieces that arrive after the final dot are the next reader's
    for piece in cut(wire, points):
        if parser.done:
            unread += piece
        else:
            kept += parser.feed(piece)
    assert parser.done
    assert parser.rest + unread == after
    size = sum(map(len, wire_lines))
    assert parser.size == size
    too_big = size_limit is not None and size > size_limit
    too_long = any(len(line) > line_limit for line in wire_lines)
    allowed = {Refusal.TOO_BIG} if too_big else set()
    if too_long:
        allowed.add(Refusal.TOO_LONG)
    if allowed:  # what was returned before is dropped by the reader (data.receive)
        assert parser.refusal in allowed
    else:
        assert parser.refusal is None
        assert kept == b"".join(line + b"\r\n" for line in lines)


@pytest.mark.parametrize(
    ("wire", "message", "rest"),
    [
        (b".\r\n", b"", b""),  # an empty message: the final dot at once
        (b"..\r\n.\r\n", b".\r\n", b""),
        (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n", b""),  # a bare LF ends no line (smuggling)
        (b"a\r\n.\rb\r\n.\r\n", b"a\r\n\rb\r\n", b""),
        (b"x\r\n.x\r\n.\r\nQUIT\r\n", b"x\r\nx\r\n", b"QUIT\r\n"),
    ],
)
def test_data_parser_one_byte_at_a_time(wire: bytes, message: bytes, rest: bytes) -> None:
    parser = DataParser(None)
    kept = b""
    for i in range(len(wire)):
        if not parser.done:
            kept += parser.feed(wire[i : i + 1])
    assert parser.done
    assert (kept, parser.rest) == (message, rest[: len(parser.rest)])


@given(
    content=st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b" "])).map(
        b"".join
    ),
    points=st.lists(st.integers(min_value=0), max_size=8),
)
def test_dot_stuffer_agrees_with_dot_stuffed(content: bytes, points: list[int]) -> None:
    stuffer = DotStuffer()
    sent = b"".join(stuffer.feed(piece) for piece in cut(content, points)) + stuffer.end()
    assert sent == dot_stuffed(content)


@given(
    header=st.lists(
        st.sampled_from(
            [b"Subject: s", b"X-Smtpgate-Job: j", b"\tfolded", b"Received: x", b"A: \r", b"B\n"]
        ),
        max_size=6,
    ),
    body=st.binary(max_size=30).map(lambda b: b.replace(b"\x00", b"")),
    separated=st.booleans(),
    mode=st.sampled_from(["fix", "refuse"]),
)
# No empty line: the last, unended line is a folded header line, not a body.
@example(header=[b"X-Smtpgate-Job: j"], body=b" ", separated=False, mode="fix")
def test_a_message_in_a_file_is_made_canonical_as_in_memory(
    header: list[bytes], body: bytes, separated: bool, mode: str
) -> None:
    raw = b"\r\n".join(header) + (b"\r\n\r\n" if separated else b"\r\n") + body
    try:
        expected = split_controls(canonical(raw, bare_line_ends=mode, max_hops=2))  # type: ignore[arg-type]
    except ContentRefused as refused:
        expected = None
        reason = refused.reply
    with tempfile.TemporaryFile() as file:
        file.write(raw)
        file.flush()
        try:
            made = canonical_file(
                file,
                len(raw),
                bare_line_ends=mode,  # type: ignore[arg-type]
                max_hops=2,
                directory=None,
            )
        except ContentRefused as refused:
            assert expected is None
            assert refused.reply == reason
            return
        assert expected is not None
        fields, controls = split_controls(made.header)
        body_of = FileBody.of(fields, made.file, made.offset, made.length)
        try:
            assert (b"".join(body_of.chunks()), controls) == expected
        finally:
            body_of.close()
            if made.file is not file:
                made.file.close()


@pytest.mark.parametrize(
    "around",
    [b"\r|\n", b"\r|x", b"x|\n", b"\r|\r\n", b"\r\n|\n", b"\n|\r"],
    ids=["crlf", "cr", "lf", "cr-crlf", "crlf-lf", "lf-cr"],
)
def test_line_ends_fixed_where_the_file_is_read_in_two_pieces(around: bytes) -> None:
    """canonical_file reads CHUNK bytes at a time: a CR at the end of one piece and an
    LF at the start of the next are one line end, not two."""
    before, after = around.split(b"|")
    head = b"Subject: s\r\n\r\n"
    filler = (b"y" * 78 + b"\r\n") * (CHUNK // 80 + 1)
    raw = head + filler[: CHUNK - len(head) - len(before)] + before + after + b"\r\nend\n"
    assert raw[CHUNK - len(before) : CHUNK + len(after)] == before + after
    expected = canonical(raw, bare_line_ends="fix", max_hops=2)
    with tempfile.TemporaryFile() as file:
        file.write(raw)
        file.flush()
        made = canonical_file(file, len(raw), bare_line_ends="fix", max_hops=2, directory=None)
        body = FileBody.of(made.header, made.file, made.offset, made.length)
        try:
            assert b"".join(body.chunks()) == expected
        finally:
            body.close()
            if made.file is not file:
                made.file.close()
