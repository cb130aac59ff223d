"""The `smtpgate` command: serve, config check, and the queue.

Few flags (`--config`, `--state-dir`, `--log-level`, `--log-format`): the config file owns
every default. Tables for people, `--json` for scripts. Exit 2 for a bad config or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

from smtpgate import __version__, logs, monitor
from smtpgate.config import Config, ConfigError
from smtpgate.configfile import find_config_file, load, masked
from smtpgate.display import iso, table, when
from smtpgate.spool import MessageView, SpoolLockedError, SqliteSpool

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The common flags may stand before or after the command; unset ones are absent
    # (a default on the top parser would overwrite what was given before the command).
    for flag in ("config", "state_dir", "log_level", "log_format"):
        if not hasattr(args, flag):
            setattr(args, flag, None)
    try:
        config_path = find_config_file(args.config, os.environ)
        if getattr(args, "creates_config", False) and config_path and not config_path.exists():
            config_path = None  # `suggest --write --config NEW.toml` makes the file
        config = load(config_path, state_dir=args.state_dir)
    except ConfigError as error:
        print(f"smtpgate: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(args.log_level or config.log.level, args.log_format or config.log.format)
    try:
        result: int = args.run(config, args)
    except SpoolLockedError as error:
        print(f"smtpgate: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, sqlite3.Error) as error:  # a state dir that cannot be made, a bad spool
        print(f"smtpgate: spool {config.spool_path()}: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except ConfigError as error:
        print(f"smtpgate: config error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="PATH",
        default=argparse.SUPPRESS,
        help="config file (else $SMTPGATE_CONFIG, else ./smtpgate.toml)",
    )
    common.add_argument(
        "--state-dir",
        metavar="DIR",
        default=argparse.SUPPRESS,
        help="spool and runtime state (else $SMTPGATE_STATE_DIR, else XDG)",
    )
    common.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=argparse.SUPPRESS
    )
    common.add_argument(
        "--log-format", choices=["auto", "console", "json"], default=argparse.SUPPRESS
    )

    parser = argparse.ArgumentParser(
        prog="smtpgate",
        parents=[common],
        description="A local SMTP gateway: accepts mail on localhost and sends it on.",
    )
    parser.add_argument("--version", action="version", version=f"smtpgate {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    serve = commands.add_parser("serve", parents=[common], help="run the gateway")
    serve.set_defaults(run=_serve)

    config = commands.add_parser("config", parents=[common], help="inspect the config")
    config_commands = config.add_subparsers(metavar="ACTION", required=True)
    check = config_commands.add_parser(
        "check", parents=[common], help="validate and print the effective config"
    )
    check.add_argument("--json", action="store_true")
    check.set_defaults(run=_config_check)

    check = commands.add_parser(
        "check", parents=[common], help="try a route's upstream: connect, TLS, AUTH, send"
    )
    check.add_argument("route", metavar="ROUTE")
    check.add_argument("--send-to", metavar="ADDRESS", help="also send one test message")
    check.add_argument(
        "--from", dest="sender", metavar="ADDRESS", help="envelope sender of the test message"
    )
    check.set_defaults(run=_check)

    send = commands.add_parser(
        "send", parents=[common], help="inject a test message through the running gateway"
    )
    send.add_argument("--to", required=True, metavar="ADDRESS", action="append")
    send.add_argument("--from", dest="sender", metavar="ADDRESS")
    send.add_argument("--route", metavar="ROUTE", help="send it by this route")
    send.set_defaults(run=_send)

    queue = commands.add_parser(
        "queue", parents=[common], help="messages and recipients in the spool"
    )
    queue.add_argument("--json", action="store_true")
    queue.add_argument("--limit", type=int, default=None, help="newest N messages only")
    queue.set_defaults(run=_queue_list)
    queue_commands = queue.add_subparsers(metavar="ACTION")
    show = queue_commands.add_parser("show", parents=[common], help="one message")
    show.add_argument("queue_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.add_argument("--body", action="store_true", help="print the message as stored")
    show.set_defaults(run=_queue_show)
    retry = queue_commands.add_parser(
        "retry", parents=[common], help="send deferred mail now (of one message, or all)"
    )
    retry.add_argument("queue_id", metavar="ID", nargs="?")
    retry.set_defaults(run=_queue_retry)

    suggest = commands.add_parser(
        "suggest",
        parents=[common],
        help="find your SMTP server in your mail programs; --write adds it as a relay",
    )
    suggest.add_argument(
        "--home", metavar="DIR", help="read the mail programs' files under DIR, not your home"
    )
    suggest.add_argument("--json", action="store_true")
    suggest.add_argument(
        "--write", action="store_true", help="add a server as [relays.NAME] and [routes.NAME]"
    )
    suggest.add_argument(
        "--pick", type=int, default=1, metavar="N", help="the row --write takes (default: 1)"
    )
    suggest.add_argument("--name", metavar="NAME", help="relay and route name (default: by host)")
    suggest.add_argument("--default", action="store_true", help="also make it server.default_route")
    suggest.add_argument(
        "--force", action="store_true", help="replace a relay or route of that name"
    )
    suggest.add_argument(
        "--test", action="store_true", help="then check the route, as `smtpgate check NAME`"
    )
    suggest.set_defaults(run=_suggest, creates_config=True)
    monitor.add_commands(commands, common)

    user = commands.add_parser(
        "user", parents=[common], help="users who may log in (AUTH) to send from anywhere"
    )
    user_commands = user.add_subparsers(metavar="ACTION", required=True)
    add = user_commands.add_parser(
        "add", parents=[common], help="add a user, asking for the password twice"
    )
    add.add_argument("name", metavar="NAME")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from one line of stdin"
    )
    add.add_argument("--replace", action="store_true", help="set a new password for NAME")
    add.set_defaults(run=_user_add)
    remove = user_commands.add_parser("remove", parents=[common], help="remove a user")
    remove.add_argument("name", metavar="NAME")
    remove.set_defaults(run=_user_remove)
    listing = user_commands.add_parser("list", parents=[common], help="the users' names")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(run=_user_list)
    return parser


# --- serve ------------------------------------------------------------------------------


def _serve(config: Config, args: argparse.Namespace) -> int:
    from smtpgate.eventloop import new_event_loop
    from smtpgate.server import Server, StartupError

    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            runner.run(Server(config).serve())
    except StartupError as error:
        print(f"smtpgate: {error}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


# --- check and send ---------------------------------------------------------------------


def _check(config: Config, args: argparse.Namespace) -> int:
    from smtpgate.check import check_route

    def say(step: str, ok: bool, detail: str) -> None:
        print(f"{step:<8} {'ok  ' if ok else 'FAIL'}  {detail}", flush=True)

    passed = asyncio.run(
        check_route(config, args.route, say, send_to=args.send_to, sender=args.sender)
    )
    print(f"verdict  route {args.route} {'works' if passed else 'does NOT work'}")
    return EXIT_OK if passed else EXIT_FAILURE


def _send(config: Config, args: argparse.Namespace) -> int:
    import smtplib
    import ssl

    from smtpgate.check import sample_message

    if args.route and args.route not in config.routes:
        raise ConfigError(f"--route: no route {args.route!r} (defined: {', '.join(config.routes)})")
    # A plain listener if there is one; else an ssl:// one, whose certificate need not
    # be checked: this is the gateway on this machine, by its address.
    listen = min(config.server.listen, key=lambda address: address.tls)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listen.host, listen.host)  # noqa: S104
    sender = args.sender or f"smtpgate-send@{config.server.hostname}"
    content = sample_message(config, sender, ", ".join(args.to), args.route or "by rules")
    if args.route:
        content = f"X-Smtpgate-Route: {args.route}\r\n".encode() + content
    connect: type[smtplib.SMTP] = smtplib.SMTP
    options: dict[str, Any] = {}
    if listen.tls:
        connect = smtplib.SMTP_SSL
        options["context"] = ssl._create_unverified_context()  # noqa: S323
    try:
        with connect(host, listen.port, timeout=30, **options) as client:
            client.ehlo(config.server.hostname)
            client.mail(sender)
            for recipient in args.to:
                code, reply = client.rcpt(recipient)
                if code >= 300:
                    print(
                        f"smtpgate: {recipient} refused: {code} {reply.decode()}", file=sys.stderr
                    )
                    return EXIT_FAILURE
            code, reply = client.data(content)
    except (OSError, smtplib.SMTPException) as error:
        print(
            f"smtpgate: cannot hand the message to the gateway at {listen}: {error}",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    text = reply.decode(errors="replace")
    if code != 250:
        print(f"smtpgate: the gateway refused the message: {code} {text}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{code} {text}")
    return EXIT_OK


# --- suggest ----------------------------------------------------------------------------


def _suggest(config: Config, args: argparse.Namespace) -> int:
    import contextlib
    from pathlib import Path

    from smtpgate.configfile import DEFAULT_CONFIG_NAME
    from smtpgate.suggest import Proposal, Scan, survey, write
    from smtpgate.suggest.survey import footnotes

    if not args.write and (args.default or args.force or args.test or args.name):
        print("smtpgate: --name, --default, --force and --test go with --write", file=sys.stderr)
        return EXIT_USAGE
    scan = Scan.of(Path(args.home) if args.home else None, os.environ)
    suggestions = survey(scan)
    for note in scan.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        found = [suggestion.as_json() for suggestion in suggestions]
        report = {"suggestions": found, "looked": scan.looked, "notes": scan.notes}
        print(json.dumps(report, indent=2))
    elif suggestions:
        headers = ["#", "PROGRAM", "ACCOUNT", "HOST", "PORT", "TLS", "USER", "NOTE"]
        rows = [[str(number), *s.row()] for number, s in enumerate(suggestions, 1)]
        print(table(headers, rows))
        for line in footnotes(suggestions, writing=args.write):
            print(line)
    else:
        print("No SMTP server found in the settings of any mail program. Looked in:")
        print("\n".join(f"  {place}" for place in scan.looked))
    if not suggestions or not args.write:
        return EXIT_OK if suggestions else EXIT_FAILURE
    if not 1 <= args.pick <= len(suggestions):
        print(f"smtpgate: --pick {args.pick}: choose 1 to {len(suggestions)}", file=sys.stderr)
        return EXIT_USAGE
    proposal = Proposal.of(suggestions[args.pick - 1], args.name)
    path = find_config_file(args.config, os.environ) or Path(DEFAULT_CONFIG_NAME)
    replaced = write(path, proposal, make_default=args.default, force=args.force)
    with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):  # JSON stays clean
        name, variable = proposal.name, proposal.password_env
        print(
            f"{'replaced' if replaced else 'added'} [relays.{name}] and [routes.{name}] in {path}"
            + (f"; server.default_route is {name}" if args.default else "")
        )
        if variable:
            print(f"smtpgate reads the password of {proposal.suggestion.user} from ${variable}")
        if not args.test:
            print(f"try it: smtpgate check {name}")
            return EXIT_OK
        if variable and variable not in os.environ:
            print(f"smtpgate: to test it, set ${variable} to the password", file=sys.stderr)
            return EXIT_FAILURE
        written = load(path, state_dir=args.state_dir)
        return _check(written, argparse.Namespace(route=name, send_to=None, sender=None))


# --- config check -----------------------------------------------------------------------


def _config_check(config: Config, args: argparse.Namespace) -> int:
    from smtpgate.auth import auth_file, auth_warning
    from smtpgate.listener import tls_context
    from smtpgate.policy import refuse_open_relay

    refuse_open_relay(config)
    config.relay_passwords(os.environ)  # a password_env that is not set is an error now
    config.http.resolve_token(os.environ)  # and so is an HTTP token_env
    tls_context(config)  # a certificate that cannot be read or used is an error now
    auth_file(config)
    for warning in [*config.warnings(), auth_warning(config)]:
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
    effective = masked(config)
    if args.json:
        print(json.dumps(effective, indent=2))
    else:
        print(_as_toml(effective))
        print("# config is valid", file=sys.stderr)
    return EXIT_OK


def _as_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Enough TOML to read the effective config back: scalars and lists, then tables."""
    lines = []
    tables = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables.extend((f"[{key}]", item) for item in value)
        elif value is not None:
            lines.append(f"{key} = {json.dumps(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        if key.startswith("["):
            name = f"[[{prefix}{key[1:-1]}]]"
        else:
            name = f"[{prefix}{key}]"
        body = _as_toml(value, f"{prefix}{key.strip('[]')}.")
        out += f"\n\n{name}\n{body}" if out else f"{name}\n{body}"
    return out.strip("\n")


# --- users ------------------------------------------------------------------------------


def _user_add(config: Config, args: argparse.Namespace) -> int:
    from smtpgate import users

    path = config.users_path()
    if problem := users.name_problem(args.name):
        print(f"smtpgate: {problem}", file=sys.stderr)
        return EXIT_USAGE
    password = _new_password(args.name, from_stdin=args.password_stdin)
    if password is None:
        return EXIT_FAILURE
    try:
        created = users.add(path, args.name, password.encode("utf-8"), replace=args.replace)
    except users.UserExistsError as error:
        print(f"smtpgate: {error}; use --replace to set a new password", file=sys.stderr)
        return EXIT_FAILURE
    except (OSError, users.UsersFileError) as error:
        print(f"smtpgate: users file {path}: {_reason(error)}", file=sys.stderr)
        return EXIT_FAILURE
    done = "set a new password for" if args.replace else "added"
    print(f"{done} {args.name} in {path}" if args.replace else f"{done} {args.name} to {path}")
    if config.server.tls.cert_file is None:
        print(
            "note: AUTH is offered only over TLS: set cert_file and key_file in [server.tls]",
            file=sys.stderr,
        )
    if created:
        print("note: restart a running `smtpgate serve` to offer AUTH", file=sys.stderr)
    return EXIT_OK


def _new_password(name: str, *, from_stdin: bool) -> str | None:
    """From one line of stdin, or asked twice on the terminal; None (said why) if empty."""
    import getpass

    if from_stdin:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    else:
        password = getpass.getpass(f"password for {name}: ")
        if password and getpass.getpass("again: ") != password:
            print("smtpgate: the passwords differ; nothing changed", file=sys.stderr)
            return None
    if not password:
        print("smtpgate: an empty password is not allowed; nothing changed", file=sys.stderr)
        return None
    return password


def _user_remove(config: Config, args: argparse.Namespace) -> int:
    from smtpgate import users

    path = config.users_path()
    try:
        removed = users.remove(path, args.name)
    except (OSError, users.UsersFileError) as error:
        print(f"smtpgate: users file {path}: {_reason(error)}", file=sys.stderr)
        return EXIT_FAILURE
    if not removed:
        print(f"smtpgate: no user {args.name} in {path}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"removed {args.name} from {path}")
    return EXIT_OK


def _user_list(config: Config, args: argparse.Namespace) -> int:
    from smtpgate import users

    path = config.users_path()
    try:
        names = sorted(users.read(path))
    except FileNotFoundError:
        print(f"no users file at {path}: AUTH is off", file=sys.stderr)
        names = []
    except (OSError, users.UsersFileError) as error:
        print(f"smtpgate: users file {path}: {_reason(error)}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps({"users_file": str(path), "users": names}, indent=2))
    else:
        print("\n".join(names) if names else "no users")
    return EXIT_OK


def _reason(error: Exception) -> str:
    return error.strerror or str(error) if isinstance(error, OSError) else str(error)


# --- queue ------------------------------------------------------------------------------


def _with_spool(config: Config) -> SqliteSpool | None:
    path = config.spool_path()
    if not path.exists():
        print(
            f"no spool at {path} yet: nothing has been accepted with this state directory",
            file=sys.stderr,
        )
        return None
    return SqliteSpool.open(path)


def _queue_list(config: Config, args: argparse.Namespace) -> int:
    async def read() -> tuple[list[MessageView], dict[str, tuple[str, float]]]:
        spool = _with_spool(config)
        if spool is None:
            return [], {}
        try:
            return await spool.messages(args.limit), await spool.relay_statuses()
        finally:
            await spool.close()

    messages, relays = asyncio.run(read())
    if args.json:
        print(
            json.dumps(
                {
                    "relays": {
                        name: {"status": status, "since": iso(at)}
                        for name, (status, at) in relays.items()
                    },
                    "messages": [_message_json(m) for m in messages],
                },
                indent=2,
            )
        )
        return EXIT_OK
    for name, (status, at) in sorted(relays.items()):
        print(f"relay {name}: {status} (since {when(at)})")
    rows = []
    for message in messages:
        for index, r in enumerate(message.recipients):
            rows.append(
                [
                    message.queue_id if index == 0 else "",
                    when(message.received_at) if index == 0 else "",
                    (message.sender or "<>") if index == 0 else "",
                    r.address,
                    r.route,
                    r.state.value,
                    str(r.attempts),
                    when(r.next_attempt) if r.state.value in ("queued", "deferred") else "",
                    r.last_reply or "",
                ]
            )
    headers = [
        "QUEUE ID",
        "RECEIVED",
        "SENDER",
        "RECIPIENT",
        "ROUTE",
        "STATE",
        "ATTEMPTS",
        "NEXT ATTEMPT",
        "LAST REPLY",
    ]
    if rows:
        print(table(headers, rows))
    counts = Counter(r.state.value for m in messages for r in m.recipients)
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    print(
        f"{len(messages)} messages, {sum(counts.values())} recipients"
        + (f": {summary}" if summary else "")
    )
    return EXIT_OK


def _queue_show(config: Config, args: argparse.Namespace) -> int:
    async def read() -> tuple[MessageView | None, bytes | None]:
        spool = _with_spool(config)
        if spool is None:
            return None, None
        try:
            message = await spool.message(args.queue_id)
            body = await spool.content(args.queue_id) if message and args.body else None
            return message, body
        finally:
            await spool.close()

    message, body = asyncio.run(read())
    if message is None:
        print(f"smtpgate: no message {args.queue_id!r} in the queue", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        data = _message_json(message)
        if body is not None:
            data["content"] = body.decode("utf-8", "replace")
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(
        f"queue id:  {message.queue_id}\nreceived:  {when(message.received_at)}"
        f" from {message.client_address} (HELO {message.helo})\n"
        f"sender:    {message.sender or '<>'}\nsize:      {message.size} bytes\n"
    )
    print(
        table(
            [
                "RECIPIENT",
                "ROUTE",
                "STATE",
                "ATTEMPTS",
                "NEXT ATTEMPT",
                "UPDATED",
                "VIA",
                "LAST REPLY",
            ],
            [
                [
                    r.address,
                    r.route,
                    r.state.value,
                    str(r.attempts),
                    when(r.next_attempt) if r.state.value in ("queued", "deferred") else "",
                    when(r.updated_at),
                    r.via or "",
                    r.last_reply or "",
                ]
                for r in message.recipients
            ],
        )
    )
    if body is not None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
    return EXIT_OK


def _queue_retry(config: Config, args: argparse.Namespace) -> int:
    import time

    async def retry() -> int:
        spool = _with_spool(config)
        if spool is None:
            return 0
        try:
            if args.queue_id and await spool.message(args.queue_id) is None:
                return -1
            return await spool.retry_now(args.queue_id, time.time())
        finally:
            await spool.close()

    count = asyncio.run(retry())
    if count < 0 or (args.queue_id and not config.spool_path().exists()):
        print(f"smtpgate: no message {args.queue_id!r} in the queue", file=sys.stderr)
        return EXIT_FAILURE
    print(
        f"{count} deferred recipients are due now; a running `smtpgate serve` on this"
        " spool sends them within a second"
    )
    return EXIT_OK


def _message_json(message: MessageView) -> dict[str, Any]:
    return {
        "queue_id": message.queue_id,
        "sender": message.sender,
        "size": message.size,
        "received_at": iso(message.received_at),
        "client_address": message.client_address,
        "helo": message.helo,
        "recipients": [
            {
                "address": r.address,
                "route": r.route,
                "state": r.state.value,
                "attempts": r.attempts,
                "next_attempt": iso(r.next_attempt),
                "last_reply": r.last_reply,
                "via": r.via,
                "updated_at": iso(r.updated_at),
            }
            for r in message.recipients
        ],
    }


if __name__ == "__main__":
    sys.exit(main())
