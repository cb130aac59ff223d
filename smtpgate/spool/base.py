"""Spool interface: the source of truth between the router and the scheduler.

The listener stores a message here before it answers 250; the scheduler leases due
recipients from here and writes their results back; the CLI reads it. Every backend
implements `Spool` and passes the same contract tests.
"""

from __future__ import annotations

import abc
import collections
import enum
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from smtpgate.body import Content


class RecipientState(enum.StrEnum):
    """The words the CLI, the API and the logs use for a recipient."""

    QUEUED = "queued"  # waiting for its first attempt, or for a route that cannot send yet
    SENDING = "sending"  # leased by a scheduler; back to queued if that process dies
    DEFERRED = "deferred"  # a temporary failure; next_attempt says when it is tried again
    DELIVERED = "delivered"
    FAILED = "failed"  # permanent failure, or the retry lifetime is over
    CANCELLED = "cancelled"
    HELD = "held"


PENDING_STATES = (RecipientState.QUEUED, RecipientState.DEFERRED)
FINAL_STATES = (RecipientState.DELIVERED, RecipientState.FAILED, RecipientState.CANCELLED)
UNFINISHED_STATES = (*PENDING_STATES, RecipientState.SENDING, RecipientState.HELD)


class JobControl(enum.StrEnum):
    """What an operator set on a job; stored. `active` lets the scheduler send it."""

    ACTIVE = "active"
    HELD = "held"  # a route with hold = true: waits for `smtpgate job release`
    PAUSED = "paused"
    CANCELLED = "cancelled"


class JobState(enum.StrEnum):
    """A job as people see it: its control, else what its recipients say."""

    QUEUED = "queued"
    HELD = "held"
    SENDING = "sending"
    PAUSED = "paused"
    DONE = "done"
    CANCELLED = "cancelled"


class JobAction(enum.StrEnum):
    CANCEL = "cancel"
    PAUSE = "pause"
    RESUME = "resume"
    RELEASE = "release"


class JobError(Exception):
    """A job control that cannot apply (no such job, or not in a state it can act on)."""


class JobCancelledError(JobError):
    """Mail for a job that was cancelled: refused, so the client knows it was not sent."""

    def __init__(self, job: str) -> None:
        super().__init__(f"job {job!r} was cancelled and takes no more mail")
        self.job = job


def new_queue_id(now: float | None = None) -> str:
    """Sortable by arrival and unique in practice: 13 hex digits of the clock in µs (good
    until 2112) and 5 random ones. The spool draws again on the rare collision."""
    micros = int((time.time() if now is None else now) * 1_000_000)
    # Not secrets: an id names mail, it guards nothing, and os.urandom is a system call
    # per message (1.5% of the listener at 3,000 msg/s).
    return f"{micros:013X}{random.getrandbits(20):05X}"


@dataclass(frozen=True, slots=True)
class NewRecipient:
    address: str
    route: str
    leased: bool = False  # stored as `sending`: a passthrough session delivers it now
    job: str = ""  # empty: the route's job of the day (see smtpgate.jobs)
    hold: bool = False  # a new job for it starts held (the route has hold = true)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """What the listener hands over at the end of DATA; `content` is already stripped of
    control headers and has CRLF line ends. A large message comes as a Body, which the
    spool reads in chunks."""

    sender: str
    recipients: Sequence[NewRecipient]
    content: Content
    client_address: str
    helo: str
    smtputf8: bool = False
    received_at: float = field(default_factory=time.time)
    send_at: float | None = None  # X-Smtpgate-Send-At: not sent before this time
    submitted_by: str | None = None  # the AUTH user of the session, if any


@dataclass(frozen=True, slots=True)
class LeasedRecipient:
    id: int
    address: str
    attempts: int


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message and those of its recipients leased for one route. A large message's
    `content` is a Body that reads the stored message in chunks."""

    queue_id: str
    route: str
    sender: str
    content: Content
    smtputf8: bool
    received_at: float
    recipients: tuple[LeasedRecipient, ...]
    job: str = ""
    send_at: float | None = None
    job_started_at: float | None = None  # the job's first lease
    client_address: str = ""  # who handed the message over: a bounce is routed as if
    submitted_by: str | None = None  # they had sent it (client and AUTH user rules hold)

    @property
    def lifetime_from(self) -> float:
        """Retries give up this long after sending could first begin, not after the
        message arrived: a scheduled message, a held job or one waiting for its window
        must not expire before its first attempt."""
        return max(self.received_at, self.send_at or 0.0, self.job_started_at or 0.0)


@dataclass(frozen=True, slots=True)
class RecipientUpdate:
    """A recipient's new state after an attempt, as decided by the scheduler."""

    recipient_id: int
    state: RecipientState
    reply: str | None  # None keeps the last reply (a turn skipped, not an attempt)
    next_attempt: float | None = None
    counts_as_attempt: bool = True
    via: str | None = None  # where it went: host, address, TLS


ATTEMPT_RESULTS = (RecipientState.DELIVERED, RecipientState.DEFERRED, RecipientState.FAILED)


def attempt_results(updates: Iterable[RecipientUpdate]) -> collections.Counter[str]:
    """Real attempts by the state they left the recipient in; turns skipped (paused,
    postponed, cancelled) are not attempts."""
    return collections.Counter(
        u.state.value for u in updates if u.counts_as_attempt and u.state in ATTEMPT_RESULTS
    )


@dataclass(frozen=True, slots=True)
class RecipientView:
    id: int
    address: str
    route: str
    state: RecipientState
    attempts: int
    next_attempt: float | None
    last_reply: str | None
    updated_at: float
    via: str | None = None


@dataclass(frozen=True, slots=True)
class MessageView:
    queue_id: str
    sender: str
    size: int
    received_at: float
    client_address: str
    helo: str
    recipients: tuple[RecipientView, ...]


@dataclass(frozen=True, slots=True)
class JobView:
    name: str
    route: str
    control: JobControl
    created_at: float
    started_at: float | None
    finished_at: float | None
    send_at: float | None
    submitted_by: str | None
    counts: dict[RecipientState, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def unfinished(self) -> int:
        return sum(self.counts.get(s, 0) for s in UNFINISHED_STATES)

    @property
    def state(self) -> JobState:
        if self.control is not JobControl.ACTIVE:
            return JobState(self.control.value)
        if self.unfinished == 0:
            return JobState.DONE
        return JobState.SENDING if self.started_at is not None else JobState.QUEUED


@dataclass(frozen=True, slots=True)
class JobRecipientView:
    id: int
    queue_id: str
    address: str
    route: str
    state: RecipientState
    attempts: int
    last_reply: str | None
    updated_at: float
    via: str | None


class SpoolLockedError(Exception):
    """Another smtpgate process already serves this spool."""


class Spool(abc.ABC):
    """Durable storage of messages and per-recipient delivery state.

    Invariants: `store` returns only after the message and all its recipients are on
    stable storage; a recipient is leased (state `sending`) by at most one delivery at a
    time; nothing is deleted by delivery, only moved to a final state.
    """

    @abc.abstractmethod
    async def store(self, message: NewMessage) -> str:
        """Make the message durable and return its queue id. Only then may SMTP say 250."""

    @abc.abstractmethod
    async def lease_due(self, routes: Sequence[str], now: float, limit: int) -> list[Delivery]:
        """Move the due recipients of up to `limit` messages (oldest due first) on these
        routes to `sending`, grouped per message and route."""

    @abc.abstractmethod
    async def record(
        self, updates: Sequence[RecipientUpdate], now: float, notices: Sequence[NewMessage] = ()
    ) -> list[str]:
        """Write attempt results of leased recipients, and store `notices` (DSNs about
        them) in the same transaction; returns the notices' queue ids."""

    @abc.abstractmethod
    async def release_leases(self, now: float, routes: Sequence[str] | None = None) -> int:
        """Recipients a dead process left `sending` (of these routes, or all) become due
        now; returns how many. At the start, and when the delivery process died."""

    @abc.abstractmethod
    async def note_waiting(self, route: str, reason: str) -> int:
        """Explain in last_reply why queued recipients of a route are not being sent."""

    @abc.abstractmethod
    async def recipient_ids(self, queue_id: str) -> list[int]:
        """The ids of a message's recipients, in the order it was stored with them."""

    @abc.abstractmethod
    async def pending_routes(self) -> set[str]:
        """Routes that have recipients still to send."""

    @abc.abstractmethod
    async def retry_now(self, queue_id: str | None, now: float) -> int:
        """Make deferred recipients (of one message, or all) due now; returns how many."""

    @abc.abstractmethod
    async def messages(self, limit: int | None = None) -> list[MessageView]:
        """Messages with every recipient, newest first."""

    @abc.abstractmethod
    async def message(self, queue_id: str) -> MessageView | None: ...

    @abc.abstractmethod
    async def content(self, queue_id: str) -> bytes | None: ...

    # --- jobs: every recipient belongs to one ----------------------------------------

    @abc.abstractmethod
    async def jobs(self) -> list[JobView]:
        """Every job with its counts by recipient state, newest first."""

    @abc.abstractmethod
    async def job(self, name: str) -> JobView | None: ...

    @abc.abstractmethod
    async def job_failures(self, name: str, limit: int) -> list[tuple[str, int]]:
        """The most common last replies of the job's failed recipients, with counts."""

    @abc.abstractmethod
    async def job_recipients(
        self, name: str, state: RecipientState | None, after_id: int, limit: int
    ) -> list[JobRecipientView]:
        """A page of the job's recipients in id order, after `after_id` (0: from the start)."""

    @abc.abstractmethod
    async def control_job(self, name: str, action: JobAction, now: float) -> int:
        """Cancel, pause, resume or release a job; returns the recipients it changed.
        Raises JobError when the job does not exist or the action does not apply."""

    @abc.abstractmethod
    async def retry_job(self, name: str, now: float, *, failed_too: bool) -> int:
        """Deferred recipients due now; with `failed_too` failed ones are queued again."""

    @abc.abstractmethod
    async def schedule_job(self, name: str, send_at: float | None) -> None:
        """Nothing of the job is sent before `send_at` (None: no such limit)."""

    @abc.abstractmethod
    async def job_controls(self) -> dict[str, JobControl]:
        """Jobs that must not send now (paused, held, cancelled), read at every turn of
        the scheduler so that a control from the CLI acts within a second."""

    # --- per-relay state that must survive a restart ---------------------------------

    @abc.abstractmethod
    async def log_send(self, relay: str, at: float) -> None:
        """Count one message sent through a rate-limited relay."""

    @abc.abstractmethod
    async def sends_since(self, relay: str, since: float) -> list[float]:
        """Send times of a relay after `since`; older ones are forgotten."""

    @abc.abstractmethod
    async def set_relay_status(self, relay: str, status: str | None, now: float) -> None:
        """Why a relay is slowed down (None: it is not), for `smtpgate queue`."""

    @abc.abstractmethod
    async def relay_statuses(self) -> dict[str, tuple[str, float]]:
        """Relays with a status: their status and when it was set."""

    @abc.abstractmethod
    async def close(self) -> None: ...
