"""Crash points: where the fault-injection tests kill the process on purpose.

`SMTPGATE_CRASH_AT=after_commit|before_reply|after_upstream_ok` makes the process exit at
once (as SIGKILL would) when it gets there, so the tests can check that nothing accepted
is lost at the dangerous moments. Unset in production: each check is one comparison.
"""

from __future__ import annotations

import os
import signal
from typing import Literal

Point = Literal["after_commit", "before_reply", "after_upstream_ok"]

_CRASH_AT = os.environ.get("SMTPGATE_CRASH_AT")
_ALSO: list[int] = []  # processes the same power cut takes down


def also_kill(pid: int) -> None:
    """The delivery process names its server: a crash in either stops both."""
    _ALSO.append(pid)


def reached(point: Point) -> None:
    if _CRASH_AT == point:
        for pid in _ALSO:
            os.kill(pid, signal.SIGKILL)
        os._exit(137)  # no cleanup, no flush: what a power cut or SIGKILL leaves
