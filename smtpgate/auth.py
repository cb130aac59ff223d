"""AUTH on the listener (RFC 4954): who is on, and how hard guessing is made.

The listener runs the SMTP exchange and asks an `Authenticator` for a verdict; the
password check runs off the event loop; failed logins are counted per client address,
slowed down (a tarpit) and finally refused. The policy then lets the session relay.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import math
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from smtpgate import logs, users
from smtpgate.config import AuthConfig, Config, ConfigError

log = logs.get(__name__)

MECHANISMS = ("LOGIN", "PLAIN")  # both send the password itself: TLS only
CONCURRENT_CHECKS = 2  # scrypt checks at once; the rest wait (each takes 32 MiB, ~0.1 s)
_SWEEP_AT = 10_000  # client addresses remembered before expired ones are swept


class Verdict(enum.Enum):
    OK = "ok"
    INVALID = "invalid"  # 535 5.7.8
    BLOCKED = "blocked"  # this failure reached max_auth_failures: 421 4.7.0 and close
    UNAVAILABLE = "unavailable"  # the users file cannot be read: 454 4.7.0


def auth_file(config: Config) -> Path | None:
    """The users file when AUTH is on: there is one, and a listener certificate.
    ConfigError when server.auth.users_file names a file that does not exist."""
    path = config.users_path()
    if config.server.auth.users_file is not None and not path.is_file():
        raise ConfigError(
            f"server.auth.users_file: {path} does not exist;"
            " create it with `smtpgate user add NAME`"
        )
    if config.server.tls.cert_file is None or not path.is_file():
        return None
    return path


def auth_warning(config: Config) -> str | None:
    """Users without a certificate: AUTH stays off, which the operator should know."""
    path = config.users_path()
    if config.server.tls.cert_file is None and path.is_file():
        return (
            f"{path} has users, but AUTH is offered only over TLS and [server.tls] has"
            " no cert_file: AUTH is off"
        )
    return None


class Throttle:
    """Failed logins per client address within a window, in memory (a restart forgets).
    IPv6 clients count per /64: one host can have all of its addresses."""

    def __init__(self, window: float, most: int, clock: Callable[[], float]) -> None:
        self._window = window
        self._most = most  # no client needs more remembered than the limit, and some
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def count(self, client: str) -> int:
        key = _key(client)
        times = self._failures.get(key)
        if times is None:
            return 0
        horizon = self._clock() - self._window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
        return len(times)

    def add(self, client: str) -> float:
        """Count a failure now; returns its time, the token to forgive it by."""
        if len(self._failures) >= _SWEEP_AT:
            for known in list(self._failures):
                self.count(known)
        now = self._clock()
        self._failures.setdefault(_key(client), deque(maxlen=self._most)).append(now)
        return now

    def forgive(self, client: str, token: float) -> None:
        times = self._failures.get(_key(client))
        if times is not None and token in times:
            times.remove(token)


def _key(client: str) -> str:
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return client
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class Authenticator:
    """Checks AUTH credentials against the users file and limits guessing per address.

    A try counts as a failure from the moment it starts, so that a client cannot escape
    the tarpit by hanging up before the reply, nor run many tries at once; a success
    or an unreadable users file takes it back."""

    def __init__(
        self,
        users_file: Path,
        settings: AuthConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.users_file = users_file
        self.settings = settings
        self._throttle = Throttle(settings.failure_window, settings.max_auth_failures * 2, clock)
        self._checks = asyncio.Semaphore(CONCURRENT_CHECKS)

    def blocked(self, client: str) -> bool:
        return self._throttle.count(client) >= self.settings.max_auth_failures

    def delay(self, client: str) -> float:
        """The tarpit: after tarpit_after failures each reply waits tarpit_delay, doubling
        with every further failure, up to tarpit_max_delay."""
        over = self._throttle.count(client) - self.settings.tarpit_after
        if over < 0 or not self.settings.tarpit_delay:
            return 0.0
        delay = self.settings.tarpit_delay * math.pow(2, min(over, 30))
        return min(delay, self.settings.tarpit_max_delay)

    async def attempt(self, client: str, mechanism: str, login: bytes, password: bytes) -> Verdict:
        """One AUTH try, its reply delayed by the tarpit. Never logs the password."""
        shown = login.decode("utf-8", "replace")[:100]
        delay = self.delay(client)
        token = self._throttle.add(client)
        if delay:
            log.info("authentication reply delayed", client=client, user=shown, delay=delay)
            await asyncio.sleep(delay)
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            name = "\0"  # no user has it; checked all the same, for even timing
        try:
            async with self._checks:
                ok = await asyncio.to_thread(users.verify, self.users_file, name, password)
        except (OSError, UnicodeDecodeError, users.UsersFileError) as error:
            self._throttle.forgive(client, token)
            log.error("cannot read the users file", path=str(self.users_file), error=str(error))
            return Verdict.UNAVAILABLE
        if ok:
            self._throttle.forgive(client, token)
            log.info("authenticated", client=client, user=name, mechanism=mechanism)
            return Verdict.OK
        failures = self._throttle.count(client)
        log.warning(
            "authentication failed",
            client=client,
            user=shown,
            mechanism=mechanism,
            failures=failures,
        )
        if failures >= self.settings.max_auth_failures:
            log.warning(
                "client blocked after failed logins",
                client=client,
                failures=failures,
                window=self.settings.failure_window,
            )
            return Verdict.BLOCKED
        return Verdict.INVALID
