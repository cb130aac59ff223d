"""Benchmark: direct delivery of 10,000 recipients spread over 100 domains.

    .venv/bin/python benchmarks/direct.py [--workers 1,16,64] [--messages 1000]

A loopback DNS server (the test suite's) answers MX and A records for 100 domains whose
MX hosts are counting sinks on 127.0.1.1-4. Each message has 10 recipients in 10
different domains, so every message is 10 transactions. For each worker count it prints
the time from the first message handed to smtpgate until the sinks hold every
recipient, the recipients per second, the speed-up over the first worker count of the
same run, and smtpgate's peak RSS. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from pathlib import Path

from relay import Process, free_port, load

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import DnsZone  # noqa: E402  (the loopback DNS server of the tests)

PYTHON = sys.executable
SINK_ADDRESSES = ["127.0.1.1", "127.0.1.2", "127.0.1.3", "127.0.1.4"]
DOMAINS = [f"d{n:03}.bench.test" for n in range(100)]


def dns_server(mx_addresses: dict[str, str] | None = None) -> DnsZone:
    """A loopback DNS server on a thread of its own, answering MX queries for each domain
    with one host at its address (default: DOMAINS spread over SINK_ADDRESSES)."""
    if mx_addresses is None:
        mx_addresses = {d: SINK_ADDRESSES[n % len(SINK_ADDRESSES)] for n, d in enumerate(DOMAINS)}
    zone = DnsZone()
    for domain, address in mx_addresses.items():
        zone.mx(domain, (10, f"mx.{domain}", address))
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, name="dns", daemon=True).start()

    async def start() -> None:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: zone, local_addr=("127.0.0.1", 0)
        )
        zone.port = transport.get_extra_info("sockname")[1]

    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    return zone


def received(count_files: list[Path]) -> int:
    total = 0
    for path in count_files:
        fields = path.read_text().split()
        total += int(fields[1]) if len(fields) == 2 else 0
    return total


def run(workers: int, messages: int, zone: DnsZone, workdir: Path) -> tuple[float, float]:
    """Seconds until every recipient arrived, and smtpgate's peak RSS in MB."""
    port = free_port()
    sinks, counts = [], []
    for address in SINK_ADDRESSES:
        count_file = workdir / f"sink-{address}-{workers}.count"
        count_file.write_text("0 0\n")
        counts.append(count_file)
        sinks.append(
            Process(
                [
                    PYTHON,
                    str(HERE / "sink.py"),
                    "--host",
                    address,
                    "--port",
                    str(port),
                    "--count-file",
                    str(count_file),
                ],
                port,
                host=address,
            )
        )
    listen = free_port()
    state = workdir / f"state-{workers}"
    config = workdir / f"direct-{workers}.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{listen}"]
state_dir = "{state}"
hostname = "gateway.bench"
max_recipients = 100

[log]
level = "warning"
format = "json"

[direct]
workers = {workers}
per_domain = 5
port = {port}
helo_name = "gateway.bench"

[dns]
nameservers = ["127.0.0.1:{zone.port}"]
""")
    smtpgate = Process([PYTHON, "-m", "smtpgate", "serve", "--config", str(config)], listen)
    expected = messages * 10
    started = time.perf_counter()
    asyncio.run(load(listen, messages, 10, recipients_of=_recipients))
    while received(counts) < expected:
        if time.perf_counter() - started > 900:
            raise SystemExit(f"{workers} workers: {received(counts)} of {expected} in 15 min")
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    rss = smtpgate.peak_rss_mb()
    smtpgate.stop()
    for sink in sinks:
        sink.stop()
    return seconds, rss


def _recipients(n: int) -> list[str]:
    """Message n goes to 10 recipients in 10 different domains."""
    return [f"r{n}@{DOMAINS[(n * 10 + k) % len(DOMAINS)]}" for k in range(10)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,16,64")
    parser.add_argument("--messages", type=int, default=1000)
    args = parser.parse_args()
    zone = dns_server()
    results = []
    with tempfile.TemporaryDirectory(prefix="smtpgate-direct-") as tmp:
        for workers in (int(w) for w in args.workers.split(",")):
            seconds, rss = run(workers, args.messages, zone, Path(tmp))
            results.append((workers, seconds, rss))
            print(f"{workers} workers: {seconds:.1f} s", file=sys.stderr)
    recipients = args.messages * 10
    base = results[0][1]
    print(f"{recipients} recipients over {len(DOMAINS)} domains ({args.messages} messages)")
    print(f"{'workers':>8}{'seconds':>10}{'rcpt/s':>10}{'speed-up':>10}{'peak RSS MB':>13}")
    for workers, seconds, rss in results:
        print(
            f"{workers:>8}{seconds:>10.1f}{recipients / seconds:>10.0f}"
            f"{base / seconds:>10.2f}{rss:>13.1f}"
        )


if __name__ == "__main__":
    main()
