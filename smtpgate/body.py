"""Body: a message too big to hold in memory, passed along the data path in chunks.

The listener hands one to the spool (a temporary file), the spool hands one to the
transports (its stored blob). Small messages stay `bytes` all the way: `Content` is either.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator, Generator, Iterator
from typing import BinaryIO

LARGE = 1 << 20  # a message larger than this travels as a Body
CHUNK = 1 << 20  # bytes read at a time
HEAD = 64 * 1024  # of a body, kept at hand: the header section of nearly every message


class Body(abc.ABC):
    """`size` bytes, read in chunks with blocking I/O: on the spool's writer thread, or
    through `read_chunks` off the event loop. Each call of `chunks` reads from the start."""

    size: int

    @abc.abstractmethod
    def chunks(self) -> Generator[bytes, None, None]: ...

    @property
    @abc.abstractmethod
    def head(self) -> bytes:
        """The first HEAD bytes (all of them if fewer): enough to quote the header."""

    @abc.abstractmethod
    def close(self) -> None:
        """Let go of what the body reads from."""


Content = bytes | Body


def size_of(content: Content) -> int:
    return len(content) if isinstance(content, bytes) else content.size


def head_of(content: Content) -> bytes:
    return content if isinstance(content, bytes) else content.head


class FileBody(Body):
    """`prefix` (the trace and header fields, made in memory) then `length` bytes of a
    file from `offset`, read through a descriptor of its own (closed by `close`), so
    it lives on after the file object it was made from is closed."""

    def __init__(self, prefix: bytes, fd: int, offset: int, length: int) -> None:
        self._prefix = prefix
        self._fd: int | None = fd
        self._offset = offset
        self._length = length
        self.size = len(prefix) + length

    @classmethod
    def of(cls, prefix: bytes, file: BinaryIO, offset: int, length: int) -> FileBody:
        return cls(prefix, os.dup(file.fileno()), offset, length)

    def duplicate(self) -> FileBody:
        """The same body with a handle of its own, for a reader that may outlive this one."""
        if self._fd is None:
            raise ValueError("the body was closed")
        return FileBody(self._prefix, os.dup(self._fd), self._offset, self._length)

    def chunks(self) -> Generator[bytes, None, None]:
        if self._fd is None:
            raise ValueError("the body was closed")
        if self._prefix:
            yield self._prefix
        yield from file_pieces(self._fd, self._offset, self._length)

    @property
    def head(self) -> bytes:
        if self._fd is None or len(self._prefix) >= HEAD:
            return self._prefix[:HEAD]
        wanted = min(HEAD - len(self._prefix), self._length)
        return self._prefix + os.pread(self._fd, wanted, self._offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def file_pieces(fd: int, offset: int, length: int) -> Iterator[bytes]:
    """`length` bytes of a file from `offset`, CHUNK at a time (pread: no shared position)."""
    position, end = offset, offset + length
    while position < end:
        piece = os.pread(fd, min(CHUNK, end - position), position)
        if not piece:
            raise OSError(f"the message's file ends {end - position} bytes early")
        position += len(piece)
        yield piece


async def read_chunks(body: Body) -> AsyncGenerator[bytes, None]:
    """The body's chunks, each read on a worker thread; closes what it opened even when
    the caller stops early (use it with contextlib.aclosing)."""
    chunks = body.chunks()
    try:
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield chunk
    finally:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(chunks.close)
