"""Monitoring and control of jobs: `smtpgate jobs` and `smtpgate job ...`.

Reads and writes the spool directly, as `smtpgate queue` does, so it works whether or not
a server runs; a running server reads job controls at every scheduler turn, so a cancel
or pause acts within a second. Counts come from an index, so the commands stay fast on a
spool of a million recipients.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from smtpgate import clock
from smtpgate.config import Config
from smtpgate.display import iso, table, when
from smtpgate.jobs import SendAtError, parse_send_at
from smtpgate.reports import (
    COLUMNS,
    TOP_FAILURES,
    column_count,
    finished,
    job_detail_json,
    job_json,
    progress,
    recipient_json,
    waiting,
)
from smtpgate.spool import SqliteSpool
from smtpgate.spool.base import JobAction, JobError, JobState, JobView, RecipientState, Spool

T = TypeVar("T")
EXIT_OK, EXIT_FAILURE = 0, 1
BAR_WIDTH = 20
PAGE = 5000  # recipients read per query when listing a job's recipients
TABLE_ROWS = 1000


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    jobs = commands.add_parser("jobs", parents=[common], help="jobs and their progress")
    jobs.add_argument("--json", action="store_true")
    jobs.set_defaults(run=_jobs)

    job = commands.add_parser("job", parents=[common], help="watch or control one job")
    actions = job.add_subparsers(metavar="ACTION", required=True)
    show = actions.add_parser("show", parents=[common], help="status and statistics")
    show.add_argument("name", metavar="JOB")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=_show)
    recipients = actions.add_parser(
        "recipients", parents=[common], help="each recipient with its attempts and last reply"
    )
    recipients.add_argument("name", metavar="JOB")
    recipients.add_argument("--state", choices=[s.value for s in RecipientState])
    output = recipients.add_mutually_exclusive_group()
    output.add_argument("--csv", action="store_true")
    output.add_argument("--json", action="store_true")
    recipients.set_defaults(run=_recipients)
    for action, text in (
        (JobAction.CANCEL, "cancel every unsent recipient; what went out stays delivered"),
        (JobAction.PAUSE, "send nothing more until resumed"),
        (JobAction.RESUME, "go on sending a paused job"),
        (JobAction.RELEASE, "send a held job, within its route's window and rate"),
    ):
        control = actions.add_parser(action.value, parents=[common], help=text)
        control.add_argument("name", metavar="JOB")
        control.set_defaults(run=_control, action=action)
    retry = actions.add_parser("retry", parents=[common], help="try deferred recipients now")
    retry.add_argument("name", metavar="JOB")
    retry.add_argument("--failed", action="store_true", help="and failed ones once more")
    retry.set_defaults(run=_retry)
    schedule = actions.add_parser(
        "schedule", parents=[common], help="send nothing of the job before a time"
    )
    schedule.add_argument("name", metavar="JOB")
    when_group = schedule.add_mutually_exclusive_group(required=True)
    when_group.add_argument("--at", metavar="TIME", help="RFC 3339, e.g. 2026-12-01T09:00+01:00")
    when_group.add_argument("--now", action="store_true", help="remove the scheduled time")
    schedule.set_defaults(run=_schedule)


# --- reading ------------------------------------------------------------------------------


def _jobs(config: Config, args: argparse.Namespace) -> int:
    jobs = _on_spool(config, lambda spool: spool.jobs())
    if jobs is None:
        jobs = []
    if args.json:
        print(json.dumps([job_json(job, config) for job in jobs], indent=2))
        return EXIT_OK
    if not jobs:
        print("no jobs yet")
        return EXIT_OK
    rows = [
        [
            job.name,
            job.route,
            job.state.value,
            _bar(job),
            *(str(column_count(job, state)) for state in COLUMNS),
            when(job.created_at),
            waiting(job, config) or "",
        ]
        for job in jobs
    ]
    headers = ["JOB", "ROUTE", "STATE", "PROGRESS", *(s.value.upper() for s in COLUMNS)]
    print(table([*headers, "CREATED", "NOTE"], rows))
    return EXIT_OK


def _show(config: Config, args: argparse.Namespace) -> int:
    async def read(spool: Spool) -> tuple[JobView | None, list[tuple[str, int]]]:
        return await spool.job(args.name), await spool.job_failures(args.name, TOP_FAILURES)

    found = _on_spool(config, read)
    job, failures = found if found else (None, [])
    if job is None:
        return _no_job(args.name)
    if args.json:
        print(json.dumps(job_detail_json(job, failures, config), indent=2))
        return EXIT_OK
    lines = [
        ("job", job.name),
        ("route", job.route),
        ("state", job.state.value + (f" ({note})" if (note := waiting(job, config)) else "")),
        ("progress", f"{_bar(job)} {finished(job)} of {job.total} recipients finished"),
        ("created", when(job.created_at)),
        ("started", when(job.started_at) or "not yet"),
        ("finished", when(job.finished_at) if job.state is JobState.DONE else ""),
        ("send at", when(job.send_at)),
        ("submitted by", job.submitted_by or ""),
    ]
    print("\n".join(f"{name + ':':<14}{value}" for name, value in lines if value))
    print()
    print(
        table(
            ["STATE", "RECIPIENTS"],
            [[state.value, str(job.counts.get(state, 0))] for state in RecipientState],
        )
    )
    if failures:
        print("\nmost common failures:")
        print(table(["COUNT", "LAST REPLY"], [[str(n), reply] for reply, n in failures]))
    return EXIT_OK


def _recipients(config: Config, args: argparse.Namespace) -> int:
    state = RecipientState(args.state) if args.state else None

    async def read(spool: Spool) -> bool:
        if await spool.job(args.name) is None:
            return False
        writer = csv.writer(sys.stdout, lineterminator="\n") if args.csv else None
        fields = ["queue_id", "address", "route", "state", "attempts", "updated_at", "via"]
        if writer:
            writer.writerow([*fields, "last_reply"])
        rows: list[list[str]] = []
        after = 0
        while page := await spool.job_recipients(args.name, state, after, PAGE):
            after = page[-1].id
            for r in page:
                values = [
                    r.queue_id,
                    r.address,
                    r.route,
                    r.state.value,
                    str(r.attempts),
                    iso(r.updated_at) or "",
                    r.via or "",
                    r.last_reply or "",
                ]
                if writer:
                    writer.writerow(values)
                elif args.json:
                    print(json.dumps(recipient_json(r)))
                else:
                    rows.append(values)
            if len(rows) >= TABLE_ROWS:  # a table is for people; --csv streams them all
                break
        if rows:
            headers = ["QUEUE ID", "RECIPIENT", "ROUTE", "STATE", "ATTEMPTS", "UPDATED", "VIA"]
            print(table([*headers, "LAST REPLY"], rows[:TABLE_ROWS]))
            if len(rows) >= TABLE_ROWS:
                print(f"(the first {TABLE_ROWS}; --csv or --json lists every recipient)")
        return True

    if not _on_spool(config, read):
        return _no_job(args.name)
    return EXIT_OK


# --- control ------------------------------------------------------------------------------


def _control(config: Config, args: argparse.Namespace) -> int:
    action: JobAction = args.action

    async def act(spool: Spool) -> int:
        return await spool.control_job(args.name, action, clock.now())

    changed = _controlling(config, act)
    if changed is None:
        return EXIT_FAILURE
    done = {
        JobAction.CANCEL: f"cancelled: {changed} unsent recipients will not be sent",
        JobAction.PAUSE: "paused: nothing more is sent until `smtpgate job resume`",
        JobAction.RESUME: "resumed",
        JobAction.RELEASE: f"released: {changed} held recipients are queued",
    }[action]
    print(f"job {args.name} {done}")
    return EXIT_OK


def _retry(config: Config, args: argparse.Namespace) -> int:
    async def act(spool: Spool) -> int:
        return await spool.retry_job(args.name, clock.now(), failed_too=args.failed)

    changed = _controlling(config, act)
    if changed is None:
        return EXIT_FAILURE
    print(f"job {args.name}: {changed} recipients are due now")
    return EXIT_OK


def _schedule(config: Config, args: argparse.Namespace) -> int:
    try:
        at = None if args.now else parse_send_at(args.at, clock.now())
    except SendAtError as error:
        print(f"smtpgate: --at {error}", file=sys.stderr)
        return EXIT_FAILURE

    async def act(spool: Spool) -> int:
        await spool.schedule_job(args.name, at)
        return 0

    if _controlling(config, act) is None:
        return EXIT_FAILURE
    print(f"job {args.name}: " + (f"nothing is sent before {when(at)}" if at else "sends now"))
    return EXIT_OK


def _controlling(config: Config, act: Callable[[Spool], Awaitable[int]]) -> int | None:
    try:
        result = _on_spool(config, act)
    except JobError as error:
        print(f"smtpgate: {error}", file=sys.stderr)
        return None
    if result is None:  # no spool here: a wrong --state-dir must not look like success
        print(
            f"smtpgate: no spool at {config.spool_path()}, so no jobs; is --state-dir"
            " (or --config) the one the server uses?",
            file=sys.stderr,
        )
    return result


# --- helpers ------------------------------------------------------------------------------


def _on_spool(config: Config, use: Callable[[Spool], Awaitable[T]]) -> T | None:
    """Run `use` on the spool, or None when nothing has been accepted yet."""
    path = config.spool_path()
    if not path.exists():
        return None

    async def run() -> T:
        spool = SqliteSpool.open(path)
        try:
            return await use(spool)
        finally:
            await spool.close()

    return asyncio.run(run())


def _no_job(name: str) -> int:
    print(f"smtpgate: no job {name!r}; `smtpgate jobs` lists them", file=sys.stderr)
    return EXIT_FAILURE


def _bar(job: JobView) -> str:
    share = progress(job)
    filled = round(share * BAR_WIDTH)
    return f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {share:4.0%}"
