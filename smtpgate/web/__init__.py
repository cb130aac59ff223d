"""The monitoring HTTP interface of `smtpgate serve`: JSON API, web page, metrics, probes."""

from smtpgate.web.app import WebServer, build_app
from smtpgate.web.metrics import Metrics
from smtpgate.web.state import Monitor

__all__ = ["Metrics", "Monitor", "WebServer", "build_app"]
