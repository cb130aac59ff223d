"""DATA: the message a client sends after 354, read off the connection in large pieces.

Part of the listener, before the handler makes it canonical and the spool stores it. It
undoes the transparency dots (RFC 5321 4.5.2), finds the final dot, enforces the size and
line-length limits as aiosmtpd does, and keeps the message in memory or, past a
threshold, in a temporary file, so a 100 MB message never sits whole in memory.
"""

from __future__ import annotations

import asyncio
import enum
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from smtpgate.body import LARGE

END = b"\r\n.\r\n"  # a line holding a single dot ends the data (RFC 5321 4.1.1.4)
LINE_LIMIT = 1001  # RFC 5321 4.5.3.1.6: 998 octets + CRLF, + the transparent dot
READ_SIZE = 1 << 20  # more than a StreamReader holds at once: each read takes it all
SPILL_AT = LARGE  # a larger message goes to a temporary file


class Refusal(enum.Enum):
    """Why the data is refused; told only after the final dot (RFC 5321 4.2.5)."""

    TOO_LONG = "line too long"
    TOO_BIG = "too much mail data"
    NO_ROOM = "the temporary file could not be written"  # a full disk, most likely


class DataParser:
    """The bytes after 354, fed as they arrive in pieces of any size: `feed` returns the
    message's next piece with the dots undone. `done` once the final dot was seen; `rest`
    then holds what followed it (commands a client pipelined after the message). Once a
    limit is passed, it reads on to the final dot but keeps nothing.

    Lines end in CRLF only, as in aiosmtpd 1.4.6: a bare LF ends no line, so neither
    "\\n.\\n" nor "\\r.\\r" ends the data (the 2023 SMTP smuggling research)."""

    def __init__(self, size_limit: int | None, line_limit: int = LINE_LIMIT) -> None:
        self._size_limit = size_limit
        self._line_limit = line_limit
        # The CRLF that ended the DATA command comes first: every line, the first one
        # too, then starts after a CRLF, and one search finds dots and the end alike.
        self._pending = b"\r\n"
        self._lead = 2  # bytes of _pending that are that CRLF, not the client's data
        self._line = 0  # length of the line read so far, not yet ended
        self.size = 0  # the client's bytes, dots included (as aiosmtpd counts them)
        self.refusal: Refusal | None = None
        self.done = False
        self.rest = b""

    def feed(self, data: bytes) -> bytes:
        buffer = self._pending + data
        end = buffer.find(END)
        if end >= 0:
            lines = buffer[: end + 2]
            self.rest = buffer[end + len(END) :]
            self._pending = b""
            self.done = True
        else:
            # Hold back what may be the start of the final dot or of a stuffed line.
            keep = next((n for n in (4, 3, 2, 1) if buffer.endswith(END[:n])), 0)
            lines = buffer[: len(buffer) - keep]
            self._pending = buffer[len(buffer) - keep :]
        if not lines:  # all held back; so is the leading CRLF, whole
            return b""
        lead, self._lead = self._lead, 0
        self.size += len(lines) - lead
        if self.refusal is None:
            self._check(lines)
        if self.refusal is not None:
            return b""
        return lines.replace(b"\r\n.", b"\r\n")[lead:]

    def _check(self, lines: bytes) -> None:
        """The size limit first, then line lengths, in aiosmtpd's order."""
        if self._size_limit and self.size > self._size_limit:
            self.refusal = Refusal.TOO_BIG
            return
        parts = lines.split(b"\r\n")
        first = self._line + len(parts[0])
        if len(parts) == 1:
            longest, self._line = 0, first
        else:
            longest = max(first, max(map(len, parts[1:-1]), default=0))
            self._line = len(parts[-1])
        # A line not ended yet is too long already if its CRLF would make it so.
        if max(longest, self._line) + 2 > self._line_limit:
            self.refusal = Refusal.TOO_LONG


class Collector:
    """The message in memory until it passes `spill_at` bytes (None: never), then in an
    anonymous temporary file in `directory`, which is gone once closed or the process
    dies, so a crash leaves nothing behind. A file that cannot be written is kept as
    `error`, so the data can still be read to its end before the client hears why."""

    def __init__(self, spill_at: int | None, directory: Path | None) -> None:
        self._spill_at = spill_at
        self._directory = directory
        self._pieces: list[bytes] = []
        self._held = 0
        self.file: BinaryIO | None = None
        self.error: OSError | None = None

    def add(self, piece: bytes) -> None:
        if self.error is not None:
            return
        try:
            if self.file is not None:
                self.file.write(piece)
                return
            self._pieces.append(piece)
            self._held += len(piece)
            if self._spill_at is not None and self._held > self._spill_at:
                self.file = tempfile.TemporaryFile(dir=self._directory)
                self.file.writelines(self._pieces)
                self._pieces.clear()
        except OSError as error:
            self.error = error
            self.close()

    def content(self) -> bytes:
        """What is held in memory (all of it unless `file` is set)."""
        return b"".join(self._pieces)

    def close(self) -> None:
        self._pieces.clear()
        if self.file is not None:
            self.file.close()


@dataclass(frozen=True, slots=True)
class Message:
    """The data of one transaction: in `content`, or in `spilled` (flushed, `size`
    bytes from its start; the receiver closes it). `refusal` says why it was not kept,
    `error` what went wrong with the temporary file."""

    content: bytes
    spilled: BinaryIO | None
    size: int
    refusal: Refusal | None
    error: OSError | None = None


async def receive(
    reader: asyncio.StreamReader,
    *,
    size_limit: int | None,
    line_limit: int = LINE_LIMIT,
    spill_at: int | None = SPILL_AT,
    directory: Path | None = None,
) -> Message:
    """Read the data up to the final dot. A lost connection raises (CancelledError, as
    aiosmtpd's eof_received cancels the session's task) and leaves nothing behind."""
    parser = DataParser(size_limit, line_limit)
    collector = Collector(spill_at, directory)
    try:
        while not parser.done:
            chunk = await reader.read(READ_SIZE)
            if not chunk:
                await asyncio.sleep(0)  # at EOF aiosmtpd has cancelled this task: let it land
                raise ConnectionResetError("the client closed the connection during DATA")
            piece = parser.feed(chunk)
            if parser.refusal is not None:
                collector.close()  # keep nothing of a message that is refused
            elif piece:
                collector.add(piece)
        if parser.rest:
            _unread(reader, parser.rest)
        if parser.refusal is not None:
            return Message(b"", None, 0, parser.refusal)
        if collector.error is None and collector.file is not None:
            try:
                collector.file.flush()
            except OSError as error:
                collector.error = error
                collector.close()
        if collector.error is not None:
            return Message(b"", None, 0, Refusal.NO_ROOM, collector.error)
        if collector.file is not None:
            return Message(b"", collector.file, collector.file.tell(), None)
        content = collector.content()
        return Message(content, None, len(content), None)
    except BaseException:
        collector.close()
        raise


def _unread(reader: asyncio.StreamReader, data: bytes) -> None:
    """Give back what followed the final dot, for the next command to read. asyncio has
    no unread; CPython's StreamReader holds what it has read in `_buffer` (since 3.4)."""
    buffer: bytearray = vars(reader)["_buffer"]
    buffer[:0] = data
