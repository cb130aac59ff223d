"""Channel: calls between the server and its delivery process, over one socket pair.

Either side may call the other, many calls under way at once, each answered by its
number, or send a notice that needs no answer (the server's "mail was stored", the
delivery process's "these results were written").
Frames are pickles with a length in front: the socket pair joins a process to the child
it started, never anything that listens, so nothing foreign can write into it.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from smtpgate import logs

log = logs.get(__name__)

_LENGTH = struct.Struct(">Q")


class ChannelClosedError(ConnectionError):
    """The other side went away (it exited, crashed or closed the channel)."""


class RemoteError(Exception):
    """The other side's handler raised; its text is the remote exception's repr."""


@dataclass(frozen=True, slots=True)
class _Call:
    number: int
    request: Any


@dataclass(frozen=True, slots=True)
class _Reply:
    number: int
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Cancel:
    number: int  # the caller gave up waiting: the handler need not go on


@dataclass(frozen=True, slots=True)
class _Notice:
    notice: Any  # news that needs no answer ("mail was stored", "results were written")


Handler = Callable[[Any], Awaitable[Any]]
Listener = Callable[[Any], None]


class Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._numbers = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._handling: dict[int, asyncio.Task[None]] = {}
        self._closed = False

    async def call(self, request: Any) -> Any:
        """Send a request and wait for its answer; cancelling the wait cancels the remote
        handler too. Raises ChannelClosedError or RemoteError."""
        if self._closed:
            raise ChannelClosedError("the channel is closed")
        self._numbers += 1
        number = self._numbers
        answer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[number] = answer
        try:
            self._send(_Call(number, request))
            return await answer
        except asyncio.CancelledError:
            if not self._closed:
                self._send(_Cancel(number))
            raise
        finally:
            self._waiting.pop(number, None)

    def notify(self, notice: Any) -> None:
        """Send news that needs no answer; dropped if the other side is gone."""
        if not self._closed:
            self._send(_Notice(notice))

    async def serve(self, handle: Handler, listen: Listener | None = None) -> None:
        """Answer the other side's calls with `handle`, pass its notices to `listen` and
        deliver the answers to ours, until the other side goes away; then every call
        still waiting fails."""
        try:
            while True:
                try:
                    header = await self._reader.readexactly(_LENGTH.size)
                    payload = await self._reader.readexactly(*_LENGTH.unpack(header))
                    frame = pickle.loads(payload)  # noqa: S301 - our own child (see above)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if isinstance(frame, _Reply):
                    if (answer := self._waiting.get(frame.number)) and not answer.done():
                        if frame.error is None:
                            answer.set_result(frame.value)
                        else:
                            answer.set_exception(RemoteError(frame.error))
                elif isinstance(frame, _Call):
                    answering = asyncio.create_task(self._answer(frame, handle))
                    self._handling[frame.number] = answering
                elif isinstance(frame, _Cancel):
                    if cancelled := self._handling.get(frame.number):
                        cancelled.cancel()
                elif isinstance(frame, _Notice) and listen is not None:
                    try:
                        listen(frame.notice)
                    except Exception:  # one bad notice must not end the channel
                        log.exception("notice failed", notice=type(frame.notice).__name__)
        finally:
            self._closed = True
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_exception(ChannelClosedError("the other process went away"))
            for task in self._handling.values():
                task.cancel()
            self._writer.close()  # the other side is gone: nobody reads this end

    async def _answer(self, call: _Call, handle: Handler) -> None:
        try:
            value = await handle(call.request)
        except asyncio.CancelledError:
            return  # the caller gave up or the channel closed: nobody waits for an answer
        except Exception as error:  # the caller must hear of it, or it waits for ever
            log.exception("call failed", request=type(call.request).__name__)
            reply = _Reply(call.number, error=repr(error))
        else:
            reply = _Reply(call.number, value)
        finally:
            self._handling.pop(call.number, None)
        if not self._closed:
            self._send(reply)

    def _send(self, frame: _Call | _Reply | _Cancel | _Notice) -> None:
        if self._writer.is_closing():
            return  # the other side is gone; `serve` fails whatever waits
        payload = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        # uvloop raises RuntimeError on a transport its peer has just closed.
        with contextlib.suppress(RuntimeError, ConnectionError):
            self._writer.writelines((_LENGTH.pack(len(payload)), payload))

    @property
    def closed(self) -> bool:
        return self._closed

    async def close(self) -> None:
        """End the channel from this side: the other side's `serve` returns."""
        self._closed = True
        self._writer.close()
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()
