"""The event loop every smtpgate process runs on."""

from __future__ import annotations

import asyncio


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it installs (not on Windows), else asyncio's: the
    listener spends most of its time in the loop's socket and callback machinery."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()
