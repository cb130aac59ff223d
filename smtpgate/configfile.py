"""The config file: from TOML and SMTPGATE_* variables to a validated `Config`.

The only module that imports pydantic, so the delivery process, which receives its Config
already validated, never pays for it. What each key means and allows is in config.py.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from smtpgate.config import Config, ConfigError

ENV_PREFIX = "SMTPGATE_"
DEFAULT_CONFIG_NAME = "smtpgate.toml"
SECRET_KEYS = frozenset({"password", "token"})


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
    return validate(raw, where)


def validate(raw: Mapping[str, Any], where: str = "config") -> Config:
    """A Config from plain data (a parsed TOML file); ConfigError says what is wrong."""
    try:
        return _adapter().validate_python(raw)
    except ValidationError as error:
        raise ConfigError(f"{where}: " + describe(error)) from None


def _adapter() -> TypeAdapter[Config]:
    """Built for each use and then dropped: a server validates its config once, and the
    5 MB the validator takes are better left free for the mail."""
    return TypeAdapter(Config)


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
        if item["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            allowed = _allowed_keys(item["loc"][:-1])
            message = "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
        elif item["type"] in ("missing", "missing_argument"):
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
    """Walk the sections along loc to list the keys that table accepts."""
    current: Any = Config
    for part in loc:
        current = _unwrap(current)
        if dataclasses.is_dataclass(current):
            current = typing.get_type_hints(current, include_extras=True).get(str(part))
            if current is None:
                return []
        elif typing.get_origin(current) in (dict, list):
            current = typing.get_args(current)[-1]
        else:
            return []
    current = _unwrap(current)
    if dataclasses.is_dataclass(current):
        return [f.name for f in dataclasses.fields(current)]
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
    data: dict[str, Any] = _mask(_adapter().dump_python(config, mode="json"))
    return data


def _mask(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: "********" if k in SECRET_KEYS and v else _mask(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_mask(v) for v in data]
    return data
