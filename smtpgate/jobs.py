"""Jobs: the unit people watch and control. Every recipient belongs to exactly one.

A message's job is named by its `X-Smtpgate-Job` header, else by its route's `job`
setting, else it joins its route's job of the day (`newsletter-2026-11-29`), so even
mail nobody labelled can be watched, paused or cancelled as a batch. `X-Smtpgate-Send-At`
schedules a message; both headers are removed before the message leaves.
"""

from __future__ import annotations

import datetime as dt
import email.utils

from smtpgate.config import RouteConfig, valid_job_name

MAX_AHEAD = 400 * 86400.0


class SendAtError(ValueError):
    """An X-Smtpgate-Send-At value that is not a date smtpgate can read."""


def job_of(header: str | None, route: RouteConfig) -> str:
    """The job a recipient on this route joins; "" is the route's job of the day, which the
    spool names (and replaces with a fresh one if someone cancelled it). A bad header name
    raises ValueError."""
    if header is not None:
        return valid_job_name(header)
    return route.job or ""


def day_job(route_name: str, at: float) -> str:
    """The route's job of the (local) day: what unlabelled mail joins."""
    return f"{route_name}-{dt.datetime.fromtimestamp(at).date().isoformat()}"


def parse_send_at(text: str, now: float) -> float:
    """RFC 3339 ('2026-12-01T09:00:00+01:00', 'Z' allowed) or RFC 5322 ('Tue, 1 Dec 2026
    09:00:00 +0100'). A time without a zone is refused: it would be a guess. So is one
    more than MAX_AHEAD away: a mistyped year would hold the mail for good."""
    text = text.strip()
    iso = text.upper()  # RFC 3339 allows "t" and "z"
    try:
        moment = dt.datetime.fromisoformat(iso.replace(" ", "T", 1) if "T" not in iso else iso)
    except ValueError:
        try:
            moment = email.utils.parsedate_to_datetime(text)
        except Exception:  # TypeError, ValueError, IndexError, OverflowError on odd input
            raise SendAtError(
                f"{text[:60]!r} is not a date; use RFC 3339 (2026-12-01T09:00:00+01:00)"
                " or RFC 5322 (Tue, 01 Dec 2026 09:00:00 +0100)"
            ) from None
        if moment.tzinfo is None and text.endswith("-0000"):  # RFC 5322: UTC, zone unknown
            moment = moment.replace(tzinfo=dt.UTC)
    if moment.tzinfo is None:
        raise SendAtError(
            f"{text[:60]!r} has no time zone; add one, as in 2026-12-01T09:00:00+01:00"
        )
    try:
        at = moment.timestamp()
    except (OverflowError, ValueError):
        raise SendAtError(f"{text[:60]!r} is out of range") from None
    if at > now + MAX_AHEAD:
        raise SendAtError(f"{text[:60]!r} is more than a year ahead; is the year right?")
    return at
