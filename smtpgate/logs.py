"""Logs: structlog set up once, one event per line.

Readable key=value lines on a terminal, JSON lines elsewhere (containers, files, journald).
Every line about a message carries `queue_id`; callers bind it, this module only renders.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

Format = Literal["auto", "console", "json"]

_settings: tuple[str, Format] = ("info", "auto")


def configure(level: str = "info", fmt: Format = "auto") -> None:
    """Route structlog and the stdlib loggers (aiosmtpd, asyncio) to stderr in one format."""
    global _settings
    _settings = (level, fmt)
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every connection at INFO; our own session events say more, once.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))
    structlog.configure(
        # filter_by_level first: an event below the level costs no timestamp or rendering.
        processors=[
            structlog.stdlib.filter_by_level,
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )


def settings() -> tuple[str, Format]:
    """The level and format in force, for a child process to log alike."""
    return _settings


def get(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.stdlib.get_logger(name)
    return logger
