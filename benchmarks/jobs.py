"""Benchmark: `smtpgate jobs` and `smtpgate job show` on a spool of a million recipients.

    .venv/bin/python benchmarks/jobs.py [--recipients 1000000] [--jobs 20] [--reps 3]

Fills a fresh spool through the real `SqliteSpool.store` (messages of 100 recipients,
spread over the jobs, a quarter of them delivered, some failed), then times each command
as a user runs it: a new process, config loaded, spool opened, answer printed. The
reference, measured in the same run, is `smtpgate --version` (the same interpreter start
and imports, no spool work), so "extra" is what the command itself costs. Peak RSS of
each command comes from wait4 on the finished child.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from smtpgate.spool import NewMessage, NewRecipient, RecipientState, RecipientUpdate, SqliteSpool

PER_MESSAGE = 100
CONTENT = b"From: app@example.net\r\nSubject: benchmark\r\n\r\n" + b"x" * 2048 + b"\r\n"


async def fill(path: Path, recipients: int, jobs: int) -> None:
    spool = SqliteSpool.open(path)
    try:
        now = time.time()
        pending: list[asyncio.Future[str]] = []
        for n in range(recipients // PER_MESSAGE):
            message = NewMessage(
                sender="app@example.net",
                recipients=[
                    NewRecipient(f"r{n}-{i}@example.com", "news", job=f"job-{n % jobs}")
                    for i in range(PER_MESSAGE)
                ],
                content=CONTENT,
                client_address="127.0.0.1",
                helo="bench",
                received_at=now,
            )
            pending.append(asyncio.ensure_future(spool.store(message)))
            if len(pending) >= 200:  # many stores share one commit, as under load
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
        # Some progress, so the counts span several states.
        for _ in range(recipients // PER_MESSAGE // 4 // 50):
            deliveries = await spool.lease_due(["news"], now, 50)
            updates = [
                RecipientUpdate(
                    r.id,
                    RecipientState.FAILED if r.id % 10 == 0 else RecipientState.DELIVERED,
                    "550 5.1.1 unknown" if r.id % 10 == 0 else "250 ok",
                )
                for d in deliveries
                for r in d.recipients
            ]
            await spool.record(updates, now)
    finally:
        await spool.close()


def timed(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one run of the command (wait4 gives the
    child's own rusage, not the maximum over every child so far)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with {child.returncode}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipients", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp)
        started = time.perf_counter()
        asyncio.run(fill(state / "spool.db", args.recipients, args.jobs))
        print(
            f"filled {args.recipients:,} recipients in {args.jobs} jobs"
            f" in {time.perf_counter() - started:.0f} s;"
            f" spool {os.path.getsize(state / 'spool.db') / 1e6:.0f} MB"
        )
        env = {**os.environ, "SMTPGATE_STATE_DIR": str(state)}
        smtpgate = [sys.executable, "-m", "smtpgate"]
        cases = {
            "reference: --version": [*smtpgate, "--version"],
            "jobs": [*smtpgate, "jobs"],
            "jobs --json": [*smtpgate, "jobs", "--json"],
            "job show": [*smtpgate, "job", "show", "job-0"],
        }
        results: dict[str, list[float]] = {name: [] for name in cases}
        peaks: dict[str, float] = {}
        for _ in range(args.reps):
            for name, command in cases.items():  # alternating, in every repetition
                seconds, peak = timed(command, env)
                results[name].append(seconds)
                peaks[name] = peak
        reference = statistics.median(results["reference: --version"])
        print(f"{'case':<22}{'median s':>10}{'extra s':>10}{'ratio':>8}{'peak RSS MB':>13}")
        for name, runs in results.items():
            median = statistics.median(runs)
            print(
                f"{name:<22}{median:>10.3f}{median - reference:>10.3f}"
                f"{median / reference:>8.2f}{peaks[name]:>13.0f}"
            )


if __name__ == "__main__":
    main()
