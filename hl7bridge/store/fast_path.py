"""The SQLite fast path: a group in as few statements as possible, waiting for another process's write
lock in short steps."""

from __future__ import annotations

import sqlite3
import time
from functools import lru_cache
from typing import Any

from hl7bridge.core.status import MessageStatus

from .planner import COMMAND_COLUMNS, DuplicatePlan, WriteRequest, WriteResult
from .schema import BUSY_TIMEOUT_MS, messages

#: How long a write waits for another connection's lock once a write has already failed on it: while the
#: lock lasts, every group is answered AR/AE within a quarter second instead of each waiting out the full
#: ``BUSY_TIMEOUT_MS`` behind the one before.
LOCK_WAIT_MS = BUSY_TIMEOUT_MS
LOCKED_WAIT_MS = 250
#: The first and the longest pause between tries while another connection holds the write lock.
LOCK_POLL_FIRST = 0.0002
LOCK_POLL_MAX = 0.001

_MESSAGE_COLUMNS = tuple(c.name for c in messages.columns if c.name != "id")
_DUPLICATE_SQL = "UPDATE messages SET duplicate_of = ?, ack_raw = ?, ack_code = ? WHERE id = ?"
#: Rows per multi-row statement at most; groups up to ``_ANY_SIZE`` rows take one statement of their own
#: size, larger ones powers of two. sqlite3 keeps its last 128 compiled statements, and one compiled for
#: every group size seen would hold tens of megabytes.
_MAX_ROWS = 64
_ANY_SIZE = 16


def write_sqlite(con: Any, group: list[WriteRequest], locked: bool) -> list[WriteResult]:
    """Write the group, waiting for another process's write lock in short steps.

    The dispatcher process commits through a connection of its own. SQLite's busy handler would
    sleep 1, 2, 5, 10 ms... between tries, which made a message that met one of its commits wait
    about 20 ms; here the wait starts at a fifth of a millisecond."""
    limit = (LOCKED_WAIT_MS if locked else LOCK_WAIT_MS) / 1000.0
    deadline, pause = time.monotonic() + limit, LOCK_POLL_FIRST
    while True:
        try:
            return _write_once(con, group)
        except sqlite3.OperationalError as exc:
            if not is_locked(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, LOCK_POLL_MAX)


def _write_once(con: Any, group: list[WriteRequest]) -> list[WriteResult]:
    """The hot path: one lookup, then one multi-row INSERT that commits by itself.

    Few statements matter more than fast ones: each ``sqlite3`` call releases the GIL and must win
    it back from the reactor thread. The lookup may run outside the transaction because this thread
    is the only one that writes accepted messages. Only a group with commands, in-group repeats, or
    more rows than one statement takes needs BEGIN and COMMIT around its statements."""
    keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
    plan = DuplicatePlan(group, _sqlite_originals(con, keys))
    if not _needs_transaction(plan):
        return plan.results(_insert_rows(con, "messages", _MESSAGE_COLUMNS, plan.rows), [])
    con.execute("BEGIN IMMEDIATE")
    try:
        ids = _insert_rows(con, "messages", _MESSAGE_COLUMNS, plan.rows)
        command_ids = _insert_rows(con, "commands", COMMAND_COLUMNS, plan.command_rows(ids))
        in_group = plan.in_group_duplicates(ids)
        if in_group:
            con.executemany(_DUPLICATE_SQL, in_group)
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise
    return plan.results(ids, command_ids)


def _needs_transaction(plan: DuplicatePlan) -> bool:
    return (
        any(r.commands for r in plan.group)
        or any(isinstance(d, int) for d in plan.duplicate_of)
        or len(_sizes(len(plan.rows))) > 1
    )


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


def is_locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc)
