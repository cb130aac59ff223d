"""Config: what every setting is, its default, and what values it allows.

Every default lives here and nowhere else. The sections are frozen stdlib dataclasses, and
this module does not import pydantic: the delivery process receives the `Config` pickled
and so never pays pydantic's 10 MB. configfile.py reads the file and the environment and
validates against these classes with pydantic, using the constraints written beside each
field (annotated-types) and the checks in each section's `__post_init__`.
"""

from __future__ import annotations

import ipaddress
import math
import re
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from annotated_types import Ge, Gt, Le, MinLen

from smtpgate.windows import Window, zone_named

BUILTIN_DIRECT_ROUTE = "direct"
IMPLICIT_TLS_SCHEME = "ssl://"
USERS_FILE_NAME = "users"  # in the state directory, unless server.auth.users_file says


class ConfigError(Exception):
    """A config problem a person must fix; the message names the key and what is allowed."""


# --- checks that pydantic runs while validating ------------------------------------------


@dataclass(frozen=True, slots=True)
class Before:
    """Turn what a person writes ('5m', "host:port") into the field's type first."""

    parse: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema  # only where configs are validated

        return core_schema.no_info_before_validator_function(self.parse, handler(source))


@dataclass(frozen=True, slots=True)
class After:
    """Check (or normalise) a field once it has its type, so the error names that field."""

    check: Callable[[Any], Any]

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema

        return core_schema.no_info_after_validator_function(self.check, handler(source))


# --- human units -------------------------------------------------------------------------

_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
}
_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: object) -> float:
    """'90s', '5m', '1h', '5d', '1w', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '90s', '5m', '1h' or '5d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _QUANTITY.match(value)):
        number, unit = match.groups()
        factor = _DURATION_UNITS.get(unit.lower() or "s")
        if factor is None:
            raise ValueError(f"unknown duration unit {unit!r} (use ms, s, m, h, d or w)")
        seconds = float(number) * factor
    else:
        raise ValueError("expected a duration such as '90s', '5m', '1h' or '5d'")
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError("a duration must be finite and not negative")
    return seconds


def parse_size(value: object) -> int:
    """'25MB', '512KiB', '1GB' or a number of bytes -> bytes (K, M, G are powers of 1024)."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '25MB' or a number of bytes")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (match := _QUANTITY.match(value)):
        number, unit = match.groups()
        factor = _SIZE_UNITS.get(unit.lower())
        if factor is None:
            raise ValueError(f"unknown size unit {unit!r} (use B, KB, MB or GB)")
        size = int(float(number) * factor)
    else:
        raise ValueError("expected a size such as '25MB' or a number of bytes")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, Before(parse_duration)]
Size = Annotated[int, Before(parse_size)]
Port = Annotated[int, Ge(1), Le(65535)]


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], Before(_one_or_many)]
NetworkList = Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], Before(_one_or_many)]


@dataclass(frozen=True)
class ListenAddress:
    """One listening socket, written 'host:port' or '[v6]:port'; an 'ssl://' prefix makes
    it speak TLS from the first byte (implicit TLS, RFC 8314: the submission port 465)."""

    host: str
    port: int
    tls: bool = False

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        text = text.strip()
        tls = text.lower().startswith(IMPLICIT_TLS_SCHEME)
        address = text[len(IMPLICIT_TLS_SCHEME) :] if tls else text
        match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]/]+):(\d+)", address)
        if not match:
            raise ValueError(f"{text!r} is not 'host:port', '[ipv6]:port' or 'ssl://host:port'")
        host = match.group(1) or match.group(3)
        port = int(match.group(2) or match.group(4))
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 0-65535")
        return cls(host=host, port=port, tls=tls)

    def is_loopback(self) -> bool:
        """True when only this machine can connect (so no one else can relay through it)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False  # a host name: assume the worst

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return IMPLICIT_TLS_SCHEME + address if self.tls else address


def _listen_list(value: object) -> object:
    items = _one_or_many(value)
    if not isinstance(items, list):
        return items
    return [ListenAddress.parse(v) if isinstance(v, str) else v for v in items]


ListenList = Annotated[list[ListenAddress], Before(_listen_list)]


# --- sections ---------------------------------------------------------------------------

# A pydantic ConfigDict, read when configfile.py validates a section: an unknown key is an
# error, not ignored; SMTPGATE_SERVER__HOSTNAME=123 reads as TOML 123, and is still a name.
SECTION = {"extra": "forbid", "coerce_numbers_to_str": True}


def _readable_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise ValueError(f"{path} is not a readable file")
    return path


@dataclass(frozen=True)
class ListenerTlsConfig:
    """The listener's certificate: with one, plain listeners offer STARTTLS and ssl://
    listeners speak TLS; AUTH is offered only over TLS."""

    __pydantic_config__: ClassVar = SECTION
    # PEM: the certificate, then any intermediates
    cert_file: Annotated[Path | None, After(_readable_file)] = None
    key_file: Annotated[Path | None, After(_readable_file)] = None  # default: in cert_file

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")


@dataclass(frozen=True)
class AuthConfig:
    """AUTH on the listener (PLAIN, LOGIN; over TLS only), and the limits on guessing."""

    __pydantic_config__: ClassVar = SECTION
    users_file: Path | None = None  # default: <state_dir>/users; AUTH is on when it exists
    max_auth_failures: Annotated[int, Ge(1)] = 5  # per client address in failure_window
    failure_window: Annotated[Duration, Gt(0)] = 900.0
    max_session_attempts: Annotated[int, Ge(1)] = 3  # failed AUTHs in one session
    tarpit_after: Annotated[int, Ge(0)] = 3  # failures before replies slow down
    tarpit_delay: Duration = 1.0  # the first delay; doubles with each further failure
    tarpit_max_delay: Duration = 15.0

    def __post_init__(self) -> None:
        if self.tarpit_max_delay < self.tarpit_delay:
            raise ValueError("tarpit_max_delay must not be less than tarpit_delay")


@dataclass(frozen=True)
class ServerConfig:
    __pydantic_config__: ClassVar = SECTION
    listen: Annotated[ListenList, MinLen(1)] = field(
        default_factory=lambda: [ListenAddress(host="127.0.0.1", port=2525)]
    )
    hostname: Annotated[str, MinLen(1)] = field(default_factory=socket.gethostname)
    state_dir: Path | None = None
    max_message_size: Annotated[Size, Gt(0)] = 25 * 1024**2
    max_recipients: Annotated[int, Ge(1)] = 1000
    max_connections: Annotated[int, Ge(1)] = 100
    max_connections_per_client: Annotated[int, Ge(1)] = 20
    max_errors: Annotated[int, Ge(1)] = 20  # error replies in a session, then 421
    max_commands: Annotated[int, Ge(1)] = 10000  # commands since the last message, then 421
    max_hops: Annotated[int, Ge(1)] = 50  # Received: fields before a loop is assumed
    min_free_space: Size = 100 * 1024**2  # below this MAIL gets 452 4.3.1
    bare_line_ends: Literal["fix", "refuse"] = "fix"
    allow_percent_hack: bool = False
    idle_timeout: Annotated[Duration, Gt(0)] = 300.0  # RFC 5321 4.5.3.2.7: 5 minutes
    trusted_networks: NetworkList = field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ]
    )
    default_route: str = BUILTIN_DIRECT_ROUTE
    # A garbled X-Smtpgate-Send-At: refuse the message at DATA, or send it now and log it.
    invalid_send_at: Literal["refuse", "send_now"] = "refuse"
    # Where the delivery side (scheduler and transports) runs: "inline" in the server's
    # process, "separate" in a delivery process of its own (another CPU core, about 40 MB
    # more memory), "auto" separate where there are two cores or more.
    delivery_process: Literal["auto", "inline", "separate"] = "auto"
    tls: ListenerTlsConfig = field(default_factory=ListenerTlsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)


def _known_backend(url: str | None) -> str | None:
    if url is None:
        return url
    if not url.startswith("sqlite:///"):
        raise ValueError("only 'sqlite:////absolute/path.db' is supported by this version")
    if not url.removeprefix("sqlite:///").startswith("/"):
        raise ValueError(
            "the spool path must be absolute: 'sqlite:////var/lib/smtpgate/spool.db'"
            " (four slashes: three for the scheme, one for the root)"
        )
    return url


@dataclass(frozen=True)
class SpoolConfig:
    __pydantic_config__: ClassVar = SECTION
    url: Annotated[str | None, After(_known_backend)] = None  # default: <state_dir>/spool.db


_RATE = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$", re.I)
_RATE_WINDOWS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
    "d": 86400,
    "day": 86400,
}


@dataclass(frozen=True)
class Rate:
    """At most `count` messages in any `window` seconds, written "30/min"."""

    count: int
    window: float

    @classmethod
    def parse(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        match = _RATE.match(value)
        if not match or int(match.group(1)) < 1:
            raise ValueError(
                f"{value!r} is not a rate such as '14/s', '30/min', '100/h' or '10000/d'"
            )
        return cls(count=int(match.group(1)), window=_RATE_WINDOWS[match.group(2).lower()])

    def __str__(self) -> str:
        unit = {1: "s", 60: "min", 3600: "h", 86400: "d"}.get(int(self.window))
        return f"{self.count}/{unit}" if unit else f"{self.count}/{self.window:g}s"


RateList = Annotated[list[Annotated[Rate, Before(Rate.parse)]], Before(_one_or_many)]
DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


@dataclass(frozen=True)
class RelayConfig:
    """An upstream SMTP server. Every option of AY Mail's "Send through the following SMTP
    server" maps here: see config/smtpgate.toml."""

    __pydantic_config__: ClassVar = SECTION
    host: Annotated[str, MinLen(1)]
    port: Port | None = None  # default by tls: none 25, starttls 587, ssl 465
    tls: Literal["none", "ssl", "starttls"] = "starttls"
    ca_file: Path | None = None
    verify: bool = True
    username: str | None = None
    password: str | None = None
    password_env: str | None = None
    password_file: Path | None = None
    allow_plaintext_auth: bool = False
    timeout: Duration = 60.0
    data_timeout: Duration = 600.0  # RFC 5321 4.5.3.2.6: wait 10 minutes for the final reply
    chunk_size: Annotated[int, Ge(1)] = 1000
    chunk_delay: Duration = 0.0
    concurrency: Annotated[int, Ge(1), Le(256)] = 1
    rate: RateList = field(default_factory=list)
    turbo: bool = False
    max_recipients: Annotated[int, Ge(1)] = 100
    backoff: Duration = 30.0  # first pause when the upstream says "too many"; doubles

    def __post_init__(self) -> None:
        sources = [k for k in ("password", "password_env", "password_file") if getattr(self, k)]
        if len(sources) > 1:
            raise ValueError(f"give the password one way, not {' and '.join(sources)}")
        if sources and not self.username:
            raise ValueError(f"{sources[0]} is set but username is not")
        if self.username and self.tls == "none" and not self.allow_plaintext_auth:
            raise ValueError(
                "username with tls = 'none' would send the password in the clear;"
                " use tls = 'starttls' or 'ssl', or set allow_plaintext_auth = true"
            )
        if self.ca_file is not None:
            if not self.ca_file.is_file():
                raise ValueError(f"ca_file {self.ca_file} is not a readable file")
            try:  # now, not at the first delivery (or in the delivery process)
                ssl.create_default_context(cafile=str(self.ca_file))
            except (ssl.SSLError, OSError) as error:
                raise ValueError(
                    f"ca_file {self.ca_file} holds no usable PEM certificates: {error}"
                ) from None

    @property
    def effective_port(self) -> int:
        return self.port or DEFAULT_PORTS[self.tls]

    def resolve_password(self, environ: Mapping[str, str]) -> str | None:
        """The AUTH password from wherever the config says; ConfigError if it is missing."""
        if self.password_env:
            value = environ.get(self.password_env)
            if value is None:
                raise ConfigError(f"password_env: ${self.password_env} is not set")
            return value
        if self.password_file:
            try:
                return self.password_file.read_text(encoding="utf-8").strip("\r\n")
            except OSError as error:
                raise ConfigError(
                    f"password_file: cannot read {self.password_file}: {error.strerror}"
                ) from None
        return self.password


def _nameservers(value: object) -> object:
    """ "127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:53": port 53 unless given."""
    items = _one_or_many(value)
    if not isinstance(items, list):
        return items
    parsed = []
    for item in items:
        if not isinstance(item, str):
            parsed.append(item)
            continue
        try:
            ipaddress.ip_address(item)
            parsed.append(ListenAddress(host=item, port=53))
        except ValueError:
            address = ListenAddress.parse(item)
            if address.tls:
                raise ValueError(f"{item!r}: DNS servers are not reached over ssl://") from None
            ipaddress.ip_address(address.host)  # a resolver is named by its address
            parsed.append(address)
    return parsed


@dataclass(frozen=True)
class DnsConfig:
    """The resolver for direct delivery. Default: the system's (/etc/resolv.conf)."""

    __pydantic_config__: ClassVar = SECTION
    nameservers: Annotated[list[ListenAddress], Before(_nameservers)] = field(default_factory=list)
    timeout: Annotated[Duration, Gt(0)] = 5.0


@dataclass(frozen=True)
class DirectConfig:
    """Direct delivery to each recipient's MX hosts (AY Mail's "Send Direct")."""

    __pydantic_config__: ClassVar = SECTION
    workers: Annotated[int, Ge(1), Le(256)] = 32  # connections in all, idle ones included
    per_domain: Annotated[int, Ge(1)] = 5  # connections to one destination domain
    helo_name: str | None = None  # default: this host's fully qualified name
    port: Port = 25
    tls: Literal["opportunistic", "require", "verify"] = "opportunistic"
    timeout: Annotated[Duration, Gt(0)] = 60.0
    data_timeout: Annotated[Duration, Gt(0)] = 600.0
    max_recipients: Annotated[int, Ge(1)] = 100


@dataclass(frozen=True)
class DeliveryConfig:
    __pydantic_config__: ClassVar = SECTION
    retry_schedule: Annotated[list[Duration], MinLen(1)] = field(
        default_factory=lambda: [300.0, 600.0, 1200.0, 2400.0, 3600.0]
    )
    give_up_after: Duration = 5 * 86400.0


def _windows(window: list[str]) -> list[str]:
    for text in window:
        Window.parse(text)
    return window


def _timezone(timezone: str) -> str:
    zone_named(timezone)
    return timezone


def _job_name(job: str | None) -> str | None:
    return None if job is None else valid_job_name(job)


@dataclass(frozen=True)
class RouteConfig:
    """Where a recipient's mail goes and at what pace. `mode = "track"` is AY Track: a
    durable background job sent onward `via` a relay or direct, inside weekly `window`s,
    at an evenly spaced `rate`, retrying every `retry_every` for `give_up_after`."""

    __pydantic_config__: ClassVar = SECTION
    mode: Literal["relay", "direct", "track"]
    relay: str | None = None
    passthrough: bool = False  # relay only: the client gets the upstream's own replies
    via: str | None = None  # track only: a relay's name, or "direct"
    window: Annotated[StrList, After(_windows)] = field(default_factory=list)  # none: any time
    timezone: Annotated[str, After(_timezone)] = "local"  # an IANA name, or the system's zone
    rate: Annotated[Rate, Before(Rate.parse)] | None = None  # track only
    hold: bool = False  # new jobs wait for `smtpgate job release`
    # The job of mail without X-Smtpgate-Job; else one job per route and day.
    job: Annotated[str | None, After(_job_name)] = None
    bounce: bool = False  # a DSN to the sender when a recipient finally fails
    retry_every: Annotated[Duration, Gt(0)] | None = None  # track default: 1h
    retry_schedule: Annotated[list[Duration], MinLen(1)] | None = None
    give_up_after: Duration | None = None

    def __post_init__(self) -> None:
        if self.mode == "relay" and not self.relay:
            raise ValueError("a route with mode = 'relay' needs relay = 'NAME' of a [relays.NAME]")
        if self.mode != "relay" and self.relay:
            raise ValueError(f"relay is only allowed with mode = 'relay', not {self.mode!r}")
        if self.mode != "relay" and self.passthrough:
            raise ValueError("passthrough = true needs mode = 'relay'")
        if self.mode == "track" and not self.via:
            raise ValueError(
                "a route with mode = 'track' needs via = 'NAME' of a [relays.NAME], or 'direct'"
            )
        if self.mode != "track":
            pacing = [k for k in ("via", "window", "rate") if getattr(self, k)]
            if pacing:
                raise ValueError(
                    f"{' and '.join(pacing)} {'need' if len(pacing) > 1 else 'needs'}"
                    " mode = 'track'"
                )
        if self.passthrough and self.hold:
            raise ValueError("hold = true cannot work with passthrough = true")
        if self.retry_every is not None and self.retry_schedule is not None:
            raise ValueError("give retry_every or retry_schedule, not both")

    def schedule(self) -> list[float] | None:
        """This route's own retry schedule; None defers to [delivery]."""
        if self.retry_every is not None:
            return [self.retry_every]
        if self.retry_schedule is None and self.mode == "track":
            return [3600.0]
        return self.retry_schedule


JOB_NAME_MAX = 100
_JOB_NAME = re.compile(r"^[\w.@+:=-]+(?: [\w.@+:=-]+)*$")


def valid_job_name(name: str) -> str:
    """Job names appear in commands, URLs and CSV files: letters, digits, single spaces
    and . _ - @ + : = only."""
    name = name.strip()
    if not name or len(name) > JOB_NAME_MAX or not _JOB_NAME.match(name):
        raise ValueError(
            f"{name[:JOB_NAME_MAX]!r} is not a job name: use up to {JOB_NAME_MAX} letters,"
            " digits, single spaces and . _ - @ + : ="
        )
    return name


@dataclass(frozen=True)
class RuleConfig:
    """First match wins; every condition given must hold, a list matches any of its items."""

    __pydantic_config__: ClassVar = SECTION
    route: str
    sender: StrList | None = None
    recipient_domain: StrList | None = None
    client: NetworkList | None = None
    header: StrList | None = None  # values of X-Smtpgate-Route
    auth_user: StrList | None = None  # AUTH user names; no client without AUTH matches


class DefaultHttpListen(list[ListenAddress]):
    """[http] listen when the config does not name one. Finding this port taken is no
    reason to stop the mail (see server.py); finding a named one taken is."""


@dataclass(frozen=True)
class HttpConfig:
    """The monitoring HTTP interface: JSON API, web page, /metrics, /healthz, /readyz.

    Invariant: an address other hosts can reach is served only with a bearer token, so a
    config that says otherwise is refused at load time, before anything listens."""

    __pydantic_config__: ClassVar = SECTION
    listen: ListenList = field(
        default_factory=lambda: DefaultHttpListen([ListenAddress(host="127.0.0.1", port=8025)])
    )
    token_env: Annotated[str, MinLen(1)] | None = None
    token_file: Path | None = None

    def __post_init__(self) -> None:
        if self.token_env and self.token_file:
            raise ValueError("give the token one way, not token_env and token_file")
        if any(a.tls for a in self.listen):
            raise ValueError(
                "listen: ssl:// is not served over TLS by the HTTP interface; listen on"
                " loopback, or put a TLS proxy in front of it"
            )
        exposed = [str(a) for a in self.listen if not a.is_loopback()]
        if exposed and not (self.token_env or self.token_file):
            raise ValueError(
                f"listen: {', '.join(exposed)} can be reached from other hosts, and the API"
                " can cancel jobs; set token_env or token_file to require a bearer token,"
                ' or listen on loopback only ("127.0.0.1:8025")'
            )

    def resolve_token(self, environ: Mapping[str, str]) -> str | None:
        """The bearer token from wherever the config says; ConfigError if it is missing
        or empty (an empty token would let anyone in)."""
        if self.token_env:
            value = environ.get(self.token_env, "")
            where = f"token_env: ${self.token_env}"
        elif self.token_file:
            try:
                value = self.token_file.read_text(encoding="utf-8").strip()
            except OSError as error:
                raise ConfigError(
                    f"http.token_file: cannot read {self.token_file}: {error.strerror}"
                ) from None
            where = f"token_file: {self.token_file}"
        else:
            return None
        if not value.strip():
            raise ConfigError(f"http.{where} is not set or empty")
        return value.strip()


@dataclass(frozen=True)
class LogConfig:
    __pydantic_config__: ClassVar = SECTION
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


@dataclass(frozen=True)
class Config:
    __pydantic_config__: ClassVar = SECTION
    server: ServerConfig = field(default_factory=ServerConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    log: LogConfig = field(default_factory=LogConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    direct: DirectConfig = field(default_factory=DirectConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    relays: dict[str, RelayConfig] = field(default_factory=dict)
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    rules: list[RuleConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        implicit = [str(a) for a in self.server.listen if a.tls]
        if implicit and self.server.tls.cert_file is None:
            raise ValueError(
                f"server.listen: {', '.join(implicit)} speaks TLS, but there is no"
                " certificate: set cert_file and key_file in [server.tls]"
            )
        if BUILTIN_DIRECT_ROUTE not in self.routes:
            self.routes[BUILTIN_DIRECT_ROUTE] = RouteConfig(mode="direct")
        for name, route in self.routes.items():
            if route.relay and route.relay not in self.relays:
                raise ValueError(
                    f"routes.{name}.relay: no [relays.{route.relay}] is defined"
                    f" (defined: {', '.join(self.relays) or 'none'})"
                )
            if route.via and route.via != BUILTIN_DIRECT_ROUTE and route.via not in self.relays:
                raise ValueError(
                    f"routes.{name}.via: no [relays.{route.via}] is defined; name a relay"
                    f" ({', '.join(self.relays) or 'none defined'}) or 'direct'"
                )
        if self.server.default_route not in self.routes:
            raise ValueError(
                f"server.default_route: no route {self.server.default_route!r}"
                f" (defined: {', '.join(self.routes)})"
            )
        for index, rule in enumerate(self.rules):
            if rule.route not in self.routes:
                raise ValueError(
                    f"rules[{index}].route: no route {rule.route!r}"
                    f" (defined: {', '.join(self.routes)})"
                )

    def relay_passwords(self, environ: Mapping[str, str]) -> dict[str, str | None]:
        """Every relay's AUTH password, or one ConfigError naming the relay that lacks it."""
        passwords = {}
        for name, relay in self.relays.items():
            try:
                passwords[name] = relay.resolve_password(environ)
            except ConfigError as error:
                raise ConfigError(f"relays.{name}.{error}") from None
        return passwords

    def warnings(self) -> list[str]:
        """Things that work but should not be so, for `config check`."""
        return [
            f"relays.{name}.password is written in the config file; prefer password_env"
            " or password_file so the secret stays out of the file"
            for name, relay in self.relays.items()
            if relay.password
        ]

    def state_dir(self) -> Path:
        if self.server.state_dir is None:
            raise ConfigError("server.state_dir is not set")  # set by load(); a bug otherwise
        return self.server.state_dir

    def users_path(self) -> Path:
        """The users file for AUTH, whether or not it exists yet."""
        return self.server.auth.users_file or self.state_dir() / USERS_FILE_NAME

    def spool_path(self) -> Path:
        if self.spool.url:
            return Path(self.spool.url.removeprefix("sqlite:///"))
        return self.state_dir() / "spool.db"

    def retry_policy(self, route: str) -> tuple[list[float], float]:
        """The retry schedule and lifetime of a route: its own, else [delivery]'s."""
        config = self.routes[route]
        schedule = config.schedule() or self.delivery.retry_schedule
        give_up = config.give_up_after
        return schedule, self.delivery.give_up_after if give_up is None else give_up
