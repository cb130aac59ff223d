"""The monitoring HTTP interface of a real `smtpgate serve`: the JSON API, the page,
/metrics and the probes, asked over loopback with urllib as any script would, while real
mail flows from a client through the gateway to a real upstream."""

from __future__ import annotations

import asyncio
import json
import os
import smtplib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import Gateway, GatewayFactory, Upstream, Upstreams, free_port, relay_config
from conftest import wait_until as wait_for

from smtpgate.config import ConfigError
from smtpgate.configfile import load
from smtpgate.spool import SqliteSpool
from smtpgate.web.app import build_app
from smtpgate.web.metrics import Metrics
from smtpgate.web.openapi import document
from smtpgate.web.state import Monitor

TURNS = 2.5  # real seconds: more than two scheduler turns (one a second)
TOKEN = "s3cret-token-for-tests"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def http(
    gateway: Gateway,
    path: str,
    *,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    token: str | None = None,
) -> Reply:
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.http_port}{path}",
        data=body,
        method=method,
        headers={**({"Authorization": f"Bearer {token}"} if token else {}), **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=15) as response:  # noqa: S310
            return Reply(response.status, dict(response.headers), response.read().decode())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, dict(error.headers), error.read().decode())


def post(gateway: Gateway, path: str, payload: Any = None, **options: Any) -> Reply:
    body = None if payload is None else json.dumps(payload).encode()
    return http(gateway, path, method="POST", body=body, **options)


def job_path(name: str, rest: str = "") -> str:
    return f"/api/jobs/{urllib.parse.quote(name, safe='')}{rest}"


def held_gateway(
    gateway_factory: GatewayFactory,
    upstream: Upstream,
    *,
    http_table: str = "",
    env: dict[str, str] | None = None,
) -> Gateway:
    """Mail by default takes `news`, a track route via the relay `up` whose jobs start
    held: nothing is sent until a release, so nothing races the test."""
    config = (
        f'[relays.up]\nhost = "127.0.0.1"\nport = {upstream.port}\ntls = "none"\n'
        'timeout = "5s"\n\n'
        '[routes.news]\nmode = "track"\nvia = "up"\nhold = true\n\n'
    )
    return gateway_factory(config + http_table, server='default_route = "news"\n', env=env or {})


def submit(gateway: Gateway, job: str, *recipients: str) -> None:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        for recipient in recipients:
            client.sendmail(
                "app@example.net",
                [recipient],
                f"X-Smtpgate-Job: {job}\r\nSubject: for {recipient}\r\n\r\nHello.\r\n".encode(),
            )


def test_jobs_their_details_and_recipient_pages_say_what_the_cli_says(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    gateway = held_gateway(gateway_factory, upstreams.start())
    addresses = [f"r{n}@example.com" for n in range(5)]
    submit(gateway, "spring sale", *addresses)
    submit(gateway, "other", "o@example.com")

    jobs = http(gateway, "/api/jobs")
    assert jobs.status == 200 and jobs.headers["Content-Type"].startswith("application/json")
    assert jobs.json() == json.loads(gateway.cli("jobs", "--json").stdout)
    assert [j["name"] for j in jobs.json()] == ["other", "spring sale"]  # newest first

    job = http(gateway, job_path("spring sale")).json()
    assert job == json.loads(gateway.cli("job", "show", "spring sale", "--json").stdout)
    assert (job["state"], job["total"], job["counts"]["held"]) == ("held", 5, 5)
    assert job["waiting"] == "held: send it with `smtpgate job release spring sale`"

    # Keyset pages of two: every recipient once, in order, and the last page says so.
    seen: list[str] = []
    after = 0
    pages = 0
    while after is not None:
        page = http(gateway, job_path("spring sale", f"/recipients?limit=2&after={after}"))
        assert page.status == 200
        data = page.json()
        assert len(data["recipients"]) <= 2
        seen += [r["address"] for r in data["recipients"]]
        after = data["next_after"]
        pages += 1
    assert seen == addresses and pages == 3
    first = http(gateway, job_path("spring sale", "/recipients?state=held")).json()
    assert [(r["state"], r["attempts"]) for r in first["recipients"]] == [("held", 0)] * 5
    assert http(gateway, job_path("spring sale", "/recipients?state=failed")).json() == {
        "job": "spring sale",
        "state": "failed",
        "recipients": [],
        "next_after": None,
    }

    queue = http(gateway, "/api/queue").json()
    assert queue["recipients"]["held"] == 6
    assert queue["jobs"]["held"] == 2
    assert queue["relays"] == {} and queue["spool_bytes"] > 0


def test_cancel_through_the_api_sends_nothing_and_release_sends_everything(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = held_gateway(gateway_factory, upstream)
    submit(gateway, "dropped", "d1@example.com", "d2@example.com")
    submit(gateway, "wanted", "w1@example.com")

    cancelled = post(gateway, job_path("dropped", "/cancel"))
    assert cancelled.status == 200
    assert cancelled.json()["changed"] == 2
    assert cancelled.json()["job"]["state"] == "cancelled"
    again = post(gateway, job_path("dropped", "/release"))
    assert again.status == 409
    assert again.json() == {"error": "job 'dropped' is cancelled; it cannot release"}

    released = post(gateway, job_path("wanted", "/release"))
    assert released.status == 200 and released.json()["changed"] == 1
    wait_for(lambda: len(upstream.messages) == 1, 15, "the released message")
    time.sleep(TURNS)
    assert [m.rcpt_tos for m in upstream.messages] == [["w1@example.com"]]
    states = {a: r["state"] for a, r in gateway.recipients().items()}
    assert states == {
        "d1@example.com": "cancelled",
        "d2@example.com": "cancelled",
        "w1@example.com": "delivered",
    }
    done = http(gateway, job_path("wanted")).json()
    assert (done["state"], done["counts"]["delivered"]) == ("done", 1)


def test_bad_requests_get_a_json_error_with_the_right_status(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    gateway = held_gateway(gateway_factory, upstreams.start())
    submit(gateway, "campaign", "c@example.com")

    missing = http(gateway, job_path("nope"))
    assert missing.status == 404
    assert missing.json() == {"error": "no job 'nope'; GET /api/jobs lists them"}
    assert post(gateway, job_path("nope", "/cancel")).status == 404
    assert http(gateway, "/api/nothing-here").json() == {"error": "Not Found"}

    paused = post(gateway, job_path("campaign", "/pause"))
    assert paused.status == 409
    assert paused.json() == {"error": "job 'campaign' is held; it cannot pause"}

    for query in ("state=lost", "limit=0", "after=-1", "limit=many"):
        bad = http(gateway, job_path("campaign", f"/recipients?{query}"))
        assert bad.status == 400, query
        assert bad.json()["error"].startswith(query.split("=")[0] + ":")
    assert post(gateway, job_path("campaign", "/retry?failed=maybe")).status == 400
    assert post(gateway, job_path("campaign", "/retry?failed=true")).json()["changed"] == 0

    schedule = job_path("campaign", "/schedule")
    assert post(gateway, schedule, {"send_at": "next tuesday"}).status == 400
    assert "no time zone" in post(gateway, schedule, {"send_at": "2026-01-08T09:00"}).text
    assert post(gateway, schedule, ["2030"]).status == 400
    garbled = http(gateway, schedule, method="POST", body=b"{not json")
    assert (garbled.status, garbled.json()) == (400, {"error": "the body is not JSON"})
    scheduled = post(gateway, schedule, {"send_at": "2026-01-08T09:00:00+01:00"})
    assert scheduled.status == 200
    assert scheduled.json()["job"]["send_at"] == "2026-01-08T08:00:00+00:00"
    assert post(gateway, schedule, {"send_at": None}).json()["job"]["send_at"] is None

    # A page elsewhere cannot steer the user's browser into a control, and a web site
    # whose DNS name points at 127.0.0.1 cannot read the API.
    foreign = post(gateway, job_path("campaign", "/cancel"), headers={"Origin": "http://evil.test"})
    assert foreign.status == 403
    assert http(gateway, job_path("campaign")).json()["state"] == "held"
    rebound = http(gateway, "/api/jobs", headers={"Host": f"evil.test:{gateway.http_port}"})
    assert rebound.status == 403 and "loopback" in rebound.json()["error"]


def test_a_token_is_required_once_configured(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    gateway = held_gateway(
        gateway_factory,
        upstreams.start(),
        http_table="[http]\ntoken_env = 'TEST_HTTP_TOKEN'\n",
        env={"TEST_HTTP_TOKEN": TOKEN},
    )
    submit(gateway, "secret", "s@example.com")

    for path in ("/api/jobs", "/metrics", "/openapi.json", job_path("secret")):
        refused = http(gateway, path)
        assert refused.status == 401, path
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert http(gateway, "/api/jobs", token="wrong").status == 401
    assert post(gateway, job_path("secret", "/cancel")).status == 401
    assert http(gateway, job_path("secret")).status == 401

    assert [j["name"] for j in http(gateway, "/api/jobs", token=TOKEN).json()] == ["secret"]
    assert http(gateway, "/healthz").status == 200  # probes need no token
    assert http(gateway, "/readyz").status == 200

    # A browser without the token gets a sign-in form; with it (the form's cookie), the page.
    sign_in = http(gateway, "/")
    assert sign_in.status == 401 and '<form id="sign-in">' in sign_in.text
    cookie = {"Cookie": f"smtpgate_token={urllib.parse.quote(TOKEN)}"}
    assert "secret" in http(gateway, "/", headers=cookie).text


def test_a_reachable_address_without_a_token_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "smtpgate.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGATE_")}
    env |= {"SMTPGATE_STATE_DIR": str(tmp_path / "state"), "SMTPGATE_CONFIG": str(config)}

    def smtpgate(*args: str, **more: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "smtpgate", *args],
            capture_output=True,
            text=True,
            env={**env, **more},
            timeout=60,
        )

    refused = smtpgate("serve", SMTPGATE_HTTP__LISTEN='["0.0.0.0:8025"]')
    assert refused.returncode == 2
    assert "http: listen: 0.0.0.0:8025 can be reached from other hosts" in refused.stderr
    assert "token_env or token_file" in refused.stderr
    assert not (tmp_path / "state" / "spool.db").exists()  # refused before anything started

    with_token = {"SMTPGATE_HTTP__LISTEN": '["0.0.0.0:8025"]', "SMTPGATE_HTTP__TOKEN_ENV": "T"}
    assert smtpgate("config", "check", **with_token, T="x").returncode == 0
    assert "$T is not set" in smtpgate("config", "check", **with_token).stderr
    unset = smtpgate("serve", **with_token)
    assert unset.returncode == 2
    assert "http.token_env: $T is not set or empty" in unset.stderr


def test_a_taken_http_port_is_a_clear_error(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    first = gateway_factory()
    second = gateway_factory(
        start=False, env={"SMTPGATE_HTTP__LISTEN": f'["127.0.0.1:{first.http_port}"]'}
    )
    result = second.cli("serve", check=False)
    assert result.returncode == 1
    assert f"cannot serve HTTP on 127.0.0.1:{first.http_port}" in result.stderr
    assert "listen = []" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_http_interface_loads_at_its_first_request(gateway_factory: GatewayFactory) -> None:
    """Its port is bound at startup (a taken one is a startup error, tested below), but
    aiohttp, 12 MB, is loaded only when someone asks; the first request waits for it."""
    gateway = gateway_factory()
    assert gateway.process is not None
    libraries = Path(f"/proc/{gateway.process.pid}/maps")
    assert "aiohttp" not in libraries.read_text()
    assert http(gateway, "/healthz").status == 200
    assert "aiohttp" in libraries.read_text()
    assert http(gateway, "/api/jobs").status == 200


def test_a_taken_default_http_port_does_not_stop_the_mail(
    gateway_factory: GatewayFactory,
) -> None:
    """Only an address the config names is a reason not to start; the default one (also
    Mailpit's and MailHog's) being taken is logged, and SMTP runs all the same."""
    with socket.socket() as squatter:
        try:
            squatter.bind(("127.0.0.1", 8025))
        except OSError:
            pytest.skip("127.0.0.1:8025 is in use on this machine already")
        squatter.listen()
        gateway = gateway_factory(start=False)
        del gateway.env["SMTPGATE_HTTP__LISTEN"]
        gateway.start()
        with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
            assert client.noop()[0] == 250
        warnings = [e for e in gateway.events() if "HTTP monitoring not started" in e["event"]]
        assert warnings and warnings[0]["address"] == "127.0.0.1:8025"


def test_metrics_count_recipients_and_results_and_the_probes_answer(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(rcpt_replies={"gone@example.com": "550 5.1.1 no such user"})
    gateway = gateway_factory(relay_config(upstream.port), server='default_route = "upstream"\n')
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        for recipient in ("a@example.com", "b@example.com", "gone@example.com"):
            client.sendmail("app@example.net", [recipient], b"Subject: s\r\n\r\nb\r\n")
    gateway.wait_for_state("gone@example.com", "failed")
    gateway.wait_for_state("b@example.com", "delivered")

    def metrics() -> dict[str, float]:
        text = http(gateway, "/metrics").text
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    def settled() -> bool:
        # The gauges come from the spool; the results counter from the delivery process,
        # which tells the server what it recorded a moment after its commit.
        values = metrics()
        return (
            values.get('smtpgate_recipients{state="delivered"}') == 2
            and sum(
                v for k, v in values.items() if k.startswith("smtpgate_recipient_results_total")
            )
            >= 3
        )

    wait_for(settled, 5)
    values = metrics()
    assert values['smtpgate_recipients{state="failed"}'] == 1
    assert values['smtpgate_recipients{state="queued"}'] == 0
    assert values["smtpgate_messages_accepted_total"] == 3
    assert values['smtpgate_recipient_results_total{state="delivered"}'] == 2
    assert values['smtpgate_recipient_results_total{state="failed"}'] == 1
    assert values['smtpgate_jobs{state="done"}'] == 1
    assert values["smtpgate_spool_bytes"] > 0
    assert values["process_resident_memory_bytes"] > 0

    assert http(gateway, "/healthz").json() == {"status": "ok"}
    assert http(gateway, "/readyz").json() == {"status": "ok"}
    assert gateway.stop() == 0
    with pytest.raises(urllib.error.URLError):
        http(gateway, "/healthz")  # stopped with the server


def test_the_page_shows_jobs_and_escapes_what_senders_and_servers_wrote(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """A route name (and so its job of the day) and an upstream's reply are text from
    elsewhere: the page shows them as text, never as markup."""
    script = "<script>alert(1)</script>"
    upstream = upstreams.start(rcpt_replies={"x@example.com": f"550 5.1.1 {script} unknown"})
    gateway = gateway_factory(
        f'[relays.up]\nhost = "127.0.0.1"\nport = {upstream.port}\ntls = "none"\n'
        f"[routes.'{script}']\nmode = 'relay'\nrelay = 'up'\n",
        server=f"default_route = '{script}'\n",
    )
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        client.sendmail("app@example.net", ["x@example.com"], b"Subject: s\r\n\r\nb\r\n")
    gateway.wait_for_state("x@example.com", "failed")
    (job,) = http(gateway, "/api/jobs").json()
    assert job["name"].startswith(script)

    page = http(gateway, "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert script not in page.text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text
    link = f'href="/jobs/{urllib.parse.quote(job["name"], safe="")}"'
    assert link in page.text

    detail = http(gateway, f"/jobs/{urllib.parse.quote(job['name'], safe='')}")
    assert detail.status == 200
    assert script not in detail.text
    assert "550 5.1.1 &lt;script&gt;alert(1)&lt;/script&gt; unknown" in detail.text  # failures
    assert 'data-action="retry" data-query="failed=true"' in detail.text
    assert http(gateway, "/jobs/nope").status == 404
    script_file = http(gateway, "/static/app.js")
    assert script_file.status == 200 and "textContent" in script_file.text
    assert http(gateway, "/static/style.css").status == 200


def test_the_openapi_document_describes_every_route(
    gateway_factory: GatewayFactory, tmp_path: Path
) -> None:
    config = load(None, environ={}, state_dir=str(tmp_path))
    spool = SqliteSpool.open(tmp_path / "spool.db")
    app = build_app(Monitor(config, spool, Metrics(spool, tmp_path / "spool.db"), None))
    asyncio.run(spool.close())  # the routes are known without serving anything
    described = document()["paths"]
    served = {
        (route.resource.canonical, route.method.lower())
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert len(served) >= 18
    missing = {(path, method) for path, method in served if method not in described.get(path, {})}
    assert missing == set()
    assert {(p, m) for p, ops in described.items() for m in ops} == served  # nothing stale

    gateway = gateway_factory()
    live = http(gateway, "/openapi.json").json()
    assert live["openapi"] == "3.1.0"
    assert live == json.loads(json.dumps(document()))


def test_the_token_comes_from_a_file_or_the_environment_never_empty(tmp_path: Path) -> None:
    def http_config(table: str, environ: dict[str, str] | None = None) -> Any:
        path = tmp_path / "smtpgate.toml"
        path.write_text(f"[http]\n{table}\n")
        return load(path, environ=environ or {}, state_dir=str(tmp_path)).http

    secret = tmp_path / "token"
    secret.write_text("from-a-file\n")
    assert http_config(f"token_file = '{secret}'").resolve_token({}) == "from-a-file"
    assert http_config("token_env = 'T'").resolve_token({"T": "from-env"}) == "from-env"
    assert http_config("").resolve_token({}) is None
    secret.write_text("\n")
    with pytest.raises(ConfigError, match=r"token_file: .* is not set or empty"):
        http_config(f"token_file = '{secret}'").resolve_token({})
    with pytest.raises(ConfigError, match="cannot read"):
        http_config(f"token_file = '{tmp_path / 'missing'}'").resolve_token({})
    with pytest.raises(ConfigError, match="give the token one way"):
        http_config(f"token_env = 'T'\ntoken_file = '{secret}'")
    assert http_config("listen = []").listen == []
    exposed = http_config("listen = ['[::]:8025']\ntoken_env = 'T'")
    assert [str(a) for a in exposed.listen] == ["[::]:8025"]
