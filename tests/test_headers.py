"""smtpgate.headers.split_controls: X-Smtpgate-* fields steer smtpgate and never leave it."""

from __future__ import annotations

import pytest

from smtpgate.headers import split_controls

BODY = (
    b"Hello,\r\n"
    b"X-Smtpgate-Route: this line is body text, not a header\r\n"
    b"\r\n"
    b"x-smtpgate-job: neither is this\r\n"
)


def test_control_fields_are_removed_and_returned() -> None:
    content = (
        b"From: Ann <ann@example.com>\r\n"
        b"X-Smtpgate-Route: corp\r\n"
        b"To: bob@example.org\r\n"
        b"x-smtpgate-job: weekly-news\r\n"
        b"Subject: hi\r\n"
        b"\r\n" + BODY
    )
    stripped, controls = split_controls(content)
    assert stripped == (
        b"From: Ann <ann@example.com>\r\nTo: bob@example.org\r\nSubject: hi\r\n\r\n" + BODY
    )
    assert controls == {"route": "corp", "job": "weekly-news"}


@pytest.mark.parametrize(
    "name", [b"X-Smtpgate-Route", b"x-smtpgate-route", b"X-SMTPGATE-ROUTE", b"x-SmtpGate-rOuTe"]
)
def test_names_match_case_insensitively_and_keys_are_lower_case(name: bytes) -> None:
    stripped, controls = split_controls(b"From: a@example.com\r\n" + name + b": bulk\r\n\r\nx\r\n")
    assert stripped == b"From: a@example.com\r\n\r\nx\r\n"
    assert controls == {"route": "bulk"}


def test_folded_control_field_is_removed_with_its_continuation_lines() -> None:
    content = (
        b"Subject: hi\r\n"
        b"X-Smtpgate-Job: quarterly\r\n"
        b"\tnewsletter\r\n"
        b"  for customers\r\n"
        b"To: b@example.org\r\n"
        b"\r\nbody\r\n"
    )
    stripped, controls = split_controls(content)
    assert stripped == b"Subject: hi\r\nTo: b@example.org\r\n\r\nbody\r\n"
    assert controls == {"job": "quarterly newsletter for customers"}


def test_other_fields_are_kept_byte_for_byte() -> None:
    before = (
        b"Received: from client (localhost [127.0.0.1])\r\n"
        b"\tby host; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    )
    after = (
        b"X-Raw:  \xe9t\xe9 latin-1,  two spaces\t\r\n"
        b"X-Smtpgateway: not ours\r\n"
        b"X-Mailer: smtpgate-client\r\n"
        b"Comments: mentions X-Smtpgate-Route: inside a value\r\n"
    )
    content = before + b"X-Smtpgate-Route: r\r\n" + after + b"\r\n" + BODY
    stripped, controls = split_controls(content)
    assert stripped == before + after + b"\r\n" + BODY
    assert controls == {"route": "r"}


def test_body_is_untouched_even_when_it_looks_like_a_control_header() -> None:
    content = b"X-Smtpgate-Route: corp\r\nSubject: s\r\n\r\n" + BODY
    stripped, controls = split_controls(content)
    assert stripped == b"Subject: s\r\n\r\n" + BODY
    assert controls == {"route": "corp"}  # not the body's value


def test_first_occurrence_wins() -> None:
    content = b"X-Smtpgate-Route: first\r\nSubject: s\r\nX-SMTPGATE-ROUTE: second\r\n\r\nbody\r\n"
    stripped, controls = split_controls(content)
    assert stripped == b"Subject: s\r\n\r\nbody\r\n"  # both copies removed
    assert controls == {"route": "first"}


def test_message_without_a_blank_line_is_all_header() -> None:
    stripped, controls = split_controls(b"Subject: s\r\nX-Smtpgate-Route: corp\r\n")
    assert stripped == b"Subject: s\r\n"
    assert controls == {"route": "corp"}


def test_message_without_a_blank_line_and_without_a_final_line_end() -> None:
    stripped, controls = split_controls(b"Subject: s\r\nX-Smtpgate-Route: corp")
    assert stripped == b"Subject: s\r\n"
    assert controls == {"route": "corp"}


@pytest.mark.parametrize(
    "content",
    [
        b"From: a@example.com\r\nSubject: s\r\n\r\n" + BODY,
        b"Subject: s\r\n\tfolded\r\n\r\nbody",
        b"Subject: s\r\n",
        b"",
        b"\r\n" + b"just a body\r\n",
        b"Subject: \xff\xfe\r\n\r\n\x00\x80\r\n",
    ],
)
def test_message_without_control_headers_is_returned_identical(content: bytes) -> None:
    stripped, controls = split_controls(content)
    assert stripped == content
    assert controls == {}


def test_values_are_decoded_as_utf8_and_trimmed() -> None:
    content = "X-Smtpgate-Job:   Café Newsletter  \r\n\r\nbody".encode()
    stripped, controls = split_controls(content)
    assert stripped == b"\r\nbody"
    assert controls == {"job": "Café Newsletter"}


def test_empty_header_section_keeps_body_lines() -> None:
    # A message that starts with the blank line has no header fields at all; a body line
    # that looks like a control header must stay, and must not steer the routing.
    content = b"\r\nX-Smtpgate-Route: quoted in a body\r\n\r\nmore\r\n"
    assert split_controls(content) == (content, {})


def test_bare_lf_message_keeps_body_lines() -> None:
    # Some scripts send bare LF line ends; aiosmtpd passes them through unchanged.
    content = b"Subject: s\nX-Smtpgate-Route: corp\n\nX-Smtpgate-Route: body text\nbye\n"
    stripped, controls = split_controls(content)
    assert stripped == b"Subject: s\n\nX-Smtpgate-Route: body text\nbye\n"
    assert controls == {"route": "corp"}
