"""The MLLP server: connection policy (allowlist, limit, timeouts) and ACKs written in arrival order."""

from __future__ import annotations

import logging
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer, endpoints, interfaces, protocol, ssl, tcp
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from .config import ListenerConfig
from .metrics import NullObserver, Observer
from .mllp import MLLPReceiver, frame
from .pipeline import Pipeline

log = logging.getLogger("hl7bridge.listener")

FRAMES_PER_TURN = 32
"""Frames of one read handed over before the event loop turns (other connections, answers, timers): one read
of 64 KiB can hold 21,000 empty frames, which took every other connection 1.9 s to wait out at once."""


@dataclass
class ListenerStats:
    connections: int = 0
    accepted_connections: int = 0
    refused_connections: int = 0
    frames: int = 0
    oversized: int = 0
    junk_bytes: int = 0
    timeouts: int = 0


@implementer(interfaces.IHalfCloseableProtocol)
class MLLPConnection(MLLPReceiver):
    """One sender's connection. Answers go out in the order the frames came in."""

    factory: MLLPFactory

    def __init__(self) -> None:
        self._slots: deque[list] = deque()
        self._idle_call = None
        self._frame_call = None
        self._read_closed = False
        self.peer = "?"
        self._plain_tcp = False

    # -- connection lifecycle ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        cfg = self.factory.config
        self.MAX_LENGTH = cfg.max_message_bytes
        self.lenient = cfg.lenient_framing
        self.frames_per_turn = FRAMES_PER_TURN
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '')}".rstrip(":")
        self.factory.stats.connections += 1
        self.factory.open.add(self)
        self._plain_tcp = isinstance(self.transport, tcp.Connection)
        self._reset_idle()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.open.discard(self)
        self.factory.stats.connections -= 1
        for call in (self._idle_call, self._frame_call):
            if call is not None and call.active():
                call.cancel()

    def readConnectionLost(self) -> None:
        """The sender half-closed: answer what is pending, then close."""
        self._read_closed = True
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    # -- timeouts ----------------------------------------------------------------------------------
    def _reset_idle(self) -> None:
        timeout = self.factory.config.idle_timeout
        if not timeout:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.clock.callLater(timeout, self._timed_out, "idle")

    def _timed_out(self, why: str) -> None:
        if why == "idle" and self._slots:
            self._reset_idle()
            return
        self.factory.stats.timeouts += 1
        log.info("closing connection from %s: %s timeout", self.peer, why)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        self._reset_idle()
        super().dataReceived(data)
        if self.in_frame:
            self._start_frame_timer()

    def backlogConsumed(self) -> None:
        if self.in_frame:
            self._start_frame_timer()

    def _start_frame_timer(self) -> None:
        """Timed from the read that left a frame unfinished: a frame that arrives whole costs no timer."""
        timeout = self.factory.config.frame_timeout
        if timeout and (self._frame_call is None or not self._frame_call.active()):
            self._frame_call = self.factory.clock.callLater(timeout, self._timed_out, "frame")

    def _frame_done(self) -> None:
        self._stop_frame_timer()
        self.factory.stats.frames += 1

    def _stop_frame_timer(self) -> None:
        if self._frame_call is not None and self._frame_call.active():
            self._frame_call.cancel()

    def frameDropped(self) -> None:
        self._stop_frame_timer()

    # -- frames ------------------------------------------------------------------------------------
    def frameReceived(self, payload: bytes) -> None:
        self._frame_done()
        self.factory.pipeline.handle(payload, self.peer, self._reserve())

    def frameTooLong(self, head: bytes) -> None:
        self._frame_done()
        self.factory.stats.oversized += 1
        log.warning("frame from %s exceeds %d bytes; answered AR", self.peer, self.MAX_LENGTH)
        self.factory.pipeline.too_long(head, self.MAX_LENGTH, self.peer, self._reserve())

    def junkDiscarded(self, count: int) -> None:
        self.factory.stats.junk_bytes += count

    def _reserve(self) -> Callable[[bytes | None], None]:
        """A place in the answer queue for the frame just read, and what fills it."""
        slot: list = [False, None, self.factory.clock.seconds()]
        self._slots.append(slot)

        def answered(result: bytes | None) -> None:
            if not slot[0]:
                slot[0], slot[1] = True, result
                self._flush()

        if len(self._slots) >= self.factory.config.max_in_flight:
            self.hold("in_flight")
        return answered

    def schedule(self, call: Callable[[], None]) -> None:
        self.factory.clock.callLater(0, call)

    def _flush(self) -> None:
        slots = self._slots
        while slots and slots[0][0]:
            _ready, payload, started = slots.popleft()
            if payload is not None and self.transport is not None:
                self._send(frame(payload))
                self.factory.observer.ack_latency(self.factory.config.name, self.factory.clock.seconds() - started)
        if len(slots) < self.factory.config.max_in_flight // 2 + 1:
            self.release("in_flight")
        self._close_if_done()

    def _send(self, data: bytes) -> None:
        """Straight to the socket when nothing waits ahead of it.

        ``transport.write`` only queues: the bytes leave once the next poll reports the socket writable,
        which cost every ACK two epoll registrations and a pass of the loop. What the kernel does not take
        at once goes the usual way, after what was sent, so order holds. A TLS connection's transport is a
        wrapper that passes attribute reads through to the socket's, hence the type test."""
        transport = self.transport
        if self._plain_tcp and not (transport.TLS or transport.dataBuffer or transport._tempDataBuffer):
            sent = transport.writeSomeData(data)
            if isinstance(sent, int):  # else an exception instance: write() then meets and reports it
                if sent == len(data):
                    return
                data = data[sent:]
        transport.write(data)

    def _close_if_done(self) -> None:
        if self._read_closed and not self._slots and not self.backlogged:
            self.transport.loseConnection()


class _Refused(protocol.Protocol):
    """Closes at once. Returning None from buildProtocol is not enough under TLS wrapping."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


class MLLPFactory(protocol.Factory):
    protocol = MLLPConnection

    def __init__(
        self, config: ListenerConfig, pipeline: Pipeline, clock: IReactorTime, observer: Observer | None = None
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.clock = clock
        self.observer = observer or NullObserver()
        self.stats = ListenerStats()
        self.open: set[MLLPConnection] = set()

    def buildProtocol(self, addr: IAddress) -> protocol.Protocol:
        host = getattr(addr, "host", None)
        if host is not None and not self.config.allows(host):
            self.stats.refused_connections += 1
            log.warning("refused connection from %s on %s: not in the allowlist", host, self.config.name)
            return _Refused()
        if len(self.open) >= self.config.max_connections:
            self.stats.refused_connections += 1
            log.warning("refused connection on %s: %d connections open (limit)", self.config.name, len(self.open))
            return _Refused()
        self.stats.accepted_connections += 1
        return super().buildProtocol(addr)


def server_endpoint(reactor: object, description: str, client_ca: str = "") -> interfaces.IStreamServerEndpoint:
    """The endpoint for a description; ``client_ca`` turns an ``ssl:`` one into mutual TLS.

    Twisted's ``ssl:`` strings cannot ask for client certificates, so the parsed
    options are rebuilt with verification against the given CA bundle.
    """
    if not client_ca:
        return endpoints.serverFromString(reactor, description)
    if not description.startswith("ssl:"):
        raise ValueError("tls_client_ca needs an ssl: endpoint")
    _kind, args, kwargs = endpoints._parseServer(description, None)
    port, _factory, options = args
    authorities = load_certificates(client_ca)
    verified = ssl.CertificateOptions(
        privateKey=options.privateKey,
        certificate=options.certificate,
        extraCertChain=options.extraCertChain,
        dhParameters=getattr(options, "dhParameters", None),
        verify=True,
        caCerts=authorities,
        requireCertificate=True,
    )
    return endpoints.SSL4ServerEndpoint(reactor, port, verified, **kwargs)


def load_certificates(path: str) -> list:
    """Every certificate in a PEM bundle, as pyOpenSSL X509 objects."""
    with open(path, "rb") as handle:
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", handle.read(), re.DOTALL)
    if not blocks:
        raise ValueError(f"{path} holds no PEM certificate")
    return [ssl.Certificate.loadPEM(block).original for block in blocks]


def listen(reactor: object, factory: MLLPFactory) -> defer.Deferred:
    """Bind the listener's endpoint; the Deferred fires with the IListeningPort."""
    endpoint = server_endpoint(reactor, factory.config.endpoint, factory.config.tls_client_ca)
    return endpoint.listen(factory)
