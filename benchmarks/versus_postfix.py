"""Benchmark: smtpgate against Postfix, side by side, in one run.

    sudo .venv/bin/python benchmarks/versus_postfix.py --install

installs Debian's postfix package (it ships Postfix's own load generator `smtp-source`
and sink `smtp-sink`), configures a loopback-only Postfix with postfix_bench.sh, and
measures smtpgate and Postfix case by case, in repetitions whose order moves on by one
each time (whoever runs right after Postfix shares the machine with the tail of its
work). It prints, as a Markdown table, medians over the repetitions and the median
of the per-repetition ratios smtpgate/Postfix for:

  - durable accept (250 replies per second) and end to end (messages the sink
    received per second, from the first connection), 4 KiB messages from smtp-source:
    1 session; 50 sessions; 50 sessions with 10 recipients a message; 50 sessions
    with a new connection per message;
  - p50/p99 latency from the end of DATA to the 250 reply, 50 sessions, with the
    asyncio client in latency.py (smtp-source does not report latency): flat out
    (each session sends its next message as soon as it has the reply, so this is the
    latency of a saturated server) and paced at --paced-rate messages a second;
  - direct delivery: 10,000 recipients over 100 domains (10 a message, each in
    another domain) to counting sinks on 127.0.2.1-100. smtpgate resolves the MX
    hosts through a loopback DNS server; Postfix, which asks only the system's
    resolver, gets a transport map to the same addresses instead (no DNS);
  - smtpgate's peak RSS (VmHWM; server and delivery process summed, and each one's) in
    each case, and its peak PSS (sampled; summed too), which counts the pages the two
    share, such as the interpreter's and OpenSSL's libraries, once.

`--baseline DIR` adds a third contender, another smtpgate source tree (for example
`git archive` of an older commit), so the effect of a change is measured in the same
run. The machine is shared and noisy: only ratios from one run compare, and a sample
during which the hypervisor gave more than STEAL_LIMIT of the CPU to other guests (the
`steal` of /proc/stat) is measured again, up to MEASURES times. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import direct
import latency
from relay import Process, free_port, load, wait_port

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from conftest import DnsZone  # noqa: E402  (the loopback DNS server of the tests)

POSTFIX_SCRIPT = HERE / "postfix_bench.sh"
POSTFIX_IN, POSTFIX_OUT = 10025, 10026
TRANSPORT_MAP = Path("/etc/postfix/smtpgate_bench_transport")
DOMAINS = [f"d{n:03}.bench.test" for n in range(100)]
DIRECT_SINKS = [f"127.0.2.{n + 1}" for n in range(len(DOMAINS))]
WAIT_SECONDS = 300  # for a sink to receive everything; a stuck contender fails the run
STEAL_LIMIT = 0.05  # of the machine's CPU time, taken by the hypervisor during a sample
MEASURES = 3  # tries of a sample; the last counts, whatever the hypervisor took

# name, sessions, recipients per message, connections reused
SOURCE_CASES = [
    ("1 session", 1, 1, True),
    ("50 sessions", 50, 1, True),
    ("50 sessions, 10 rcpts", 50, 10, True),
    ("50 sessions, new connection per message", 50, 1, False),
]
Sample = dict[str, float]


# --- the contenders -----------------------------------------------------------------------


def postfix(action: str) -> None:
    env = {**os.environ, "PF_IN_PORT": str(POSTFIX_IN), "PF_OUT_PORT": str(POSTFIX_OUT)}
    subprocess.run(
        ["bash", str(POSTFIX_SCRIPT), action],
        check=action not in ("stop", "flush"),
        env=env,
        stdout=subprocess.DEVNULL,
    )


def postfix_direct_map(sink_port: int) -> None:
    """Postfix sends DOMAINS to the same addresses smtpgate's DNS server names."""
    TRANSPORT_MAP.write_text(
        "".join(f"{d} smtp:[{a}]:{sink_port}\n" for d, a in zip(DOMAINS, DIRECT_SINKS, strict=True))
    )
    subprocess.run(
        ["postconf", "-e", f"transport_maps = texthash:{TRANSPORT_MAP}"],
        check=True,
    )


def postfix_flush() -> None:
    """Empty the queue and wait until no delivery is left over from the last run."""
    postfix("flush")
    time.sleep(0.5)


class Gateway:
    """One smtpgate process, fresh for each measurement, so each has its own peak RSS."""

    def __init__(
        self, source: Path | None, workdir: Path, settings: str, default_route: str = ""
    ) -> None:
        self.port = free_port()
        state = Path(tempfile.mkdtemp(dir=workdir))
        config = state / "smtpgate.toml"
        config.write_text(f"""
[server]
listen = ["127.0.0.1:{self.port}"]
state_dir = "{state}"
hostname = "gateway.bench"
max_connections = 1000
max_connections_per_client = 1000
max_recipients = 100
{f'default_route = "{default_route}"' if default_route else ""}

[log]
level = "warning"
format = "json"
{settings}""")
        env = dict(os.environ)
        if source is not None:
            env["PYTHONPATH"] = str(source)
        self.process = Process(
            [sys.executable, "-m", "smtpgate", "serve", "--config", str(config)],
            self.port,
            env=env,
            cwd=state,  # not the checkout: `-m` would import smtpgate from there first
        )

    def stop(self) -> Sample:
        """Stop it; its peak RSS (summed, and the server's and the delivery process's
        own) and peak PSS, in MB."""
        server, *children = self.process.peak_rss_each_mb()
        pss = self.process.peak_pss_mb()
        self.process.stop()
        rss = server + sum(children)
        return {"rss": rss, "pss": pss, "server rss": server, "delivery rss": rss - server}


def stolen_seconds() -> float:
    """CPU time the hypervisor gave to other guests so far, all cores (/proc/stat)."""
    with open("/proc/stat") as stat:
        fields = stat.readline().split()
    ticks = int(fields[8]) if fields[0] == "cpu" and len(fields) > 8 else 0
    return ticks / os.sysconf("SC_CLK_TCK")


def relay_settings(sink_port: int) -> str:
    return f"""
[relays.sink]
host = "127.0.0.1"
port = {sink_port}
tls = "none"
concurrency = 10
turbo = true

[routes.sink]
mode = "relay"
relay = "sink"
"""


# --- the loads -----------------------------------------------------------------------------


def smtp_sink(port: int, messages: int) -> subprocess.Popen[bytes]:
    """Postfix's smtp-sink, exiting after `messages` messages: its exit marks the end."""
    process = subprocess.Popen(
        ["smtp-sink", "-u", "nobody", "-M", str(messages), f"127.0.0.1:{port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return process


def smtp_source(port: int, sessions: int, messages: int, recipients: int, reuse: bool) -> float:
    """Seconds for smtp-source to have every message answered."""
    argv = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-l", "4096"]
    argv += ["-r", str(recipients), "-f", "sender@example.test", "-t", "rcpt@example.test"]
    argv += ["-M", "bench.test"] + (["-d"] if reuse else [])
    started = time.perf_counter()
    subprocess.run([*argv, f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def source_case(
    port: int, sink_port: int, case: tuple[str, int, int, bool], messages: int
) -> Sample:
    _, sessions, recipients, reuse = case
    receiver = smtp_sink(sink_port, messages)
    started = time.perf_counter()
    accept = smtp_source(port, sessions, messages, recipients, reuse)
    receiver.wait(WAIT_SECONDS)
    end_to_end = time.perf_counter() - started
    return {"accept": messages / accept, "e2e": messages / end_to_end}


def latency_case(port: int, sink_port: int, messages: int, rate: float = 0) -> Sample:
    receiver = smtp_sink(sink_port, messages)
    result = latency.run(port, 50, messages, rate)
    receiver.wait(WAIT_SECONDS)
    return {
        "accept": result.rate,
        "p50": result.percentile(50) * 1000,
        "p99": result.percentile(99) * 1000,
    }


def _direct_recipients(n: int) -> list[str]:
    """Message n goes to 10 recipients in 10 different domains."""
    return [f"r{n}@{DOMAINS[(n * 10 + k) % len(DOMAINS)]}" for k in range(10)]


def direct_case(port: int, sink_port: int, messages: int, workdir: Path) -> Sample:
    count_file = workdir / f"direct-{time.monotonic_ns()}.count"
    count_file.write_text("0 0\n")
    receiver = Process(
        [
            sys.executable,
            str(HERE / "sink.py"),
            "--host",
            ",".join(DIRECT_SINKS),
            "--port",
            str(sink_port),
            "--count-file",
            str(count_file),
        ],
        sink_port,
        host=DIRECT_SINKS[-1],
    )
    expected = messages * 10
    started = time.perf_counter()
    try:
        asyncio.run(load(port, messages, 10, recipients_of=_direct_recipients))
        wait_for(lambda: _received(count_file) >= expected, f"{expected} direct recipients")
        seconds = time.perf_counter() - started
    finally:
        receiver.stop()
    return {"e2e": expected / seconds}


def _received(count_file: Path) -> int:
    fields = count_file.read_text().split()
    return int(fields[1]) if len(fields) == 2 else 0


def wait_for(done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def dns_server() -> DnsZone:
    return direct.dns_server(dict(zip(DOMAINS, DIRECT_SINKS, strict=True)))


# --- one repetition ----------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.zone = dns_server()
        self.direct_port = free_port()
        contenders: dict[str, Path | None] = {"smtpgate": None}
        if args.baseline:
            contenders["before"] = args.baseline.resolve()
        self.contenders = contenders
        self.samples: dict[str, dict[str, list[Sample]]] = {}
        self.measured_again = 0

    def note(self, case: str, who: str, sample: Sample) -> None:
        self.samples.setdefault(case, {}).setdefault(who, []).append(sample)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in sample.items())
        print(f"  {case:<42} {who:<9} {shown}", file=sys.stderr, flush=True)

    def unstolen(self, case: str, who: str, measure: Callable[[], Sample]) -> Sample:
        """`measure()`, again while the hypervisor took more than STEAL_LIMIT of the CPU
        meanwhile: such a sample measures the neighbours, and only one contender pays."""
        for attempt in range(1, MEASURES + 1):
            stolen, started = stolen_seconds(), time.monotonic()
            sample = measure()
            cpu_seconds = (time.monotonic() - started) * (os.cpu_count() or 1)
            share = (stolen_seconds() - stolen) / cpu_seconds
            if share <= STEAL_LIMIT or attempt == MEASURES:
                return sample
            self.measured_again += 1
            print(
                f"  {case:<42} {who:<9} the hypervisor took {share:.0%} of the CPU;"
                " measuring again",
                file=sys.stderr,
                flush=True,
            )
        raise AssertionError("unreachable")

    def gateway_run(
        self,
        source: Path | None,
        settings: str,
        measure: Callable[[int], Sample],
        default_route: str = "sink",
    ) -> Sample:
        gateway = Gateway(source, self.workdir, settings, default_route)
        try:
            sample = measure(gateway.port)
        finally:
            memory = gateway.stop()
        return {**sample, **memory}

    def run_case(
        self,
        case: str,
        rep: int,
        measure: Callable[[int, int], Sample],
        settings: Callable[[int], str] = relay_settings,
        default_route: str = "sink",
        postfix_port: int = POSTFIX_OUT,
    ) -> None:
        """`measure(listening port, sink port)` for every contender, in an order that moves
        on by one each repetition: whoever runs right after Postfix shares the machine
        with the tail of its work (its queue manager and logging), and nobody must always
        be that one."""
        who = [*self.contenders, "postfix"]
        shift = rep % len(who)

        def postfix_sample() -> Sample:
            postfix_flush()
            return measure(POSTFIX_IN, postfix_port)

        def gateway_sample(source: Path | None) -> Sample:
            sink_port = free_port()
            return self.gateway_run(
                source, settings(sink_port), lambda port: measure(port, sink_port), default_route
            )

        for name in who[shift:] + who[:shift]:
            if name == "postfix":
                self.note(case, name, self.unstolen(case, name, postfix_sample))
            else:
                sample = functools.partial(gateway_sample, self.contenders[name])
                self.note(case, name, self.unstolen(case, name, sample))

    def repetition(self, rep: int) -> None:
        messages, wanted = self.args.messages, set(self.args.cases)
        for case in [c for c in SOURCE_CASES if c[0] in wanted or "all" in wanted]:
            self.run_case(
                case[0],
                rep,
                functools.partial(source_case, case=case, messages=messages),
            )
        if {"latency", "all"} & wanted:
            self.run_case(
                "latency", rep, lambda port, sink_port: latency_case(port, sink_port, messages)
            )
        if {"paced", "all"} & wanted:
            paced, rate = self.args.paced_messages, self.args.paced_rate
            self.run_case(
                "paced",
                rep,
                lambda port, sink_port: latency_case(port, sink_port, paced, rate),
            )
        if {"direct", "all"} & wanted:
            direct = self.args.direct_messages
            self.run_case(
                "direct",
                rep,
                lambda port, _: direct_case(port, self.direct_port, direct, self.workdir),
                settings=lambda _: self.direct_settings(),
                default_route="",
                postfix_port=self.direct_port,
            )

    def direct_settings(self) -> str:
        return f"""
[direct]
workers = 64
per_domain = 5
port = {self.direct_port}
helo_name = "gateway.bench"

[dns]
nameservers = ["127.0.0.1:{self.zone.port}"]
"""


# --- the report ---------------------------------------------------------------------------


def machine() -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = next(
        int(line.split()[1]) // 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("MemTotal")
    )
    versions = ", ".join(
        f"{name} {_version(name)}" for name in ("aiosmtpd", "aiosmtplib", "uvloop", "structlog")
    )
    postfix_version = subprocess.run(
        ["postconf", "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    commit = subprocess.run(
        ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    filesystem = subprocess.run(
        ["stat", "-f", "-c", "%T", tempfile.gettempdir(), "/var/spool/postfix"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    return [
        f"- {os.cpu_count()} cores ({cpu}), {memory} MB RAM, Linux {platform.release()}",
        f"- Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {versions}",
        f"- Postfix {postfix_version} (Debian); smtpgate {commit or 'unknown commit'}",
        f"- spool and Postfix queue on: {' / '.join(filesystem)}",
    ]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


ROWS = [  # case, measure, label, unit
    ("1 session", "accept", "durable accept, 1 session", "msg/s"),
    ("1 session", "e2e", "end to end, 1 session", "msg/s"),
    ("50 sessions", "accept", "durable accept, 50 sessions", "msg/s"),
    ("50 sessions", "e2e", "end to end, 50 sessions, 1 rcpt", "msg/s"),
    ("50 sessions, 10 rcpts", "accept", "durable accept, 50 sessions, 10 rcpts", "msg/s"),
    ("50 sessions, 10 rcpts", "e2e", "end to end, 50 sessions, 10 rcpts", "msg/s"),
    (
        "50 sessions, new connection per message",
        "accept",
        "accept, new connection per message",
        "msg/s",
    ),
    (
        "50 sessions, new connection per message",
        "e2e",
        "end to end, new connection per message",
        "msg/s",
    ),
    ("latency", "accept", "accept, 50 sessions (latency client)", "msg/s"),
    ("latency", "p50", "end of DATA to 250, p50, 50 sessions flat out", "ms"),
    ("latency", "p99", "end of DATA to 250, p99, 50 sessions flat out", "ms"),
    ("paced", "p50", "end of DATA to 250, p50, 50 sessions at {rate} msg/s", "ms"),
    ("paced", "p99", "end of DATA to 250, p99, 50 sessions at {rate} msg/s", "ms"),
    ("direct", "e2e", "direct, 10,000 rcpts over 100 domains", "rcpt/s"),
]


def report(bench: Bench, args: argparse.Namespace, seconds: float) -> str:
    before = "before" in bench.contenders
    lines = [
        f"## {dt.date.today().isoformat()}: smtpgate / Postfix",
        "",
        *machine(),
        f"- {args.messages} messages of 4 KiB a case ({args.paced_messages} paced,"
        f" {args.direct_messages} x 10 recipients for direct), {args.reps} repetitions"
        " (each case's contenders in an order that moves on by one each time),"
        " medians; the ratio is the median of the per-repetition ratios"
        " smtpgate/Postfix (for rates higher is better, for ms lower is better)"
        + ("; before is the baseline tree, before/Postfix its ratio" if before else "")
        + f"; {bench.measured_again} samples measured again because the hypervisor took"
        f" more than {STEAL_LIMIT:.0%} of the CPU meanwhile; the run took {seconds / 60:.1f} min",
        "",
        "| case | unit | smtpgate | Postfix | ratio |"
        + (" before | before/Postfix |" if before else "")
        + " smtpgate peak RSS MB (server + delivery) | smtpgate peak PSS MB |",
        "|---|---|---:|---:|---:|" + ("---:|---:|" if before else "") + "---:|---:|",
    ]
    for case, measure, label, unit in ROWS:
        runs = bench.samples.get(case)
        if not runs or "postfix" not in runs:
            continue
        theirs = [s[measure] for s in runs["postfix"]]
        cells = [label.format(rate=f"{args.paced_rate:g}"), unit]
        for who in ["smtpgate", *(["before"] if before else [])]:
            ours = [s[measure] for s in runs[who]]
            ratio = statistics.median(o / t for o, t in zip(ours, theirs, strict=True))
            if who == "smtpgate":
                cells += [f"{statistics.median(ours):.1f}", f"{statistics.median(theirs):.1f}"]
            else:
                cells += [f"{statistics.median(ours):.1f}"]
            cells.append(f"{ratio:.2f}")
        peak = max(runs["smtpgate"], key=lambda s: s["rss"])
        cells.append(f"{peak['rss']:.0f} ({peak['server rss']:.0f} + {peak['delivery rss']:.0f})")
        cells.append(f"{max(s['pss'] for s in runs['smtpgate']):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--direct-messages", type=int, default=1000)
    parser.add_argument("--paced-messages", type=int, default=1500)
    parser.add_argument("--paced-rate", type=float, default=300, help="messages/s")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument(
        "--cases",
        default="all",
        help="';'-separated (case names hold commas): all, latency, paced, direct, or a"
        " source case's name such as '50 sessions, 10 rcpts'",
    )
    parser.add_argument("--baseline", type=Path, help="another smtpgate source tree to compare")
    parser.add_argument("--install", action="store_true", help="apt-get install postfix (root)")
    args = parser.parse_args()
    args.cases = [case.strip() for case in args.cases.split(";")]
    if args.install and not shutil.which("smtp-source"):
        postfix("install")
    if not (shutil.which("smtp-source") and shutil.which("postfix")):
        raise SystemExit("needs Debian's postfix package: run with --install (as root)")
    started = time.perf_counter()
    postfix("stop")
    postfix("setup")
    bench_dir = Path(tempfile.mkdtemp(prefix="smtpgate-vs-postfix-"))
    try:
        bench = Bench(args, bench_dir)
        postfix_direct_map(bench.direct_port)
        postfix("start")
        wait_port(POSTFIX_IN)
        for rep in range(args.reps):
            print(f"repetition {rep + 1} of {args.reps}", file=sys.stderr, flush=True)
            bench.repetition(rep)
    finally:
        postfix("stop")
        postfix("flush")
        shutil.rmtree(bench_dir, ignore_errors=True)
    print(report(bench, args, time.perf_counter() - started))


if __name__ == "__main__":
    main()
