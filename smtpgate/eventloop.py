"""The event loop every smtpgate process runs on."""

from __future__ import annotations

import asyncio
import gc
import sys

# How long the event loop's thread keeps the interpreter lock while the spool's writer
# thread waits for it (Python's default is 5 ms).
SWITCH_SECONDS = 0.0005


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where it installs (not on Windows), else asyncio's: the
    listener spends most of its time in the loop's socket and callback machinery."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def set_startup_aside() -> None:
    """Once started: exempt what startup made (modules, config, caches) from the cyclic
    garbage collector, and let it look for cycles among the rest each time it looks at
    its second generation. A closed SMTP session is a knot of reference cycles (aiosmtpd's
    session, its bound methods and task, the traceback of the read it cancelled) that
    only a full collection frees, and Python ran one about every 70,000 allocations and
    only once the survivors reached a quarter of all it tracks: at a new connection per
    message, 5 MB of dead sessions waited. Frozen, the startup's objects are no longer
    counted nor traversed, so a full collection is cheap enough to run that often."""
    gc.collect()
    gc.freeze()
    gc.collect()  # resets the count of survivors to what is not frozen: few
    young, middle, _ = gc.get_threshold()
    gc.set_threshold(young, middle, 1)


def hand_over_quickly() -> None:
    """The spool's writer thread needs the interpreter lock between the statements of
    every transaction, and a busy event loop keeps it for the switch interval each
    time: a 250 waits for a commit that waits, statement after statement, for the
    loop. In the delivery process the writer does so holding the spool's write turn,
    which the listener's commits then wait for. A shorter interval costs only while
    another thread is waiting."""
    sys.setswitchinterval(SWITCH_SECONDS)
