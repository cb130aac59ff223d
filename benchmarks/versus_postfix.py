"""Benchmark: smtpgate against Postfix, side by side, in one run.

    .venv/bin/python benchmarks/versus_postfix.py [--messages 5000] [--reps 3]

Both get the same load from Postfix's own `smtp-source` and hand mail on to the same
`smtp-sink`, in alternating repetitions; it prints medians and the ratio
smtpgate/Postfix for: accept rate (messages answered 250) and end-to-end rate (messages
the sink received), with 1 and 50 sessions, 1 and 10 recipients, connections reused or
a new one per message; and smtpgate's peak RSS. Loopback only.

It needs Debian's postfix package (smtp-source and smtp-sink come with it) and sets up a
loopback-only Postfix with ../shared/bench/postfix_bench.sh (`--install` installs it;
root).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from relay import Process, free_port, wait_port

HERE = Path(__file__).resolve().parent
POSTFIX_SCRIPT = HERE.parent.parent / "shared" / "bench" / "postfix_bench.sh"
POSTFIX_IN, POSTFIX_OUT = 10025, 10026
CASES = [  # sessions, recipients per message, reuse connections
    (1, 1, True),
    (50, 1, True),
    (50, 10, True),
    (50, 1, False),
]


def postfix(action: str) -> None:
    env = {**os.environ, "PF_IN_PORT": str(POSTFIX_IN), "PF_OUT_PORT": str(POSTFIX_OUT)}
    subprocess.run(
        ["bash", str(POSTFIX_SCRIPT), action],
        check=action != "stop",
        env=env,
        stdout=subprocess.DEVNULL,
    )


def sink(port: int, messages: int) -> subprocess.Popen[bytes]:
    """smtp-sink that exits after `messages` messages: its exit marks the end to end."""
    process = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-M", str(messages), f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return process


def source(port: int, sessions: int, messages: int, recipients: int, reuse: bool) -> float:
    argv = [
        "smtp-source",
        "-s",
        str(sessions),
        "-m",
        str(messages),
        "-l",
        "4096",
        "-r",
        str(recipients),
        "-f",
        "sender@example.test",
        "-t",
        "rcpt@example.test",
        "-M",
        "bench.test",
    ]
    if reuse:
        argv.append("-d")
    started = time.perf_counter()
    subprocess.run([*argv, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def run_smtpgate(
    case: tuple[int, int, bool], messages: int, workdir: Path
) -> tuple[float, float, float]:
    sessions, recipients, reuse = case
    out = free_port()
    receiver = sink(out, messages)
    listen = free_port()
    state = Path(tempfile.mkdtemp(dir=workdir))
    config = state / "smtpgate.toml"
    config.write_text(f"""
[server]
listen = ["127.0.0.1:{listen}"]
state_dir = "{state}"
hostname = "gateway.bench"
default_route = "sink"
max_connections = 1000
max_connections_per_client = 1000

[log]
level = "warning"
format = "json"

[relays.sink]
host = "127.0.0.1"
port = {out}
tls = "none"
concurrency = 10
turbo = true

[routes.sink]
mode = "relay"
relay = "sink"
""")
    gateway = Process([sys.executable, "-m", "smtpgate", "serve", "--config", str(config)], listen)
    started = time.perf_counter()
    accept = source(listen, sessions, messages, recipients, reuse)
    receiver.wait(600)
    end_to_end = time.perf_counter() - started
    rss = gateway.peak_rss_mb()
    gateway.stop()
    return messages / accept, messages / end_to_end, rss


def run_postfix(case: tuple[int, int, bool], messages: int) -> tuple[float, float]:
    sessions, recipients, reuse = case
    postfix("flush")
    receiver = sink(POSTFIX_OUT, messages)
    started = time.perf_counter()
    accept = source(POSTFIX_IN, sessions, messages, recipients, reuse)
    receiver.wait(600)
    end_to_end = time.perf_counter() - started
    return messages / accept, messages / end_to_end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--install", action="store_true", help="apt-get install postfix")
    args = parser.parse_args()
    if args.install:
        postfix("install")
    if not (shutil.which("smtp-source") and shutil.which("postfix")):
        raise SystemExit("needs Debian's postfix package: run with --install (as root)")
    postfix("setup")
    postfix("start")
    wait_port(POSTFIX_IN)
    results: dict[tuple[int, int, bool], list[tuple[float, ...]]] = {c: [] for c in CASES}
    try:
        with tempfile.TemporaryDirectory(prefix="smtpgate-vs-postfix-") as tmp:
            for rep in range(args.reps):
                for case in CASES:
                    ours = run_smtpgate(case, args.messages, Path(tmp))
                    theirs = run_postfix(case, args.messages)
                    results[case].append((*ours, *theirs))
                    print(
                        f"rep {rep + 1} {case}: smtpgate {ours}, postfix {theirs}", file=sys.stderr
                    )
    finally:
        postfix("stop")
    print(
        f"{args.messages} messages of 4 KiB, smtp-source -> X -> smtp-sink,"
        f" {args.reps} repetitions, medians"
    )
    print(
        f"{'sessions':>8}{'rcpts':>6}{'reuse':>6}  {'accept sg/pf':>18}{'ratio':>7}"
        f"  {'end-to-end sg/pf':>18}{'ratio':>7}{'RSS MB':>8}"
    )
    for (sessions, recipients, reuse), runs in results.items():
        accept, e2e, rss, pf_accept, pf_e2e = (
            statistics.median(r[i] for r in runs) for i in range(5)
        )
        print(
            f"{sessions:>8}{recipients:>6}{'yes' if reuse else 'no':>6}"
            f"  {accept:>8.0f}/{pf_accept:<9.0f}{accept / pf_accept:>7.2f}"
            f"  {e2e:>8.0f}/{pf_e2e:<9.0f}{e2e / pf_e2e:>7.2f}{rss:>8.1f}"
        )


if __name__ == "__main__":
    main()
