"""Wiring and lifecycle: open the log, start the writer, bind the listeners, shut down cleanly."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from twisted.internet import defer
from twisted.internet.interfaces import IListeningPort

from . import hl7schema
from .ack import AckBuilder
from .config import Config
from .intake import Intake
from .listener import MLLPFactory, listen
from .pipeline import Pipeline
from .store import Writer, open_engine

log = logging.getLogger("hl7bridge.service")


class StartupError(RuntimeError):
    """The service cannot start; the message is one line saying what to fix."""


@dataclass
class Service:
    config: Config
    reactor: object
    factories: list[MLLPFactory] = field(default_factory=list)
    ports: list[IListeningPort] = field(default_factory=list)
    writer: Writer | None = None

    @defer.inlineCallbacks
    def start(self):
        """Open the database and bind every listener; fails with ``StartupError``."""
        os.umask(0o077)
        hl7schema.warm()
        from .store import StoreError

        try:
            engine = open_engine(self.config.service.database, self.config.service.sqlite_synchronous)
        except StoreError as exc:
            raise StartupError(str(exc)) from None
        self.engine = engine
        self.writer = Writer(engine, self.reactor.callFromThread)
        self.writer.start()
        acks = AckBuilder(self.config.service.application, self.config.service.facility)
        for listener in self.config.listeners:
            intake = Intake(listener.feed(), acks, listener.charset_fallback)
            pipeline = Pipeline(intake, self.writer, listener.name, listener.validation == "strict")
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

    def addresses(self) -> list[str]:
        return [_describe(p) for p in self.ports]

    @defer.inlineCallbacks
    def stop(self, grace: float = 10.0):
        """Stop accepting, let pending answers go out (up to ``grace`` s), flush the writer."""
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
        if self.writer is not None:
            writer, self.writer = self.writer, None
            from twisted.internet import threads

            yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), writer.stop)


def _sleep(reactor: object, seconds: float) -> defer.Deferred:
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
    if "Address already in use" in text or ("98" in text and "Couldn't listen" in text):
        return "the port is already in use (another hl7bridge or program holds it; use --listen to pick another)"
    if isinstance(exc, (KeyError, IndexError)) or "LISTEN_FDS" in text:
        return "no socket was passed by systemd (start it through hl7bridge.socket, or use a tcp: endpoint)"
    return text.strip().splitlines()[0] if text.strip() else exc.__class__.__name__
