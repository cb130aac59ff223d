"""Clock: the one source of "now" for everything that schedules mail.

Sending windows, rates, send-at times, retries and give-up lifetimes are all decided
against `now()`. Production reads the system clock. The end-to-end tests set
`SMTPGATE_TEST_CLOCK=/path/file` to drive a real server through days of windows and
retries in seconds: the file holds the current time as Unix seconds and the test rewrites
it. Timeouts and pauses of live SMTP sessions stay on the real monotonic clock.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_TEST_CLOCK = os.environ.get("SMTPGATE_TEST_CLOCK")


def now() -> float:
    if _TEST_CLOCK is None:
        return time.time()
    try:
        return float(Path(_TEST_CLOCK).read_text(encoding="ascii"))
    except (OSError, ValueError) as error:  # a broken test setup, never production
        raise RuntimeError(f"SMTPGATE_TEST_CLOCK={_TEST_CLOCK}: {error}") from None
