"""smtpgate.config: human units, the TOML file, embedded defaults, environment overrides."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import pytest

from smtpgate.config import Config, ConfigError, ListenAddress, parse_duration, parse_size
from smtpgate.configfile import load, masked

# --- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("5m", 300.0),
        ("5min", 300.0),
        ("1h", 3600.0),
        ("5d", 432000.0),
        ("1w", 604800.0),
        ("250ms", 0.25),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        ("45", 45.0),  # no unit: seconds
        ("2H", 7200.0),  # units are case-insensitive
        (30, 30.0),
        (2.5, 2.5),
        (0, 0.0),
    ],
)
def test_duration_in_human_units(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["5x", "10 fortnights", "3y"])
def test_duration_with_unknown_unit_names_the_unit(text: str) -> None:
    with pytest.raises(ValueError, match="unknown duration unit"):
        parse_duration(text)


@pytest.mark.parametrize("value", [-1, -0.5])
def test_negative_duration_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [True, False, None, "", "h", "-5s", "five minutes", [5]])
def test_not_a_duration(value: object) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(value)


# --- sizes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("25MB", 25 * 1024**2),
        ("25mb", 25 * 1024**2),
        ("512KiB", 512 * 1024),
        ("512k", 512 * 1024),
        ("1GB", 1024**3),
        ("2MiB", 2 * 1024**2),
        ("100B", 100),
        ("100", 100),
        ("1.5KB", 1536),
        (4096, 4096),
    ],
)
def test_size_in_human_units(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["25XB", "10 pages", "1TB"])
def test_size_with_unknown_unit_names_the_unit(text: str) -> None:
    with pytest.raises(ValueError, match="unknown size unit"):
        parse_size(text)


def test_negative_size_is_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        parse_size(-1)


@pytest.mark.parametrize("value", [True, None, "", "MB", [1]])
def test_not_a_size(value: object) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(value)


# --- listen addresses ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("[::1]:25", "::1", 25),
        ("0.0.0.0:587", "0.0.0.0", 587),
        ("127.0.0.1:2525", "127.0.0.1", 2525),
        ("mail.example.com:465", "mail.example.com", 465),
        ("  localhost:2525 ", "localhost", 2525),
    ],
)
def test_listen_address_parse(text: str, host: str, port: int) -> None:
    address = ListenAddress.parse(text)
    assert (address.host, address.port) == (host, port)


@pytest.mark.parametrize("text", ["[::1]:25", "0.0.0.0:587", "ssl://0.0.0.0:465", "ssl://[::]:465"])
def test_listen_address_prints_as_written(text: str) -> None:
    assert str(ListenAddress.parse(text)) == text


@pytest.mark.parametrize(
    ("text", "tls"),
    [("ssl://0.0.0.0:465", True), ("SSL://[::1]:465", True), ("0.0.0.0:465", False)],
)
def test_listen_address_ssl_prefix_means_implicit_tls(text: str, tls: bool) -> None:
    assert ListenAddress.parse(text).tls is tls


@pytest.mark.parametrize("text", ["tls://0.0.0.0:465", "ssl://", "ssl://ssl://h:1", "ssl:/h:1"])
def test_listen_address_other_schemes_are_bad(text: str) -> None:
    with pytest.raises(ValueError, match="is not 'host:port'"):
        ListenAddress.parse(text)


def test_a_dns_server_is_not_reached_over_ssl(tmp_path: Path) -> None:
    path = write(tmp_path, '[dns]\nnameservers = ["ssl://127.0.0.1:853"]\n')
    with pytest.raises(ConfigError) as caught:
        load(path, environ={}, state_dir=str(tmp_path))
    assert "dns.nameservers: 'ssl://127.0.0.1:853': DNS servers are not reached" in str(
        caught.value
    )


def test_the_http_interface_is_not_offered_on_ssl_listeners(tmp_path: Path) -> None:
    """It would be served in the clear, bearer token and all."""
    path = write(tmp_path, '[http]\nlisten = ["ssl://127.0.0.1:8443"]\n')
    with pytest.raises(ConfigError, match="http: listen: ssl:// is not served over TLS"):
        load(path, environ={}, state_dir=str(tmp_path))


@pytest.mark.parametrize("text", ["::1:25", "localhost", "host:", ":25", "[::1]", "host:port"])
def test_listen_address_bad(text: str) -> None:
    with pytest.raises(ValueError, match="is not 'host:port'"):
        ListenAddress.parse(text)


def test_listen_address_port_out_of_range() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ListenAddress.parse("127.0.0.1:70000")


@pytest.mark.parametrize(
    ("text", "loopback"),
    [
        ("127.0.0.1:25", True),
        ("127.1.2.3:25", True),
        ("[::1]:25", True),
        ("localhost:25", True),
        ("0.0.0.0:25", False),
        ("[::]:25", False),
        ("192.168.1.10:25", False),
        ("mail.example.com:25", False),  # a name could resolve anywhere
    ],
)
def test_listen_address_loopback(text: str, loopback: bool) -> None:
    assert ListenAddress.parse(text).is_loopback() is loopback


# --- load: the file and the embedded defaults ---------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smtpgate.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str, **environ: str) -> Config:
    return load(write(tmp_path, text), environ=environ, state_dir=str(tmp_path / "state"))


def test_embedded_defaults(tmp_path: Path) -> None:
    config = load(None, environ={"SMTPGATE_STATE_DIR": str(tmp_path)})
    assert config.server.listen == [ListenAddress(host="127.0.0.1", port=2525)]
    assert config.server.default_route == "direct"
    assert config.routes["direct"].mode == "direct"
    assert config.server.max_message_size == 25 * 1024**2
    assert ipaddress.ip_network("127.0.0.0/8") in config.server.trusted_networks
    assert ipaddress.ip_network("::1/128") in config.server.trusted_networks
    assert config.state_dir() == tmp_path
    assert config.spool_path() == tmp_path / "spool.db"


@pytest.mark.skipif(sys.platform != "linux", reason="XDG_STATE_HOME is the Linux convention")
def test_embedded_defaults_use_the_xdg_state_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    config = load(None, environ={})
    assert config.state_dir() == tmp_path / "xdg" / "smtpgate"
    assert config.spool_path().parent == config.state_dir()


def test_a_file_with_every_section(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [server]
        listen = ["127.0.0.1:2525", "[::1]:2525"]
        max_message_size = "10MB"
        idle_timeout = "10m"
        trusted_networks = "10.0.0.0/8"
        default_route = "corp"

        [relays.corp]
        host = "smtp.example.com"
        port = 587

        [routes.corp]
        mode = "relay"
        relay = "corp"

        [[rules]]
        route = "direct"
        recipient_domain = "example.org"
        """,
    )
    assert config.server.listen == [
        ListenAddress.parse("127.0.0.1:2525"),
        ListenAddress.parse("[::1]:2525"),
    ]
    assert config.server.max_message_size == 10 * 1024**2
    assert config.server.idle_timeout == 600.0
    assert config.server.trusted_networks == [ipaddress.ip_network("10.0.0.0/8")]
    assert config.relays["corp"].port == 587
    assert config.routes["corp"].relay == "corp"
    assert "direct" in config.routes  # the builtin route is still there
    assert config.rules[0].recipient_domain == ["example.org"]  # one string is a list of one


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such config file") as caught:
        load(path, environ={})
    assert str(path) in str(caught.value)


def test_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML") as caught:
        load_text(tmp_path, "[server\nlisten = 1\n")
    assert "smtpgate.toml" in str(caught.value)
    assert "line 1" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "key", "allowed"),
    [
        ("colour = 'blue'\n", "colour", ["server", "relays", "routes", "rules", "delivery"]),
        ("[server]\nlisten_on = 1\n", "server.listen_on", ["listen", "trusted_networks"]),
        (
            "[relays.x]\nhost = 'a'\nhots = 'b'\n",
            "relays.x.hots",
            ["host", "port", "timeout", "data_timeout"],
        ),
        ("[[rules]]\nroute = 'direct'\nsendr = 'a'\n", "rules[0].sendr", ["sender", "client"]),
    ],
)
def test_unknown_key_is_named_with_the_allowed_keys(
    tmp_path: Path, text: str, key: str, allowed: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, text)
    message = str(caught.value)
    assert f"{key}: unknown key" in message
    allowed_text = message.split("allowed:", 1)[1]
    for name in allowed:
        assert name in allowed_text


def test_wrong_type_names_the_dotted_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, "[relays.x]\nhost = 'smtp.example.com'\nport = 'abc'\n")
    message = str(caught.value)
    assert "relays.x.port" in message
    assert "'abc'" in message
    assert "Traceback" not in message


def test_bad_duration_in_file_names_key_and_units(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.give_up_after: unknown duration unit"):
        load_text(tmp_path, "[delivery]\ngive_up_after = '5 years'\n")


def test_bad_listen_address_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.listen: 'everywhere' is not"):
        load_text(tmp_path, "[server]\nlisten = ['everywhere']\n")


def test_relay_route_without_relay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"routes\.corp: .*needs relay = 'NAME'"):
        load_text(tmp_path, "[routes.corp]\nmode = 'relay'\n")


def test_relay_only_with_mode_relay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="relay is only allowed with mode = 'relay'"):
        load_text(
            tmp_path,
            "[relays.corp]\nhost = 'a'\n[routes.corp]\nmode = 'direct'\nrelay = 'corp'\n",
        )


def test_a_ca_file_without_certificates_is_refused_at_load(tmp_path: Path) -> None:
    """Not at the first delivery, in a process whose traceback nobody reads."""
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("this is not a certificate\n")
    with pytest.raises(ConfigError, match=r"relays\.corp: .*ca\.pem holds no usable PEM"):
        load_text(tmp_path, f"[relays.corp]\nhost = 'a'\ntls = 'ssl'\nca_file = '{not_pem}'\n")


def test_route_naming_an_undefined_relay(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(
            tmp_path,
            "[relays.office]\nhost = 'a'\n[routes.corp]\nmode = 'relay'\nrelay = 'corp'\n",
        )
    message = str(caught.value)
    assert "routes.corp.relay" in message
    assert "[relays.corp]" in message
    assert "office" in message  # what is defined


def test_rule_naming_an_undefined_route(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"rules\[0\]\.route: no route 'bulk'.*direct"):
        load_text(tmp_path, "[[rules]]\nroute = 'bulk'\nsender = '*@news.example.com'\n")


def test_undefined_default_route(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.default_route: no route 'corp'"):
        load_text(tmp_path, "[server]\ndefault_route = 'corp'\n")


def test_only_sqlite_spool_urls(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spool\.url: only 'sqlite:////absolute/path\.db'"):
        load_text(tmp_path, "[spool]\nurl = 'postgresql://db/smtpgate'\n")


def test_relative_sqlite_spool_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spool\.url: the spool path must be absolute"):
        load_text(tmp_path, "[spool]\nurl = 'sqlite:///var/lib/smtpgate/spool.db'\n")
    config = load_text(tmp_path, f"[spool]\nurl = 'sqlite:///{tmp_path}/s.db'\n")
    assert config.spool_path() == tmp_path / "s.db"


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_durations_must_be_finite(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.give_up_after: a duration must be finite"):
        load_text(tmp_path, f"[delivery]\ngive_up_after = {value}\n")


def test_errors_from_the_environment_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"with SMTPGATE_SERVER__BOGUS: server\.bogus"):
        load(None, environ={"SMTPGATE_SERVER__BOGUS": "1"}, state_dir=str(tmp_path))


def test_a_numeric_environment_value_fills_a_text_key(tmp_path: Path) -> None:
    config = load(None, environ={"SMTPGATE_SERVER__HOSTNAME": "123"}, state_dir=str(tmp_path))
    assert config.server.hostname == "123"


# --- environment overrides ----------------------------------------------------------


def test_environment_defines_a_relay(tmp_path: Path) -> None:
    config = load(
        None,
        environ={
            "SMTPGATE_STATE_DIR": str(tmp_path),
            "SMTPGATE_RELAYS__CORP__HOST": "smtp.example.com",
            "SMTPGATE_RELAYS__CORP__PORT": "587",
            "SMTPGATE_ROUTES__CORP__MODE": "relay",
            "SMTPGATE_ROUTES__CORP__RELAY": "corp",
            "SMTPGATE_SERVER__DEFAULT_ROUTE": "corp",
        },
    )
    assert config.relays["corp"].host == "smtp.example.com"
    assert config.relays["corp"].port == 587
    assert config.server.default_route == "corp"


def test_environment_values_parse_as_toml(tmp_path: Path) -> None:
    config = load(
        None,
        environ={
            "SMTPGATE_STATE_DIR": str(tmp_path),
            "SMTPGATE_SERVER__LISTEN": '["127.0.0.1:2600"]',
            "SMTPGATE_SERVER__MAX_RECIPIENTS": "50",
            "SMTPGATE_DELIVERY__RETRY_SCHEDULE": '["1m", "2m"]',
            "SMTPGATE_LOG__FORMAT": "json",  # not TOML: taken as the string
        },
    )
    assert config.server.listen == [ListenAddress(host="127.0.0.1", port=2600)]
    assert config.server.max_recipients == 50
    assert config.delivery.retry_schedule == [60.0, 120.0]
    assert config.log.format == "json"


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[relays.corp]\nhost = 'smtp.example.com'\nport = 25\n",
        SMTPGATE_RELAYS__CORP__PORT="2525",
    )
    assert config.relays["corp"].port == 2525
    assert config.relays["corp"].host == "smtp.example.com"  # the rest of the table stays


def test_environment_key_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"server\.bogus: unknown key"):
        load(None, environ={"SMTPGATE_STATE_DIR": str(tmp_path), "SMTPGATE_SERVER__BOGUS": "1"})


def test_environment_wrong_type(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"relays\.corp\.port"):
        load(
            None,
            environ={
                "SMTPGATE_STATE_DIR": str(tmp_path),
                "SMTPGATE_RELAYS__CORP__HOST": "a",
                "SMTPGATE_RELAYS__CORP__PORT": "submission",
            },
        )


def test_environment_cannot_descend_into_a_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SMTPGATE_SERVER__LISTEN__HOST"):
        load_text(
            tmp_path,
            "[server]\nlisten = '127.0.0.1:2525'\n",
            SMTPGATE_SERVER__LISTEN__HOST="0.0.0.0",
        )


def test_unrelated_environment_is_ignored(tmp_path: Path) -> None:
    config = load(
        None,
        environ={
            "SMTPGATE_STATE_DIR": str(tmp_path),
            "SMTPGATE_DEBUG": "1",
            "HOME": "/x",
            "RELAYS__CORP__HOST": "a",
        },
    )
    assert config.relays == {}


def test_state_dir_precedence(tmp_path: Path) -> None:
    env_dir, file_dir, arg_dir = tmp_path / "env", tmp_path / "file", tmp_path / "arg"
    environ = {"SMTPGATE_STATE_DIR": str(env_dir)}
    with_file = write(tmp_path, f"[server]\nstate_dir = '{file_dir}'\n")

    assert load(None, environ=environ).state_dir() == env_dir
    assert load(None, environ=environ, state_dir=str(arg_dir)).state_dir() == arg_dir
    assert load(with_file, environ=environ).state_dir() == file_dir
    assert load(with_file, environ=environ, state_dir=str(arg_dir)).state_dir() == arg_dir
    assert load(with_file, environ=environ, state_dir=str(arg_dir)).spool_path() == (
        arg_dir / "spool.db"
    )


def test_spool_url_sets_the_spool_path(tmp_path: Path) -> None:
    config = load_text(tmp_path, f"[spool]\nurl = 'sqlite:///{tmp_path}/queue.db'\n")
    assert config.spool_path() == tmp_path / "queue.db"


# --- retry policy -------------------------------------------------------------------


def test_retry_policy_per_route_or_from_delivery(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        """
        [delivery]
        retry_schedule = ["1m", "5m"]
        give_up_after = "2d"

        [routes.own]
        mode = "direct"
        retry_schedule = ["30s"]
        give_up_after = "1h"

        [routes.lifetime_only]
        mode = "direct"
        give_up_after = "0s"
        """,
    )
    assert config.retry_policy("own") == ([30.0], 3600.0)
    assert config.retry_policy("direct") == ([60.0, 300.0], 172800.0)
    # "0s" is a lifetime of its own (give up at once), not "unset"
    assert config.retry_policy("lifetime_only") == ([60.0, 300.0], 0.0)


def test_retry_policy_defaults(tmp_path: Path) -> None:
    config = load(None, environ={"SMTPGATE_STATE_DIR": str(tmp_path)})
    schedule, give_up = config.retry_policy("direct")
    assert schedule == [300.0, 600.0, 1200.0, 2400.0, 3600.0]
    assert give_up == 5 * 86400.0


def test_empty_retry_schedule_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"delivery\.retry_schedule"):
        load_text(tmp_path, "[delivery]\nretry_schedule = []\n")


# --- masked -------------------------------------------------------------------------


def test_masked_hides_an_inline_password_and_config_warns(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[relays.corp]\nhost = 'smtp.example.com'\nusername = 'me'\npassword = 'hunter2'\n",
    )
    shown = masked(config)
    assert shown["relays"]["corp"]["password"] == "*" * 8
    assert "hunter2" not in json.dumps(shown)
    assert shown["relays"]["corp"]["username"] == "me"
    assert config.warnings() == [
        "relays.corp.password is written in the config file; prefer password_env"
        " or password_file so the secret stays out of the file"
    ]


def test_masked_is_the_effective_config_as_plain_data(tmp_path: Path) -> None:
    config = load_text(
        tmp_path,
        "[relays.corp]\nhost = 'smtp.example.com'\ntimeout = '2m'\n"
        "[server]\nlisten = '[::1]:2525'\n",
    )
    shown = masked(config)
    assert json.loads(json.dumps(shown)) == shown
    assert shown["relays"]["corp"]["host"] == "smtp.example.com"
    assert shown["relays"]["corp"]["timeout"] == 120.0
    assert shown["relays"]["corp"]["tls"] == "starttls"
    assert shown["relays"]["corp"]["password"] is None
    assert shown["routes"]["direct"]["mode"] == "direct"
    assert shown["server"]["state_dir"] == str(tmp_path / "state")
