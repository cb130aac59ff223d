"""Crash points: where the fault-injection tests kill the process on purpose.

`SMTPGATE_CRASH_AT=after_commit|before_reply|after_upstream_ok` makes the process exit at
once (as SIGKILL would) when it gets there, so the tests can check that nothing accepted
is lost at the dangerous moments. Unset in production: each check is one comparison.
"""

from __future__ import annotations

import os
from typing import Literal

Point = Literal["after_commit", "before_reply", "after_upstream_ok"]

_CRASH_AT = os.environ.get("SMTPGATE_CRASH_AT")


def reached(point: Point) -> None:
    if _CRASH_AT == point:
        os._exit(137)  # no cleanup, no flush: what a power cut or SIGKILL leaves
