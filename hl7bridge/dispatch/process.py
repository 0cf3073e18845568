"""The service's side of the dispatcher process: start it, restart it if it dies, and talk to it.

``DispatcherProcess`` stands in for ``Dispatcher`` in the service (``wake``, ``wait_for``, ``forget``,
``state``), so the writer, the pipeline and the health checks do not know where it runs. The
child's writes arrive here as ``write`` events and go through the service's writer, the log's only one.
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
from twisted.internet import defer, protocol, task
from twisted.python.failure import Failure

from hl7bridge.core.observer import Observer
from hl7bridge.dispatch import pipe
from hl7bridge.dispatch.child import ChildSpec
from hl7bridge.dispatch.pipe import EVENTS_FD, MAX_LINE, LineBuffer
from hl7bridge.store import CommandUpdate, Job, OutboxWrite, Writer

log = logging.getLogger("hl7bridge.dispatcher")

#: Variables that belong to the service process alone (systemd talks to the main PID only).
_PARENT_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")
_METRICS = ("api_call", "retry", "dead_letter")
#: Past this many bytes waiting for the child's pipe, wakes are dropped (a child that reads nothing).
UNSENT_WAKES_LIMIT = 64 * 1024
RESTART_MIN = 0.5
RESTART_MAX = 30.0
#: A child that ran this long before exiting restarts after ``RESTART_MIN`` again.
STABLE_AFTER = 60.0


class DispatcherProcess:
    def __init__(self, reactor: Any, spec: ChildSpec, observer: Observer, writer: Writer) -> None:
        self.reactor = reactor
        self.spec = spec
        self.observer = observer
        self.writer = writer
        #: What the child last said of its state (held, paused); a new child starts from nothing.
        self._state = pipe.DispatchState()
        #: Why there is no child now (it exited and restarts shortly).
        self.down_reason: str | None = None
        self.restarts = 0
        self._waiters: dict[int, Callable[[CommandUpdate], None]] = {}
        self._lock = threading.Lock()
        self._out: int | None = None
        self._transport: Any = None
        self._started_at = 0.0
        self._delay = RESTART_MIN
        self._stopping = False
        self._ended: defer.Deferred[None] | None = None
        self._lost_wakes = 0
        #: Lines the child's pipe has not taken yet. Answers to its writes must never be lost (a thread
        #: of the child waits for each one), nor cut (lines must stay whole).
        self._unsent = b""
        self._flush_later = False
        #: Which child a write came from: the answer to a dead child's write must not reach its successor,
        #: whose writes are numbered from 1 again.
        self._generation = 0
        self._alive: task.LoopingCall | None = None

    def start(self) -> None:
        if self._alive is None:
            self._alive = task.LoopingCall(self._send, pipe.ALIVE_LINE)
            self._alive.clock = self.reactor
            self._alive.start(pipe.ALIVE_EVERY, now=False)
        read_end, write_end = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in _PARENT_ONLY}
        self._ended = defer.Deferred()
        self._started_at = time.monotonic()
        self._transport = self.reactor.spawnProcess(
            _ChildProtocol(self),
            sys.executable,
            [sys.executable, "-m", "hl7bridge.dispatch.child"],
            env=env,
            childFDs={0: read_end, 1: 1, 2: 2, EVENTS_FD: "r"},
        )
        os.close(read_end)
        os.set_blocking(write_end, False)
        with self._lock:
            self._out = write_end
            self._unsent = b""
            self._generation += 1
        self._send(self.spec.to_line())
        for command_id in list(self._waiters):
            self._send(pipe.wait_for(command_id))
        log.info("dispatcher process started (pid %d)", self._transport.pid)

    def state(self) -> pipe.DispatchState:
        return replace(self._state, down_reason=self.down_reason or self._state.down_reason)

    def wake(self) -> None:
        """From any thread (the writer's, after committing commands)."""
        self._send(pipe.WAKE_LINE)

    def dispatch_now(self) -> None:
        self._send(pipe.NOW_LINE)

    def wait_for(self, command_id: int, callback: Callable[[CommandUpdate], None]) -> None:
        self._waiters[command_id] = callback
        self._send(pipe.wait_for(command_id))

    def forget(self, command_id: int) -> None:
        self._waiters.pop(command_id, None)

    def stop(self, grace: float = 10.0) -> defer.Deferred[None]:
        """Let the child finish the calls under way (up to ``grace`` s); what is left stays queued."""
        self._stopping = True
        if self._alive is not None and self._alive.running:
            self._alive.stop()
        if self._ended is None or self._ended.called:
            return defer.succeed(None)
        ended = self._ended
        self._send(pipe.stop(grace))
        kill = self.reactor.callLater(grace + 5.0, self._kill)
        ended.addBoth(lambda result: kill.cancel() if kill.active() else None)
        return ended

    # -- the child's side of things --------------------------------------------------------------
    def event(self, event: dict[str, Any]) -> None:
        if pipe.WRITE in event:
            # Rebuilt in the writer thread, not here: this thread answers the senders.
            number, generation = event[pipe.WRITE], self._generation
            self.writer.submit_job(Job(lambda conn: OutboxWrite.from_json(event)(conn),
                                       lambda _r, e: self._written(number, e, generation)))  # fmt: skip
        elif pipe.STATE in event:
            self._state = pipe.DispatchState.from_json(event[pipe.STATE])
        elif pipe.FINAL in event:
            update = CommandUpdate(**event[pipe.FINAL])
            waiter = self._waiters.pop(update.command_id, None)
            if waiter is not None:
                waiter(update)
        elif event.get(pipe.METRIC) in _METRICS:
            getattr(self.observer, event[pipe.METRIC])(*event["args"])

    def ended(self, reason: Failure) -> None:
        with self._lock:
            if self._out is not None:
                os.close(self._out)
                self._out = None
        ended, self._ended = self._ended, None
        if not self._stopping:
            if time.monotonic() - self._started_at > STABLE_AFTER:
                self._delay = RESTART_MIN
            delay, self._delay = self._delay, min(self._delay * 2, RESTART_MAX)
            why = _exit_description(reason)
            self._state = pipe.DispatchState()
            self.down_reason = f"the dispatcher process {why}; it restarts in {delay:g} s"
            log.error("the dispatcher process %s; starting it again in %g s", why, delay)
            self.restarts += 1
            self.reactor.callLater(delay, self._restart)
        if ended is not None:
            ended.callback(None)

    def _restart(self) -> None:
        if self._stopping:
            return
        self.down_reason = None
        self.start()

    def _kill(self) -> None:
        log.warning("the dispatcher process did not stop in time; killing it")
        try:
            self._transport.signalProcess("KILL")
        except Exception:  # noqa: BLE001 - already gone
            pass

    def _written(self, number: int, error: BaseException | None, generation: int) -> None:
        """In the writer thread: tell the child its write N is committed, or why not."""
        if generation != self._generation:
            return
        if error is None:
            self._send(pipe.committed(number))
        else:
            text = " ".join(f"{error.__class__.__name__}: {error}".split())
            self._send(pipe.failed(number, text))

    def _flush(self) -> None:
        """Write what the pipe can take now; try again shortly for the rest (one retry pending at a time)."""
        with self._lock:
            if self._out is None or not self._unsent:
                return
            try:
                written = os.write(self._out, self._unsent)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EPIPE):
                    raise
                written = 0
            self._unsent = self._unsent[written:]
            retry = bool(self._unsent) and not self._flush_later
            self._flush_later = self._flush_later or retry
        if retry:
            self.reactor.callFromThread(self.reactor.callLater, 0.01, self._retry_flush)

    def _retry_flush(self) -> None:
        with self._lock:
            self._flush_later = False
        self._flush()

    def _send(self, data: bytes) -> None:
        """Never blocks: lines queue behind what the pipe has not taken (whole lines, in order), except that
        a child that stopped reading (a standby waiting to lead) loses wakes (it also polls) and alive lines
        rather than growing the queue."""
        with self._lock:
            if self._out is None:
                return
            lost = data in (pipe.WAKE_LINE, pipe.ALIVE_LINE) and len(self._unsent) > UNSENT_WAKES_LIMIT
            if not lost:
                self._unsent += data
        if lost:
            self._lost_wakes += data == pipe.WAKE_LINE
            if data == pipe.WAKE_LINE and self._lost_wakes in (1, 100, 10_000):
                log.warning("the dispatcher process is not reading its pipe (%d wake(s) lost)", self._lost_wakes)
            return
        self._flush()


class _ChildProtocol(protocol.ProcessProtocol):
    def __init__(self, owner: DispatcherProcess) -> None:
        self.owner = owner
        self._lines = LineBuffer(MAX_LINE)

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != EVENTS_FD:
            return
        dropped = self._lines.dropped
        lines = self._lines.feed(data)
        if self._lines.dropped != dropped:
            log.error("a line from the dispatcher process longer than %d bytes was dropped", MAX_LINE)
        for line in lines:
            try:
                self.owner.event(orjson.loads(line))
            except Exception:
                log.exception("unreadable line from the dispatcher process")

    def processEnded(self, reason: Failure) -> None:
        self.owner.ended(reason)


def _exit_description(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"was killed by signal {value.signal}"
    return f"exited with status {getattr(value, 'exitCode', '?')}"
