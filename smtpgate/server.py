"""Server: builds the data path from a Config and runs it from startup to shutdown.

`Server(config).serve()` is what `smtpgate serve` runs, in the manner of uvicorn: a
startup checklist, run until a signal, then a graceful shutdown; a second signal insists.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from smtpgate import clock, logs
from smtpgate.auth import Authenticator, auth_file, auth_warning
from smtpgate.config import Config, DefaultHttpListen
from smtpgate.delivery.process import DeliveryProcess
from smtpgate.eventloop import hand_over_quickly, set_startup_aside
from smtpgate.listener import Connections, Handler, protocol_factory, tls_context
from smtpgate.passthrough import Passthrough
from smtpgate.policy import RelayPolicy, refuse_open_relay
from smtpgate.router import Router
from smtpgate.scheduler import DRAIN_SECONDS, Scheduler, build_scheduler
from smtpgate.spool import SqliteSpool
from smtpgate.spool.salvage import SalvageReport
from smtpgate.transports import RelayTransport, Transport
from smtpgate.transports.build import build_transports, relay_of
from smtpgate.web.interface import HttpInterface
from smtpgate.web.metrics import Metrics

log = logs.get(__name__)

SESSION_GRACE_SECONDS = 10.0  # how long open SMTP sessions may finish at shutdown
TLS_HANDSHAKE_SECONDS = 10.0  # for ssl:// listeners


class StartupError(Exception):
    """The server cannot start for a reason the operator must fix (port taken, ...)."""


def _log_salvage(report: SalvageReport) -> None:
    """Loud, once per damaged message: someone must look into the quarantine."""
    log.warning(
        "the spool was damaged: every intact message was kept, the damage is quarantined",
        quarantine=str(report.quarantine),
        problems=report.problems[:5],
        messages_kept=report.copied.get("messages", 0),
        recipients_kept=report.copied.get("recipients", 0),
        messages_quarantined=len(report.messages),
        messages_not_delivered=len(report.undeliverable),
        rows_lost=report.lost,
        report=str(report.quarantine / "report.txt"),
    )
    for entry in report.messages:
        log.warning(
            "message kept only in part" if entry.kept else "message cannot be delivered",
            queue_id=entry.queue_id,
            reason=entry.reason,
            quarantine=str(report.quarantine),
        )


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._stop = asyncio.Event()
        self._signals = 0

    def separate_routes(self) -> list[str]:
        """The routes delivered by the delivery process: all of them when it is on,
        except those of a relay that a passthrough route uses, whose connection and
        rate limits must be shared with the listener's live sessions."""
        config = self.config
        mode = config.server.delivery_process
        if mode == "inline" or (mode == "auto" and (os.cpu_count() or 1) < 2):
            return []
        live_relays = {relay_of(config, n) for n, r in config.routes.items() if r.passthrough}
        return [name for name in config.routes if relay_of(config, name) not in live_relays]

    async def serve(self) -> None:
        config = self.config
        # 1. Refuse a config that would make an open relay, before touching anything;
        #    find every relay's password and the listener's certificate (a missing one
        #    is a config error, now).
        refuse_open_relay(config)
        passwords = config.relay_passwords(os.environ)
        token = config.http.resolve_token(os.environ)
        tls = tls_context(config)
        users_file = auth_file(config)
        if warning := auth_warning(config):
            log.warning(warning)
        # 2. Take the spool (and its single-server lock), salvaging a damaged one into a
        #    fresh spool; release work a dead process leased.
        spool = SqliteSpool.open(
            config.spool_path(), exclusive=True, quarantine=config.state_dir() / "quarantine"
        )
        if spool.salvaged is not None:
            _log_salvage(spool.salvaged)
        listeners: list[asyncio.Server] = []
        transports: dict[str, Transport] = {}
        scheduler: Scheduler | None = None
        scheduler_task: asyncio.Task[None] | None = None
        delivery_process: DeliveryProcess | None = None
        http: HttpInterface | None = None
        try:
            released = await spool.release_leases(clock.now())
            if released:
                log.warning("released recipients left in flight by a previous run", count=released)
            # 3. The delivery side, built but not started until the listeners are bound;
            #    in a process of its own where it can have a core.
            metrics = Metrics(spool, config.spool_path())
            waiting: dict[str, str] = {}
            for route in await spool.pending_routes() - set(config.routes):
                waiting[route] = (
                    f"waiting: route {route!r} is no longer in the config;"
                    " add it back to send this mail"
                )
            separate = self.separate_routes()
            inline = [name for name in config.routes if name not in separate]
            transports = build_transports(config, inline, passwords, spool)
            if separate:
                delivery_process = DeliveryProcess(
                    config,
                    separate,
                    passwords,
                    waiting,
                    spool,
                    metrics.count_attempts,
                    spool_lock=spool.lock_file,
                )
                try:
                    await delivery_process.start()
                except (Exception, asyncio.CancelledError) as error:
                    await delivery_process.close()
                    delivery_process = None
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    raise StartupError(
                        f"cannot start the delivery process ({error!r}; its own error, if"
                        ' any, is above); [server] delivery_process = "inline" runs'
                        " deliveries in this process instead"
                    ) from None
            for transport in set(transports.values()):
                await transport.start()
            router = Router(config)
            if inline:
                scheduler = build_scheduler(
                    config,
                    spool,
                    transports,
                    {} if separate else waiting,
                    on_recorded=metrics.count_results,
                )
            # 4. Monitoring over HTTP, bound before SMTP: once SMTP answers, so does the API
            #    (its app loads at the first request).
            if config.http.listen:
                http = HttpInterface(config, spool, metrics, token)
                for address in config.http.listen:
                    try:
                        http.listen(address)
                    except OSError as error:
                        if isinstance(config.http.listen, DefaultHttpListen):
                            # The default port (also Mailpit's) is taken: mail matters
                            # more than the page, so run without it and say so.
                            log.warning(
                                "HTTP monitoring not started: the default address is taken;"
                                " set [http] listen to another, or to [] to say so",
                                address=str(address),
                                error=error.strerror,
                            )
                            continue
                        raise StartupError(
                            f"cannot serve HTTP on {address}: {error.strerror}; change"
                            " [http] listen (or SMTPGATE_HTTP__LISTEN), or turn it off"
                            " with listen = []"
                        ) from None
            # 5. The accepting side.
            policy = RelayPolicy(config.server.trusted_networks)
            connections = Connections(
                config.server.max_connections,
                config.server.max_connections_per_client,
                exempt=policy.may_relay,
            )
            live_routes = {
                name: transport
                for name, transport in transports.items()
                if config.routes[name].passthrough and isinstance(transport, RelayTransport)
            }
            passthrough = Passthrough(live_routes) if live_routes else None

            def stored() -> None:
                metrics.count_accepted()
                if scheduler is not None:
                    scheduler.wake()
                if delivery_process is not None:
                    delivery_process.wake()

            handler = Handler(
                config, spool, router, policy, on_stored=stored, passthrough=passthrough
            )
            authenticator = (
                Authenticator(users_file, config.server.auth) if users_file is not None else None
            )
            factories = {
                implicit: protocol_factory(
                    config,
                    handler,
                    connections,
                    tls=tls,
                    implicit_tls=implicit,
                    authenticator=authenticator,
                )
                for implicit in (False, True)
            }
            loop = asyncio.get_running_loop()
            for address in config.server.listen:
                try:
                    listeners.append(
                        await loop.create_server(
                            factories[address.tls],
                            host=address.host,
                            port=address.port,
                            reuse_address=True,
                            ssl=tls if address.tls else None,
                            # A client that never finishes its TLS handshake must not hold
                            # a socket for asyncio's default minute.
                            ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS if address.tls else None,
                        )
                    )
                except OSError as error:
                    raise StartupError(f"cannot listen on {address}: {error.strerror}") from None
                log.info(
                    "listening",
                    address=str(address),
                    tls="implicit" if address.tls else "starttls" if tls else "none",
                    auth=str(users_file) if users_file is not None else None,
                )
            if scheduler is not None:
                scheduler_task = asyncio.create_task(scheduler.run(), name="scheduler")
            if delivery_process is not None:
                delivery_process.go()
            log.info(
                "ready",
                state_dir=str(config.state_dir()),
                spool=str(config.spool_path()),
                routes={n: r.mode for n, r in config.routes.items()},
            )
            set_startup_aside()
            hand_over_quickly()
            # 6. Run until asked to stop.
            self._install_signal_handlers()
            await self._stop.wait()
            # Shutdown checklist:
            # a. stop accepting connections;
            log.info("shutting down")
            for listener in listeners:
                listener.close()
            # b. let open sessions finish their transaction, up to the grace period;
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SESSION_GRACE_SECONDS):
                    await connections.idle.wait()
            # c. let deliveries under way finish, then cancel the rest (they stay leased
            #    and are sent again after the next start);
            if scheduler is not None:
                await scheduler.drain(DRAIN_SECONDS)
        finally:
            # d. stop the scheduler and the HTTP server (monitoring stays up while work
            #    drains), then close the spool: everything acknowledged is on disk.
            if scheduler_task is not None:
                scheduler_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await scheduler_task
            for listener in listeners:
                listener.close()
            for transport in set(transports.values()):
                await transport.close()
            if delivery_process is not None:  # it drains its own deliveries, then exits
                await delivery_process.close()
            if http is not None:
                await http.stop()
            await spool.close()
            log.info("stopped")

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info(
                "stop requested; finishing work under way (send again to force)",
                signal=signal.Signals(signum).name,
            )
            self._stop.set()
        else:
            log.warning("forced stop", signal=signal.Signals(signum).name)
            raise SystemExit(1)
