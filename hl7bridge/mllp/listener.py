"""The MLLP server: connection policy (allowlist, limits, timeouts, TLS) and ACKs written in arrival order."""

from __future__ import annotations

import logging
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from twisted.internet import defer, endpoints, interfaces, protocol, tcp
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from hl7bridge.core.answers import Answer, Close
from hl7bridge.core.logs import RefusalLog
from hl7bridge.core.observer import NullObserver, Observer
from hl7bridge.mllp import tls
from hl7bridge.mllp.connections import FdWatch, Refused, enable_keepalive
from hl7bridge.mllp.framing import MLLPReceiver, frame
from hl7bridge.mllp.tls import TlsSettings

log = logging.getLogger("hl7bridge.listener")

FRAMES_PER_TURN = 32
"""Frames of one read handed over before the event loop turns (other connections, answers, timers): one read
of 64 KiB can hold 21,000 empty frames, which took every other connection 1.9 s to wait out at once."""


class ListenerSettings(Protocol):
    """What the listener reads of its configuration (``app.config.ListenerConfig`` is one)."""

    @property
    def name(self) -> str: ...
    @property
    def endpoint(self) -> str: ...
    @property
    def max_message_bytes(self) -> int: ...
    @property
    def lenient_framing(self) -> bool: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def frame_timeout(self) -> float: ...
    @property
    def max_in_flight(self) -> int: ...
    @property
    def max_connections(self) -> int: ...
    @property
    def max_connections_per_peer(self) -> int: ...

    def allows(self, host: str) -> bool: ...

    def tls_settings(self) -> TlsSettings: ...


class FrameHandler(Protocol):
    """Where frames go (the pipeline): each answer comes back through ``reply``, ``None`` for none, ``CLOSE`` to
    close the connection without one."""

    def handle(self, payload: bytes, peer: str, reply: Callable[[Answer], None]) -> None: ...

    def too_long(self, head: bytes, limit: int, peer: str, reply: Callable[[Answer], None]) -> None: ...


@dataclass
class ListenerStats:
    connections: int = 0
    accepted_connections: int = 0
    refused_connections: int = 0
    frames: int = 0
    oversized: int = 0
    junk_bytes: int = 0
    timeouts: int = 0


@implementer(interfaces.IHalfCloseableProtocol, interfaces.IHandshakeListener)
class MLLPConnection(MLLPReceiver):
    """One sender's connection. Answers go out in the order the frames came in.

    Idle means no progress: the idle timer restarts when a frame is complete and when the last pending
    answer has been written, never for bytes outside a frame (a junk byte every few seconds would hold
    the connection forever). A frame in progress is bounded by ``frame_timeout`` from its first start
    block; a start block that abandons an unfinished frame does not restart that clock."""

    factory: MLLPFactory
    #: Set by the TLS verifier when it refuses the client's certificate: the reason, for the log.
    tls_refusal: str | None = None

    def __init__(self) -> None:
        #: The socket, while ACKs may go to it directly: plain TCP, and nothing ever left queued in Twisted.
        self._socket: socket.socket | None = None
        self._slots: deque[list] = deque()
        self._idle_call = None
        self._frame_call = None
        self._idle_expired = False
        self._read_closed = False
        #: Set when an answer was ``CLOSE``: nothing more is read, answered or sent on this connection.
        self._unanswered = False
        self._handshake_done = False
        self._counted = False
        self.peer = "?"
        self.host = "?"

    # -- connection lifecycle ----------------------------------------------------------------------
    def connectionMade(self) -> None:
        cfg = self.factory.config
        self.MAX_LENGTH = cfg.max_message_bytes
        self.lenient = cfg.lenient_framing
        self.frames_per_turn = FRAMES_PER_TURN
        peer = self.transport.getPeer()
        self.host = str(getattr(peer, "host", "?"))
        self.peer = f"{self.host}:{getattr(peer, 'port', '')}".rstrip(":")
        if self.factory.crowded(self.transport):
            self.transport.abortConnection()
            return
        self._counted = True
        self.factory.stats.connections += 1
        if isinstance(self.transport, tcp.Connection) and not interfaces.ISSLTransport.providedBy(self.transport):
            self._socket = self.transport.getHandle()
        self.factory.opened(self)
        enable_keepalive(self.transport)
        self._reset_idle()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._socket = None
        if not self._counted:
            return
        self.factory.closed(self)
        self.factory.stats.connections -= 1
        for call in (self._idle_call, self._frame_call):
            if call is not None and call.active():
                call.cancel()
        why = self.tls_refusal or tls.handshake_failure(reason.value)
        if self.factory.tls and not self._handshake_done and why:
            self.factory.refusals.warn(("tls", self.host, why), "TLS handshake from %s on %s refused: %s",
                                       self.peer, self.factory.config.name, why)  # fmt: skip

    def readConnectionLost(self) -> None:
        """The sender half-closed: answer what is pending, then close."""
        self._read_closed = True
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        self.transport.loseConnection()

    # -- timeouts ----------------------------------------------------------------------------------
    def _reset_idle(self) -> None:
        self._idle_expired = False
        timeout = self.factory.config.idle_timeout
        if not timeout:
            return
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(timeout)
        else:
            self._idle_call = self.factory.clock.callLater(timeout, self._timed_out, "idle")

    def _timed_out(self, why: str) -> None:
        if why == "idle":
            if self._slots:
                self._reset_idle()
                return
            if self.in_frame and self._frame_call is not None and self._frame_call.active():
                self._idle_expired = True  # the frame may still end in time; its timer decides
                return
        self.factory.stats.timeouts += 1
        log.info("closing connection from %s: %s timeout", self.peer, why)
        self.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        super().dataReceived(data)
        if self.in_frame:
            self._start_frame_timer()
        elif self._frame_call is not None and self._frame_call.active():
            self._stop_frame_timer()  # a frame was dropped and none follows
            if self._idle_expired and self.transport is not None:
                self._timed_out("idle")

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
        self._reset_idle()
        self.factory.stats.frames += 1

    def _stop_frame_timer(self) -> None:
        if self._frame_call is not None and self._frame_call.active():
            self._frame_call.cancel()

    # -- frames ------------------------------------------------------------------------------------
    def frameReceived(self, payload: bytes) -> None:
        self._frame_done()
        if not self._unanswered:
            self.factory.pipeline.handle(payload, self.peer, self._reserve())

    def frameTooLong(self, head: bytes) -> None:
        self._frame_done()
        self.factory.stats.oversized += 1
        log.warning("frame from %s exceeds %d bytes; answered AR", self.peer, self.MAX_LENGTH)
        self.factory.pipeline.too_long(head, self.MAX_LENGTH, self.peer, self._reserve())

    def junkDiscarded(self, count: int) -> None:
        self.factory.stats.junk_bytes += count

    def _reserve(self) -> Callable[[Answer], None]:
        """A place in the answer queue for the frame just read, and what fills it."""
        slot: list = [False, None, self.factory.clock.seconds()]
        self._slots.append(slot)

        def answered(result: Answer) -> None:
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
            if isinstance(payload, Close):
                self._close_unanswered()
                return
            if payload is not None and self.transport is not None:
                self._send(frame(payload))
                self.factory.observer.ack_latency(self.factory.config.name, self.factory.clock.seconds() - started)
        if len(slots) < self.factory.config.max_in_flight // 2 + 1:
            self.release("in_flight")
        if not slots:
            self._reset_idle()
        self._close_if_done()

    def _send(self, data: bytes) -> None:
        """Straight to the socket while nothing waits in Twisted's buffer.

        ``transport.write`` only queues: the bytes leave once the next poll reports the socket writable,
        which cost every ACK two epoll registrations and a pass of the loop. Only this method writes to the
        transport, so once the kernel leaves part of an ACK to Twisted, every later ACK of this connection
        queues behind it there and order holds. Public API only: the socket comes from ``getHandle``."""
        sock = self._socket
        if sock is not None:
            try:
                sent = sock.send(data)
            except OSError:  # EAGAIN, or an error that ``write`` meets again and reports as Twisted does
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
            self._socket = None
        self.transport.write(data)

    def _close_unanswered(self) -> None:
        """Close without answering this frame or the ones read after it (the pipeline said why): the answers before
        it are out or queued in Twisted, which sends them first; none is written to the socket directly after."""
        self._unanswered = True
        self._socket = None
        self._slots.clear()
        log.info("closing connection from %s with %s unanswered", self.peer, self.factory.config.name)
        if self.transport is not None:
            self.transport.loseConnection()

    def _close_if_done(self) -> None:
        if self._read_closed and not self._slots and not self.backlogged:
            self.transport.loseConnection()


class MLLPFactory(protocol.Factory):
    protocol = MLLPConnection

    def __init__(
        self,
        config: ListenerSettings,
        pipeline: FrameHandler,
        clock: IReactorTime,
        observer: Observer | None = None,
        fds: FdWatch | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.clock = clock
        self.observer = observer or NullObserver()
        self.fds = fds
        self.stats = ListenerStats()
        self.open: set[MLLPConnection] = set()
        self.per_peer: dict[str, int] = {}
        self.refusals = RefusalLog(log, clock)
        self.tls = config.endpoint.startswith("ssl:")

    def opened(self, conn: MLLPConnection) -> None:
        self.open.add(conn)
        self.per_peer[conn.host] = self.per_peer.get(conn.host, 0) + 1

    def closed(self, conn: MLLPConnection) -> None:
        self.open.discard(conn)
        left = self.per_peer.get(conn.host, 0) - 1
        if left > 0:
            self.per_peer[conn.host] = left
        else:
            self.per_peer.pop(conn.host, None)

    def answers_pending(self) -> bool:
        """Whether any connection still waits for an answer to a frame it sent (a stop waits for those)."""
        return any(conn._slots for conn in self.open)

    def buildProtocol(self, addr: IAddress) -> protocol.Protocol:
        host = getattr(addr, "host", None)
        why = self._refusal(host)
        if why:
            self.refuse(str(host), why)
            return Refused()
        self.stats.accepted_connections += 1
        return super().buildProtocol(addr)

    def refuse(self, host: str, why: str) -> None:
        self.stats.refused_connections += 1
        self.refusals.warn((host, why), "refused connection from %s on %s: %s", host, self.config.name, why)

    def crowded(self, transport: interfaces.ITransport) -> bool:
        """A connection whose descriptor eats into the reserve kept for the database and the dispatcher."""
        if self.fds is None:
            return False
        try:
            fd = transport.getHandle().fileno()
        except (AttributeError, OSError):
            return False
        if not self.fds.crowded(fd):
            return False
        self.stats.accepted_connections -= 1
        self.refuse(str(getattr(transport.getPeer(), "host", "?")), "out of file descriptors")
        self.fds.dropped()
        return True

    def _refusal(self, host: str | None) -> str:
        cfg = self.config
        if host is not None and not cfg.allows(host):
            return "not in the allowlist"
        if len(self.open) >= cfg.max_connections:
            return f"{cfg.max_connections} connections open (max_connections)"
        if host is not None and self.per_peer.get(host, 0) >= cfg.max_connections_per_peer:
            return f"{cfg.max_connections_per_peer} connections open from this peer (max_connections_per_peer)"
        if self.fds is not None and self.fds.low():
            return "out of file descriptors"
        return ""


def server_endpoint(reactor: object, description: str) -> interfaces.IStreamServerEndpoint:
    """The endpoint to bind. For ``ssl:`` that is plain TCP: the TLS layer is added by ``listen_on``."""
    if not description.startswith("ssl:"):
        return endpoints.serverFromString(reactor, description)
    port, options = tls.split_endpoint(description)
    return endpoints.serverFromString(reactor, tls.tcp_description(port, options))


def listen_on(reactor: object, description: str, factory: protocol.Factory,
              settings: TlsSettings | None = None) -> defer.Deferred:  # fmt: skip
    """Bind an endpoint string; an ``ssl:`` one gets this package's TLS context (``tls.py``: Twisted's own ``ssl:``
    defaults allow static-RSA and CBC suites). The MLLP listeners and the console listener both bind through here.
    The Deferred fires with the IListeningPort."""
    endpoint = server_endpoint(reactor, description)
    if not description.startswith("ssl:"):
        return endpoint.listen(factory)
    creator = tls.ServerConnections(tls.context_for(description, settings or TlsSettings()))
    return endpoint.listen(TLSMemoryBIOFactory(creator, False, factory))


def listen(reactor: object, factory: MLLPFactory) -> defer.Deferred:
    """Bind the listener's endpoint; the Deferred fires with the IListeningPort."""
    return listen_on(reactor, factory.config.endpoint, factory, factory.config.tls_settings())
