"""The elected dispatcher of a log: the lock that makes one leader, the lease that bounds a stuck one, and the
epoch that fences a deposed one's writes (docs/architecture.md, "Dispatch across instances").

Only the leader's dispatcher process sends; the others' wait here as standbys. On PostgreSQL the lock is a
session advisory lock on a connection of its own, on which the leader also renews its lease every
``RENEW_EVERY`` s and LISTENs for the writers' notifications; on a SQLite file it is a ``flock`` (one
instance: nobody can take over, and nothing is renewed).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import make_url

from hl7bridge.store import open_engine, try_dispatch_lock
from hl7bridge.store.cluster import claim_leadership, current_leader, end_session, listen_outbox, renew_leadership

log = logging.getLogger("hl7bridge.dispatcher")

#: ``[service] dispatch_lease``'s default (seconds): a stopped leader is taken over within about 4-4.6 s.
DEFAULT_LEASE = 4.0
#: Seconds between the leader's renewals of its lease.
RENEW_EVERY = 1.0
#: The leader starts no API call once its last renewal is older than the lease less this part of it: the
#: standby takes over only after the whole lease, by the database's clock.
SEND_MARGIN = 0.25
#: Seconds between a standby's tries of the lock, and between its reads of the leader's row (PostgreSQL).
TRY_EVERY = 0.1
LOOK_EVERY = 0.5


def open_lock_file(database: str) -> int:
    """A descriptor of the SQLite log's lock file, ``<log>.lock`` (made 0600), whose ``flock`` elects its
    dispatcher and its housekeeping. Never the log itself: closing any descriptor of the log in a process drops
    every POSIX lock SQLite holds on it there (https://www.sqlite.org/howtocorrupt.html, 2.2), and the service's
    own dispatcher thread and housekeeping open and close theirs while its writer writes."""
    return os.open(f"{database}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on an open file if it is free: a SQLite log's elections (the file's lock is
    held until that descriptor closes, so with its process at the latest)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class Leadership:
    """Wait to lead (``acquire``), then keep leading (``keep``) until deposed: then the process exits, and the
    service starts a new one, which waits as a standby."""

    def __init__(self, database: str, instance: str, lease: float, exit: Callable[[int], Any] = os._exit) -> None:
        self.database = database
        self.instance = instance
        self.lease = lease
        self.epoch: int | None = None
        self._exit = exit
        self._postgres = make_url(database).get_backend_name() == "postgresql"
        self._conn: Any = None
        self._fd: int | None = None
        #: ``time.monotonic()`` when the last renewal that succeeded was sent.
        self._renewed = 0.0
        #: ``time.monotonic()`` when the service was last heard from (its lines on the pipe).
        self.parent_seen = time.monotonic()

    def acquire(self, should_stop: Callable[[], bool]) -> bool:
        """Block until this process leads (True), or until ``should_stop`` says so (False: the service stops or is
        gone). True at once for an in-memory log (nothing to share, nothing to fence), and once this one leads."""
        if self.epoch is not None:
            return True
        url = make_url(self.database)
        if self._postgres:
            self._conn = open_engine(self.database, create=False).connect()
            take: Callable[[], bool] = lambda: try_dispatch_lock(self._conn)  # noqa: E731
        elif url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
            return True
        else:
            self._fd = open_lock_file(url.database)
            take = self._flock
        waited = 0
        while not take():
            if should_stop():
                return False
            if waited == 10:
                log.warning("another dispatcher leads on this log; this one waits as a standby")
            if self._postgres and waited % round(LOOK_EVERY / TRY_EVERY) == 0:
                self._end_stuck_leader()
            time.sleep(TRY_EVERY)
            waited += 1
        self._claim()
        return True

    def release(self) -> None:
        """Free a SQLite file's lock as the dispatcher stops, for a dispatcher started next in this process (the
        service's own thread, ``run_in = "thread"``). A PostgreSQL lock goes with its process, whose lease thread
        still uses the session until it exits."""
        if self._fd is not None:
            fd, self._fd, self.epoch = self._fd, None, None
            os.close(fd)

    def _flock(self) -> bool:
        assert self._fd is not None
        return try_flock(self._fd)

    def _end_stuck_leader(self) -> None:
        """A leader that has not renewed for its whole lease (stopped, hung, cut off) still holds the lock through
        its session: end that session, which frees the lock for the next try."""
        leader = current_leader(self._conn)
        self._conn.commit()
        if leader is None or leader.backend_pid is None or leader.age <= leader.lease:
            return
        log.warning("the dispatcher leader (instance %s, epoch %d) has not renewed its lease for %.1f s (lease %g s); "
                    "ending its session to take over", leader.instance, leader.epoch, leader.age, leader.lease)  # fmt: skip
        end_session(self._conn, leader.backend_pid)

    def _claim(self) -> None:
        started = time.monotonic()
        if self._postgres:
            self.epoch = claim_leadership(self._conn, self.instance, self.lease)
            listen_outbox(self._conn)
        else:
            # SQLite: one short write, before this process dispatches (it never writes the log afterwards).
            engine = open_engine(self.database, create=False, in_use=True)
            with engine.connect() as conn:
                self.epoch = claim_leadership(conn, self.instance, self.lease)
            engine.dispose()
        self._renewed = self.parent_seen = started
        log.info("this dispatcher leads (epoch %d)", self.epoch)

    def fresh(self) -> bool:
        """Whether an API call may start: the lease was renewed recently enough that no standby can have taken
        over (always, on SQLite: nobody can)."""
        return not self._postgres or time.monotonic() - self._renewed < self.lease * (1 - SEND_MARGIN)

    def keep(self, wake: Callable[[], None]) -> None:
        """Renew the lease and pass the writers' notifications on as wakes, in a thread, until deposed."""
        if self._postgres:
            threading.Thread(target=self._keep, args=(wake,), name="hl7bridge-leader", daemon=True).start()

    def _keep(self, wake: Callable[[], None]) -> None:
        driver = self._conn.connection.driver_connection
        silent = False
        try:
            while True:
                next_renewal = time.monotonic() + RENEW_EVERY
                while (left := next_renewal - time.monotonic()) > 0:
                    for _ in driver.notifies(timeout=left, stop_after=1):
                        wake()
                if time.monotonic() - self.parent_seen > self.lease / 2:
                    # A stopped or hung service answers none of this process's writes: let the lease lapse, so
                    # that a standby takes over, rather than hold the log's dispatching with it.
                    if not silent:
                        log.warning("the service has not been heard from for %.1f s; the lease is not renewed",
                                    time.monotonic() - self.parent_seen)  # fmt: skip
                    silent = True
                    continue
                silent = False
                sent = time.monotonic()
                if not renew_leadership(self._conn, self.epoch or 0):
                    log.warning("another dispatcher has taken over (epoch %d is over); this one stops", self.epoch)
                    self._exit(3)
                    return
                self._renewed = sent
        except Exception as exc:  # noqa: BLE001 - the lock went with the session: never dispatch without it
            log.error("the dispatcher's lock session failed (%s: %s); this one stops", exc.__class__.__name__,
                      " ".join(str(exc).split())[:200])  # fmt: skip
            self._exit(3)
