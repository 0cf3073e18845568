"""Connection hygiene shared by the MLLP and health listeners: refusal, TCP keep-alive, a connection cap for the
health port, and file-descriptor headroom (the refusals' rate-limited log is ``core.logs.RefusalLog``)."""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
from typing import Any

from twisted.internet import protocol, task
from twisted.internet.interfaces import IAddress, IReactorTime
from twisted.logger import globalLogPublisher
from twisted.protocols import policies

from hl7bridge.core.logs import RefusalLog

log = logging.getLogger("hl7bridge.connections")

#: Keep-alive on accepted sockets: a peer that vanished (power loss, a NAT that forgot the flow) is
#: found after about KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_COUNT = 2 minutes of silence.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 10
KEEPALIVE_COUNT = 6
#: Descriptors kept free for the database, the dispatcher's pipes and the API client: below this many,
#: new connections are refused and /healthz fails.
FD_RESERVE = 16
#: An accept that failed for want of descriptors counts for this long in /healthz.
ACCEPT_ERROR_HOLD = 5.0


class Refused(protocol.Protocol):
    """Closes at once. Returning None from buildProtocol is not enough under TLS wrapping."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()


def enable_keepalive(transport: Any) -> None:
    """TCP keep-alive on an accepted socket, so a half-open connection is found and closed."""
    try:
        sock = transport.getHandle()
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", KEEPALIVE_IDLE),
            ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL),
            ("TCP_KEEPCNT", KEEPALIVE_COUNT),
        ):
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except (AttributeError, OSError):
        pass


class CappedFactory(policies.WrappingFactory):
    """At most ``limit`` connections at once to the wrapped factory; the rest are closed at once."""

    def __init__(self, wrapped: protocol.Factory, limit: int, name: str, refusals: RefusalLog) -> None:
        super().__init__(wrapped)
        self.limit = limit
        self.name = name
        self.refusals = refusals

    def buildProtocol(self, addr: IAddress) -> protocol.Protocol | None:
        if len(self.protocols) >= self.limit:
            host = str(getattr(addr, "host", "?"))
            self.refusals.warn((self.name, host), "refused connection from %s on %s: %d connections open (limit)",
                               host, self.name, self.limit)  # fmt: skip
            return Refused()
        return super().buildProtocol(addr)


def open_descriptors() -> int | None:
    """How many descriptors the process holds; None where /proc is missing."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir itself held
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return descriptor_limit()
        return None


def descriptor_limit() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_descriptor_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (never above the hard limit); returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft, hard


class FdWatch:
    """Descriptor headroom, for /healthz and the log.

    When the table is full, Twisted's accept closes the new connection and logs at info level only, so
    exhaustion passed silently. This watches the table once a second and listens for those accept
    events; it reports on the way in and on the way out, not per connection."""

    def __init__(self, clock: IReactorTime, interval: float = 1.0, reserve: int = FD_RESERVE) -> None:
        self.clock = clock
        self.reserve = reserve
        self.open: int | None = None
        self.limit = descriptor_limit()
        self.accept_failed_at: float | None = None
        self.accept_failures = 0
        self.short_since: float | None = None
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = clock
        self._interval = interval

    def start(self) -> None:
        globalLogPublisher.addObserver(self._twisted_event)
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        globalLogPublisher.removeObserver(self._twisted_event)
        if self._loop.running:
            self._loop.stop()

    def _twisted_event(self, event: dict[str, Any]) -> None:
        """Twisted's accept, out of descriptors: it closes each waiting client with its reserved descriptor
        ("EMFILE recovery: Closed socket from ..."), or gives up on one ("Could not accept ... (EMFILE)")."""
        fmt = str(event.get("log_format") or "")
        if event.get("acceptError") in ("EMFILE", "ENFILE") or fmt.startswith("EMFILE recovery: Closed"):
            self.dropped()

    def dropped(self) -> None:
        """A connection was closed at accept for want of descriptors."""
        self.accept_failures += 1
        self.accept_failed_at = self.clock.seconds()
        if self.short_since is None:
            self.check()

    def crowded(self, fd: int) -> bool:
        """True when a just-accepted descriptor eats into the reserve. The kernel hands out the lowest
        free number, so every descriptor below ``fd`` is in use: an O(1) check on each accept."""
        return fd >= self.limit - self.reserve

    def low(self) -> bool:
        """True while fewer than ``reserve`` descriptors are free (as of the last check)."""
        return self.open is not None and self.limit - self.open < self.reserve

    def check(self) -> None:
        self.limit = descriptor_limit()
        self.open = open_descriptors()
        ok, detail = self.status()
        if not ok and self.short_since is None:
            self.short_since = self.clock.seconds()
            log.warning("out of file descriptors: %s; new connections are refused until some close", detail)
        elif ok and self.short_since is not None:
            log.warning("file descriptors available again after %.0f s: %s",
                        self.clock.seconds() - self.short_since, detail)  # fmt: skip
            self.short_since = None
            self.accept_failures = 0

    def status(self) -> tuple[bool, str]:
        counts = f"{self.open} of {self.limit} descriptors open" if self.open is not None else "descriptors unknown"
        recent = self.accept_failed_at is not None and self.clock.seconds() - self.accept_failed_at < ACCEPT_ERROR_HOLD
        if recent:
            return False, f"{counts}; {self.accept_failures} connection(s) refused for want of descriptors"
        if self.low():
            return False, f"{counts}; fewer than {self.reserve} free (RLIMIT_NOFILE {self.limit})"
        return True, counts
