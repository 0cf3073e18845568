"""This service process as one instance of several on a log: its row in ``instances``, heartbeated every
``BEAT_EVERY`` s through the writer (off the reactor), the sessions of stopped instances that hold up the others'
writers ended at each beat (PostgreSQL), and whether it runs the next housekeeping pass."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, task, threads

from hl7bridge import __version__
from hl7bridge.dispatch.leader import open_lock_file, try_flock
from hl7bridge.mllp.tls import endpoint_fields, endpoint_port
from hl7bridge.store import Job, Writer
from hl7bridge.store.cluster import (
    beat,
    current_leader,
    end_stalled_sessions,
    forget_instance,
    register_instance,
    release_housekeeping_lock,
    retention_passed_at,
    try_housekeeping_lock,
)

log = logging.getLogger("hl7bridge.service")

#: Seconds between heartbeats (``status`` shows an instance down after 3 leases without one).
BEAT_EVERY = 2.0


def default_name(endpoint: str | None) -> str:
    """host:port of the first listener (host:pid when it has no port, as under socket activation): the same
    across restarts, so a restarted instance replaces the row its crashed run left."""
    host = socket.gethostname()
    port = endpoint_port(endpoint_fields(endpoint or "")[0])
    return f"{host}:{port}" if port.isdigit() and port != "0" else f"{host}:{os.getpid()}"


class Instance:
    def __init__(self, reactor: Any, writer: Writer, engine: Any, name: str, lease: float,
                 last_message: Any) -> None:  # fmt: skip
        """``name``: ``[service] instance_name``, or what ``default_name`` makes of the first listener."""
        self.reactor = reactor
        self.writer = writer
        self.engine = engine
        self.id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.name = name
        self.lease = lease
        #: Returns when this instance last received a message (epoch seconds, None: never).
        self._last_message = last_message
        self._loop: task.LoopingCall | None = None
        self._busy = False
        self._failed = False
        self._sweeping = False
        self._sweep_failed = False
        self._row: dict[str, Any] = {}

    def start(self) -> None:
        self._row = {"id": self.id, "name": self.name, "host": self.host, "pid": os.getpid(), "version": __version__,
                     "started_at": time.time(), "last_message_at": None, "lease": self.lease}  # fmt: skip
        self._busy = True
        row = dict(self._row)
        self.writer.submit_job(Job(lambda conn: register_instance(conn, row), self._done))
        self._loop = task.LoopingCall(self._beat)
        self._loop.clock = self.reactor
        self._loop.start(BEAT_EVERY, now=False)

    def leave(self) -> defer.Deferred[None]:
        """A clean stop: the row goes (a stopped instance is not a down one); the writer must still run."""
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        left: defer.Deferred[None] = defer.Deferred()

        def done(_result: Any, error: BaseException | None) -> None:
            if error is not None:
                log.warning("cannot remove this instance's row: %s", error.__class__.__name__)
            self.reactor.callFromThread(left.callback, None)

        self.writer.submit_job(Job(lambda conn: forget_instance(conn, self.id), done))
        return left

    def _beat(self) -> None:
        self._end_stalled()
        if self._busy:
            return
        self._busy = True
        row = dict(self._row, last_message_at=self._last_message())
        self.writer.submit_job(Job(lambda conn: beat(conn, row), self._done, durable=False))

    def _end_stalled(self) -> None:
        """End the PostgreSQL sessions of stopped or hung processes whose transactions hold locks
        (``end_stalled_sessions``). Every instance looks, so a stopped one holds up the others' writers (and the new
        leader's writes) for ``STALLED_AFTER_S`` and a beat at most; in a thread of the reactor's pool, never through
        the writer, which may be the one waiting."""
        if self._sweeping or self.engine.dialect.name != "postgresql":
            return
        self._sweeping = True

        def sweep() -> None:
            with self.engine.connect() as conn:
                ended = end_stalled_sessions(conn)
            for session in ended:
                log.warning("ended a database session (client %s) whose transaction held its locks while its process "
                            "kept it waiting for %.1f s (stopped or hung): nothing of it is committed, and its "
                            "senders' resends are deduplicated", session.client, session.stalled_s)  # fmt: skip

        def failed(failure: Any) -> None:
            # Said once a spell: a database out of reach is the heartbeat's to report; a role that may not end
            # another's session (no pg_signal_backend) is the operator's to fix.
            if not self._sweep_failed:
                log.warning("cannot look for stalled database sessions: %s: %s", failure.value.__class__.__name__,
                            " ".join(str(failure.value).split())[:200])  # fmt: skip
            self._sweep_failed = True

        def succeeded(_result: None) -> None:
            if self._sweep_failed:
                log.info("looking for stalled database sessions works again")
            self._sweep_failed = False

        def over(_result: None) -> None:
            self._sweeping = False

        swept = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), sweep)
        swept.addCallbacks(succeeded, failed).addBoth(over)

    def _done(self, _result: Any, error: BaseException | None) -> None:
        """In the writer thread."""
        self._busy = False
        if (error is not None) != self._failed:
            self._failed = error is not None
            if error is not None:
                log.warning("cannot record this instance's heartbeat: %s", error.__class__.__name__)
            else:
                log.info("this instance's heartbeat is recorded again")

    def housekeeping_turn(self, dispatching: bool, every: float) -> defer.Deferred[Callable[[], None] | None]:
        """Whether this instance runs the next housekeeping pass: then a ``release`` to call (off the reactor) once
        the pass is over, else None. Where this instance runs a dispatcher, the leader's instance passes; where it
        runs none (no routes: nothing elects a leader), the pass is elected alone, by the housekeeping lock held for
        the pass (a PostgreSQL session lock; the ``flock`` of a SQLite log's lock file), skipped while another holds it. Either way
        only if no instance started one within ``every`` s (``meta``): a takeover brings no second pass that day."""

        def take() -> Callable[[], None] | None:
            release = _nothing if dispatching else self._housekeeping_lock()
            if release is None:
                return None
            try:
                with self.engine.connect() as conn:
                    leader = current_leader(conn) if dispatching else None
                    last = retention_passed_at(conn)
            except BaseException:
                release()
                raise
            elsewhere = leader is not None and leader.instance != self.id
            if elsewhere or (last is not None and time.time() - last < every):
                release()
                return None
            return release

        return threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), take)

    def _housekeeping_lock(self) -> Callable[[], None] | None:
        """The housekeeping lock if it is free (its release), else None."""
        if self.engine.dialect.name == "postgresql":
            conn = self.engine.connect()
            if not try_housekeeping_lock(conn):
                conn.close()
                return None

            def unlock() -> None:
                try:
                    release_housekeeping_lock(conn)
                finally:
                    conn.close()

            return unlock
        path = self.engine.url.database
        if not path or path == ":memory:":
            return _nothing
        fd = open_lock_file(path)
        if not try_flock(fd):
            os.close(fd)
            return None
        return lambda: os.close(fd)


def _nothing() -> None:
    """A release with nothing to release."""
