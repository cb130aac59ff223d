"""Benchmark: smtpgate's durable accept and end-to-end relay, against a reference.

    .venv/bin/python benchmarks/relay.py [--messages 2000] [--connections 20] [--reps 3]

Every case runs against smtpgate and against the reference (an aiosmtpd server that
stores nothing and answers 250 at once) in alternating repetitions of the same run, and
prints medians and the ratio smtpgate/reference: the machine is shared and noisy, so
only ratios from one run mean anything. Loopback only.

Cases:
  accept      N messages of 4 KiB over K persistent connections: the rate of 250 replies
              (smtpgate: flushed to the spool first).
  relay       the same N messages until the upstream sink has them all (smtpgate relays
              them over `concurrency` connections; the reference has no second hop, so
              the ratio is the price of keeping mail safe and forwarding it).
  relay-10    10 recipients a message, turbo off and on.
Peak RSS of smtpgate is read from /proc/PID/status (VmHWM); peak PSS is sampled from
/proc/PID/smaps_rollup.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiosmtplib

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
PSS_SAMPLE_SECONDS = 0.25


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, seconds: float = 15, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing answers on port {port}")


def message(size: int = 4096) -> bytes:
    head = b"From: <bench@example.test>\r\nTo: <rcpt@example.test>\r\nSubject: bench\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    return head + (line * (size // len(line) + 1))[:size]


async def load(
    port: int,
    messages: int,
    connections: int,
    recipients: int = 1,
    recipients_of: Callable[[int], list[str]] | None = None,
) -> float:
    """Seconds to send `messages` over `connections` persistent connections; message n
    goes to `recipients_of(n)`, else to `recipients` fixed addresses."""
    content = message()
    fixed = [f"r{i}@example.test" for i in range(recipients)]
    numbers = iter(range(messages))

    async def worker(count: int) -> None:
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=port,
            start_tls=False,
            local_hostname="bench.test",
            timeout=120,
        )
        await client.connect()
        for _ in range(count):
            n = next(numbers)
            rcpts = recipients_of(n) if recipients_of else fixed
            await client.sendmail("bench@example.test", rcpts, content)
        await client.quit()

    share, extra = divmod(messages, connections)
    started = time.perf_counter()
    await asyncio.gather(*(worker(share + (i < extra)) for i in range(connections)))
    return time.perf_counter() - started


def family(pid: int) -> list[int]:
    """The process and its descendants, from /proc."""
    members = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        for child in (task / "children").read_text().split():
            members += family(int(child))
    return members


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _pss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


class Process:
    def __init__(
        self,
        argv: list[str],
        port: int,
        host: str = "127.0.0.1",
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.popen = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=cwd
        )
        wait_port(port, host=host)
        self._peak_pss_kb = 0
        self._sampling = threading.Event()
        threading.Thread(target=self._sample_pss, daemon=True).start()

    def peak_rss_mb(self) -> float:
        """Peak RSS of the process and its children (smtpgate's delivery process), summed:
        an upper bound, since the two peaks need not come at the same moment, and each
        counts in full the pages of the interpreter and libraries the two share."""
        return sum(self.peak_rss_each_mb())

    def peak_rss_each_mb(self) -> list[float]:
        """Peak RSS of the process, then of each of its descendants."""
        return [_peak_rss_kb(pid) / 1024 for pid in family(self.popen.pid)]

    def peak_pss_mb(self) -> float:
        """The highest PSS of the process and its children summed, sampled every
        PSS_SAMPLE_SECONDS: the memory they use together, a shared page counted once."""
        return self._peak_pss_kb / 1024

    def _sample_pss(self) -> None:
        while not self._sampling.wait(PSS_SAMPLE_SECONDS) and self.popen.poll() is None:
            try:
                total = sum(_pss_kb(pid) for pid in family(self.popen.pid))
            except OSError:  # a process of the family just went
                continue
            self._peak_pss_kb = max(self._peak_pss_kb, total)

    def stop(self) -> None:
        self._sampling.set()
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()


def sink(workdir: Path) -> tuple[Process, int, Path]:
    port = free_port()
    count_file = workdir / f"sink-{port}.count"
    count_file.write_text("0 0\n")
    return (
        Process(
            [PYTHON, str(HERE / "sink.py"), "--port", str(port), "--count-file", str(count_file)],
            port,
        ),
        port,
        count_file,
    )


def received(count_file: Path) -> int:
    text = count_file.read_text().split()
    return int(text[0]) if text else 0


def gateway(
    workdir: Path,
    upstream: int,
    *,
    server: str = "",
    relay: str = "",
    route: str = "",
    source: Path | None = None,
) -> tuple[Process, int]:
    """`smtpgate serve` relaying everything to 127.0.0.1:upstream, and its port. `server`,
    `relay` and `route` are more lines for those tables; `source` is another smtpgate
    source tree to run instead of the installed one."""
    port = free_port()
    state = Path(tempfile.mkdtemp(dir=workdir))
    config = state / "smtpgate.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
state_dir = "{state}"
hostname = "gateway.bench"
default_route = "sink"
max_connections = 1000
max_connections_per_client = 1000
{server}

[log]
level = "warning"
format = "json"

[relays.sink]
host = "127.0.0.1"
port = {upstream}
tls = "none"
concurrency = 10
{relay}

[routes.sink]
mode = "relay"
relay = "sink"
{route}
""")
    env = dict(os.environ)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    process = Process(
        [PYTHON, "-m", "smtpgate", "serve", "--config", str(config)],
        port,
        env=env,
        cwd=state,  # not the checkout: `-m` would import smtpgate from there first
    )
    return process, port


def run_case(case: str, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """One repetition of one case for both contenders: messages per second and RSS."""
    recipients = 10 if case.startswith("relay-10") else 1
    result: dict[str, float] = {}
    # The reference: stores nothing, forwards nothing.
    ref, ref_port, _ = sink(workdir)
    seconds = asyncio.run(load(ref_port, args.messages, args.connections, recipients))
    ref.stop()
    result["reference"] = args.messages / seconds
    # smtpgate, relaying to a sink of its own.
    upstream, upstream_port, count_file = sink(workdir)
    smtpgate, port = gateway(
        workdir, upstream_port, relay=f"turbo = {str(case.endswith('turbo')).lower()}"
    )
    started = time.perf_counter()
    seconds = asyncio.run(load(port, args.messages, args.connections, recipients))
    if case == "accept":
        result["smtpgate"] = args.messages / seconds
    else:
        while received(count_file) < args.messages:
            if time.perf_counter() - started > 600:
                raise SystemExit(
                    f"{case}: the sink got {received(count_file)} of {args.messages} in 10 minutes"
                )
            time.sleep(0.05)
        result["smtpgate"] = args.messages / (time.perf_counter() - started)
    result["rss_mb"] = smtpgate.peak_rss_mb()
    smtpgate.stop()
    upstream.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--cases", default="accept,relay,relay-10,relay-10-turbo")
    args = parser.parse_args()
    cases = args.cases.split(",")
    with tempfile.TemporaryDirectory(prefix="smtpgate-bench-") as tmp:
        samples: dict[str, list[dict[str, float]]] = {case: [] for case in cases}
        for rep in range(args.reps):
            for case in cases:
                samples[case].append(run_case(case, args, Path(tmp)))
                print(f"rep {rep + 1} {case}: {samples[case][-1]}", file=sys.stderr)
    print(
        f"{args.messages} messages of 4 KiB over {args.connections} connections,"
        f" {args.reps} repetitions, medians ({os.cpu_count()} cores)"
    )
    print(
        f"{'case':<16}{'smtpgate msg/s':>16}{'reference msg/s':>17}{'ratio':>8}{'peak RSS MB':>13}"
    )
    for case, runs in samples.items():
        ours = statistics.median(r["smtpgate"] for r in runs)
        ref = statistics.median(r["reference"] for r in runs)
        rss = max(r["rss_mb"] for r in runs)
        print(f"{case:<16}{ours:>16.0f}{ref:>17.0f}{ours / ref:>8.2f}{rss:>13.1f}")


if __name__ == "__main__":
    main()
