"""Wiring and lifecycle: open the log, start the writer and dispatcher, bind the listeners, stop cleanly."""

from __future__ import annotations

import gc
import logging
import os
import secrets
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy import make_url
from twisted.internet import defer, endpoints, task, threads
from twisted.internet.interfaces import IListeningPort
from twisted.python.threadable import isInIOThread
from twisted.python.threadpool import ThreadPool
from twisted.web import server

from hl7bridge.app.config import Config
from hl7bridge.app.config_diff import ServiceDiff
from hl7bridge.app.config_digest import ConfigIdentity, identity
from hl7bridge.app.dispatch_config import router
from hl7bridge.app.instance import Instance, default_name
from hl7bridge.app.wiring import intake_for, replayer_for
from hl7bridge.core.logs import RefusalLog
from hl7bridge.core.status import Role
from hl7bridge.dispatch.child import ChildSpec, FixedToken
from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import JourneysClient, TokenSource, plain_http_outside_loopback
from hl7bridge.dispatch.leader import Leadership
from hl7bridge.dispatch.process import DispatcherProcess
from hl7bridge.hl7 import tables
from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.ingest.intake import Intake
from hl7bridge.ingest.pipeline import Pipeline
from hl7bridge.mllp.connections import CappedFactory, FdWatch, raise_descriptor_limit
from hl7bridge.mllp.listener import MLLPFactory, listen, listen_on
from hl7bridge.ops import systemd as sd
from hl7bridge.ops.health import HealthResource, HealthState, Probes
from hl7bridge.ops.metrics import Metrics
from hl7bridge.store import (
    DAMAGED_HINT,
    Job,
    PurgeCounts,
    StoreError,
    Writer,
    compact,
    integrity_problem,
    is_locked,
    loose_directory,
    open_engine,
    purge_step,
)
from hl7bridge.store.cluster import record_retention_pass
from hl7bridge.store.configs import register_config, set_reload_refused, set_running_config
from hl7bridge.store.search import newest_id
from hl7bridge.store.search_index import Indexer, index_path
from hl7bridge.testing.sandbox import Sandbox, write_secret
from hl7bridge.workflow.accounts import AccountError, add_user, list_users
from hl7bridge.workflow.dispatch_target import record_dispatch_target
from hl7bridge.workflow.status import ListenerFacts, LogFacts, assess

log = logging.getLogger("hl7bridge.service")
#: Descriptors the service holds besides connections: database files, pipes, the reactor, the API client.
DESCRIPTOR_BASE = 128
#: A health connection that sends no complete request for this long is closed.
HEALTH_IDLE_TIMEOUT = 30.0
#: How long start-up waits for another process's write lock to record its configuration, and how often it tries.
CONFIG_LOCK_WAIT = 60.0
CONFIG_LOCK_RETRY = 0.25
#: The ``--sandbox`` demo's console account, and the file beside the control token holding its password.
DEMO_USER = "demo"
DEMO_PASSWORD_FILE = "console-demo.password"
#: Seconds between an instance's looks at whether it leads and a retention pass is due.
RETENTION_LOOK = 60.0
#: Seconds between two retention passes on the log, whichever instances run them.
RETENTION_EVERY = 86400.0
#: Descriptors short for this long is a leak, not a burst: the watchdog then lets systemd restart.
FD_RESTART_AFTER = 120.0


class StartupError(RuntimeError):
    """The service cannot start; the message is one line saying what to fix."""


@dataclass
class Service:
    config: Config
    reactor: Any
    with_sandbox: bool = False
    sandbox_listen: str | None = None
    factories: list[MLLPFactory] = field(default_factory=list)
    #: The listeners' intakes, in listener order: a reload gives them the new routes.
    intakes: list[Intake] = field(default_factory=list)
    ports: list[IListeningPort] = field(default_factory=list)
    writer: Writer | None = None
    dispatcher: Dispatcher | DispatcherProcess | None = None
    sandbox: Sandbox | None = None
    metrics: Metrics = field(default_factory=Metrics)
    health: HealthState | None = None
    stopping: bool = False
    #: The configuration running (``configs`` id, digest, path and mtime): recorded with every command.
    config_id: int | None = None
    config_identity: ConfigIdentity | None = None
    _loops: list[task.LoopingCall] = field(default_factory=list)
    _health_port: IListeningPort | None = None
    _probes: Probes | None = None
    fds: FdWatch | None = None
    _console_port: IListeningPort | None = None
    _console_pool: ThreadPool | None = None
    #: This process as one instance of those on the log (its heartbeat, whether it leads).
    instance: Instance | None = None
    #: ``time.time()`` of this instance's last retention pass.
    _purged_at: float = 0.0
    #: A SQLite log's search index thread (``store.search_index``); PostgreSQL indexes at intake.
    indexer: Indexer | None = None

    @defer.inlineCallbacks
    def start(self):
        """Open the database, start the sandbox if asked, bind every listener; fails with ``StartupError``."""
        os.umask(0o077)
        tables.warm()
        cfg = self.config
        tls = [lst.name for lst in cfg.listeners if lst.endpoint.split(":", 1)[0] == "ssl"]
        tls += ["console"] if cfg.console.tls else []
        if tls and not sd.write_execute_memory_allowed():
            raise StartupError(
                f"listener {tls[0]!r} uses TLS, which needs writable+executable memory (pyOpenSSL's cffi "
                "callbacks); under systemd install systemd/hl7bridge-tls.conf (MemoryDenyWriteExecute=no)"
            )
        try:
            self.engine = open_engine(cfg.service.database, cfg.service.sqlite_synchronous)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        yield self._check_log()
        self.writer = Writer(self.engine, self.reactor.callFromThread)
        self.writer.start()
        try:
            self.config_identity = identity(cfg)
            self.config_id = yield self._record_config(self.config_identity)
        except Exception as exc:  # noqa: BLE001 - the log cannot be written: nothing could be accepted
            yield self.stop()
            raise StartupError(f"cannot record the configuration in the log: {exc.__class__.__name__}: {exc}") from None
        name = cfg.service.instance_name or default_name(cfg.listeners[0].endpoint if cfg.listeners else None)
        self.instance = Instance(self.reactor, self.writer, self.engine, name, cfg.service.dispatch_lease,
                                 self._last_message)  # fmt: skip
        self.instance.start()
        if self.with_sandbox:
            yield self._start_sandbox()
        routes = router(self.config.routes, self.config.dispatch)
        if routes is not None:
            self._start_dispatcher()
        # What start-up built (schema tables, Twisted, SQLAlchemy) lives as long as the service: keep it out of
        # the collector's full passes (one took 0.2 s while the first messages waited), before anything listens.
        gc.collect()
        gc.freeze()
        self._budget_descriptors()
        self.fds = FdWatch(self.reactor)
        self.fds.start()
        acks = AckBuilder(cfg.service.application, cfg.service.facility, cfg.service.ack_phi)
        for listener in cfg.listeners:
            sync = listener.ack_mode == "dispatched"
            intake = intake_for(cfg, listener, acks)
            intake.config_id = self.config_id
            self.intakes.append(intake)
            pipeline = Pipeline(
                intake,
                self.writer,
                listener.name,
                strict_validation=listener.validation == "strict",
                verdicts=self.dispatcher if sync else None,
                reactor=self.reactor,
                dispatch_timeout=listener.dispatch_timeout,
                observer=self.metrics,
            )
            factory = MLLPFactory(listener, pipeline, self.reactor, self.metrics, self.fds)
            self.metrics.track_listener(listener.name, lambda f=factory: len(f.open))
            try:
                port = yield listen(self.reactor, factory)
            except Exception as exc:  # noqa: BLE001 - CannotListenError, KeyError for systemd fds, ...
                yield self.stop()
                raise StartupError(
                    f"listener {listener.name!r} cannot listen on {listener.endpoint}: "
                    f"{why_not_bound(exc, f'listeners.{listener.name}.endpoint (or serve --listen)')}"
                ) from None
            self.factories.append(factory)
            self.ports.append(port)
            log.info("listener %s listening on %s", listener.name, _describe(port))
        yield self._start_health()
        yield self._start_console()
        self._start_retention()
        self._start_search_index()
        log.info("configuration %s, digest %s (configs id %d)", self.config_identity.path,
                 self.config_identity.digest, self.config_id)  # fmt: skip

    @defer.inlineCallbacks
    def _check_log(self):
        """Refuse a damaged log before anything is accepted into it; report a directory others can read."""
        database = self.config.service.database
        loose = loose_directory(database)
        if loose:
            log.warning("%s", loose)
        if self.config.service.integrity_check == "off":
            return
        # quick_check reads every page: about 1 s per GB in the page cache, tens of seconds per GB from disk.
        # systemd's start timeout is extended while (and only while) it runs.
        extend = task.LoopingCall(sd.notify, "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=Checking the message log")
        extend.clock = self.reactor
        extend.start(20.0)
        started = time.monotonic()
        try:
            problem = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), integrity_problem,
                                                      self.engine)  # fmt: skip
        finally:
            extend.stop()
        if problem is not None:
            self.engine.dispose()
            path = make_url(database).database or database
            raise StartupError(
                f"the message log {path} is damaged (quick_check: {problem}); {DAMAGED_HINT.format(path=path)}"
            )
        took = time.monotonic() - started
        # Worth an operator's attention only when it delays the start noticeably (a large or cold log).
        log.log(logging.INFO if took >= 1.0 else logging.DEBUG, "message log checked in %.1f s (PRAGMA quick_check)",
                took)  # fmt: skip

    def _budget_descriptors(self) -> None:
        """Every listener full at once must fit under RLIMIT_NOFILE, with room for the database,
        the dispatcher's pipes and the API client: raise the soft limit if the hard one allows."""
        cfg = self.config
        wanted = (sum(lst.max_connections for lst in cfg.listeners) + cfg.health.max_connections
                  + (cfg.console.max_connections if cfg.console.listen else 0) + DESCRIPTOR_BASE)  # fmt: skip
        soft, hard = raise_descriptor_limit(wanted)
        if soft < wanted:
            log.warning("the descriptor limit (RLIMIT_NOFILE %d, hard %d) is below the %d the listeners' "
                        "max_connections may need: raise LimitNOFILE or lower max_connections", soft, hard, wanted)  # fmt: skip

    def _descriptors(self) -> tuple[bool, str]:
        return self.fds.status() if self.fds is not None else (True, "not watched")

    def _listeners_up(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting down"
        if len(self.ports) != len(self.config.listeners):
            return False, f"{len(self.ports)} of {len(self.config.listeners)} listener(s) bound"
        return True, ", ".join(f"{f.config.name} on {_describe(p)} ({len(f.open)} connection(s))"
                               for f, p in zip(self.factories, self.ports, strict=False))  # fmt: skip

    def _listener_facts(self) -> list[ListenerFacts]:
        return [ListenerFacts(f.config.name, len(f.open), self.metrics.last_message_at.get(f.config.name))
                for f in self.factories]  # fmt: skip

    @defer.inlineCallbacks
    def _start_health(self):
        cfg = self.config.health
        expires = self.config.api.token_expiry()
        self.health = HealthState(
            self._listeners_up,
            lambda: self.dispatcher.state() if self.dispatcher is not None else None,
            cfg.outbox_stuck_after,
            cfg.heartbeat_interval,
            descriptors=self._descriptors,
            listeners=self._listener_facts,
            token_expires=expires,
            instance=self.instance.id if self.instance is not None else None,
            search_index=lambda: self.indexer.state().problem if self.indexer is not None else None,
        )
        self.metrics.token_expires.set(expires.timestamp() if expires else 0)
        self._probes = Probes(self.reactor, self.health, self.writer, self.engine, self.metrics,
                              [lst.name for lst in self.config.listeners])  # fmt: skip
        self._probes.start()
        if not cfg.listen:
            return
        site = server.Site(HealthResource(self.health, self.metrics, self._probes), timeout=HEALTH_IDLE_TIMEOUT)
        site.noisy = False
        capped = CappedFactory(site, cfg.max_connections, "health", RefusalLog(log, self.reactor))
        try:
            self._health_port = yield endpoints.serverFromString(self.reactor, cfg.listen).listen(capped)
        except Exception as exc:  # noqa: BLE001 - port in use and the like
            yield self.stop()
            raise StartupError(
                f"the health listener cannot listen on {cfg.listen}: {why_not_bound(exc, 'health.listen')}"
            ) from None
        log.info("health and metrics on http://%s/healthz, /status and /metrics", _describe(self._health_port))

    @defer.inlineCallbacks
    def _start_console(self):
        """The JSON API and console on ``[console] listen``, with a thread pool of its own for their blocking work."""
        cfg = self.config.console
        if not cfg.listen:
            return
        from hl7bridge.api.console.pages import PAGES, STATIC
        from hl7bridge.api.http import POOL_THREADS, ApiContext
        from hl7bridge.api.server import build_site
        from hl7bridge.api.v1 import ROUTES
        from hl7bridge.app.settings_view import settings_json

        pool = ThreadPool(minthreads=0, maxthreads=POOL_THREADS, name="hl7bridge-api")
        pool.start()
        self._console_pool = pool
        health = self.health
        assert health is not None
        context = ApiContext(
            engine=self.engine,
            pool=pool,
            status=lambda: self._status_json(health),
            settings=lambda: settings_json(self.config),
            count_login=self.metrics.login,
            login_log=RefusalLog(logging.getLogger("hl7bridge.api"), self.reactor),
            replayer=lambda **options: replayer_for(self.engine, self.config, **options),
            config_diff=ServiceDiff(self.engine),
            secure_cookies=cfg.tls,
            session_idle=cfg.session_idle,
            session_absolute=cfg.session_absolute,
        )
        site = build_site(context, [*ROUTES, *PAGES], self.reactor, idle_timeout=cfg.idle_timeout,
                          request_timeout=cfg.request_timeout, static_dir=STATIC)  # fmt: skip
        capped = CappedFactory(site, cfg.max_connections, "console", RefusalLog(log, self.reactor))
        try:
            self._console_port = yield listen_on(self.reactor, cfg.listen, capped)
        except Exception as exc:  # noqa: BLE001 - port in use and the like
            yield self.stop()
            raise StartupError(
                f"the console cannot listen on {cfg.listen}: {why_not_bound(exc, 'console.listen')}"
            ) from None
        log.info("console on %s (JSON API at /api/v1/)", self.console_url())
        if warning := cfg.cleartext_warning():
            log.warning("%s", warning)
        if self.sandbox is not None:
            yield threads.deferToThreadPool(self.reactor, pool, self._demo_account)

    def _demo_account(self) -> None:
        """``--sandbox`` is a newcomer's demo: with the console on and a new log (no message, no account yet), an
        admin ``demo`` with a random password (written 0600 beside the sandbox's control token) lets them log in at
        once. Never without ``--sandbox``, never in a log that holds messages or accounts."""
        assert self.sandbox is not None and self.engine is not None
        with self.engine.connect() as conn:
            logged = newest_id(conn)
        if logged or list_users(self.engine):  # a log that holds messages is no newcomer's: no stray admin in it
            return
        password = secrets.token_urlsafe(18)
        database = make_url(self.config.service.database).database or "."
        target = Path(self.sandbox.control_token_file or database).parent / DEMO_PASSWORD_FILE
        try:
            write_secret(str(target), password)
            add_user(self.engine, DEMO_USER, Role.ADMIN, password, actor="serve --sandbox")
        except (OSError, AccountError) as exc:
            log.warning("no console demo account (%s): add one with 'hl7bridge user add'", exc)
            return
        log.warning("console demo account: log in at %s as %r with the password in %s (mode 0600); add your own "
                    "with 'hl7bridge user add'", self.console_url(), DEMO_USER, target)  # fmt: skip

    def _status_json(self, health: HealthState, fresh: LogFacts | None = None) -> dict[str, Any]:
        """``/status``'s JSON for the console and the JSON API (their worker threads): the log's facts read now in
        the asking thread, then judged on the reactor, whose the other facts are."""
        if not isInIOThread():
            try:
                fresh = self._probes.read_now() if self._probes is not None else None
            except Exception:  # noqa: BLE001 - the timer's last read, and its error, are judged instead
                fresh = None
            return threads.blockingCallFromThread(self.reactor, self._status_json, health, fresh)
        if fresh is not None and self._probes is not None:
            self._probes.record(fresh)
        return assess(health.facts(time.time())).to_json()

    def _start_search_index(self) -> None:
        """A SQLite log's index is a file of its own, kept by a thread of its own (``store.search_index.Indexer``):
        no message's commit waits for it. PostgreSQL indexes each message in the transaction that writes it
        (``store.schema.index_messages``): nothing to run."""
        assert self.engine is not None
        if index_path(self.engine) is not None:
            self.indexer = Indexer(Path(str(self.engine.url.database)),
                                   check=self.config.service.integrity_check != "off")  # fmt: skip
            self.indexer.start()

    def _start_retention(self) -> None:
        """A daily pass on one instance of the log (``Instance.housekeeping_turn``: the leading one, or where no
        dispatcher runs, the one holding the housekeeping lock): every instance looks every ``RETENTION_LOOK`` s, so
        that after a takeover or a death another takes the passes over."""
        if not self.config.service.retention_days:
            return
        loop = task.LoopingCall(self._retention_due)
        loop.clock = self.reactor
        loop.start(RETENTION_LOOK, now=True)
        self._loops.append(loop)

    @defer.inlineCallbacks
    def _retention_due(self):
        if self.instance is None or self.writer is None or time.time() - self._purged_at < RETENTION_EVERY:
            return
        try:
            release = yield self.instance.housekeeping_turn(self.dispatcher is not None, RETENTION_EVERY)
        except Exception as exc:  # noqa: BLE001 - tried again at the next look
            log.warning("retention: cannot tell which instance passes: %s", exc.__class__.__name__)
            return
        if release is None:
            return
        self._purged_at = at = time.time()
        try:
            self.writer.submit_job(Job(lambda conn: record_retention_pass(conn, at), _retention_recorded))
            yield self.purge_now(self.config.service.retention_days * 86400.0)
        finally:
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), release)

    def _last_message(self) -> float | None:
        return max(self.metrics.last_message_at.values(), default=None)

    def purge_now(self, older_than: float) -> defer.Deferred:
        """One retention pass, in slices through the writer so ingest is never held for long."""
        cutoff = time.time() - older_than
        total = PurgeCounts()
        done: defer.Deferred = defer.Deferred()

        def step_done(result: PurgeCounts | None, error: BaseException | None) -> None:
            self.reactor.callFromThread(after_step, result, error)

        def after_step(result: PurgeCounts | None, error: BaseException | None) -> None:
            if error is not None or result is None or self.writer is None:
                log.error("retention purge failed: %s", error)
                done.callback(total)
                return
            total.__iadd__(result)
            if result.total:
                self.writer.submit_job(Job(lambda conn: purge_step(conn, cutoff), step_done))
                return
            threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), compact, self.engine)
            log.info("retention: cleared patient data of %d message(s), %d command(s), %d attempt(s)",
                     total.messages, total.commands, total.attempts)  # fmt: skip
            done.callback(total)

        if self.writer is None:
            return defer.succeed(total)
        self.writer.submit_job(Job(lambda conn: purge_step(conn, cutoff), step_done))
        return done

    def _record_config(self, config: ConfigIdentity) -> defer.Deferred[int]:
        """The ``configs`` id of ``config``, recorded (through the writer) as the one the service runs now. Every
        command names it, so nothing is accepted before it is recorded: while another process (a CLI) holds the
        log's write lock, this waits for it, up to ``CONFIG_LOCK_WAIT``, instead of failing the start."""
        done: defer.Deferred[int] = defer.Deferred()
        assert self.writer is not None
        writer = self.writer
        deadline = time.monotonic() + CONFIG_LOCK_WAIT

        def work(conn: Any) -> int:
            config_id = register_config(conn, config.digest, config.path, config.mtime, time.time())
            set_running_config(conn, config_id, time.time())
            return config_id

        def settled(result: int, error: BaseException | None) -> None:  # in the writer thread
            if error is not None and is_locked(error) and time.monotonic() < deadline:
                self.reactor.callFromThread(waiting)
            elif error is not None:
                self.reactor.callFromThread(done.errback, error)
            else:
                self.reactor.callFromThread(done.callback, result)

        def waiting() -> None:
            nonlocal told
            if not told:
                told = True
                log.warning("another process holds the log's write lock: waiting for it to record the configuration")
            self.reactor.callLater(CONFIG_LOCK_RETRY, writer.submit_job, Job(work, settled))

        told = False
        writer.submit_job(Job(work, settled))
        return done

    def reload_refused(self, reason: str) -> None:
        """A reload check-config refused: recorded for ``hl7bridge reload``, which waits to tell the operator."""
        if self.writer is not None:
            at = time.time()
            self.writer.submit_job(Job(lambda conn: set_reload_refused(conn, at, reason), _reload_recorded))

    def reload(self, config: Config) -> defer.Deferred[list[str]]:
        """SIGHUP: new routes and mappings take effect for the next message once the new configuration is recorded
        in the log (its commands then name it); connections stay open.

        Fires with what could not be applied without a restart."""
        needs_restart = []
        if [lst.endpoint for lst in config.listeners] != [lst.endpoint for lst in self.config.listeners]:
            needs_restart.append("listeners")
        if config.service.database != self.config.service.database:
            needs_restart.append("service.database")
        if bool(config.routes) != bool(self.config.routes):
            needs_restart.append("routes (adding the first route or removing the last)")
        routes = router(config.routes, config.dispatch)
        fresh = identity(config)

        def apply(config_id: int) -> list[str]:
            for intake in self.intakes:
                intake.router, intake.config_id = routes, config_id
            self.config = replace(self.config, routes=config.routes, dispatch=config.dispatch)
            self.config_id, self.config_identity = config_id, fresh
            log.info("running configuration %s, digest %s (configs id %d)", fresh.path, fresh.digest, config_id)
            return needs_restart

        return self._record_config(fresh).addCallback(apply)

    def dispatch_now(self) -> None:
        """SIGUSR1 (``hl7bridge dispatch now``): the dispatcher tries what waits now, a held queue's probe included;
        the backoff in the log was ended by the command that sent the signal."""
        if self.dispatcher is None:
            log.warning("dispatch now: no dispatcher runs (no routes are configured)")
            return
        log.info("dispatch now: the dispatcher tries what waits")
        self.dispatcher.dispatch_now()

    def console_url(self) -> str | None:
        """Where the console and the JSON API answer; None when ``[console] listen`` is off."""
        if self._console_port is None:
            return None
        return f"{'https' if self.config.console.tls else 'http'}://{_describe(self._console_port)}/"

    def addresses(self) -> list[str]:
        return [_describe(p) for p in self.ports]

    def watchdog_problems(self) -> list[str]:
        """What a restart could fix: the listeners, the database, or descriptors short for minutes (a leak;
        a burst passes sooner). A paused API cannot be fixed so, and a restart would close the MLLP port
        the engines send to."""
        if self.health is None:
            return []
        checks = self.health.checks(time.time())
        problems = [f"{n}: {c.detail}" for n, c in checks.items() if n in ("listeners", "database") and not c.ok]
        fds = self.fds
        if (
            fds is not None
            and fds.short_since is not None
            and self.reactor.seconds() - fds.short_since > FD_RESTART_AFTER
        ):
            problems.append(f"descriptors: {checks['descriptors'].detail} for over {FD_RESTART_AFTER:.0f} s")
        return problems

    @defer.inlineCallbacks
    def stop(self, grace: float = 10.0):
        """Stop accepting, answer what was received (up to ``grace`` s), let API calls finish, flush the log."""
        self.stopping = True
        for loop in self._loops:
            if loop.running:
                loop.stop()
        for port in self.ports:
            yield port.stopListening()
        self.ports = []
        if self._console_port is not None:
            port, self._console_port = self._console_port, None
            yield port.stopListening()
        if self.fds is not None:
            self.fds.stop()
        waited = 0.0
        # A short pause first: bytes already on their way in count as received.
        while waited < grace and (waited < 0.25 or any(f.answers_pending() for f in self.factories)):
            yield _sleep(self.reactor, 0.05)
            waited += 0.05
        for factory in self.factories:
            for conn in list(factory.open):
                conn.transport.loseConnection()
        if self.dispatcher is not None:
            dispatcher, self.dispatcher = self.dispatcher, None
            if isinstance(dispatcher, DispatcherProcess):
                yield dispatcher.stop(grace)
            else:
                yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), dispatcher.stop, grace)
        if self._probes is not None:
            self._probes.stop()
        if self.instance is not None and self.writer is not None:
            yield self.instance.leave()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.stop)
        if self.indexer is not None:
            indexer, self.indexer = self.indexer, None
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), indexer.stop)
        if self._console_pool is not None:
            pool, self._console_pool = self._console_pool, None
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)
        if self._health_port is not None:
            yield self._health_port.stopListening()
        if self.sandbox is not None:
            yield self.sandbox.stop()

    @defer.inlineCallbacks
    def _start_sandbox(self):
        cfg = self.config
        self.sandbox = Sandbox.from_config(self.reactor, cfg.sandbox, cfg.api.org_id, self.sandbox_listen)
        if self.sandbox.state.client_token() is None:
            raise StartupError("--sandbox needs a [[sandbox.tokens]] entry with the scopes create.journey_instances "
                               "and read.journey_instances (see the example config)")  # fmt: skip
        try:
            yield self.sandbox.start()
        except Exception as exc:  # noqa: BLE001 - port in use, a remote interface not allowed, and the like
            raise StartupError(
                f"the sandbox cannot start on {self.sandbox.listen_description}: "
                f"{why_not_bound(exc, 'sandbox.listen (or serve --sandbox-listen)')}"
            ) from None
        self.config = replace(cfg, api=replace(cfg.api, base_url=self.sandbox.url))
        log.info("sandbox Journeys API listening on %s", self.sandbox.url)

    def _start_dispatcher(self) -> None:
        api, dispatch, service = self.config.api, self.config.dispatch, self.config.service
        # The sandbox gets its own token, never the configured one: that is the production API's secret.
        sandbox_token = self.sandbox.state.client_token() if self.sandbox is not None else None
        tokens: TokenSource | FixedToken = FixedToken(sandbox_token) if sandbox_token else api.tokens()
        postgres = make_url(service.database).get_backend_name() == "postgresql"
        if postgres and dispatch.run_in == "thread":
            log.warning('dispatch.run_in = "thread" is not for a shared PostgreSQL log: only the elected dispatcher '
                        "process may send; it runs in a process")  # fmt: skip
        instance = self.instance.id if self.instance is not None else ""
        if (dispatch.run_in == "process" or postgres) and _shareable(service.database):
            spec = ChildSpec(
                database=service.database,
                api=api,
                settings=asdict(dispatch),
                log_level=service.log_level,
                log_format=service.log_format,
                log_phi=service.log_phi,
                token=tokens.token if isinstance(tokens, FixedToken) else "",
                instance=instance,
                lease=service.dispatch_lease,
            )
            self.dispatcher = DispatcherProcess(self.reactor, spec, self.metrics, self.writer)
        else:
            client = JourneysClient(api, tokens)
            # Elected as the process is (the file's lock): a second service on this log stands by, never doubles.
            leadership = Leadership(service.database, instance, service.dispatch_lease)
            self.dispatcher = Dispatcher(self.engine, self.writer, client, dispatch, observer=self.metrics,
                                         leadership=leadership)  # fmt: skip
        self.writer.on_commands = self.dispatcher.wake
        self.dispatcher.start()
        started = time.time()
        self.writer.submit_job(Job(lambda conn: record_dispatch_target(conn, api.base_url, started), _target_recorded))
        if sandbox_token:
            log.warning("dispatching to the built-in sandbox at %s (org %s) with the sandbox's own token; nothing "
                        "reaches MedChat", api.base_url, api.org_id)  # fmt: skip
        else:
            log.info("dispatching to %s (org %s) with the configured API token", api.base_url, api.org_id)
        if plain_http_outside_loopback(api.base_url):
            log.warning("api.base_url %s is plain http:// to another machine: the token and patient data cross "
                        "the network unencrypted; use https://", api.base_url)  # fmt: skip


def _shareable(database: str) -> bool:
    """Whether another process can open the same log (not an in-memory SQLite database)."""
    url = make_url(database)
    return not (url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"))


def _sleep(reactor: Any, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _describe(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(host)


def why_not_bound(exc: BaseException, setting: str) -> str:
    """One line on why a port could not be bound; a conflict names the ``setting`` that chooses that port (each
    listener has its own: pointing at ``--listen`` for the health port sent operators to the wrong one)."""
    text = str(exc)
    if "Address already in use" in text:
        return f"the port is already in use (another hl7bridge or program holds it; choose another with {setting})"
    if isinstance(exc, (KeyError, IndexError)) or "LISTEN_FDS" in text:
        return "no socket was passed by systemd (start it through hl7bridge.socket, or use a tcp: endpoint)"
    return text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__


def _reload_recorded(_result: object, error: BaseException | None) -> None:
    if error is not None:
        log.error("cannot record the refused reload in the log: %s", error)


def _retention_recorded(_result: object, error: BaseException | None) -> None:
    if error is not None:
        log.error("retention: cannot record the pass in the log (another instance may pass today too): %s",
                  error.__class__.__name__)  # fmt: skip


def _target_recorded(_result: object, error: BaseException | None) -> None:
    """Never fatal: the service dispatches all the same; replay and reconcile then read an older record (they
    print its time) or api.base_url."""
    if error is not None:
        log.error("cannot record where the service dispatches (for replay and reconcile): %s", error)
