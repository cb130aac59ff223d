"""The delivery process: the delivery side in a child of the server, on a core of its own.

The channel is tested over a real socket pair; the process itself end to end, through a
real client, `smtpgate serve` and a real upstream, including its death and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import sqlite3
import subprocess
from pathlib import Path

import pytest
from conftest import (
    Gateway,
    GatewayFactory,
    Upstream,
    Upstreams,
    relay_config,
    wait_until,
    with_default_route,
)

from smtpgate.transports.channel import Channel, ChannelClosedError, RemoteError

MESSAGE = b"From: ann@example.org\r\nSubject: hello\r\n\r\nhello\r\n"


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def delivery_process_of(pid: int) -> int:
    workers = [
        child
        for child in children(pid)
        if b"smtpgate.delivery.worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, f"expected one delivery process, found {workers}"
    return workers[0]


def send(port: int, recipient: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("ann@example.org", [recipient], MESSAGE)


def separate(route: str) -> str:
    return with_default_route(route) + 'delivery_process = "separate"\n'


# --- the channel -------------------------------------------------------------------------


async def channel_pair() -> tuple[Channel, Channel]:
    left, right = socket.socketpair()
    ends = []
    for sock in (left, right):
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        ends.append(Channel(reader, writer))
    return ends[0], ends[1]


def test_calls_go_both_ways_at_once_and_each_gets_its_own_answer() -> None:
    async def scenario() -> None:
        server, child = await channel_pair()

        async def slow_echo(request: object) -> object:
            assert isinstance(request, int)
            await asyncio.sleep(0.01 * (5 - request))  # later calls answer first
            return ("child", request)

        async def ledger(request: object) -> object:
            return ("server", request)

        serving = [
            asyncio.create_task(server.serve(ledger)),
            asyncio.create_task(child.serve(slow_echo)),
        ]
        answers = await asyncio.gather(*(server.call(n) for n in range(5)), child.call("sends"))
        assert answers == [*(("child", n) for n in range(5)), ("server", "sends")]
        await server.close()
        await asyncio.gather(*serving)

    asyncio.run(scenario())


def test_an_error_on_the_other_side_reaches_the_caller_and_the_channel_goes_on() -> None:
    async def scenario() -> None:
        server, child = await channel_pair()

        async def picky(request: object) -> object:
            if request == "this":
                raise ValueError("cannot do this")
            return "done"

        async def unused(request: object) -> object:
            raise AssertionError

        serving = [
            asyncio.create_task(server.serve(unused)),
            asyncio.create_task(child.serve(picky)),
        ]
        with pytest.raises(RemoteError, match="cannot do this"):
            await server.call("this")
        assert await server.call("that") == "done"
        await server.close()
        await asyncio.gather(*serving)

    asyncio.run(scenario())


def test_giving_up_on_a_call_stops_its_handler_and_a_closed_side_fails_the_waiting() -> None:
    async def scenario() -> None:
        server, child = await channel_pair()
        handler_cancelled = asyncio.Event()

        async def forever(request: object) -> object:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                handler_cancelled.set()
                raise
            return None

        async def unused(request: object) -> object:
            raise AssertionError

        serving = [
            asyncio.create_task(server.serve(unused)),
            asyncio.create_task(child.serve(forever)),
        ]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(server.call("stall"), 0.1)
        await asyncio.wait_for(handler_cancelled.wait(), 5)

        waiting = asyncio.create_task(server.call("stall"))
        await asyncio.sleep(0.05)
        await child.close()  # the delivery process goes away mid-call
        with pytest.raises(ChannelClosedError):
            await waiting
        with pytest.raises(ChannelClosedError):
            await server.call("after")
        await asyncio.gather(*serving)

    asyncio.run(scenario())


# --- the process -------------------------------------------------------------------------


def test_deliveries_run_in_a_process_of_their_own(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(
        relay_config(upstream.port, relay='rate = ["1000/s"]'), server=separate("upstream")
    )
    assert gateway.process is not None
    child = delivery_process_of(gateway.process.pid)
    send(gateway.port, "bob@example.com")
    wait_until(lambda: upstream.messages, what="the message at the upstream")
    assert upstream.messages[0].rcpt_tos == ["bob@example.com"]
    gateway.wait_for_state("bob@example.com", "delivered")
    attempts = [e for e in gateway.events() if e["event"] == "attempt"]
    assert attempts and all(e.get("process") == "delivery" for e in attempts)
    assert all("process" not in e for e in gateway.events() if e["event"] == "accepted")
    # It receives its config validated and serves no HTTP: it never loads pydantic or
    # aiohttp, about 20 MB that only the server needs.
    libraries = Path(f"/proc/{child}/maps").read_text()
    assert "pydantic_core" not in libraries and "aiohttp" not in libraries
    assert gateway.stop() == 0
    # The relay's rate ledger lives in the one spool: the child wrote it there.
    with sqlite3.connect(gateway.state_dir / "spool.db") as spool:
        sends = spool.execute("SELECT relay FROM relay_sends").fetchall()
    assert sends == [("upstream",)]
    assert not Path(f"/proc/{child}").exists(), "the delivery process outlived the server"


def test_inline_one_process_does_everything(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(
        relay_config(upstream.port),
        server=with_default_route("upstream") + 'delivery_process = "inline"\n',
    )
    assert gateway.process is not None
    send(gateway.port, "bob@example.com")
    wait_until(lambda: upstream.messages, what="the message at the upstream")
    assert children(gateway.process.pid) == []
    assert all("process" not in e for e in gateway.events() if e["event"] == "attempt")


def test_by_default_the_delivery_process_runs_where_there_are_two_cores(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start()
    gateway = gateway_factory(relay_config(upstream.port), server=with_default_route("upstream"))
    assert gateway.process is not None
    send(gateway.port, "bob@example.com")
    wait_until(lambda: upstream.messages, what="the message at the upstream")
    workers = [
        child
        for child in children(gateway.process.pid)
        if b"smtpgate.delivery.worker" in Path(f"/proc/{child}/cmdline").read_bytes()
    ]
    assert len(workers) == (1 if (os.cpu_count() or 1) >= 2 else 0)


def test_a_passthrough_relay_stays_with_the_listener(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """Its live sessions and its queued deliveries must share one set of limits, so
    that relay's transport is not moved; the other routes still are."""
    live, other = upstreams.start(), upstreams.start()
    gateway = gateway_factory(
        relay_config(live.port, route="live")
        + "passthrough = true\n\n"
        + relay_config(other.port, route="other")
        + '[[rules]]\nrecipient_domain = "other.example"\nroute = "other"\n',
        server=separate("live"),
    )
    assert gateway.process is not None
    send(gateway.port, "bob@example.com")
    send(gateway.port, "eve@other.example")
    wait_until(lambda: live.messages and other.messages, what="both messages delivered")
    gateway.wait_for_state("eve@other.example", "delivered")
    by_recipient = {
        e["recipient"]: e for e in gateway.events() if e["event"] == "attempt" and "recipient" in e
    }
    assert by_recipient["eve@other.example"].get("process") == "delivery"
    delivery_process_of(gateway.process.pid)


def test_a_killed_delivery_process_is_replaced_and_its_mail_sent_again(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    upstream = upstreams.start(stall_data=True)
    gateway = gateway_factory(relay_config(upstream.port), server=separate("upstream"))
    assert gateway.process is not None
    first = delivery_process_of(gateway.process.pid)
    send(gateway.port, "bob@example.com")
    wait_until(lambda: upstream.handler.mails, what="the delivery under way")
    upstream.handler.stall_data = False
    os.kill(first, signal.SIGKILL)  # mid-DATA: the upstream never said 250

    died = wait_until(
        lambda: [e for e in gateway.events() if e["event"].startswith("delivery process died")],
        what="the server to notice",
    )
    assert died[0]["pid"] == first
    send(gateway.port, "carol@example.com")  # mail accepted meanwhile is not stuck
    gateway.wait_for_state("bob@example.com", "delivered", timeout=30)
    gateway.wait_for_state("carol@example.com", "delivered", timeout=30)
    assert sorted(m.rcpt_tos[0] for m in upstream.messages) == [
        "bob@example.com",
        "carol@example.com",
    ]
    second = delivery_process_of(gateway.process.pid)
    assert second != first
    assert gateway.stop() == 0


def sending_slowly(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> tuple[Upstream, Gateway, int]:
    """A gateway whose delivery process is sending bob's message to an upstream that
    takes two seconds to answer the final dot; and that process's pid."""
    upstream = upstreams.start(data_delay=2.0)
    gateway = gateway_factory(relay_config(upstream.port), server=separate("upstream"))
    assert gateway.process is not None
    child = delivery_process_of(gateway.process.pid)
    send(gateway.port, "bob@example.com")
    wait_until(lambda: upstream.handler.mails, what="the delivery under way")
    return upstream, gateway, child


def test_ctrl_c_lets_the_delivery_under_way_finish(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """A terminal's Ctrl-C reaches every process of the group: the delivery process
    ignores it and the server drains, so the message on the wire is not cut off."""
    upstream, gateway, child = sending_slowly(gateway_factory, upstreams)
    assert gateway.process is not None
    os.kill(child, signal.SIGINT)
    os.kill(gateway.process.pid, signal.SIGINT)
    assert gateway.process.wait(30) == 0
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.com"]]
    assert gateway.recipients()["bob@example.com"]["state"] == "delivered"
    assert not Path(f"/proc/{child}").exists()


def test_a_dead_server_leaves_the_spool_to_its_delivery_process_until_it_finished(
    gateway_factory: GatewayFactory, upstreams: Upstreams
) -> None:
    """The child goes on with what it was sending when the server is killed, and keeps
    the spool locked meanwhile: a new server, started at once, would otherwise send the
    same message again."""
    upstream, gateway, child = sending_slowly(gateway_factory, upstreams)
    assert gateway.process is not None
    os.kill(gateway.process.pid, signal.SIGKILL)  # the server alone
    gateway.process.wait()

    refused = subprocess.run(
        gateway.command("serve"), capture_output=True, text=True, env=gateway.env, timeout=30
    )
    assert refused.returncode != 0
    assert "in use by smtpgate" in refused.stderr
    wait_until(lambda: not Path(f"/proc/{child}").exists(), what="the delivery process to finish")

    gateway.start()
    gateway.wait_for_state("bob@example.com", "delivered")
    assert [m.rcpt_tos for m in upstream.messages] == [["bob@example.com"]]
