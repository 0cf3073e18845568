"""The single writer thread: messages and their commands in group commits, and dispatcher jobs."""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    bindparam,
    select,
)
from sqlalchemy.engine import Engine

from hl7bridge.core.status import MessageStatus

from .schema import BUSY_TIMEOUT_MS, _first_line, commands, messages

log = logging.getLogger("hl7bridge.store")


@dataclass(slots=True)
class WriteRequest:
    """One message row to insert; ``dedupe_key`` set for messages that would be answered AA."""

    row: dict[str, Any]
    dedupe_key: tuple[str, str, str] | None
    on_done: Callable[[WriteResult], None]
    commands: list[dict[str, Any]] = field(default_factory=list)


@dataclass(slots=True)
class Job:
    """Any other write (dispatcher results, replays): runs in the writer thread, in its own savepoint."""

    work: Callable[[Any], Any]
    on_done: Callable[[Any, BaseException | None], None]


@dataclass(slots=True)
class WriteResult:
    message_id: int | None
    duplicate_of: int | None = None
    original_ack: bytes | None = None
    original_ack_code: str | None = None
    error: str | None = None
    command_ids: tuple[int, ...] = ()


_STOP = object()
#: How long a write waits for another connection's lock once a write has already failed on it: while the
#: lock lasts, every group is answered AR/AE within a quarter second instead of each waiting out the full
#: ``BUSY_TIMEOUT_MS`` behind the one before.
LOCK_WAIT_MS = BUSY_TIMEOUT_MS
LOCKED_WAIT_MS = 250
#: The first and the longest pause between tries while another connection holds the write lock.
LOCK_POLL_FIRST = 0.0002
LOCK_POLL_MAX = 0.001
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
        self.engine = engine
        self.call_back = call_back
        self.max_group = max_group
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="hl7bridge-writer", daemon=True)
        self.commits = 0
        self.rows = 0
        self.failures = 0
        self.last_error: str | None = None
        self._insert = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)
        self._raw: Any = None
        self._rows_since_checkpoint = 0
        self._locked = False
        self._original = (
            select(messages.c.id, messages.c.ack_raw, messages.c.ack_code)
            .where(messages.c.sending_application == bindparam("app"))
            .where(messages.c.sending_facility == bindparam("fac"))
            .where(messages.c.control_id == bindparam("ctrl"))
            .where(messages.c.status == MessageStatus.ACCEPTED)
            .order_by(messages.c.id)
            .limit(1)
        )
        self._insert_commands = commands.insert().returning(commands.c.id, sort_by_parameter_order=True)
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
        latest after ``CHECKPOINT_HARD_ROWS``, so the WAL stays small under steady load too."""
        if self._raw is None:
            return
        due = self._rows_since_checkpoint
        if due < CHECKPOINT_ROWS or (not idle and due < CHECKPOINT_HARD_ROWS):
            return
        self._rows_since_checkpoint = 0
        self._raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()

    def _handle(self, requests: list[WriteRequest]) -> None:
        results = self._write(requests)
        self.call_back(_deliver, requests, results)
        if self.on_commands is not None and any(r.command_ids for r in results):
            self.on_commands()

    def _run_job_slice(self, jobs: Sequence[Job]) -> int:
        """Run jobs in one transaction, at most ``job_slice`` seconds' worth once one has run; returns how many.

        Each job runs in a savepoint of its own, except a lone job: its transaction is its savepoint
        (SAVEPOINT and RELEASE were a fifth of the writer's time with the GIL under dispatch)."""
        nested = len(jobs) > 1
        outcomes: list[tuple[Any, BaseException | None]] = []
        began = time.monotonic()
        try:
            with self.engine.begin() as conn, self._lock_wait(conn):
                locked: BaseException | None = None
                for job in jobs:
                    if self.job_slice and outcomes and time.monotonic() - began >= self.job_slice:
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
                        if _is_locked(exc):
                            # The next jobs would wait out the same lock one after the other.
                            locked, self._locked = exc, True
                        continue
                    outcomes.append((result, None))
            self.commits += 1
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
        try:
            if self._sqlite_file():
                results = self._write_sqlite(group)
            else:
                with self.engine.begin() as conn:
                    results = self._write_generic(conn, group)
            self.commits += 1
            self.rows += len(group)
            self.last_error = None
            self._locked = False
            return results
        except Exception as exc:  # noqa: BLE001 - any failure must turn into a NAK, never a lost message
            self.failures += 1
            self.last_error = f"{exc.__class__.__name__}: {_first_line(exc)}"
            self._locked = _is_locked(exc)
            log.error("database write failed for %d message(s): %s", len(group), self.last_error)
            return [WriteResult(None, error=self.last_error)] * len(group)

    def _sqlite_file(self) -> bool:
        url = self.engine.url
        return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")

    def _write_sqlite(self, group: list[WriteRequest]) -> list[WriteResult]:
        """Write the group, waiting for another process's write lock in short steps.

        The dispatcher process commits through a connection of its own. SQLite's busy handler would
        sleep 1, 2, 5, 10 ms... between tries, which made a message that met one of its commits wait
        about 20 ms; here the wait starts at a fifth of a millisecond."""
        con = self._connection()
        self._rows_since_checkpoint += len(group)
        limit = (LOCKED_WAIT_MS if self._locked else LOCK_WAIT_MS) / 1000.0
        deadline, pause = time.monotonic() + limit, LOCK_POLL_FIRST
        while True:
            try:
                return self._write_sqlite_once(con, group)
            except sqlite3.OperationalError as exc:
                if not _is_locked(exc) or time.monotonic() + pause > deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, LOCK_POLL_MAX)

    def _write_sqlite_once(self, con: Any, group: list[WriteRequest]) -> list[WriteResult]:
        """The hot path: one lookup, then one multi-row INSERT that commits by itself.

        Few statements matter more than fast ones: each ``sqlite3`` call releases the GIL and must win
        it back from the reactor thread. The lookup may run outside the transaction because this thread
        is the only one that writes accepted messages. Only a group with commands, in-group repeats, or
        more rows than one statement takes needs BEGIN and COMMIT around its statements."""
        keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
        plan = _Plan(group, _sqlite_originals(con, keys))
        if not plan.needs_transaction():
            return plan.results(_insert_rows(con, "messages", _MESSAGE_COLUMNS, plan.rows), [])
        con.execute("BEGIN IMMEDIATE")
        try:
            ids = _insert_rows(con, "messages", _MESSAGE_COLUMNS, plan.rows)
            command_ids = _insert_rows(con, "commands", _COMMAND_COLUMNS, plan.command_rows(ids))
            in_group = plan.in_group_duplicates(ids)
            if in_group:
                con.executemany(_DUPLICATE_SQL, in_group)
            con.execute("COMMIT")
        except BaseException:
            if con.in_transaction:
                con.execute("ROLLBACK")
            raise
        return plan.results(ids, command_ids)

    @contextlib.contextmanager
    def _lock_wait(self, conn: Any) -> Iterator[None]:
        """While the database is known to be locked, jobs wait briefly for it too (then the pool's default)."""
        if not (self._locked and conn.dialect.name == "sqlite"):
            yield
            return
        conn.exec_driver_sql(f"PRAGMA busy_timeout={LOCKED_WAIT_MS}")
        try:
            yield
        finally:
            conn.connection.driver_connection.execute(f"PRAGMA busy_timeout={LOCK_WAIT_MS}")

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

    def _write_generic(self, conn: Any, group: list[WriteRequest]) -> list[WriteResult]:
        """Any other database, through SQLAlchemy Core."""
        keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
        plan = _Plan(group, self._generic_originals(conn, keys))
        ids = [r.id for r in conn.execute(self._insert, plan.rows)]
        command_rows = [dict(zip(_COMMAND_COLUMNS, values, strict=True)) for values in plan.command_rows(ids)]
        command_ids = [r.id for r in conn.execute(self._insert_commands, command_rows)] if command_rows else []
        in_group = plan.in_group_duplicates(ids)
        if in_group:
            conn.execute(
                messages.update()
                .where(messages.c.id == bindparam("i"))
                .values(duplicate_of=bindparam("d"), ack_raw=bindparam("a"), ack_code=bindparam("c")),
                [{"d": d, "a": a, "c": c, "i": i} for d, a, c, i in in_group],
            )
        return plan.results(ids, command_ids)

    def _generic_originals(self, conn: Any, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], Any]:
        found = {}
        for key in keys:
            row = conn.execute(self._original, {"app": key[0], "fac": key[1], "ctrl": key[2]}).first()
            if row is not None:
                found[key] = (row[0], row[1], row[2])
        return found


class _Plan:
    """Which rows of a group are duplicates, of what, and the rows to insert, before touching the database."""

    def __init__(self, group: list[WriteRequest], originals: dict[tuple[str, str, str], Any]) -> None:
        self.group = group
        self.owners: list[int] = []
        self.rows: list[dict[str, Any]] = []
        self.duplicate_of: list[tuple[int, bytes, str] | int | None] = []
        first_in_group: dict[tuple[str, str, str], int] = {}
        for position, request in enumerate(group):
            key, row = request.dedupe_key, request.row
            original: tuple[int, bytes, str] | int | None = None
            if key:
                original = originals.get(key)
                if original is not None:
                    row = dict(row, status=MessageStatus.DUPLICATE, duplicate_of=original[0], ack_raw=original[1],
                               ack_code=original[2])  # fmt: skip
                elif key in first_in_group:
                    original = first_in_group[key]
                    row = dict(row, status=MessageStatus.DUPLICATE)
                else:
                    first_in_group[key] = position
            self.rows.append(row)
            self.duplicate_of.append(original)

    def needs_transaction(self) -> bool:
        return (
            any(r.commands for r in self.group)
            or any(isinstance(d, int) for d in self.duplicate_of)
            or len(_sizes(len(self.rows))) > 1
        )

    def in_group_duplicates(self, ids: list[int]) -> list[tuple[int, bytes, str, int]]:
        """(original id, its ACK, its code, duplicate id) for repeats of a message in the same group."""
        out = []
        for position, original in enumerate(self.duplicate_of):
            if isinstance(original, int):
                first = self.rows[original]
                out.append((ids[original], first["ack_raw"], first["ack_code"], ids[position]))
        return out

    def command_rows(self, ids: list[int]) -> list[tuple[Any, ...]]:
        """The commands of the messages that are not duplicates, in column order, with their message ids."""
        self.owners = []
        out = []
        for position, request in enumerate(self.group):
            if request.commands and self.duplicate_of[position] is None:
                for command in request.commands:
                    out.append(tuple(ids[position] if c == "message_id" else command.get(c) for c in _COMMAND_COLUMNS))
                    self.owners.append(position)
        return out

    def results(self, ids: list[int], command_ids: list[int]) -> list[WriteResult]:
        owned: dict[int, list[int]] = {}
        for owner, command_id in zip(self.owners, command_ids, strict=True):
            owned.setdefault(owner, []).append(command_id)
        results = []
        for position, original in enumerate(self.duplicate_of):
            if original is None:
                results.append(WriteResult(ids[position], command_ids=tuple(owned.get(position, ()))))
            elif isinstance(original, int):
                first = self.rows[original]
                results.append(WriteResult(ids[position], ids[original], first["ack_raw"], first["ack_code"]))
            else:
                results.append(WriteResult(ids[position], original[0], original[1], original[2]))
        return results


_COMMAND_COLUMNS = tuple(c.name for c in commands.columns if c.name != "id")
_MESSAGE_COLUMNS = tuple(c.name for c in messages.columns if c.name != "id")
_DUPLICATE_SQL = "UPDATE messages SET duplicate_of = ?, ack_raw = ?, ack_code = ? WHERE id = ?"
#: Rows per multi-row statement at most; groups up to ``_ANY_SIZE`` rows take one statement of their own
#: size, larger ones powers of two. sqlite3 keeps its last 128 compiled statements, and one compiled for
#: every group size seen would hold tens of megabytes.
_MAX_ROWS = 64
_ANY_SIZE = 16


def _sizes(count: int) -> list[int]:
    """The statement sizes for ``count`` rows, largest first (12 -> 12; 37 -> 32, 5)."""
    sizes = []
    while count > _ANY_SIZE:
        size = min(_MAX_ROWS, 1 << (count.bit_length() - 1))
        sizes.append(size)
        count -= size
    return [*sizes, count] if count else sizes


@lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], rows: int) -> str:
    placeholders = "(" + ", ".join("?" for _ in columns) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([placeholders] * rows)


@lru_cache(maxsize=16)
def _originals_sql(keys: int) -> str:
    return (
        "WITH k(a, f, c) AS (VALUES " + ", ".join(["(?, ?, ?)"] * keys) + ") "
        "SELECT k.a, k.f, k.c, m.id, m.ack_raw, m.ack_code FROM k CROSS JOIN messages AS m "
        "INDEXED BY ix_messages_sender_control ON m.sending_application = k.a AND m.sending_facility = k.f "
        f"AND m.control_id = k.c WHERE m.status = '{MessageStatus.ACCEPTED}' ORDER BY m.id DESC"
    )


def _insert_rows(con: Any, table: str, columns: tuple[str, ...], rows: list[Any]) -> list[int]:
    """Insert rows (dicts or tuples in column order) with multi-row INSERTs; their ids, in order.

    The transaction holds the write lock and the tables have no AUTOINCREMENT gaps to fear: the rowids
    of one statement are consecutive and end at ``lastrowid``."""
    if rows and isinstance(rows[0], dict):
        rows = [tuple(map(row.get, columns)) for row in rows]
    ids: list[int] = []
    start = 0
    for size in _sizes(len(rows)):
        chunk = rows[start : start + size]
        start += size
        last = con.execute(_insert_sql(table, columns, size), [v for row in chunk for v in row]).lastrowid
        ids.extend(range(last - size + 1, last + 1))
    return ids


def _sqlite_originals(con: Any, keys: list[tuple[str, str, str]]) -> dict[tuple[str, str, str], Any]:
    """The first accepted message per (MSH-3, MSH-4, MSH-10), in as few statements as the sizes allow.

    The keys are joined against the sender/control-id index explicitly: left to itself, SQLite plans a
    row-value ``IN`` as a scan by status, which costs time in proportion to the log's size."""
    found: dict[tuple[str, str, str], Any] = {}
    start = 0
    for size in _sizes(len(keys)):
        chunk = keys[start : start + size]
        start += size
        for a, f, c, message_id, ack_raw, ack_code in con.execute(_originals_sql(size), [v for k in chunk for v in k]):
            found[(a, f, c)] = (message_id, ack_raw, ack_code)
    return found


def _is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc)


def _deliver(group: list[WriteRequest], results: list[WriteResult]) -> None:
    for request, result in zip(group, results, strict=True):
        try:
            request.on_done(result)
        except Exception:
            log.exception("result delivery failed")
