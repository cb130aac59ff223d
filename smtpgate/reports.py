"""Reports: how a job and its recipients are described, the same to people and scripts.

Shared by the CLI (`smtpgate jobs`, `smtpgate job ...` in monitor.py) and the HTTP API
and page (web/), so `jobs --json` and `GET /api/jobs` use the same words and fields.
"""

from __future__ import annotations

from typing import Any

from smtpgate import clock
from smtpgate.config import Config
from smtpgate.display import iso, when
from smtpgate.pacing import RoutePace
from smtpgate.spool.base import (
    FINAL_STATES,
    JobRecipientView,
    JobState,
    JobView,
    RecipientState,
)
from smtpgate.windows import SendingWindows

TOP_FAILURES = 5  # the most common failure replies `job show` and the API list
COLUMNS = (  # the counts a table of jobs shows, CLI and page alike
    RecipientState.DELIVERED,
    RecipientState.FAILED,
    RecipientState.DEFERRED,
    RecipientState.QUEUED,
    RecipientState.CANCELLED,
)


def finished(job: JobView) -> int:
    """Recipients with a final state: delivered, failed or cancelled."""
    return sum(job.counts.get(state, 0) for state in FINAL_STATES)


def column_count(job: JobView, state: RecipientState) -> int:
    """A count in a table of jobs: `queued` there includes held and sending ones, all not
    yet tried or on the wire right now."""
    count = job.counts.get(state, 0)
    if state is RecipientState.QUEUED:
        count += job.counts.get(RecipientState.HELD, 0) + job.counts.get(RecipientState.SENDING, 0)
    return count


def progress(job: JobView) -> float:
    """The share of the job that is finished, 0.0 to 1.0 (an empty job is done)."""
    return finished(job) / job.total if job.total else 1.0


def waiting(job: JobView, config: Config) -> str | None:
    """Why an unfinished job is not sending right now, and until when."""
    now = clock.now()
    if job.state is JobState.HELD:
        return f"held: send it with `smtpgate job release {job.name}`"
    if job.state is JobState.PAUSED:
        return f"paused: go on with `smtpgate job resume {job.name}`"
    if job.state in (JobState.DONE, JobState.CANCELLED):
        return None
    if job.send_at and job.send_at > now:
        return f"scheduled: sending starts {when(job.send_at)}"
    route = config.routes.get(job.route)
    if route is None:
        return f"route {job.route!r} is no longer in the config"
    if route.mode == "track":
        pace = RoutePace(SendingWindows(route.window, route.timezone), route.rate, 1.0)
        return pace.waiting_reason(now)
    return None


def job_json(job: JobView, config: Config) -> dict[str, Any]:
    """One job as `smtpgate jobs --json` and `GET /api/jobs` give it."""
    return {
        "name": job.name,
        "route": job.route,
        "state": job.state.value,
        "waiting": waiting(job, config),
        "total": job.total,
        "counts": {state.value: job.counts.get(state, 0) for state in RecipientState},
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at) if job.state is JobState.DONE else None,
        "send_at": iso(job.send_at),
        "submitted_by": job.submitted_by,
    }


def job_detail_json(
    job: JobView, failures: list[tuple[str, int]], config: Config
) -> dict[str, Any]:
    """A job with its most common failures, as `job show --json` and `GET /api/jobs/NAME`."""
    data = job_json(job, config)
    data["top_failures"] = [{"reply": reply, "count": count} for reply, count in failures]
    return data


def recipient_json(recipient: JobRecipientView) -> dict[str, Any]:
    """One recipient of a job, as `job recipients --json` and the API's pages give it;
    `id` is the key to ask for the page after it."""
    return {
        "id": recipient.id,
        "queue_id": recipient.queue_id,
        "address": recipient.address,
        "route": recipient.route,
        "state": recipient.state.value,
        "attempts": recipient.attempts,
        "updated_at": iso(recipient.updated_at),
        "via": recipient.via,
        "last_reply": recipient.last_reply,
    }
