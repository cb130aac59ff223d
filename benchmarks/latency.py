"""Accept latency: the time from the end of DATA to the server's reply, per message.

    .venv/bin/python benchmarks/latency.py --port 2525 [--sessions 50] [--messages 3000]

smtp-source reports no latency, so this is a small asyncio SMTP client: each of
`sessions` connections sends its share of the messages one after another (MAIL, RCPT,
DATA, each awaited, as smtp-source does) and times the final dot's reply; as fast as
the server answers (the latency of a saturated server), or at a given total `--rate`. The clock
starts just before the message and its final dot are written; the message is 4 KiB,
so that write never waits for the socket buffer. versus_postfix.py measures smtpgate
and Postfix with it in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass

from relay import message


@dataclass(frozen=True)
class Latencies:
    rate: float  # messages answered 250 per second, over the whole run
    seconds: list[float]  # end of DATA -> reply, one per message

    def percentile(self, p: float) -> float:
        ordered = sorted(self.seconds)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole (multi-line) reply; its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("the server closed the connection")
        if line[3:4] != b"-":
            return line[:3]


async def measure(port: int, sessions: int, messages: int, rate: float = 0) -> Latencies:
    """As fast as the server answers; or, with `rate`, message k of the run due at
    k / rate seconds (sent then, or at once if its session is late)."""
    payload = message() + b"\r\n.\r\n"
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    begin = loop.time() + 0.2

    async def session(first: int, count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await _reply(reader)
        writer.write(b"EHLO latency.bench\r\n")
        await _reply(reader)
        for k in range(count):
            if rate:
                await asyncio.sleep(begin + (first + k * sessions) / rate - loop.time())
            for command, expected in (
                (b"MAIL FROM:<sender@example.test>\r\n", b"250"),
                (b"RCPT TO:<rcpt@example.test>\r\n", b"250"),
                (b"DATA\r\n", b"354"),
            ):
                writer.write(command)
                if (code := await _reply(reader)) != expected:
                    raise RuntimeError(f"{command!r} answered {code!r}")
            started = time.perf_counter()
            writer.write(payload)
            code = await _reply(reader)
            latencies.append(time.perf_counter() - started)
            if code != b"250":
                raise RuntimeError(f"the final dot answered {code!r}")
        writer.write(b"QUIT\r\n")
        await _reply(reader)
        writer.close()
        await writer.wait_closed()

    share, extra = divmod(messages, sessions)
    started = time.perf_counter()
    await asyncio.gather(*(session(i, share + (i < extra)) for i in range(sessions)))
    return Latencies(messages / (time.perf_counter() - started), latencies)


def run(port: int, sessions: int, messages: int, rate: float = 0) -> Latencies:
    """In a fresh event loop; uvloop's where it installs, to keep the client's own CPU low."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(measure(port, sessions, messages, rate))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(measure(port, sessions, messages, rate))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=0, help="messages/s; 0: as fast as it goes")
    args = parser.parse_args()
    result = run(args.port, args.sessions, args.messages, args.rate)
    print(
        f"{result.rate:.0f} msg/s; end of DATA to reply: p50 {result.percentile(50) * 1000:.1f}"
        f" ms, p99 {result.percentile(99) * 1000:.1f} ms,"
        f" mean {statistics.fmean(result.seconds) * 1000:.1f} ms"
    )


if __name__ == "__main__":
    main()
