"""Metrics for Prometheus at GET /metrics: counters since start, gauges read from the spool.

Counters are bumped by hooks the server wires into the listener (`on_stored`) and the
scheduler (`on_recorded`); gauges are read from the spool at scrape time, at most once a
second however many scrapers ask, since every spool read queues behind the writes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, ProcessCollector, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.metrics import disable_created_metrics

from smtpgate.spool.base import (
    ATTEMPT_RESULTS,
    JobState,
    RecipientState,
    RecipientUpdate,
    Spool,
    attempt_results,
)

SNAPSHOT_SECONDS = 1.0  # spool-derived gauges are at most this old

# A *_created series per counter says nothing that process_start_time_seconds does not.
disable_created_metrics()  # type: ignore[no-untyped-call]  # the library leaves it untyped


class Metrics:
    """One server's metrics, in a registry of its own (never the global one, so two
    servers in one test process never share counts)."""

    def __init__(self, spool: Spool, spool_path: Path) -> None:
        self._spool = spool
        self._spool_path = spool_path
        self.registry = CollectorRegistry()
        self._accepted = Counter(
            "smtpgate_messages_accepted",
            "Messages stored in the spool at DATA since the server started (a passthrough"
            " message the upstream refused is stored too, with its recipients cancelled).",
            registry=self.registry,
        )
        self._results = Counter(
            "smtpgate_recipient_results",
            "Delivery attempts since the server started, by the state they left the recipient"
            " in: delivered, deferred (to be retried) or failed.",
            ["state"],
            registry=self.registry,
        )
        for state in ATTEMPT_RESULTS:
            self._results.labels(state.value)
        self._snapshot = _Snapshot()
        self.registry.register(self._snapshot)
        ProcessCollector(registry=self.registry)
        self._taken_at = float("-inf")
        self._lock = asyncio.Lock()

    def count_accepted(self) -> None:
        self._accepted.inc()

    def count_results(self, updates: Sequence[RecipientUpdate]) -> None:
        self.count_attempts(attempt_results(updates))

    def count_attempts(self, results: Mapping[str, int]) -> None:
        """Attempts by result (see `attempt_results`): one label lookup for many."""
        for state, count in results.items():
            self._results.labels(state).inc(count)

    async def render(self) -> bytes:
        """The Prometheus text format, with gauges at most SNAPSHOT_SECONDS old."""
        async with self._lock:
            if time.monotonic() - self._taken_at >= SNAPSHOT_SECONDS:
                jobs = await self._spool.jobs()
                recipients = dict.fromkeys(RecipientState, 0)
                by_state = dict.fromkeys(JobState, 0)
                for job in jobs:
                    by_state[job.state] += 1
                    for state, count in job.counts.items():
                        recipients[state] += count
                self._snapshot.recipients = recipients
                self._snapshot.jobs = by_state
                self._snapshot.spool_bytes = spool_bytes(self._spool_path)
                self._taken_at = time.monotonic()
        return generate_latest(self.registry)


def spool_bytes(path: Path) -> int:
    """The spool's size on disk: the database and its write-ahead log."""
    total = 0
    for part in (path, path.with_name(path.name + "-wal")):
        try:
            total += part.stat().st_size
        except OSError:
            pass  # no WAL right after a checkpoint
    return total


class _Snapshot:
    """The spool-derived gauges as last read (prometheus_client collects synchronously)."""

    def __init__(self) -> None:
        self.recipients: dict[RecipientState, int] = dict.fromkeys(RecipientState, 0)
        self.jobs: dict[JobState, int] = dict.fromkeys(JobState, 0)
        self.spool_bytes = 0

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        recipients = GaugeMetricFamily(
            "smtpgate_recipients", "Recipients in the spool by state.", labels=["state"]
        )
        for state, count in self.recipients.items():
            recipients.add_metric([state.value], count)
        jobs = GaugeMetricFamily("smtpgate_jobs", "Jobs by state.", labels=["state"])
        for job_state, count in self.jobs.items():
            jobs.add_metric([job_state.value], count)
        size = GaugeMetricFamily(
            "smtpgate_spool_bytes",
            "Size of the spool on disk (database and WAL).",
            value=self.spool_bytes,
        )
        return [recipients, jobs, size]
