"""Control headers: `X-Smtpgate-*` fields that steer smtpgate and never leave it.

Works on the raw bytes of the header section so the rest of the message is stored and
sent exactly as the client wrote it (no re-encoding by the email package).
"""

from __future__ import annotations

CONTROL_PREFIX = b"x-smtpgate-"


def split_controls(content: bytes) -> tuple[bytes, dict[str, str]]:
    """Remove every X-Smtpgate-* field (with its folded lines) from the header section.

    Returns the content without them and their values by lower-case name without the
    prefix ('route', 'job', ...); of a repeated name the first wins.
    """
    header_end = _end_of_header_section(content)
    if CONTROL_PREFIX not in content[:header_end].lower():
        return content, {}
    kept: list[bytes] = []
    fields: list[tuple[str, list[bytes]]] = []
    dropping = False
    for line in content[:header_end].splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):  # RFC 5322 2.2.3: continues the field above
            (fields[-1][1] if dropping else kept).append(line)
            continue
        dropping = line.lower().startswith(CONTROL_PREFIX)
        if not dropping:
            kept.append(line)
            continue
        name, _, value = line.partition(b":")
        key = name[len(CONTROL_PREFIX) :].strip().lower().decode("ascii", "replace")
        fields.append((key, [value]))
    controls: dict[str, str] = {}
    for key, parts in fields:
        text = b" ".join(part.strip() for part in parts).decode("utf-8", "replace")
        controls.setdefault(key, text)
    return b"".join(kept) + content[header_end:], controls


def _end_of_header_section(content: bytes) -> int:
    """Offset of the empty line that ends the header section (RFC 5322 2.1), or the end.
    A bare LF counts as a line end here so body lines are never taken for fields."""
    offset = 0
    for line in content.splitlines(keepends=True):
        if line in (b"\r\n", b"\n"):
            return offset
        offset += len(line)
    return offset
