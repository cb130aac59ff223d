"""A counting SMTP sink for the benchmarks: aiosmtpd that stores nothing.

Also the reference server: `--mode null` answers 250 to every message, which is what
Python SMTP parsing alone costs; smtpgate is measured against it in the same run.
Writes the number of messages and recipients received to --count-file every 0.1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session


class Counter:
    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        self.recipients += len(envelope.rcpt_tos)
        return "250 2.0.0 Ok"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


async def serve(port: int, count_file: Path, host: str = "127.0.0.1") -> None:
    """Listen on `host`, a loopback address or several separated by commas."""
    counter = Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        # No size limit: benchmarks/big_message.py sends it 100 MB.
        lambda: SMTP(counter, hostname="sink.bench", enable_SMTPUTF8=True, data_size_limit=None),
        host.split(","),
        port,
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("READY", flush=True)

    def save() -> None:  # a few bytes to the page cache: not worth a thread
        count_file.write_text(f"{counter.messages} {counter.recipients}\n")

    while not stop.is_set():
        save()
        try:
            await asyncio.wait_for(stop.wait(), 0.1)
        except TimeoutError:
            pass
    save()
    server.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--count-file", type=Path, required=True)
    parser.add_argument(
        "--host", default="127.0.0.1", help="loopback addresses, separated by commas"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.count_file, args.host))


if __name__ == "__main__":
    main()
