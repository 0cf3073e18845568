"""The generic write path: any database other than a SQLite file, through SQLAlchemy Core (on PostgreSQL the
rows themselves through psycopg's pipelined ``executemany``, ``_pg_insert``).

On PostgreSQL the accepted messages are held unique by (MSH-3, MSH-4, MSH-10) (``ux_messages_accepted_key``), and
a group goes in with ``INSERT … ON CONFLICT DO NOTHING``: should another writer accept the same key between this
group's lookup and its insert, the insert waits for that transaction and skips the row, and the group is planned
again with the now committed original, so the resend is answered with the original's ACK and starts nothing.
The duplicate lookup and the messages' search keys and words go in with the rows, in the same pipeline: one round
trip and the COMMIT a group (``_write_postgres``)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, select

from hl7bridge.core.status import MessageStatus

from .cluster import notify_outbox
from .planner import COMMAND_COLUMNS, DuplicatePlan, WriteRequest, WriteResult
from .schema import StoreError, commands, index_messages, messages, unindex_messages

_INSERT = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)
_INSERT_COMMANDS = commands.insert().returning(commands.c.id, sort_by_parameter_order=True)
_ORIGINAL = (
    select(messages.c.id, messages.c.ack_raw, messages.c.ack_code)
    .where(messages.c.sending_application == bindparam("app"))
    .where(messages.c.sending_facility == bindparam("fac"))
    .where(messages.c.control_id == bindparam("ctrl"))
    .where(messages.c.status == MessageStatus.ACCEPTED)
    .order_by(messages.c.id)
    .limit(1)
)
_DUPLICATES = (
    messages.update()
    .where(messages.c.id == bindparam("i"))
    .values(duplicate_of=bindparam("d"), ack_raw=bindparam("a"), ack_code=bindparam("c"))
)


def write_generic(conn: Any, group: list[WriteRequest]) -> list[WriteResult]:
    """Any other database, through SQLAlchemy Core, in the caller's transaction."""
    if conn.dialect.name == "postgresql":
        return _write_postgres(conn, group)
    keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
    plan = DuplicatePlan(group, _originals(conn, keys))
    ids = [r.id for r in conn.execute(_INSERT, plan.rows)]
    return _finish(conn, plan, ids)


def _finish(conn: Any, plan: DuplicatePlan, ids: list[int], postgres: bool = False) -> list[WriteResult]:
    """The commands of the group's new messages, and the repeats within the group pointed at their first copy."""
    if postgres:
        command_ids = _pg_insert(conn, "commands", COMMAND_COLUMNS, plan.command_rows(ids), "")
        if command_ids:
            notify_outbox(conn)
    else:
        command_rows = [dict(zip(COMMAND_COLUMNS, values, strict=True)) for values in plan.command_rows(ids)]
        command_ids = [r.id for r in conn.execute(_INSERT_COMMANDS, command_rows)] if command_rows else []
    in_group = plan.in_group_duplicates(ids)
    if in_group:
        conn.execute(_DUPLICATES, [{"d": d, "a": a, "c": c, "i": i} for d, a, c, i in in_group])
    return plan.results(ids, command_ids)


def _write_postgres(conn: Any, group: list[WriteRequest]) -> list[WriteResult]:
    """The group in one round trip before its COMMIT, planned as though none of its keys were logged (nearly always
    so): the duplicate lookup, the search index and the rows, with ids taken from the connection's drawn ids
    (``_take_ids``), so that the rows ``ON CONFLICT DO NOTHING`` skipped are known by id. A key found logged (a
    resend) or accepted meanwhile by another writer (a skipped row): the group's rows and index are taken out again
    and it is planned anew with those originals, the rows' round trip again. Each pass finds at least one more
    original, so it ends."""
    keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
    ids = _take_ids(conn, len(group))
    originals: dict[tuple[str, str, str], Any] = {}
    driver = conn.connection.driver_connection
    for attempt in range(len(keys) + 2):
        plan = DuplicatePlan(group, originals)
        rows = [dict(row, id=i) for row, i in zip(plan.rows, ids, strict=True)]
        looked = attempt == 0 and bool(keys)
        with driver.cursor() as lookup:

            def first(rows: list[dict] = rows, lookup: Any = lookup, looked: bool = looked) -> None:
                if looked:
                    _queue_lookup(lookup, keys)
                index_messages(conn, ids, rows)

            inserted = set(_pg_insert(conn, "messages", _MESSAGE_COLUMNS, rows, " ON CONFLICT DO NOTHING", first))
            found = _originals_found(lookup) if looked else {}
        if not found and len(inserted) == len(rows):
            return _finish(conn, plan, ids, postgres=True)
        conn.execute(messages.delete().where(messages.c.id.in_(sorted(inserted))))
        unindex_messages(conn, ids, rows)
        skipped = [r.dedupe_key for r, i in zip(group, ids, strict=True) if i not in inserted and r.dedupe_key]
        if skipped:
            with driver.cursor() as lookup:
                _queue_lookup(lookup, skipped)
                found.update(_originals_found(lookup))
        if not found:
            break
        originals.update(found)
    raise StoreError("a message of the group conflicts with a row that is not an accepted original")


_MESSAGE_COLUMNS = tuple(c.name for c in messages.columns)


@lru_cache(maxsize=8)
def _pg_insert_sql(table: str, columns: tuple[str, ...], conflict: str) -> str:
    return (f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(['%s'] * len(columns))}){conflict} "
            "RETURNING id")  # fmt: skip


def _pg_insert(
    conn: Any,
    table: str,
    columns: tuple[str, ...],
    rows: list[Any],
    conflict: str,
    first: Callable[[], None] | None = None,
) -> list[int]:
    """Insert rows (dicts, or tuples in column order) with the driver's ``executemany``; the ids of the rows
    inserted, in order. psycopg sends one prepared statement per row in one pipeline, a round trip in all:
    SQLAlchemy's multi-row VALUES for 20 messages was a statement of 540 parameters, too long for psycopg's query
    cache and planned anew each time, and a group took 13 ms instead of 4 (``bench/ingest.py --postgres``).
    ``first`` queues statements ahead of the rows in the same pipeline (the rows' search index): psycopg's
    ``executemany(returning=True)`` flushes and waits for its results, and a statement queued after it would cost a
    round trip of its own (a group of one took 1.8 ms longer)."""
    if not rows:
        return []
    if isinstance(rows[0], dict):
        rows = [tuple(map(row.get, columns)) for row in rows]
    ids: list[int] = []
    driver = conn.connection.driver_connection
    with driver.cursor() as cur:
        with driver.pipeline():
            if first is not None:
                first()
            cur.executemany(_pg_insert_sql(table, columns, conflict), rows, returning=True)
        while True:
            ids.extend(row[0] for row in cur.fetchall())
            if not cur.nextset():
                break
    return ids


def _originals(conn: Any, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], Any]:
    found = {}
    for key in keys:
        row = conn.execute(_ORIGINAL, {"app": key[0], "fac": key[1], "ctrl": key[2]}).first()
        if row is not None:
            found[key] = (row[0], row[1], row[2])
    return found


#: The first accepted message of each key (a replay too, as on SQLite), in a statement whose text never changes (the
#: keys go in as three arrays), where a row-value ``IN`` of as many tuples as the group has keys was a new statement
#: for SQLAlchemy to build, cache-key and compile each time (0.55 ms of the writer's CPU a group, half of all it
#: spent on a lone message). It is never prepared (``prepare=False``): a plan cached while the table was small (a
#: new log, its statistics not yet gathered) scanned the whole table for ever after, 2.5 ms a group and growing
#: (``bench/cluster.py``, ``pg_stat_statements``); planned each time, it probes the unique key (0.1 ms).
_PG_ORIGINALS_SQL = f"""
SELECT k.app, k.fac, k.ctrl, m.id, m.ack_raw, m.ack_code
FROM unnest(%s::text[], %s::text[], %s::text[]) AS k(app, fac, ctrl)
JOIN messages AS m ON m.sending_application = k.app AND m.sending_facility = k.fac AND m.control_id = k.ctrl
WHERE m.status = '{MessageStatus.ACCEPTED}'
"""
_PG_DRAW_IDS_SQL = "SELECT nextval(pg_get_serial_sequence('messages', 'id')) FROM generate_series(1, %s)"
#: Message ids a writer's connection draws from the sequence at a time, kept for its next groups: a draw is one
#: more round trip, and the group's own trip cannot wait for it (its index and rows need the ids). Ids drawn and
#: not used (a connection closed, a group that failed) are gaps, as any sequence leaves.
IDS_PER_DRAW = 256
_DRAWN = "hl7bridge_message_ids"


def _take_ids(conn: Any, count: int) -> list[int]:
    """``count`` message ids from those this connection drew, drawing more when short."""
    drawn: deque[int] = conn.connection.info.setdefault(_DRAWN, deque())
    if len(drawn) < count:
        with conn.connection.driver_connection.cursor() as cur:
            drawn.extend(sorted(r[0] for r in cur.execute(_PG_DRAW_IDS_SQL, (max(count, IDS_PER_DRAW),))))
    return [drawn.popleft() for _ in range(count)]


def _queue_lookup(cur: Any, keys: Sequence[tuple[str, str, str]]) -> None:
    cur.execute(_PG_ORIGINALS_SQL, ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]), prepare=False)


def _originals_found(cur: Any) -> dict[tuple[str, str, str], Any]:
    found: dict[tuple[str, str, str], Any] = {}
    for app, fac, ctrl, message_id, ack_raw, ack_code in cur.fetchall():
        if (app, fac, ctrl) not in found or message_id < found[(app, fac, ctrl)][0]:
            found[(app, fac, ctrl)] = (message_id, ack_raw, ack_code)
    return found
