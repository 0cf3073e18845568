"""The single writer thread: messages and their commands in group commits, and dispatcher jobs.

It schedules; the writes themselves are ``fast_path`` (a SQLite file) and ``generic_path`` (any other
database), both planned by ``planner``."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError

from .fast_path import LOCK_WAIT_MS, LOCKED_WAIT_MS, is_locked, write_sqlite
from .generic_path import write_generic
from .planner import WriteRequest, WriteResult
from .schema import _first_line, writing_engine

log = logging.getLogger("hl7bridge.store")


@dataclass(slots=True)
class Job:
    """Any other write (dispatcher results, replays): runs in the writer thread, in its own savepoint."""

    work: Callable[[Any], Any]
    on_done: Callable[[Any, BaseException | None], None]
    #: False for what can be rebuilt from the log (the search index): the job runs in a transaction of its own
    #: whose commit does not wait for fsync (SQLite ``synchronous=NORMAL``). The next durable commit's fsync
    #: covers it (WAL frames are checksummed in a chain, so a later commit never survives an earlier one); a
    #: crash loses at most the job's own commit, and its next run redoes it.
    durable: bool = True


_STOP = object()
#: Messages between checkpoints (about 5 WAL pages each): small enough that one takes a few milliseconds.
CHECKPOINT_ROWS = 200
CHECKPOINT_HARD_ROWS = 2000
#: Seconds of jobs per transaction: a message that arrives meanwhile waits at most about this long.
JOB_SLICE = 0.002


class Writer:
    """The single writer thread. ``call_back`` runs result delivery on the caller's thread."""

    def __init__(
        self,
        engine: Engine,
        call_back: Callable[..., Any],
        max_group: int = 2000,
        job_slice: float = JOB_SLICE,
    ) -> None:
        self.engine = writing_engine(engine)
        self._own_engine = self.engine is not engine
        self.call_back = call_back
        self.max_group = max_group
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hl7bridge-writer", daemon=True)
        self.commits = 0
        self.rows = 0
        self.failures = 0
        self.last_error: str | None = None
        self._raw: Any = None
        self._rows_since_checkpoint = 0
        self._locked = False
        self.on_commands: Callable[[], None] | None = None
        #: Jobs run in transactions of about this many seconds' work (0: all queued jobs in one); between
        #: two, the messages that came meanwhile are written first.
        self.job_slice = job_slice

    def start(self) -> None:
        self._thread.start()

    def submit(self, request: WriteRequest) -> None:
        self._queue.put(request)

    def stop(self, timeout: float = 30.0) -> None:
        """Write everything queued, then end the thread."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout)
        if self._own_engine and not self._thread.is_alive():
            self.engine.dispose()

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def submit_job(self, job: Job) -> None:
        self._queue.put(job)

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            if self._raw is not None:
                self._raw.close()
                self._raw = None

    def _loop(self) -> None:
        """Each pass writes the messages queued so far, then one slice of the jobs waiting. Messages are
        what senders wait on; jobs (the dispatcher's results, heartbeats) can wait a slice."""
        q = self._queue
        jobs: deque[Job] = deque()
        stopping = False
        while True:
            group = []
            if not jobs:
                if stopping:
                    return
                group.append(q.get())
            while len(group) < self.max_group:
                try:
                    group.append(q.get_nowait())
                except queue.Empty:
                    break
            if any(g is _STOP for g in group):
                stopping = True  # what was queued before the stop is still written
                group = [g for g in group if g is not _STOP]
            requests = [g for g in group if isinstance(g, WriteRequest)]
            jobs.extend(g for g in group if isinstance(g, Job))
            try:
                if requests:
                    self._handle(requests)
                if jobs:
                    for _ in range(max(1, self._run_job_slice(jobs))):
                        jobs.popleft()
                self._checkpoint_if_due(idle=q.empty() and not jobs)
            except Exception:
                # The writer must outlive anything: a dead writer answers nothing, not even AR.
                log.exception("the writer failed on a group; carrying on")

    def _checkpoint_if_due(self, idle: bool) -> None:
        """Copy the WAL into the database here, after the group's answers have gone back.

        SQLite's automatic checkpoint runs inside the COMMIT that crosses its threshold, so the ACKs
        of that group wait for it. Here it runs between groups: when the writer is idle, or at the
        latest after ``CHECKPOINT_HARD_ROWS``, so the WAL stays small under steady load too. Jobs count as well:
        their commits run no automatic checkpoint, so before the first message (a restart on a quiet feed) only
        this one bounds the WAL."""
        due = self._rows_since_checkpoint
        if due < CHECKPOINT_ROWS or (not idle and due < CHECKPOINT_HARD_ROWS) or not self._sqlite_file():
            return
        self._rows_since_checkpoint = 0
        self._connection().execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _handle(self, requests: list[WriteRequest]) -> None:
        results = self._write(requests)
        self.call_back(_deliver, requests, results)
        if self.on_commands is not None and any(r.command_ids for r in results):
            self.on_commands()

    def _run_job_slice(self, jobs: Sequence[Job]) -> int:
        """Run jobs in one transaction, at most ``job_slice`` seconds' worth once one has run; returns how many.

        Each job runs in a savepoint of its own, except a lone job: its transaction is its savepoint
        (SAVEPOINT and RELEASE were a fifth of the writer's time with the GIL under dispatch). A job that is
        not ``durable`` runs alone, and a durable one never shares its commit."""
        relaxed = not jobs[0].durable
        nested = len(jobs) > 1 and jobs[1].durable and not relaxed
        outcomes: list[tuple[Any, BaseException | None]] = []
        began = time.monotonic()
        try:
            with self.engine.connect() as conn, self._lock_wait(conn), self._job_commit(conn, relaxed), conn.begin():
                locked: BaseException | None = None
                for job in jobs:
                    if outcomes and (
                        relaxed or not job.durable or (self.job_slice and time.monotonic() - began >= self.job_slice)
                    ):
                        break
                    if locked is not None:
                        outcomes.append((None, locked))
                        continue
                    try:
                        with conn.begin_nested() if nested else contextlib.nullcontext():
                            result = job.work(conn)
                    except Exception as exc:  # noqa: BLE001 - reported to the job's owner
                        outcomes.append((None, exc))
                        if not nested:
                            conn.rollback()  # nothing of a failed job is committed
                        if is_locked(exc):
                            # The next jobs would wait out the same lock one after the other.
                            locked, self._locked = exc, True
                        continue
                    outcomes.append((result, None))
            self.commits += 1
            self._rows_since_checkpoint += CHECKPOINT_ROWS if relaxed else len(outcomes)
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every job of the slice failed
            self.failures += 1
            self.last_error = f"{exc.__class__.__name__}: {_first_line(exc)}"
            failed = len(outcomes) or len(jobs)
            log.error("database write failed for %d job(s): %s", failed, self.last_error)
            outcomes = [(None, exc)] * failed
        for job, (result, error) in zip(jobs, outcomes, strict=False):
            try:
                job.on_done(result, error)
            except Exception:
                log.exception("job result delivery failed")
        return len(outcomes)

    def _write(self, group: list[WriteRequest]) -> list[WriteResult]:
        committing = False
        try:
            if self._sqlite_file():
                results = self._write_sqlite(group)
            else:
                for retry in (True, False):
                    try:
                        with self.engine.begin() as conn:
                            results = write_generic(conn, group)
                            committing = True
                        break
                    except DBAPIError as exc:
                        if committing or not retry or not exc.connection_invalidated:
                            raise
                        # Nothing was committed: the connection died before the COMMIT was sent (a restarted
                        # server; the pool pings only a connection idle for a while), and the pool now replaces
                        # every connection it held. The group is written again once, on a new connection.
                        log.warning("the database connection was lost before the COMMIT of %d message(s), nothing "
                                    "committed; writing them again on a new connection (%s)", len(group),
                                    _first_line(exc))  # fmt: skip
            self.commits += 1
            self.rows += len(group)
            self.last_error = None
            self._locked = False
            return results
        except Exception as exc:  # noqa: BLE001 - any failure must turn into a NAK, never a lost message
            self.failures += 1
            self.last_error = f"{exc.__class__.__name__}: {_first_line(exc)}"
            self._locked = is_locked(exc)
            unknown = committing and isinstance(exc, DBAPIError) and exc.connection_invalidated
            if unknown:
                log.error("the connection to the database was lost during the COMMIT of %d message(s), which may "
                          "or may not have been committed: no answer is sent, their connections are closed, and "
                          "the resends will be deduplicated (%s)", len(group), self.last_error)  # fmt: skip
            else:
                log.error("database write failed for %d message(s): %s", len(group), self.last_error)
            return [WriteResult(None, error=self.last_error, outcome_unknown=unknown)] * len(group)

    def _sqlite_file(self) -> bool:
        url = self.engine.url
        return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")

    def _write_sqlite(self, group: list[WriteRequest]) -> list[WriteResult]:
        con = self._connection()
        self._rows_since_checkpoint += len(group)
        return write_sqlite(con, group, self._locked)

    @contextlib.contextmanager
    def _lock_wait(self, conn: Any) -> Iterator[None]:
        """While the database is known to be locked, jobs wait briefly for it too (then the pool's default)."""
        if not (self._locked and conn.dialect.name == "sqlite"):
            yield
            return
        driver = conn.connection.driver_connection
        driver.execute(f"PRAGMA busy_timeout={LOCKED_WAIT_MS}")
        try:
            yield
        finally:
            driver.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")

    @contextlib.contextmanager
    def _job_commit(self, conn: Any, relaxed: bool) -> Iterator[None]:
        """A job's commit on SQLite runs no automatic checkpoint (the writer schedules checkpoints between groups,
        ``_checkpoint_if_due``: one inside a job's commit held up the messages queued behind it, and copied the
        log's pages again soon after the writer's own), and a ``relaxed`` one does not wait for fsync; the pooled
        connection's own settings after it.

        Driver-level statements (before and after SQLAlchemy's transaction): SQLite reads both at commit."""
        if conn.dialect.name != "sqlite":
            yield
            return
        driver = conn.connection.driver_connection
        (synchronous,) = driver.execute("PRAGMA synchronous").fetchone()
        (autocheckpoint,) = driver.execute("PRAGMA wal_autocheckpoint").fetchone()
        driver.execute("PRAGMA wal_autocheckpoint=0")
        if relaxed:
            driver.execute("PRAGMA synchronous=NORMAL")
        try:
            yield
        finally:
            try:
                driver.execute(f"PRAGMA synchronous={int(synchronous)}")
                driver.execute(f"PRAGMA wal_autocheckpoint={int(autocheckpoint)}")
            except Exception:
                conn.invalidate()  # the pool must never hand a durable job a connection left relaxed
                raise

    def _connection(self) -> Any:
        """The writer's own DBAPI connection, in autocommit mode so that it controls BEGIN and COMMIT."""
        if self._raw is None:
            pooled = self.engine.raw_connection()
            raw = pooled.driver_connection
            pooled.detach()
            raw.isolation_level = None
            raw.execute("PRAGMA wal_autocheckpoint=0")
            raw.execute("PRAGMA busy_timeout=0")  # waits in _write_sqlite instead
            self._raw = raw
        return self._raw


def _deliver(group: list[WriteRequest], results: list[WriteResult]) -> None:
    for request, result in zip(group, results, strict=True):
        try:
            request.on_done(result)
        except Exception:
            log.exception("result delivery failed")
