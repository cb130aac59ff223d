"""Benchmark: what one large message costs smtpgate in memory and time.

    .venv/bin/python benchmarks/big_message.py [--mb 100] [--baseline DIR]

Starts a counting sink (sink.py) and `smtpgate serve` relaying to it, sends one message
of --mb megabytes with smtplib, and waits until the sink has it. Reports smtpgate's
peak RSS (VmHWM from /proc/PID/status, its delivery process added) before the message
and after its delivery, the growth against the message's size, and the seconds from
DATA to the 250 and to the sink. `--baseline DIR` runs another smtpgate source tree
(for example a checkout of main) the same way in the same run, for a before/after.
Loopback only.
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tempfile
import time
from pathlib import Path

from relay import family, gateway, received, sink

LINE = b"The quick brown fox jumps over the lazy dog. " * 2 + b"\r\n"


def big(megabytes: int) -> bytes:
    """About `megabytes` MB of text with a line that begins with a dot now and then."""
    head = b"From: <bench@example.test>\r\nTo: <rcpt@example.test>\r\nSubject: big\r\n\r\n"
    block = LINE * 99 + b". a line that begins with a dot\r\n"
    body = block * (megabytes * 1_000_000 // len(block) + 1)
    return head + body[: megabytes * 1_000_000]


def peak_and_current_mb(pid: int) -> tuple[float, float]:
    """Of the server and its delivery process, summed (as versus_postfix.py counts)."""
    peak = current = 0.0
    for member in family(pid):
        for line in Path(f"/proc/{member}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "VmHWM":
                peak += int(value.split()[0]) / 1024
            elif name == "VmRSS":
                current += int(value.split()[0]) / 1024
    return peak, current


def run(who: str, source: Path | None, message: bytes, workdir: Path) -> dict[str, float]:
    sink_process, sink_port, count_file = sink(workdir)
    smtpgate, port = gateway(
        workdir,
        sink_port,
        server=f'max_message_size = "{2 * len(message) // 1_000_000 + 10}MB"\nidle_timeout = "10m"',
        relay='data_timeout = "10m"',
        source=source,
    )
    try:
        time.sleep(1.0)  # let start-up settle: the spool opened, the scheduler idle
        pid = smtpgate.popen.pid
        before, _ = peak_and_current_mb(pid)
        started = time.perf_counter()
        with smtplib.SMTP("127.0.0.1", port, timeout=600) as client:
            client.sendmail("bench@example.test", ["rcpt@example.test"], message)
        accepted = time.perf_counter() - started
        while received(count_file) < 1:
            time.sleep(0.05)
        delivered = time.perf_counter() - started
        after, now = peak_and_current_mb(pid)
    finally:
        smtpgate.stop()
        sink_process.stop()
    size = len(message) / 2**20
    result = {
        "message_mb": size,
        "peak_before_mb": before,
        "peak_after_mb": after,
        "growth_mb": after - before,
        "growth_of_size": (after - before) / size,
        "rss_after_mb": now,
        "accept_s": accepted,
        "delivered_s": delivered,
    }
    shown = ", ".join(f"{k} {v:.2f}" for k, v in result.items())
    print(f"{who:<9} {shown}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100, help="message size in MB (10^6 bytes)")
    parser.add_argument("--baseline", type=Path, help="another smtpgate source tree to compare")
    args = parser.parse_args()
    message = big(args.mb)
    with tempfile.TemporaryDirectory(prefix="smtpgate-big-") as directory:
        workdir = Path(directory)
        run("smtpgate", None, message, workdir)
        if args.baseline is not None:
            run("baseline", args.baseline.resolve(), message, workdir)
    sys.exit(0)


if __name__ == "__main__":
    main()
