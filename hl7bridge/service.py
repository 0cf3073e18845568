"""Wiring and lifecycle: open the log, start the writer and dispatcher, bind the listeners, stop cleanly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, threads
from twisted.internet.interfaces import IListeningPort

from . import hl7schema
from .ack import AckBuilder
from .config import Config
from .dispatch_config import router
from .dispatcher import Dispatcher, DispatchSettings
from .intake import Intake
from .journeys import JourneysClient, TokenSource
from .listener import MLLPFactory, listen
from .pipeline import Pipeline
from .sandbox import Sandbox, SandboxState
from .store import StoreError, Writer, open_engine

log = logging.getLogger("hl7bridge.service")


class StartupError(RuntimeError):
    """The service cannot start; the message is one line saying what to fix."""


@dataclass
class Service:
    config: Config
    reactor: Any
    with_sandbox: bool = False
    sandbox_listen: str | None = None
    factories: list[MLLPFactory] = field(default_factory=list)
    ports: list[IListeningPort] = field(default_factory=list)
    writer: Writer | None = None
    dispatcher: Dispatcher | None = None
    sandbox: Sandbox | None = None

    @defer.inlineCallbacks
    def start(self):
        """Open the database, start the sandbox if asked, bind every listener; fails with ``StartupError``."""
        os.umask(0o077)
        hl7schema.warm()
        cfg = self.config
        try:
            self.engine = open_engine(cfg.service.database, cfg.service.sqlite_synchronous)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.writer = Writer(self.engine, self.reactor.callFromThread)
        self.writer.start()
        if self.with_sandbox:
            yield self._start_sandbox()
        routes = router(self.config.routes, self.config.dispatch)
        if routes is not None:
            self._start_dispatcher()
        acks = AckBuilder(cfg.service.application, cfg.service.facility)
        for listener in cfg.listeners:
            sync = listener.ack_mode == "dispatched"
            intake = Intake(listener.feed(), acks, listener.charset_fallback, routes, listener.name, sync)
            pipeline = Pipeline(
                intake,
                self.writer,
                listener.name,
                listener.validation == "strict",
                verdicts=self.dispatcher if sync else None,
                reactor=self.reactor,
                dispatch_timeout=listener.dispatch_timeout,
            )
            factory = MLLPFactory(listener, pipeline, self.reactor)
            try:
                port = yield listen(self.reactor, factory)
            except Exception as exc:  # noqa: BLE001 - CannotListenError, KeyError for systemd fds, ...
                yield self.stop()
                raise StartupError(
                    f"listener {listener.name!r} cannot listen on {listener.endpoint}: {_why(exc)}"
                ) from None
            self.factories.append(factory)
            self.ports.append(port)
            log.info("listener %s listening on %s", listener.name, _describe(port))

    @defer.inlineCallbacks
    def _start_sandbox(self):
        cfg = self.config
        sandbox_cfg = cfg.sandbox
        tokens = dict(sandbox_cfg.tokens)
        if not tokens:
            raise StartupError("--sandbox needs [[sandbox.tokens]] in the configuration (see the example config)")
        state = SandboxState(sandbox_cfg.org_id or cfg.api.org_id, tokens,
                             {j.chat_bot_id: j for j in sandbox_cfg.journeys}, replace(sandbox_cfg.faults))  # fmt: skip
        self.sandbox = Sandbox(self.reactor, self.sandbox_listen or sandbox_cfg.listen, state)
        try:
            yield self.sandbox.start()
        except Exception as exc:  # noqa: BLE001 - port in use and the like
            raise StartupError(f"the sandbox cannot listen on {self.sandbox.listen_description}: {_why(exc)}") from None
        self.config = replace(cfg, api=replace(cfg.api, base_url=self.sandbox.url))
        log.info("sandbox Journeys API listening on %s", self.sandbox.url)

    def _start_dispatcher(self) -> None:
        api, dispatch = self.config.api, self.config.dispatch
        tokens = api.tokens()
        if self.sandbox is not None and not _token_available(tokens):
            tokens = _FixedToken(next(iter(self.sandbox.state.tokens)))
        client = JourneysClient(api.base_url, api.org_id, tokens, api.cancel_path, api.connect_timeout,
                                api.read_timeout)  # fmt: skip
        settings = DispatchSettings(
            batch_size=dispatch.batch_size,
            batch_window=dispatch.batch_window_ms / 1000.0,
            workers=dispatch.workers,
            retry_initial=dispatch.retry_initial,
            retry_max=dispatch.retry_max,
            probe_interval=dispatch.auth_probe_interval,
        )
        self.dispatcher = Dispatcher(self.engine, self.writer, client, settings)
        self.writer.on_commands = self.dispatcher.wake
        self.dispatcher.start()
        log.info("dispatching to %s (org %s)", api.base_url, api.org_id)

    def addresses(self) -> list[str]:
        return [_describe(p) for p in self.ports]

    @defer.inlineCallbacks
    def stop(self, grace: float = 10.0):
        """Stop accepting, answer what was received (up to ``grace`` s), let API calls finish, flush the log."""
        for port in self.ports:
            yield port.stopListening()
        self.ports = []
        waited = 0.0
        while any(c._slots for f in self.factories for c in f.open) and waited < grace:
            yield _sleep(self.reactor, 0.05)
            waited += 0.05
        for factory in self.factories:
            for conn in list(factory.open):
                conn.transport.loseConnection()
        if self.dispatcher is not None:
            dispatcher, self.dispatcher = self.dispatcher, None
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), dispatcher.stop, grace)
        if self.writer is not None:
            writer, self.writer = self.writer, None
            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.stop)
        if self.sandbox is not None:
            yield self.sandbox.stop()


@dataclass(frozen=True)
class _FixedToken:
    """The in-process sandbox's own token, when no other is configured."""

    token: str

    def read(self) -> str:
        return self.token


def _token_available(tokens: TokenSource) -> bool:
    try:
        tokens.read()
    except Exception:  # noqa: BLE001 - any failure means "not available"
        return False
    return True


def _sleep(reactor: Any, seconds: float) -> defer.Deferred:
    d: defer.Deferred = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


def _describe(port: IListeningPort) -> str:
    host = port.getHost()
    if hasattr(host, "port"):
        return f"{host.host}:{host.port}"
    return str(host)


def _why(exc: BaseException) -> str:
    text = str(exc)
    if "Address already in use" in text:
        return "the port is already in use (another hl7bridge or program holds it; use --listen to pick another)"
    if isinstance(exc, (KeyError, IndexError)) or "LISTEN_FDS" in text:
        return "no socket was passed by systemd (start it through hl7bridge.socket, or use a tcp: endpoint)"
    return text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
