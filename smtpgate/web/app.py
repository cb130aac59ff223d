"""The HTTP application: routes, the guard every request passes, and its lifecycle.

Runs inside `smtpgate serve` on the server's event loop and spool, loaded by
interface.py at the first connection to the sockets server.py had it bind, and stopped
in the server's shutdown checklist; api.py, page.py, metrics.py and openapi.py hold what
each route answers.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import urllib.parse
from importlib import resources

from aiohttp import web
from aiohttp.typedefs import Handler

from smtpgate import logs
from smtpgate.web import api, page
from smtpgate.web.openapi import document
from smtpgate.web.state import MONITOR, Monitor

log = logs.get(__name__)

TOKEN_COOKIE = "smtpgate_token"  # noqa: S105  # the cookie's name, set by the sign-in form
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/static/app.js", "/static/style.css"})
SHUTDOWN_SECONDS = 2.0  # open HTTP requests get this long at shutdown
READY_SECONDS = 5.0  # a spool read slower than this is not ready
STATIC_TYPES = {"app.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own script and style: a value that slipped through escaping
# still could not run a script.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self';"
    " img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def build_app(monitor: Monitor) -> web.Application:
    app = web.Application(middlewares=[_security_headers, _errors_as_json, _guard])
    app[MONITOR] = monitor
    api.add_routes(app.router)
    page.add_routes(app.router)
    static = resources.files("smtpgate.web") / "static"
    for name, content_type in STATIC_TYPES.items():
        body = (static / name).read_bytes()
        app.router.add_get(f"/static/{name}", _static(body, content_type))
    app.router.add_get("/openapi.json", _openapi)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


class WebServer:
    """The app on its listen addresses, in the server's event loop."""

    def __init__(self, app: web.Application) -> None:
        self._runner = web.AppRunner(
            app, handle_signals=False, access_log=None, shutdown_timeout=SHUTDOWN_SECONDS
        )
        self._set_up = False

    async def serve(self, sock: socket.socket) -> None:
        """Serve on one more listening socket (interface.py binds them)."""
        if not self._set_up:
            await self._runner.setup()
            self._set_up = True
        await web.SockSite(self._runner, sock).start()

    async def stop(self) -> None:
        if self._set_up:
            await self._runner.cleanup()


# --- the guard ----------------------------------------------------------------------------


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who may ask: with a token, only those who give it (header or the page's cookie);
    without one (loopback only), requests that name a loopback host, so a web site that
    rebinds its DNS name to 127.0.0.1 cannot read the API. Controls refuse requests from
    another origin: a page elsewhere must not cancel jobs through the user's browser."""
    monitor = request.app[MONITOR]
    if request.path not in OPEN_PATHS:
        if monitor.token is None:
            if not _loopback_host(request.host):
                raise web.HTTPForbidden(
                    reason=f"host {request.host!r} is not a loopback name; without a token"
                    " smtpgate answers only requests for 127.0.0.1, [::1] or localhost"
                )
        elif not _authorized(request, monitor.token):
            if page.is_page(request.path):
                return page.sign_in(request)
            raise web.HTTPUnauthorized(
                reason="a bearer token is required: Authorization: Bearer TOKEN",
                headers={"WWW-Authenticate": 'Bearer realm="smtpgate"'},
            )
    if request.method == "POST" and not _same_origin(request):
        raise web.HTTPForbidden(reason="a request from another origin may not control jobs")
    return await handler(request)


def _authorized(request: web.Request, token: str) -> bool:
    given = ""
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        given = value.strip()
    elif TOKEN_COOKIE in request.cookies:
        given = urllib.parse.unquote(request.cookies[TOKEN_COOKIE])
    return hmac.compare_digest(given.encode(), token.encode())


def _loopback_host(host: str | None) -> bool:
    if not host:
        return False
    name = host[1:].partition("]")[0] if host.startswith("[") else host.rpartition(":")[0]
    name = name or host  # no port given
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _same_origin(request: web.Request) -> bool:
    """Browsers send Origin with every cross-origin POST; scripts and curl send none."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return urllib.parse.urlsplit(origin).netloc == request.host


@web.middleware
async def _errors_as_json(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is {"error": "..."} with its status; an unexpected one is logged with
    its traceback and never shown to the client."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return web.json_response(
            {"error": error.reason}, status=error.status, headers=_kept_headers(error)
        )
    except Exception:
        log.exception("HTTP request failed", method=request.method, path=request.path)
        return web.json_response({"error": "internal error; see the server log"}, status=500)


def _kept_headers(error: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in error.headers.items() if k in ("WWW-Authenticate", "Allow")}


@web.middleware
async def _security_headers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost, so error replies and the sign-in page carry them too."""
    response = await handler(request)
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


# --- small routes -------------------------------------------------------------------------


def _static(body: bytes, content_type: str) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    return serve


async def _openapi(request: web.Request) -> web.StreamResponse:
    return web.json_response(document())


async def _metrics(request: web.Request) -> web.StreamResponse:
    body = await request.app[MONITOR].metrics.render()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


async def _healthz(request: web.Request) -> web.StreamResponse:
    """The process answers: for a container's liveness probe."""
    return web.json_response({"status": "ok"})


async def _readyz(request: web.Request) -> web.StreamResponse:
    """The spool answers a read: for a readiness probe."""
    try:
        async with asyncio.timeout(READY_SECONDS):
            await request.app[MONITOR].spool.job_controls()
    except Exception as error:
        log.warning("not ready: the spool does not answer", error=str(error))
        reason = str(error) or type(error).__name__  # a timeout has no text
        return web.json_response({"error": f"the spool does not answer: {reason}"}, status=503)
    return web.json_response({"status": "ok"})
