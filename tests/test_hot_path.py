"""Fast paths on the accept path agree with the slow code they stand in for."""

from __future__ import annotations

import re
from email._header_value_parser import get_angle_addr
from email.errors import HeaderParseError

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpgate.content import _BARE, ContentRefused, canonical
from smtpgate.listener import plain_path
from smtpgate.transports.pipelining import dot_stuffed

PATH_ALPHABET = "ab.-+@<>()[] \t\r\n=\"'\\:;,x1_%!é"


@pytest.mark.parametrize(
    ("arg", "expected"),
    [
        ("<a@b.example>", ("a@b.example", "")),
        ("<first.last+tag@mail-1.example> SIZE=4096 BODY=8BITMIME", None),
        ("<a@b.example>  SIZE=1", ("a@b.example", "SIZE=1")),
    ],
)
def test_plain_paths_take_the_fast_path(arg: str, expected: tuple[str, str] | None) -> None:
    found = plain_path(arg)
    assert found is not None
    if expected is not None:
        assert found == expected


@pytest.mark.parametrize(
    "arg", ["<>", " <a@b.example>", "<a@[127.0.0.1]>", "<a@b.example.>", "<a@b> (c)", "<a@b>\n"]
)
def test_other_forms_go_to_aiosmtpds_parser(arg: str) -> None:
    assert plain_path(arg) is None


@given(
    st.text(PATH_ALPHABET, max_size=30).map(lambda s: "<" + s)
    | st.from_regex(r"<[a-z.+-]{1,6}@[a-z1.-]{1,6}>[ \t(a-zA-Z=)]{0,6}", fullmatch=True)
)
def test_plain_path_agrees_with_the_email_parser(arg: str) -> None:
    found = plain_path(arg)
    if found is None:
        return
    address, rest = get_angle_addr(arg)
    assert (address.addr_spec, rest) == found


@given(st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"")))
def test_bare_line_end_check_agrees_with_the_regex(raw: bytes) -> None:
    bare = _BARE.search(raw) is not None
    try:
        canonical(raw, bare_line_ends="refuse", max_hops=50)
    except ContentRefused as refused:
        assert bare and "bare" in refused.reply
    else:
        assert not bare


def test_parser_refuses_what_plain_path_refuses() -> None:
    """A trailing dot is no domain; the fast path must not be laxer than the parser."""
    with pytest.raises(HeaderParseError):
        get_angle_addr("<a@b.example.>")


def _dot_stuffed_by_regex(content: bytes) -> bytes:
    content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    content = re.sub(rb"(?m)^\.", b"..", content)
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b" "])).map(b"".join))
def test_dot_stuffing_agrees_with_the_regex(content: bytes) -> None:
    assert dot_stuffed(content) == _dot_stuffed_by_regex(content)
