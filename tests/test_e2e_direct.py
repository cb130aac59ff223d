"""Direct delivery end to end: a loopback DNS server answers for the test domains, and
real SMTP servers on 127.0.0.x addresses play their MX hosts."""

from __future__ import annotations

import smtplib
from collections import Counter

import pytest
from conftest import (
    Certificates,
    DnsZone,
    Gateway,
    GatewayFactory,
    Upstreams,
    free_port,
    wait_until,
)


def direct(port: int, extra: str = "") -> str:
    """[direct] on `port` (every MX of the test listens there, each on its own address)."""
    return (
        f'[direct]\nport = {port}\ntimeout = "2s"\n{extra}\n'
        '[routes.direct]\nmode = "direct"\nretry_schedule = ["1s"]\n'
    )


def send(gateway: Gateway, recipients: list[str], sender: str = "a@example.org") -> str:
    with smtplib.SMTP("127.0.0.1", gateway.port, timeout=30) as client:
        refused = client.sendmail(sender, recipients, b"Subject: direct\r\n\r\nhello\r\n")
        assert refused == {}
        return client.noop()[1].decode()


def state(gateway: Gateway, address: str) -> dict[str, object]:
    return gateway.recipients()[address]


def test_each_domain_goes_to_its_own_mx_in_one_transaction(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    mx_a = upstreams.start(port, host="127.0.0.2")
    mx_b = upstreams.start(port, host="127.0.0.3")
    dns_zone.mx("a.test", (10, "mx.a.test", "127.0.0.2"))
    dns_zone.mx("b.test", (10, "mx.b.test", "127.0.0.3"))
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@a.test", "bob@a.test", "cid@b.test"])

    gateway.wait_for_state("cid@b.test", "delivered")
    gateway.wait_for_state("ann@a.test", "delivered")
    assert [m.rcpt_tos for m in mx_a.messages] == [["ann@a.test", "bob@a.test"]]
    assert [m.rcpt_tos for m in mx_b.messages] == [["cid@b.test"]]
    via = state(gateway, "ann@a.test")["via"]
    assert via == f"mx.a.test [127.0.0.2]:{port} without TLS"
    attempt = next(e for e in gateway.events() if e["event"] == "attempt" and e.get("mx"))
    assert {"domain", "mx", "ip", "via", "reply", "seconds"} <= set(attempt)


def test_preference_order_and_fallback_to_the_next_mx(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    backup = upstreams.start(port, host="127.0.0.5")
    # The best MX refuses connections (nothing listens on 127.0.0.4).
    dns_zone.mx("c.test", (20, "backup.c.test", "127.0.0.5"), (10, "main.c.test", "127.0.0.4"))
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@c.test"])

    gateway.wait_for_state("ann@c.test", "delivered")
    assert len(backup.messages) == 1
    tried = [e["mx"] for e in gateway.events() if e["event"] == "attempt" and e.get("mx")]
    assert tried == ["main.c.test", "backup.c.test"]


def test_421_greeting_moves_on_to_the_next_mx(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    from conftest import RawScript

    port = free_port()
    upstreams.start_protocol(lambda: RawScript(b"421 4.3.2 busy\r\n"), port, host="127.0.0.6")
    good = upstreams.start(port, host="127.0.0.7")
    dns_zone.mx("g.test", (10, "busy.g.test", "127.0.0.6"), (20, "good.g.test", "127.0.0.7"))
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@g.test"])

    gateway.wait_for_state("ann@g.test", "delivered")
    assert len(good.messages) == 1


def test_implicit_mx_is_the_domains_own_address(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(port, host="127.0.0.8")
    dns_zone.add("d.test", "A", "127.0.0.8")
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@d.test"])

    gateway.wait_for_state("ann@d.test", "delivered")
    assert len(server.messages) == 1


def test_domains_that_take_no_mail_fail_at_once(
    gateway_factory: GatewayFactory, dns_zone: DnsZone
) -> None:
    dns_zone.add("e.test", "TXT", '"no mail here"')  # exists, but no MX and no address
    dns_zone.add("f.test", "MX", "0 .")  # RFC 7505 null MX
    gateway = gateway_factory(direct(free_port()))

    send(gateway, ["ann@e.test", "ann@f.test", "ann@nonexistent.test"])

    assert "no MX and no address" in str(
        gateway.wait_for_state("ann@e.test", "failed")["last_reply"]
    )
    assert str(gateway.wait_for_state("ann@f.test", "failed")["last_reply"]).startswith(
        "556 5.1.10"
    )
    nx = gateway.wait_for_state("ann@nonexistent.test", "failed")
    assert "does not exist (NXDOMAIN)" in str(nx["last_reply"])


def test_dns_trouble_is_temporary(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(port, host="127.0.0.9")
    dns_zone.mx("slow.test", (10, "mx.slow.test", "127.0.0.9"))
    dns_zone.silent.add("slow.test")  # the DNS server does not answer for now
    dns_zone.servfail.add("broken.test")
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@slow.test", "ann@broken.test"])

    slow = gateway.wait_for_state("ann@slow.test", "deferred")
    assert str(slow["last_reply"]).startswith("451 4.4.3 DNS lookup of MX for slow.test")
    assert str(gateway.wait_for_state("ann@broken.test", "deferred")["last_reply"]).startswith(
        "451 4.4.3"
    )
    dns_zone.silent.clear()  # the DNS server answers again: the retry delivers
    gateway.wait_for_state("ann@slow.test", "delivered")
    assert len(server.messages) == 1


def test_dns_server_down_defers(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory(
        direct(free_port()), env={"SMTPGATE_DNS__NAMESERVERS": f'["127.0.0.1:{free_port()}"]'}
    )
    send(gateway, ["ann@a.test"])
    recipient = gateway.wait_for_state("ann@a.test", "deferred")
    assert str(recipient["last_reply"]).startswith("451 4.4.3 DNS lookup of MX for a.test")


def test_some_recipients_accepted_others_refused(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(
        port, host="127.0.0.10", rcpt_replies={"gone@h.test": "550 5.1.1 no such user"}
    )
    dns_zone.mx("h.test", (10, "mx.h.test", "127.0.0.10"))
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@h.test", "gone@h.test"])

    gateway.wait_for_state("ann@h.test", "delivered")
    assert gateway.wait_for_state("gone@h.test", "failed")["last_reply"] == (
        "550 5.1.1 no such user"
    )
    assert [m.rcpt_tos for m in server.messages] == [["ann@h.test"]]


def test_silence_after_data_is_logged_as_unknown_and_retried(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(port, host="127.0.0.11", drop_after_data=1)
    dns_zone.mx("i.test", (10, "mx.i.test", "127.0.0.11"))
    gateway = gateway_factory(direct(port))

    send(gateway, ["ann@i.test"])

    delivered = gateway.wait_for_state("ann@i.test", "delivered")
    assert delivered["attempts"] == 2
    assert any(e["event"] == "outcome unknown" for e in gateway.events())
    assert len(server.messages) == 1


def test_an_address_literal_needs_no_dns(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(port, host="127.0.0.19")
    gateway = gateway_factory(direct(port))
    send(gateway, ["ann@[127.0.0.19]"])
    gateway.wait_for_state("ann@[127.0.0.19]", "delivered")
    assert len(server.messages) == 1
    assert dns_zone.queries == []


def test_connections_are_reused_for_the_same_host(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    server = upstreams.start(port, host="127.0.0.12")
    dns_zone.mx("j.test", (10, "mx.j.test", "127.0.0.12"))
    gateway = gateway_factory(direct(port, "workers = 1"))

    for n in range(5):
        send(gateway, [f"r{n}@j.test"])

    wait_until(lambda: len(server.messages) == 5, what="five messages at the MX")
    assert server.handler.connections == 1


def test_one_worker_moves_between_hosts_without_waiting_for_idle_timeouts(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    port = free_port()
    first = upstreams.start(port, host="127.0.0.17")
    second = upstreams.start(port, host="127.0.0.18")
    dns_zone.mx("k.test", (10, "mx.k.test", "127.0.0.17"))
    dns_zone.mx("l.test", (10, "mx.l.test", "127.0.0.18"))
    gateway = gateway_factory(direct(port, "workers = 1"))

    for n in range(4):
        send(gateway, [f"r{n}@k.test", f"r{n}@l.test"])

    # The one connection goes idle after each host; the next host must not wait for the
    # idle connection to expire (5 s each time) before it gets its turn.
    wait_until(
        lambda: len(first.messages) == 4 and len(second.messages) == 4,
        timeout=8,
        what="eight transactions over one worker",
    )
    assert first.handler.most_open == 1 and second.handler.most_open == 1


def test_opportunistic_tls_and_the_stricter_modes(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    dns_zone: DnsZone,
    certificates: Certificates,
) -> None:
    port = free_port()
    upstreams.start(port, host="127.0.0.13", starttls=certificates.untrusted_context)
    plain = upstreams.start(port, host="127.0.0.14")
    dns_zone.mx("tls.test", (10, "mx.tls.test", "127.0.0.13"))
    dns_zone.mx("plain.test", (10, "mx.plain.test", "127.0.0.14"))

    opportunistic = gateway_factory(direct(port))
    send(opportunistic, ["ann@tls.test", "ann@plain.test"])
    encrypted = opportunistic.wait_for_state("ann@tls.test", "delivered")
    assert str(encrypted["via"]).endswith(("TLSv1.3", "TLSv1.2"))
    cleartext = opportunistic.wait_for_state("ann@plain.test", "delivered")
    assert str(cleartext["via"]).endswith("without TLS")
    shown = opportunistic.cli("queue", "show", opportunistic.queue()[0]["queue_id"]).stdout
    assert "VIA" in shown and "mx.tls.test [127.0.0.13]" in shown

    strict = gateway_factory(direct(port, 'tls = "verify"'))
    send(strict, ["bob@tls.test"])
    assert "TLS certificate not trusted" in str(
        strict.wait_for_state("bob@tls.test", "deferred")["last_reply"]
    )
    required = gateway_factory(direct(port, 'tls = "require"'))
    send(required, ["bob@plain.test"])
    assert "does not offer STARTTLS" in str(
        required.wait_for_state("bob@plain.test", "deferred")["last_reply"]
    )
    assert len(plain.messages) == 1


@pytest.mark.parametrize(("workers", "per_domain"), [(4, 2), (256, 5)])
def test_a_slow_domain_does_not_starve_the_others(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    dns_zone: DnsZone,
    workers: int,
    per_domain: int,
) -> None:
    port = free_port()
    slow = upstreams.start(port, host="127.0.0.15", data_delay=1.0)
    fast = upstreams.start(port, host="127.0.0.16")
    dns_zone.mx("slow.example.test", (10, "mx.slow.example.test", "127.0.0.15"))
    dns_zone.mx("fast.example.test", (10, "mx.fast.example.test", "127.0.0.16"))
    gateway = gateway_factory(direct(port, f"workers = {workers}\nper_domain = {per_domain}"))

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(20):  # the slow domain's mail arrives first
            client.sendmail(
                "a@example.org", [f"s{n}@slow.example.test"], b"Subject: s\r\n\r\nb\r\n"
            )
        for n in range(20):
            client.sendmail(
                "a@example.org", [f"f{n}@fast.example.test"], b"Subject: f\r\n\r\nb\r\n"
            )

    wait_until(lambda: len(fast.messages) == 20, timeout=15, what="the fast domain's mail")
    assert len(slow.messages) < 20  # a second a message at a few connections: not done
    assert slow.handler.most_open <= per_domain
    counts = Counter(r["state"] for r in gateway.recipients().values())
    assert counts["delivered"] >= 20


@pytest.mark.parametrize(("slow_domains", "per_domain"), [(1, 2), (2, 1)])
def test_slow_domains_in_every_message_do_not_hold_back_the_others(
    gateway_factory: GatewayFactory,
    upstreams: Upstreams,
    dns_zone: DnsZone,
    slow_domains: int,
    per_domain: int,
) -> None:
    """Each message goes to one or two slow domains and a fast one, the slow domains'
    connections together half the workers: a slow part holds one connection while it
    waits, not the whole message's share of what is leased, and the messages whose slow
    parts wait take no worker from the fast domain's mail. (Slow domains whose
    `per_domain` connections add up to every worker do hold the rest back.)"""
    port = free_port()
    slow = [
        upstreams.start(port, host=f"127.0.0.{17 + n}", data_delay=3.0) for n in range(slow_domains)
    ]
    fast = upstreams.start(port, host="127.0.0.21")
    for n in range(slow_domains):
        dns_zone.mx(f"slow{n}.example.test", (10, f"mx.slow{n}.example.test", f"127.0.0.{17 + n}"))
    dns_zone.mx("fast.example.test", (10, "mx.fast.example.test", "127.0.0.21"))
    gateway = gateway_factory(direct(port, f"workers = 4\nper_domain = {per_domain}"))

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(20):
            slow_rcpts = [f"s{n}@slow{k}.example.test" for k in range(slow_domains)]
            client.sendmail(
                "a@example.org",
                [*slow_rcpts, f"f{n}@fast.example.test"],
                b"Subject: slow and fast\r\n\r\nb\r\n",
            )

    # per_domain slow transactions at a time, three seconds each: 30 s or more for a
    # slow domain. Held back by them, the fast domain would take as long.
    wait_until(lambda: len(fast.messages) == 20, timeout=15, what="the fast domain's mail")
    for upstream in slow:
        assert len(upstream.messages) < 20
        assert upstream.handler.most_open <= per_domain


def test_what_is_leased_ahead_is_counted_in_connections(
    gateway_factory: GatewayFactory, upstreams: Upstreams, dns_zone: DnsZone
) -> None:
    """A message to four domains takes four connections. With two workers and slow MX
    hosts, the route keeps a couple of connections' worth of recipients leased
    (`sending`), not a couple of messages per connection (16 recipients): the rest wait
    in the spool, where they hold no memory of the delivery process and another job's
    mail may go first."""
    port = free_port()
    domains = [f"d{n}.example.test" for n in range(4)]
    for n, domain in enumerate(domains):
        upstreams.start(port, host=f"127.0.0.{40 + n}", data_delay=0.2)
        dns_zone.mx(domain, (10, f"mx.{domain}", f"127.0.0.{40 + n}"))
    gateway = gateway_factory(direct(port, "workers = 2\nper_domain = 2"))

    with smtplib.SMTP("127.0.0.1", gateway.port) as client:
        for n in range(8):
            recipients = [f"m{n}@{domain}" for domain in domains]
            client.sendmail("a@example.org", recipients, b"Subject: four\r\n\r\nb\r\n")

    most_sending = 0

    def all_delivered() -> bool:
        nonlocal most_sending
        states = Counter(r["state"] for r in gateway.recipients().values())
        most_sending = max(most_sending, states["sending"])
        return states["delivered"] == 32

    wait_until(all_delivered, timeout=60, what="all 32 recipients delivered")
    # Two messages' worth while their results are written, with the next one's.
    assert 0 < most_sending <= 12, f"{most_sending} recipients leased for 2 connections"
