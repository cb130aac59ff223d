"""The JSON API under /api: jobs, their recipients and controls, and the queue.

The same words and fields as `smtpgate jobs --json` and `smtpgate job ... --json`
(reports.py shapes both); openapi.py describes every route added here.
"""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.typedefs import Handler

from smtpgate import clock
from smtpgate.display import iso
from smtpgate.jobs import SendAtError, parse_send_at
from smtpgate.reports import TOP_FAILURES, job_detail_json, job_json, recipient_json
from smtpgate.spool.base import JobAction, JobError, JobState, RecipientState
from smtpgate.web.metrics import spool_bytes
from smtpgate.web.state import monitor_of as _monitor

PAGE_DEFAULT = 100  # recipients in a page unless `limit` says otherwise
PAGE_MAX = 1000  # a larger `limit` is cut to this: one request never reads a whole job
ACTIONS = (JobAction.CANCEL, JobAction.PAUSE, JobAction.RESUME, JobAction.RELEASE)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/api/jobs", list_jobs)
    router.add_get("/api/jobs/{name}", show_job)
    router.add_get("/api/jobs/{name}/recipients", job_recipients)
    for action in ACTIONS:
        router.add_post(f"/api/jobs/{{name}}/{action.value}", _control(action))
    router.add_post("/api/jobs/{name}/retry", retry_job)
    router.add_post("/api/jobs/{name}/schedule", schedule_job)
    router.add_get("/api/queue", queue)


async def list_jobs(request: web.Request) -> web.StreamResponse:
    monitor = _monitor(request)
    jobs = await monitor.spool.jobs()
    return web.json_response([job_json(job, monitor.config) for job in jobs])


async def show_job(request: web.Request) -> web.StreamResponse:
    monitor = _monitor(request)
    name = await _existing_job(request)
    job = await monitor.spool.job(name)
    if job is None:  # removed between the two reads
        raise _no_job(name)
    failures = await monitor.spool.job_failures(name, TOP_FAILURES)
    return web.json_response(job_detail_json(job, failures, monitor.config))


async def job_recipients(request: web.Request) -> web.StreamResponse:
    """A page in id order; `next_after` asks for the next one (keyset paging stays fast
    at the end of a million recipients, where an offset would read them all)."""
    monitor = _monitor(request)
    name = await _existing_job(request)
    state = recipient_state(request.query.get("state"))
    after = _integer(request, "after", 0, minimum=0)
    limit = min(_integer(request, "limit", PAGE_DEFAULT, minimum=1), PAGE_MAX)
    page = await monitor.spool.job_recipients(name, state, after, limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return web.json_response(
        {
            "job": name,
            "state": state.value if state else None,
            "recipients": [recipient_json(r) for r in page],
            "next_after": page[-1].id if more else None,
        }
    )


def _control(action: JobAction) -> Handler:
    async def control(request: web.Request) -> web.StreamResponse:
        monitor = _monitor(request)
        name = await _existing_job(request)
        try:
            changed = await monitor.spool.control_job(name, action, clock.now())
        except JobError as error:
            raise web.HTTPConflict(reason=str(error)) from None
        return await _changed(request, name, changed)

    control.__name__ = f"{action.value}_job"
    control.__doc__ = f"POST /api/jobs/NAME/{action.value}"
    return control


async def retry_job(request: web.Request) -> web.StreamResponse:
    monitor = _monitor(request)
    name = await _existing_job(request)
    failed_too = _boolean(request, "failed")
    try:
        changed = await monitor.spool.retry_job(name, clock.now(), failed_too=failed_too)
    except JobError as error:
        raise web.HTTPConflict(reason=str(error)) from None
    return await _changed(request, name, changed)


async def schedule_job(request: web.Request) -> web.StreamResponse:
    """{"send_at": "RFC 3339"} sends nothing of the job before then; null sends now."""
    monitor = _monitor(request)
    name = await _existing_job(request)
    try:
        body = json.loads(await request.read() or b"null")
    except ValueError:
        raise web.HTTPBadRequest(reason="the body is not JSON") from None
    if not isinstance(body, dict) or "send_at" not in body:
        raise web.HTTPBadRequest(reason='give {"send_at": "2026-12-01T09:00:00+01:00"} or null')
    text = body["send_at"]
    if text is not None and not isinstance(text, str):
        raise web.HTTPBadRequest(reason="send_at: an RFC 3339 string, or null")
    try:
        send_at = None if text is None else parse_send_at(text, clock.now())
    except SendAtError as error:
        raise web.HTTPBadRequest(reason=f"send_at: {error}") from None
    try:
        await monitor.spool.schedule_job(name, send_at)
    except JobError as error:
        raise web.HTTPConflict(reason=str(error)) from None
    return await _changed(request, name, 0)


async def queue(request: web.Request) -> web.StreamResponse:
    """Counts by state and the relays' statuses. Read from the job counts (an index), not
    by listing messages, so it stays cheap on a big spool."""
    monitor = _monitor(request)
    jobs = await monitor.spool.jobs()
    relays = await monitor.spool.relay_statuses()
    recipients = dict.fromkeys((s.value for s in RecipientState), 0)
    by_state = dict.fromkeys((s.value for s in JobState), 0)
    for job in jobs:
        by_state[job.state.value] += 1
        for state, count in job.counts.items():
            recipients[state.value] += count
    return web.json_response(
        {
            "recipients": recipients,
            "jobs": by_state,
            "relays": {
                name: {"status": status, "since": iso(at)} for name, (status, at) in relays.items()
            },
            "spool_bytes": spool_bytes(monitor.config.spool_path()),
        }
    )


# --- helpers ------------------------------------------------------------------------------


async def _existing_job(request: web.Request) -> str:
    name = request.match_info["name"]
    if await _monitor(request).spool.job(name) is None:
        raise _no_job(name)
    return name


def _no_job(name: str) -> web.HTTPNotFound:
    return web.HTTPNotFound(reason=f"no job {name!r}; GET /api/jobs lists them")


async def _changed(request: web.Request, name: str, changed: int) -> web.StreamResponse:
    """What a control did: how many recipients it changed, and the job as it is now."""
    monitor = _monitor(request)
    job = await monitor.spool.job(name)
    if job is None:
        raise _no_job(name)
    return web.json_response({"changed": changed, "job": job_json(job, monitor.config)})


def recipient_state(text: str | None) -> RecipientState | None:
    if not text:
        return None
    try:
        return RecipientState(text)
    except ValueError:
        allowed = ", ".join(s.value for s in RecipientState)
        raise web.HTTPBadRequest(reason=f"state: {text!r} is not one of {allowed}") from None


def _integer(request: web.Request, key: str, default: int, *, minimum: int) -> int:
    text = request.query.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise web.HTTPBadRequest(reason=f"{key}: {text!r} is not a whole number") from None
    if value < minimum:
        raise web.HTTPBadRequest(reason=f"{key}: must be at least {minimum}")
    return value


def _boolean(request: web.Request, key: str) -> bool:
    text = request.query.get(key, "false").lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise web.HTTPBadRequest(reason=f"{key}: {text!r} is not true or false")
