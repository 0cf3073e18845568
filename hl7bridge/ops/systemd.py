"""systemd service notifications (sd_notify(3)) without libsystemd, and a health-gated watchdog.

The unit (systemd/hl7bridge.service) is ``Type=notify`` with ``WatchdogSec=``: systemd waits for
``READY=1`` before it counts the service as started, and restarts it when ``WATCHDOG=1`` keep-alives
stop. Every function is a no-op returning False when ``$NOTIFY_SOCKET`` is unset (not run by systemd,
tests, the CLI), and none ever raises: a lost notification must not take the service down with it.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import task

log = logging.getLogger("hl7bridge.systemd")

# systemd reads notifications into a PIPE_BUF (4096 byte) buffer and drops longer ones whole.
_MAX_STATUS = 1024


def notify(state: str) -> bool:
    """Send ``state`` (``KEY=value`` lines) to ``$NOTIFY_SOCKET``; True if the datagram was sent.

    A path is a filesystem socket, a leading ``@`` the abstract namespace. Errors are logged at
    debug level only: the service keeps running whether or not systemd listens.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    elif address[0] != "/":
        log.debug("NOTIFY_SOCKET %r is not a path or an abstract socket; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.debug("sd_notify to %r failed: %s", address, exc)
        return False
    return True


def _status_line(text: str) -> str:
    # One line: a newline would start another KEY=value assignment.
    return "STATUS=" + " ".join(text.split())[:_MAX_STATUS]


def ready(status: str | None = None) -> bool:
    """Start-up is complete (listeners bound, database open): ``READY=1``, with an optional STATUS."""
    return notify("READY=1" if status is None else f"READY=1\n{_status_line(status)}")


def stopping(status: str | None = None) -> bool:
    """Shutdown has begun: systemd stops the watchdog and gives the service TimeoutStopSec to exit."""
    return notify("STOPPING=1" if status is None else f"STOPPING=1\n{_status_line(status)}")


def status(text: str) -> bool:
    """A one-line status for ``systemctl status`` (newlines become spaces)."""
    return notify(_status_line(text))


def watchdog_ping() -> bool:
    """One keep-alive: ``WATCHDOG=1``."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds between keep-alives: half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises.

    None when the watchdog is off, the value is not a positive integer, or ``$WATCHDOG_PID`` names
    another process (the variables were inherited from a parent that systemd watches).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    try:
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid is not None:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return micros / 2_000_000


def write_execute_memory_allowed() -> bool:
    """Whether this process may map writable+executable memory.

    ``MemoryDenyWriteExecute=yes`` (also SELinux ``execmem`` denials, ``prctl(PR_SET_MDWE)``) forbids
    it, and pyOpenSSL's cffi callbacks need it: Twisted sets one on every TLS context, so without it
    every TLS handshake fails. Checked at start-up, a TLS listener can fail fast with a clear message.
    """
    try:
        probe = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except OSError:
        return False
    probe.close()
    return True


class Watchdog:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds from the reactor, but only while healthy.

    Pinging from a reactor timer means a blocked reactor stops the keep-alives by itself; gating on
    ``is_healthy`` lets a wedged-but-running service (e.g. a dead database writer) be restarted too.
    When pings stop, a STATUS line says why (``describe()`` when given); when health returns, pings
    resume and the STATUS says so. Only include checks a restart can fix: an unreachable remote API
    is not one, and restarting for it would only drop the MLLP listeners.
    """

    def __init__(
        self,
        reactor: Any,
        is_healthy: Callable[[], bool],
        interval: float | None = None,
        describe: Callable[[], str] | None = None,
    ) -> None:
        """``interval`` None means :func:`watchdog_interval` (systemd's own setting, halved)."""
        self.reactor = reactor
        self.is_healthy = is_healthy
        self.describe = describe
        self.interval = watchdog_interval() if interval is None else interval
        self.pinging = True
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = reactor

    @property
    def running(self) -> bool:
        return self._loop.running

    def start(self) -> bool:
        """Start pinging (the first check runs at once); False, doing nothing, when there is no interval."""
        if not self.interval or self.interval <= 0 or self._loop.running:
            return False
        self._loop.start(self.interval, now=True)
        return True

    def stop(self) -> None:
        """Stop pinging (at shutdown, after ``stopping()``); safe to call twice or before ``start``."""
        if self._loop.running:
            self._loop.stop()

    def _tick(self) -> None:
        try:
            healthy = bool(self.is_healthy())
            reason = "" if healthy else self._reason()
        except Exception as exc:  # noqa: BLE001 - a failing check means "unhealthy", never a dead timer
            healthy, reason = False, f"the health check raised {exc.__class__.__name__}: {exc}"
        if healthy:
            if self.pinging:
                watchdog_ping()
            else:
                self.pinging = True
                log.info("healthy again: watchdog keep-alives resumed")
                notify(f"WATCHDOG=1\n{_status_line('Healthy again; watchdog keep-alives resumed')}")
        elif self.pinging:
            self.pinging = False
            log.warning("unhealthy (%s): watchdog keep-alives stopped, systemd will restart the service", reason)
            status(f"Unhealthy: {reason}; watchdog keep-alives stopped")

    def _reason(self) -> str:
        if self.describe is None:
            return "health check failed"
        try:
            return self.describe() or "health check failed"
        except Exception as exc:  # noqa: BLE001 - the reason is best effort
            return f"health check failed (describing it raised {exc.__class__.__name__})"
