"""Streaming DATA: a large message sent from the spool a chunk at a time.

Used by the upstream session (relay, direct, passthrough) for a Body; a small message
goes whole through `pipelining.dot_stuffed`, which this agrees with byte for byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import re

from smtpgate.body import Body, read_chunks
from smtpgate.transports.pipelining import ReplyReader

_LINE_END = re.compile(rb"\r\n|\r|\n")


class DotStuffer:
    """dot_stuffed() for a message fed in chunks cut anywhere: CRLF line ends, leading
    dots doubled (RFC 5321 4.5.2), the final dot from `end`. A line may begin in one
    chunk and its dot come in the next; a CR at the end of a chunk waits for the next,
    which may begin with its LF."""

    def __init__(self) -> None:
        self._held = b""
        self._line_start = True  # the next byte begins a line
        self._sent = False  # anything written yet

    def feed(self, chunk: bytes) -> bytes:
        chunk = self._held + chunk
        self._held = b"\r" if chunk.endswith(b"\r") else b""
        if self._held:
            chunk = chunk[:-1]
        if not chunk:
            return b""
        crlf = chunk.count(b"\r\n")  # the spool holds CRLF only: skip the regex then
        if chunk.count(b"\r") != crlf or chunk.count(b"\n") != crlf:
            chunk = _LINE_END.sub(b"\r\n", chunk)
        chunk = chunk.replace(b"\r\n.", b"\r\n..")
        if self._line_start and chunk.startswith(b"."):
            chunk = b"." + chunk
        self._line_start = chunk.endswith(b"\r\n")
        self._sent = True
        return chunk

    def end(self) -> bytes:
        """The rest: a held CR as a line end, a last line end if missing, the final dot."""
        rest = self.feed(b"\n") if self._held else b""  # a lone CR is a line end
        if not self._line_start or not self._sent:
            rest += b"\r\n"
        return rest + b".\r\n"


async def write_body(
    transport: asyncio.WriteTransport, reader: ReplyReader, body: Body, within: float
) -> None:
    """The body dot-stuffed and its final dot, written as fast as the server reads: each
    chunk waits until the transport's buffer is below its high-water mark again, for at
    most `within` seconds (TimeoutError), or until the connection drops."""
    stuffer = DotStuffer()
    async with contextlib.aclosing(read_chunks(body)) as chunks:
        async for chunk in chunks:
            transport.write(stuffer.feed(chunk))
            await reader.writable(within)
    transport.write(stuffer.end())
