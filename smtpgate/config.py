"""Config: one TOML file, embedded defaults, and environment overrides.

The CLI loads it once and hands the validated `Config` to the server; every default lives
here and nowhere else. A bad file becomes one `ConfigError` naming the key, never a traceback.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
import ssl
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from smtpgate.windows import Window, zone_named

ENV_PREFIX = "SMTPGATE_"
DEFAULT_CONFIG_NAME = "smtpgate.toml"
BUILTIN_DIRECT_ROUTE = "direct"
SECRET_KEYS = frozenset({"password", "token"})
IMPLICIT_TLS_SCHEME = "ssl://"
USERS_FILE_NAME = "users"  # in the state directory, unless server.auth.users_file says


class ConfigError(Exception):
    """A config problem a person must fix; the message names the key and what is allowed."""


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


Duration = Annotated[float, BeforeValidator(parse_duration)]
Size = Annotated[int, BeforeValidator(parse_size)]
Port = Annotated[int, Field(ge=1, le=65535)]


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


StrList = Annotated[list[str], BeforeValidator(_one_or_many)]
NetworkList = Annotated[
    list[ipaddress.IPv4Network | ipaddress.IPv6Network], BeforeValidator(_one_or_many)
]


class ListenAddress(BaseModel):
    """One listening socket, written 'host:port' or '[v6]:port'; an 'ssl://' prefix makes
    it speak TLS from the first byte (implicit TLS, RFC 8314: the submission port 465)."""

    model_config = ConfigDict(frozen=True, defer_build=True)
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


# --- sections ---------------------------------------------------------------------------


class _Section(BaseModel):
    # coerce_numbers_to_str: SMTPGATE_SERVER__HOSTNAME=123 reads as TOML 123, still a name.
    model_config = ConfigDict(
        extra="forbid", frozen=True, coerce_numbers_to_str=True, defer_build=True
    )


class ListenerTlsConfig(_Section):
    """The listener's certificate: with one, plain listeners offer STARTTLS and ssl://
    listeners speak TLS; AUTH is offered only over TLS."""

    cert_file: Path | None = None  # PEM: the certificate, then any intermediates
    key_file: Path | None = None  # PEM; default: the key is in cert_file

    @field_validator("cert_file", "key_file")
    @classmethod
    def _exists(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a readable file")
        return path

    @model_validator(mode="after")
    def _pair(self) -> ListenerTlsConfig:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file is set but cert_file is not")
        return self


class AuthConfig(_Section):
    """AUTH on the listener (PLAIN, LOGIN; over TLS only), and the limits on guessing."""

    users_file: Path | None = None  # default: <state_dir>/users; AUTH is on when it exists
    max_auth_failures: int = Field(default=5, ge=1)  # per client address in failure_window
    failure_window: Annotated[Duration, Field(gt=0)] = 900.0
    max_session_attempts: int = Field(default=3, ge=1)  # failed AUTHs in one session
    tarpit_after: int = Field(default=3, ge=0)  # failures before replies slow down
    tarpit_delay: Duration = 1.0  # the first delay; doubles with each further failure
    tarpit_max_delay: Duration = 15.0

    @model_validator(mode="after")
    def _delays(self) -> AuthConfig:
        if self.tarpit_max_delay < self.tarpit_delay:
            raise ValueError("tarpit_max_delay must not be less than tarpit_delay")
        return self


class ServerConfig(_Section):
    listen: Annotated[list[ListenAddress], BeforeValidator(_listen_list)] = Field(
        default_factory=lambda: [ListenAddress(host="127.0.0.1", port=2525)], min_length=1
    )
    hostname: str = Field(default_factory=socket.gethostname, min_length=1)
    state_dir: Path | None = None
    max_message_size: Annotated[Size, Field(gt=0)] = 25 * 1024**2
    max_recipients: int = Field(default=1000, ge=1)
    max_connections: int = Field(default=100, ge=1)
    max_connections_per_client: int = Field(default=20, ge=1)
    max_errors: int = Field(default=20, ge=1)  # error replies in a session, then 421
    max_commands: int = Field(default=10000, ge=1)  # commands since the last message, then 421
    max_hops: int = Field(default=50, ge=1)  # Received: fields before a loop is assumed
    min_free_space: Size = 100 * 1024**2  # below this MAIL gets 452 4.3.1
    bare_line_ends: Literal["fix", "refuse"] = "fix"
    allow_percent_hack: bool = False
    idle_timeout: Annotated[Duration, Field(gt=0)] = 300.0  # RFC 5321 4.5.3.2.7: 5 minutes
    trusted_networks: NetworkList = Field(
        default_factory=lambda: [
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
        ]
    )
    default_route: str = BUILTIN_DIRECT_ROUTE
    # A garbled X-Smtpgate-Send-At: refuse the message at DATA, or send it now and log it.
    invalid_send_at: Literal["refuse", "send_now"] = "refuse"
    # Where the delivery side (scheduler and transports) runs: "inline" in the server's
    # process, "separate" in a delivery process of its own (another CPU core, about 45 MB
    # more memory), "auto" separate where there are two cores or more.
    delivery_process: Literal["auto", "inline", "separate"] = "auto"
    tls: ListenerTlsConfig = Field(default_factory=ListenerTlsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)


class SpoolConfig(_Section):
    url: str | None = None  # default: sqlite:///<state_dir>/spool.db

    @field_validator("url")
    @classmethod
    def _known_backend(cls, url: str | None) -> str | None:
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


class Rate(BaseModel):
    """At most `count` messages in any `window` seconds, written "30/min"."""

    model_config = ConfigDict(frozen=True, defer_build=True)
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


RateList = Annotated[
    list[Annotated[Rate, BeforeValidator(Rate.parse)]], BeforeValidator(_one_or_many)
]
DEFAULT_PORTS = {"none": 25, "starttls": 587, "ssl": 465}


class RelayConfig(_Section):
    """An upstream SMTP server. Every option of AY Mail's "Send through the following SMTP
    server" maps here: see config/smtpgate.toml."""

    host: str = Field(min_length=1)
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
    chunk_size: int = Field(default=1000, ge=1)
    chunk_delay: Duration = 0.0
    concurrency: int = Field(default=1, ge=1, le=256)
    rate: RateList = Field(default_factory=list)
    turbo: bool = False
    max_recipients: int = Field(default=100, ge=1)
    backoff: Duration = 30.0  # first pause when the upstream says "too many"; doubles

    @model_validator(mode="after")
    def _consistent(self) -> RelayConfig:
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
        return self

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


class DnsConfig(_Section):
    """The resolver for direct delivery. Default: the system's (/etc/resolv.conf)."""

    nameservers: Annotated[list[ListenAddress], BeforeValidator(_nameservers)] = Field(
        default_factory=list
    )
    timeout: Annotated[Duration, Field(gt=0)] = 5.0


class DirectConfig(_Section):
    """Direct delivery to each recipient's MX hosts (AY Mail's "Send Direct")."""

    workers: int = Field(default=32, ge=1, le=256)  # connections in all, idle ones included
    per_domain: int = Field(default=5, ge=1)  # connections to one destination domain
    helo_name: str | None = None  # default: this host's fully qualified name
    port: Port = 25
    tls: Literal["opportunistic", "require", "verify"] = "opportunistic"
    timeout: Annotated[Duration, Field(gt=0)] = 60.0
    data_timeout: Annotated[Duration, Field(gt=0)] = 600.0
    max_recipients: int = Field(default=100, ge=1)


class DeliveryConfig(_Section):
    retry_schedule: list[Duration] = Field(
        default_factory=lambda: [300.0, 600.0, 1200.0, 2400.0, 3600.0], min_length=1
    )
    give_up_after: Duration = 5 * 86400.0


class RouteConfig(_Section):
    """Where a recipient's mail goes and at what pace. `mode = "track"` is AY Track: a
    durable background job sent onward `via` a relay or direct, inside weekly `window`s,
    at an evenly spaced `rate`, retrying every `retry_every` for `give_up_after`."""

    mode: Literal["relay", "direct", "track"]
    relay: str | None = None
    passthrough: bool = False  # relay only: the client gets the upstream's own replies
    via: str | None = None  # track only: a relay's name, or "direct"
    window: StrList = Field(default_factory=list)  # track only; none: any time
    timezone: str = "local"  # of the windows: an IANA name, or the system's zone
    rate: Annotated[Rate, BeforeValidator(Rate.parse)] | None = None  # track only
    hold: bool = False  # new jobs wait for `smtpgate job release`
    job: str | None = None  # the job of mail without X-Smtpgate-Job; else route-and-day
    bounce: bool = False  # a DSN to the sender when a recipient finally fails
    retry_every: Annotated[Duration, Field(gt=0)] | None = None  # track default: 1h
    retry_schedule: list[Duration] | None = Field(default=None, min_length=1)
    give_up_after: Duration | None = None

    @model_validator(mode="after")
    def _consistent(self) -> RouteConfig:
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
        return self

    @field_validator("window")
    @classmethod
    def _windows(cls, window: list[str]) -> list[str]:
        for text in window:
            Window.parse(text)
        return window

    @field_validator("timezone")
    @classmethod
    def _timezone(cls, timezone: str) -> str:
        zone_named(timezone)
        return timezone

    @field_validator("job")
    @classmethod
    def _job_name(cls, job: str | None) -> str | None:
        return None if job is None else valid_job_name(job)

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


class RuleConfig(_Section):
    """First match wins; every condition given must hold, a list matches any of its items."""

    route: str
    sender: StrList | None = None
    recipient_domain: StrList | None = None
    client: NetworkList | None = None
    header: StrList | None = None  # values of X-Smtpgate-Route
    auth_user: StrList | None = None  # AUTH user names; no client without AUTH matches


class HttpConfig(_Section):
    """The monitoring HTTP interface: JSON API, web page, /metrics, /healthz, /readyz.

    Invariant: an address other hosts can reach is served only with a bearer token, so a
    config that says otherwise is refused at load time, before anything listens."""

    listen: Annotated[list[ListenAddress], BeforeValidator(_listen_list)] = Field(
        default_factory=lambda: [ListenAddress(host="127.0.0.1", port=8025)]
    )
    token_env: str | None = Field(default=None, min_length=1)
    token_file: Path | None = None

    @model_validator(mode="after")
    def _token_where_reachable(self) -> HttpConfig:
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
        return self

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


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "console", "json"] = "auto"


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig)
    spool: SpoolConfig = Field(default_factory=SpoolConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    delivery: DeliveryConfig = Field(default_factory=DeliveryConfig)
    direct: DirectConfig = Field(default_factory=DirectConfig)
    dns: DnsConfig = Field(default_factory=DnsConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    relays: dict[str, RelayConfig] = Field(default_factory=dict)
    routes: dict[str, RouteConfig] = Field(default_factory=dict)
    rules: list[RuleConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references_resolve(self) -> Config:
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
        return self

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


# --- loading ----------------------------------------------------------------------------


def find_config_file(explicit: str | None, environ: Mapping[str, str]) -> Path | None:
    """--config, then SMTPGATE_CONFIG, then ./smtpgate.toml; None means embedded defaults."""
    if explicit:
        return Path(explicit)
    if environ.get("SMTPGATE_CONFIG"):
        return Path(environ["SMTPGATE_CONFIG"])
    local = Path(DEFAULT_CONFIG_NAME)
    return local if local.is_file() else None


def default_state_dir(environ: Mapping[str, str]) -> Path:
    """$SMTPGATE_STATE_DIR, else the XDG state directory ($XDG_STATE_HOME/smtpgate)."""
    if environ.get("SMTPGATE_STATE_DIR"):
        return Path(environ["SMTPGATE_STATE_DIR"])
    if environ.get("XDG_STATE_HOME"):
        return Path(environ["XDG_STATE_HOME"]) / "smtpgate"
    import platformdirs

    return Path(platformdirs.user_state_dir("smtpgate", appauthor=False))


def load(
    path: Path | None,
    *,
    environ: Mapping[str, str] | None = None,
    state_dir: str | None = None,
) -> Config:
    """Read, override from the environment, validate. Raises ConfigError with a clear text."""
    environ = os.environ if environ is None else environ
    raw: dict[str, Any] = {}
    where = "embedded defaults"
    if path is not None:
        where = str(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"{path}: cannot read: {error}") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML: {error}") from None
    overrides = apply_environment(raw, environ)
    if overrides:
        where += f" with {', '.join(overrides)}"
    server = raw.setdefault("server", {})
    if not isinstance(server, dict):
        raise ConfigError(f"{where}: server: expected a table [server]")
    if state_dir:
        server["state_dir"] = state_dir
    elif "state_dir" not in server:
        server["state_dir"] = str(default_state_dir(environ))
    try:
        return Config.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: " + describe(error)) from None


def apply_environment(raw: dict[str, Any], environ: Mapping[str, str]) -> list[str]:
    """SMTPGATE_RELAYS__CORP__HOST=x sets relays.corp.host; values parse as TOML when they can.
    Returns the names of the variables applied, for error messages."""
    applied = []
    for name, text in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        keys = [part.lower() for part in name[len(ENV_PREFIX) :].split("__")]
        if not all(keys):
            raise ConfigError(f"{name}: empty key in environment override")
        table = raw
        for key in keys[:-1]:
            table = table.setdefault(key, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{name}: {key} is not a table and cannot hold {keys[-1]}")
        table[keys[-1]] = _env_value(text)
        applied.append(name)
    return applied


def _env_value(text: str) -> object:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def describe(error: ValidationError) -> str:
    """Pydantic's errors as 'key.path: what is wrong' lines, naming allowed keys."""
    lines = []
    for item in error.errors():
        location = _dotted(item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(item["loc"][:-1])
            message = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif item["type"] == "missing":
            message = "required key is missing"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if "input" in item and not isinstance(item["input"], dict | list):
                message += f" (got {item['input']!r})"
        lines.append(f"{location}: {message}" if location else message)
    return "\n  ".join(lines)


def _dotted(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part.startswith(("function-", "list[", "lax-", "json-")):
            continue  # pydantic's internal validator names, not keys
        else:
            text += f".{part}" if text else part
    return text


def _allowed_keys(loc: tuple[int | str, ...]) -> list[str]:
    """Walk the model along loc to list the keys that table accepts."""
    current: Any = Config
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return []
            current = field.annotation
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = members[0]
        else:
            return annotation


def masked(config: Config) -> dict[str, Any]:
    """The effective config as plain data, secrets masked, for `config check`."""
    data: dict[str, Any] = _mask(config.model_dump(mode="json"))
    return data


def _mask(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: "********" if k in SECRET_KEYS and v else _mask(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_mask(v) for v in data]
    return data
