"""Pipelining (RFC 2920): MAIL, every RCPT and DATA in one write, replies matched in order.

aiosmtplib reads exactly one reply per command it sends, so a pipelined transaction
borrows the connection's transport for its duration and reads the replies itself. It
checks that each reply fits its command, so a server that answers out of step is caught
instead of having its replies paired with the wrong recipients.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

MAX_REPLY_BYTES = 64 * 1024  # a reply longer than this is not SMTP
_REPLY_LINE = re.compile(rb"\d{3}([ -]|$)")


class PipelineBroken(Exception):
    """The server stalled or answered out of step; nothing was handed over yet."""


class ConnectionDropped(ConnectionError):
    pass


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str


class ReplyReader(asyncio.Protocol):
    """Collects complete (multi-line) replies in the order they arrive, and hears the
    transport's flow control while it streams a large message."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._replies: deque[Reply] = deque()
        self._waiter: asyncio.Future[None] | None = None  # next() waiting for a reply
        self._lost: BaseException | None = None
        self._writable = asyncio.Event()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    async def writable(self, within: float) -> None:
        """Wait until the transport takes more (TimeoutError after `within` seconds);
        ConnectionDropped when the connection went away meanwhile."""
        async with asyncio.timeout(within):
            await self._writable.wait()
        if isinstance(self._lost, ConnectionDropped):
            raise self._lost

    def data_received(self, data: bytes) -> None:
        if self._lost is not None:  # nothing after a broken reply can be trusted
            return
        self._buffer.extend(data)
        self._parse()
        if len(self._buffer) > MAX_REPLY_BYTES:  # what is left is one unfinished reply
            self._lost = PipelineBroken("reply too long")
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = ConnectionDropped("connection lost" + (f": {exc}" if exc else ""))
        self._wake()
        self._writable.set()

    def eof_received(self) -> bool:
        self._lost = ConnectionDropped("connection closed by the server")
        self._wake()
        return False

    def _parse(self) -> None:
        lines: list[bytes] = []
        offset = 0
        while (end := self._buffer.find(b"\n", offset)) >= 0:
            line = bytes(self._buffer[offset : end + 1]).rstrip(b"\r\n")
            offset = end + 1
            if not _REPLY_LINE.match(line):
                self._lost = PipelineBroken(f"malformed reply line {line[:80]!r}")
                return
            lines.append(line)
            if line[3:4] != b"-":
                text = "\n".join(part[4:].decode("utf-8", "replace") for part in lines)
                self._replies.append(Reply(int(line[:3]), text))
                del self._buffer[:offset]
                offset = 0
                lines = []

    @property
    def lost(self) -> bool:
        return self._lost is not None

    async def next(self, within: float) -> Reply:
        """The next reply; TimeoutError if none arrives `within` seconds. One caller at a
        time. A bare future and one timer: asyncio.timeout and an Event cost the delivery
        process several per cent of its loop, with a wait for every message's replies."""
        if self._replies:  # pipelined replies often come in one packet: no timer needed
            return self._replies.popleft()
        if self._waiter is not None:
            raise RuntimeError("another caller is waiting for the next reply")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not self._replies:
            if self._lost is not None:
                raise self._lost
            waiter = self._waiter = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


@contextmanager
def borrowed(transport: asyncio.Transport) -> Iterator[ReplyReader]:
    """Route the transport's incoming data to a ReplyReader, then give it back."""
    original = transport.get_protocol()
    reader = ReplyReader()
    transport.set_protocol(reader)
    try:
        yield reader
    finally:
        if not reader.lost:
            transport.set_protocol(original)
        elif not transport.is_closing():  # a broken reply: nothing after it is to be trusted,
            transport.close()  # and the connection must not go back to the pool


def dot_stuffed(content: bytes) -> bytes:
    """DATA payload: CRLF line ends, leading dots doubled (RFC 5321 4.5.2), final dot."""
    crlf = content.count(b"\r\n")  # the listener stores CRLF only: skip the regex then
    if content.count(b"\r") != crlf or content.count(b"\n") != crlf:
        content = re.sub(rb"\r\n|\r|\n", b"\r\n", content)
    content = content.replace(b"\r\n.", b"\r\n..")  # every line starts after a CRLF ...
    if content.startswith(b"."):  # ... but the first
        content = b"." + content
    if not content.endswith(b"\r\n"):
        content += b"\r\n"
    return content + b".\r\n"


def fits(command: bytes, reply: Reply) -> bool:
    """Could this reply answer this command? 354 only to DATA, 2xx never to DATA."""
    if command.startswith(b"DATA"):
        return reply.code == 354 or 400 <= reply.code < 600
    return 200 <= reply.code < 300 or 400 <= reply.code < 600
