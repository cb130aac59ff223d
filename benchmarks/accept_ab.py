"""A/B of the small-message accept rate: this tree against another smtpgate tree.

    .venv/bin/python benchmarks/accept_ab.py --baseline DIR [--sessions 50]
        [--messages 3000] [--reps 4] [--rcpts 1] [--hold | --e2e | --drain [--no-turbo]]
        [--state-on /dev/shm]

Postfix's smtp-source sends 4 KiB messages over `--sessions` connections (each reused,
-d) to a fresh `smtpgate serve` of each tree in turn, the order alternating between
repetitions; the route relays with turbo to Postfix's smtp-sink, or with --hold is held,
so only the accept path runs. With --e2e the rate is end to end: until smtp-sink has
received every message (it exits after the last). With --drain the delivery process is
stopped (SIGSTOP) while the messages are accepted, then let go: the rate is how fast it
empties the queue into smtp-sink, alone on the machine, with the CPU it spent a message
(the delivery side's cost, apart from the listener's; --no-turbo: one command at a
time). `--state-on` puts the spool on another
file system (a tmpfs takes the disk's flushes out of the measurement). Prints each rate, the medians
and the ratio this/baseline: only ratios from one run compare. Loopback only.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from relay import family, free_port, gateway, wait_port

HERE = Path(__file__).resolve().parent


def accept_rate(port: int, sessions: int, messages: int, rcpts: int = 1) -> float:
    argv = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "4096", "-d"]
    argv += ["-r", str(rcpts)]
    argv += ["-f", "sender@example.test", "-t", "rcpt@example.test", "-M", "bench.test"]
    started = time.perf_counter()
    subprocess.run([*argv, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return messages / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User and system time of a process so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one(source: Path, args: argparse.Namespace, workdir: Path) -> float:
    sink_port = free_port()
    until = ["-M", str(args.messages)] if args.e2e or args.drain else []
    sink = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", *until, f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(sink_port)
        process, port = gateway(
            workdir,
            sink_port,
            relay=f"turbo = {str(not args.no_turbo).lower()}",
            route=f"hold = {str(args.hold).lower()}",
            source=source,
        )
        try:
            time.sleep(0.5)  # start-up settles
            if args.drain:
                return drained(process.popen.pid, port, sink, args)
            started = time.perf_counter()
            rate = accept_rate(port, args.sessions, args.messages, args.rcpts)
            if not args.e2e:
                return rate
            sink.wait(300)
            return args.messages / (time.perf_counter() - started)
        finally:
            process.stop()
    finally:
        sink.kill()
        sink.wait()


def drained(
    server: int, port: int, sink: subprocess.Popen[bytes], args: argparse.Namespace
) -> float:
    """Accept with the delivery process stopped, then time it emptying the queue."""
    [delivery] = family(server)[1:]  # the server's one child
    os.kill(delivery, signal.SIGSTOP)
    try:
        accept_rate(port, args.sessions, args.messages, args.rcpts)
        spent = cpu_seconds(delivery)
        started = time.perf_counter()
    finally:
        os.kill(delivery, signal.SIGCONT)
    sink.wait(300)
    rate = args.messages / (time.perf_counter() - started)
    used = (cpu_seconds(delivery) - spent) / args.messages * 1e6
    print(f"  delivery process: {used:.0f} us of CPU a message", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--baseline", type=Path, required=True, help="another smtpgate tree")
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--rcpts", type=int, default=1, help="recipients a message")
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument("--hold", action="store_true", help="hold the route: accept only")
    modes.add_argument("--e2e", action="store_true", help="time until the sink has all")
    modes.add_argument(
        "--drain", action="store_true", help="queue all with delivery stopped, then time it"
    )
    parser.add_argument("--no-turbo", action="store_true", help="relay one command at a time")
    parser.add_argument("--state-on", type=Path, help="a directory for the spools")
    args = parser.parse_args()
    trees = {"this": HERE.parent, "baseline": args.baseline.resolve()}
    rates: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(dir=args.state_on, prefix="smtpgate-ab-") as directory:
        for rep in range(args.reps):
            order = list(trees.items())
            for name, source in order if rep % 2 == 0 else reversed(order):
                rate = one(source, args, Path(directory))
                rates[name].append(rate)
                print(f"{rep} {name:<9} {rate:.0f} msg/s", flush=True)
    this, baseline = (statistics.median(rates[name]) for name in trees)
    print(f"median: this {this:.0f}, baseline {baseline:.0f} msg/s, ratio {this / baseline:.2f}")


if __name__ == "__main__":
    main()
