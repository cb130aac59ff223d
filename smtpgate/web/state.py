"""What every HTTP handler shares: the running server's config, spool and metrics."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from smtpgate.config import Config
from smtpgate.spool.base import Spool
from smtpgate.web.metrics import Metrics


@dataclass(frozen=True, slots=True)
class Monitor:
    config: Config
    spool: Spool
    metrics: Metrics
    token: str | None  # None: no token configured (loopback only, by config validation)


MONITOR = web.AppKey("monitor", Monitor)


def monitor_of(request: web.Request) -> Monitor:
    return request.app[MONITOR]
