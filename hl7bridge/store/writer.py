"""The single writer thread: messages and their commands in group commits, and dispatcher jobs."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import (
    bindparam,
    select,
)
from sqlalchemy.engine import Engine

from .schema import _first_line, commands, messages

log = logging.getLogger("hl7bridge.store")
_ORIGINAL_SQL = (
    "SELECT id, ack_raw, ack_code FROM messages WHERE sending_application = ? AND sending_facility = ? "
    "AND control_id = ? AND status = 'accepted' ORDER BY id LIMIT 1"
)


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


@dataclass(frozen=True, slots=True)
class WriteResult:
    message_id: int | None
    duplicate_of: int | None = None
    original_ack: bytes | None = None
    original_ack_code: str | None = None
    error: str | None = None
    command_ids: tuple[int, ...] = ()


_STOP = object()


class Writer:
    """The single writer thread. ``call_back`` runs result delivery on the caller's thread."""

    def __init__(
        self,
        engine: Engine,
        call_back: Callable[..., Any],
        max_group: int = 2000,
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
        self._insert_columns = [c.name for c in messages.columns if c.name != "id"]
        self._insert_sql = (
            f"INSERT INTO messages ({', '.join(self._insert_columns)}) "
            f"VALUES ({', '.join('?' for _ in self._insert_columns)})"
        )
        self._original = (
            select(messages.c.id, messages.c.ack_raw, messages.c.ack_code)
            .where(messages.c.sending_application == bindparam("app"))
            .where(messages.c.sending_facility == bindparam("fac"))
            .where(messages.c.control_id == bindparam("ctrl"))
            .where(messages.c.status == "accepted")
            .order_by(messages.c.id)
            .limit(1)
        )
        self._insert_commands = commands.insert().returning(commands.c.id, sort_by_parameter_order=True)
        self.on_commands: Callable[[], None] | None = None

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
        q = self._queue
        while True:
            item = q.get()
            if item is _STOP:
                return
            group = [item]
            stop = False
            while len(group) < self.max_group:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                group.append(nxt)
            try:
                self._handle(group)
            except Exception:
                # The writer must outlive anything: a dead writer answers nothing, not even AR.
                log.exception("the writer failed on a group; carrying on")
            if stop:
                return

    def _handle(self, group: list[Any]) -> None:
        requests = [g for g in group if isinstance(g, WriteRequest)]
        jobs = [g for g in group if isinstance(g, Job)]
        if requests:
            results = self._write(requests)
            self.call_back(_deliver, requests, results)
            if self.on_commands is not None and any(r.command_ids for r in results):
                self.on_commands()
        if jobs:
            self._run_jobs(jobs)

    def _run_jobs(self, jobs: list[Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            with self.engine.begin() as conn:
                for job in jobs:
                    try:
                        with conn.begin_nested():
                            result = job.work(conn)
                    except Exception as exc:  # noqa: BLE001 - reported to the job's owner
                        outcomes.append((None, exc))
                        continue
                    outcomes.append((result, None))
            self.commits += 1
        except Exception as exc:  # noqa: BLE001 - the commit itself failed: every job failed
            self.failures += 1
            self.last_error = f"{exc.__class__.__name__}: {_first_line(exc)}"
            log.error("database write failed for %d job(s): %s", len(jobs), self.last_error)
            outcomes = [(None, exc)] * len(jobs)
        for job, (result, error) in zip(jobs, outcomes, strict=True):
            try:
                job.on_done(result, error)
            except Exception:
                log.exception("job result delivery failed")

    def _write(self, group: list[WriteRequest]) -> list[WriteResult]:
        try:
            with self.engine.begin() as conn:
                originals = self._originals(conn, [r.dedupe_key for r in group if r.dedupe_key])
                rows = []
                dup_of: list[tuple[int, bytes, str] | None] = []
                seen_in_group: dict[tuple[str, str, str], int] = {}
                for position, request in enumerate(group):
                    key = request.dedupe_key
                    original = originals.get(key) if key else None
                    if key and original is None and key in seen_in_group:
                        original = ("group", seen_in_group[key])
                    row = request.row
                    if original is not None:
                        row = dict(row, status="duplicate")
                    elif key:
                        seen_in_group[key] = position
                    rows.append(row)
                    dup_of.append(original)
                ids = self._insert_messages(conn, rows)
                results = []
                for position, original in enumerate(dup_of):
                    if original is None:
                        results.append(WriteResult(ids[position]))
                        continue
                    if original[0] == "group":
                        first = original[1]
                        orig_id, ack_raw, ack_code = ids[first], rows[first]["ack_raw"], rows[first]["ack_code"]
                    else:
                        orig_id, ack_raw, ack_code = original
                    results.append(WriteResult(ids[position], orig_id, ack_raw, ack_code))
                command_rows = []
                owners = []
                for position, request in enumerate(group):
                    if request.commands and dup_of[position] is None:
                        for command in request.commands:
                            command_rows.append(dict(command, message_id=ids[position]))
                            owners.append(position)
                if command_rows:
                    command_ids: dict[int, list[int]] = {}
                    for owner, row in zip(owners, conn.execute(self._insert_commands, command_rows), strict=True):
                        command_ids.setdefault(owner, []).append(row.id)
                    results = [replace(r, command_ids=tuple(command_ids.get(i, ()))) for i, r in enumerate(results)]
                dup_updates = [
                    {"i": res.message_id, "d": res.duplicate_of, "a": res.original_ack, "c": res.original_ack_code}
                    for res in results
                    if res.duplicate_of is not None
                ]
                if dup_updates:
                    conn.execute(
                        messages.update()
                        .where(messages.c.id == bindparam("i"))
                        .values(duplicate_of=bindparam("d"), ack_raw=bindparam("a"), ack_code=bindparam("c")),
                        dup_updates,
                    )
            self.commits += 1
            self.rows += len(group)
            self.last_error = None
            return results
        except Exception as exc:  # noqa: BLE001 - any failure must turn into a NAK, never a lost message
            self.failures += 1
            self.last_error = f"{exc.__class__.__name__}: {_first_line(exc)}"
            log.error("database write failed for %d message(s): %s", len(group), self.last_error)
            return [WriteResult(None, error=self.last_error)] * len(group)

    def _insert_messages(self, conn: Any, rows: list[dict[str, Any]]) -> list[int]:
        """Insert the group's rows and return their ids, in order.

        On SQLite the hot path goes to the driver: one ``executemany``. The transaction holds the
        write lock, so the new rowids are consecutive and end at ``last_insert_rowid()``."""
        if conn.dialect.name != "sqlite":
            return [r.id for r in conn.execute(self._insert, rows)]
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.executemany(self._insert_sql, [tuple(row.get(c) for c in self._insert_columns) for row in rows])
            last = cursor.execute("SELECT last_insert_rowid()").fetchone()[0]
        finally:
            cursor.close()
        return list(range(last - len(rows) + 1, last + 1))

    def _originals(self, conn: Any, keys: Sequence[tuple[str, str, str]]) -> dict:
        """The first accepted message per (MSH-3, MSH-4, MSH-10), one indexed lookup per key.

        (A single ``(a, b, c) IN (VALUES ...)`` query makes SQLite scan by status instead of
        using the sender/control-id index, which costs time in proportion to the log's size.)"""
        found: dict[tuple[str, str, str], tuple[int, bytes, str]] = {}
        if not keys:
            return found
        if conn.dialect.name == "sqlite":
            cursor = conn.connection.driver_connection.cursor()
            try:
                for key in dict.fromkeys(keys):
                    row = cursor.execute(_ORIGINAL_SQL, key).fetchone()
                    if row is not None:
                        found[key] = (row[0], row[1], row[2])
            finally:
                cursor.close()
            return found
        for key in dict.fromkeys(keys):
            row = conn.execute(self._original, {"app": key[0], "fac": key[1], "ctrl": key[2]}).first()
            if row is not None:
                found[key] = (row[0], row[1], row[2])
        return found


def _deliver(group: list[WriteRequest], results: list[WriteResult]) -> None:
    for request, result in zip(group, results, strict=True):
        try:
            request.on_done(result)
        except Exception:
            log.exception("result delivery failed")
