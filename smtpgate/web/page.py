"""The web page: the jobs table at /, one job at /jobs/NAME, rendered on the server.

Job names, addresses and replies come from mail senders and upstream servers, so every
value goes through `_e` (html.escape) and every URL part through `_q`; the only script
is static/app.js, which calls the JSON API for the buttons and reloads.
"""

from __future__ import annotations

import html
import urllib.parse

from aiohttp import web

from smtpgate.config import Config
from smtpgate.display import when
from smtpgate.reports import COLUMNS, TOP_FAILURES, column_count, finished, progress, waiting
from smtpgate.spool.base import JobRecipientView, JobState, JobView, RecipientState
from smtpgate.web.api import recipient_state
from smtpgate.web.state import monitor_of

PAGE_SIZE = 100  # recipients shown on one page of the job page
REFRESH_SECONDS = 5  # the pages reload themselves this often


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/", jobs_page)
    router.add_get("/jobs/{name}", job_page)


def is_page(path: str) -> bool:
    """A page for people (a sign-in form instead of a bare 401)."""
    return path == "/" or path.startswith("/jobs/")


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _document(title: str, body: str, *, refresh: bool = True) -> web.Response:
    text = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · smtpgate</title>
<link rel="stylesheet" href="/static/style.css">
<script src="/static/app.js" defer></script>
</head>
<body{f' data-refresh="{REFRESH_SECONDS}"' if refresh else ""}>
<header><a href="/">smtpgate</a> <span id="status" role="status"></span></header>
<main>
{body}
</main>
</body>
</html>
"""
    return web.Response(text=text, content_type="text/html", charset="utf-8")


def sign_in(request: web.Request) -> web.StreamResponse:
    """The page for a browser without the token: the form stores it in a cookie."""
    body = """<h1>Sign in</h1>
<p>This smtpgate requires its HTTP token (<code>[http] token_env</code> or
<code>token_file</code> in its config).</p>
<form id="sign-in">
<label>Token <input type="password" name="token" autocomplete="current-password"
required></label>
<button type="submit">Sign in</button>
</form>"""
    response = _document("Sign in", body, refresh=False)
    response.set_status(401)
    response.headers["WWW-Authenticate"] = 'Bearer realm="smtpgate"'
    return response


# --- the jobs table -----------------------------------------------------------------------


async def jobs_page(request: web.Request) -> web.StreamResponse:
    monitor = monitor_of(request)
    jobs = await monitor.spool.jobs()
    relays = await monitor.spool.relay_statuses()
    parts = ["<h1>Jobs</h1>"]
    if relays:
        parts.append('<ul class="relays">')
        parts += [
            f"<li>relay <b>{_e(name)}</b>: {_e(status)} (since {_e(when(at))})</li>"
            for name, (status, at) in sorted(relays.items())
        ]
        parts.append("</ul>")
    if not jobs:
        parts.append(
            "<p>No jobs yet. Every message smtpgate accepts joins a job: its"
            " <code>X-Smtpgate-Job</code> header, else its route's <code>job</code>,"
            " else the route's job of the day.</p>"
        )
    else:
        heads = ["Job", "Route", "State", "Progress", *(s.value for s in COLUMNS), "Created"]
        parts.append('<table class="jobs"><thead><tr>')
        parts += [f"<th>{_e(h.capitalize())}</th>" for h in heads]
        parts.append("<th>Note</th></tr></thead><tbody>")
        parts += [_job_row(job, monitor.config) for job in jobs]
        parts.append("</tbody></table>")
    return _document("Jobs", "\n".join(parts))


def _job_row(job: JobView, config: Config) -> str:
    counts = "".join(f'<td class="n">{column_count(job, s)}</td>' for s in COLUMNS)
    return (
        f'<tr><td class="name"><a href="/jobs/{_q(job.name)}">{_e(job.name)}</a></td>'
        f'<td>{_e(job.route)}</td>{_state(job)}<td class="bar">{_bar(job)}</td>{counts}'
        f"<td>{_e(when(job.created_at))}</td><td>{_e(waiting(job, config) or '')}</td></tr>"
    )


def _state(job: JobView) -> str:
    return f'<td><span class="state {_e(job.state.value)}">{_e(job.state.value)}</span></td>'


def _bar(job: JobView) -> str:
    return (
        f'<progress max="{max(job.total, 1)}" value="{finished(job) if job.total else 1}">'
        f"</progress> {progress(job):.0%}"
    )


# --- one job ------------------------------------------------------------------------------


async def job_page(request: web.Request) -> web.StreamResponse:
    monitor = monitor_of(request)
    name = request.match_info["name"]
    job = await monitor.spool.job(name)
    if job is None:
        body = f'<h1>No job {_e(name)}</h1><p><a href="/">All jobs</a></p>'
        response = _document("No such job", body, refresh=False)
        response.set_status(404)
        return response
    state = recipient_state(request.query.get("state"))
    after = request.query.get("after", "0")
    after_id = int(after) if after.isdigit() else 0
    failures = await monitor.spool.job_failures(name, TOP_FAILURES)
    page = await monitor.spool.job_recipients(name, state, after_id, PAGE_SIZE + 1)
    note = waiting(job, monitor.config)
    parts = [
        f"<h1>Job {_e(job.name)}</h1>",
        f'<p><span class="state {_e(job.state.value)}">{_e(job.state.value)}</span>'
        + (f" {_e(note)}" if note else "")
        + "</p>",
        _buttons(job),
        f"<p>{_bar(job)} {finished(job)} of {job.total} recipients finished</p>",
        _details(job),
        _counts(job),
    ]
    if failures:
        parts.append("<h2>Most common failures</h2><table><tr><th>Count</th><th>Reply</th></tr>")
        parts += [f'<tr><td class="n">{n}</td><td>{_e(reply)}</td></tr>' for reply, n in failures]
        parts.append("</table>")
    parts.append(_recipients(job, state, page))
    return _document(f"Job {job.name}", "\n".join(parts))


def _buttons(job: JobView) -> str:
    actions: list[tuple[str, str, str]] = []  # (action, query, label)
    if job.state in (JobState.QUEUED, JobState.SENDING):
        actions.append(("pause", "", "Pause"))
    if job.state is JobState.PAUSED:
        actions.append(("resume", "", "Resume"))
    if job.state is JobState.HELD:
        actions.append(("release", "", "Release"))
    if job.counts.get(RecipientState.DEFERRED):
        actions.append(("retry", "", "Retry deferred now"))
    if job.counts.get(RecipientState.FAILED):
        actions.append(("retry", "failed=true", "Retry deferred and failed"))
    if job.state not in (JobState.DONE, JobState.CANCELLED):
        actions.append(("cancel", "", "Cancel"))
    buttons = [
        f'<button type="button" data-job="{_e(job.name)}" data-action="{action}"'
        + (f' data-query="{_e(query)}"' if query else "")
        + (
            f' data-confirm="Cancel every unsent recipient of {_e(job.name)}?"'
            if action == "cancel"
            else ""
        )
        + f">{_e(label)}</button>"
        for action, query, label in actions
    ]
    return f'<p class="actions">{" ".join(buttons)}</p>' if buttons else ""


def _details(job: JobView) -> str:
    rows = [
        ("Route", job.route),
        ("Created", when(job.created_at)),
        ("Started", when(job.started_at) or "not yet"),
        ("Finished", when(job.finished_at) if job.state is JobState.DONE else ""),
        ("Send at", when(job.send_at)),
        ("Submitted by", job.submitted_by or ""),
    ]
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in rows if v)
    return f"<dl>{items}</dl>"


def _counts(job: JobView) -> str:
    cells = "".join(
        f'<tr><td><a href="?state={state.value}">{state.value}</a></td>'
        f'<td class="n">{job.counts.get(state, 0)}</td></tr>'
        for state in RecipientState
    )
    return f'<table class="counts"><tr><th>State</th><th>Recipients</th></tr>{cells}</table>'


def _recipients(job: JobView, state: RecipientState | None, page: list[JobRecipientView]) -> str:
    filters = ['<a href="?">all</a>'] + [
        f'<a href="?state={s.value}">{s.value}</a>' for s in RecipientState
    ]
    shown = state.value if state else "all"
    parts = [
        f"<h2>Recipients ({_e(shown)})</h2>",
        f'<p class="filters">{" · ".join(filters)}</p>',
    ]
    more = len(page) > PAGE_SIZE
    page = page[:PAGE_SIZE]
    if not page:
        parts.append("<p>None.</p>")
        return "\n".join(parts)
    heads = ["Recipient", "State", "Attempts", "Updated", "Via", "Last reply", "Queue id"]
    parts.append("<table><tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>")
    parts += [
        f"<tr><td>{_e(r.address)}</td><td>{_e(r.state.value)}</td>"
        f'<td class="n">{r.attempts}</td><td>{_e(when(r.updated_at))}</td>'
        f"<td>{_e(r.via or '')}</td><td>{_e(r.last_reply or '')}</td>"
        f"<td><code>{_e(r.queue_id)}</code></td></tr>"
        for r in page
    ]
    parts.append("</table>")
    if more:
        query = urllib.parse.urlencode(
            {**({"state": state.value} if state else {}), "after": page[-1].id}
        )
        parts.append(f'<p><a href="?{_e(query)}">Next {PAGE_SIZE}</a></p>')
    return "\n".join(parts)
