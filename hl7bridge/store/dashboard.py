"""The dashboard's reads. Messages per minute by ACK code and listener come from ``message_minutes`` (counted in
the search index file a second behind intake, ``search_index``): a window costs a few hundred rows however busy it was. Counting the
window's messages themselves cost 0.5 µs each, 90-370 ms for a busy hour of 180,000 (``bench/timeline.py``). The
messages past the index are counted directly, at most ``TAIL_MAX`` of them; more are reported, not counted. On
a database other than SQLite (no index file) the window is counted from the messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from .schema import INDEX_SCHEMA, message_minutes, messages
from .search import TAIL_MAX
from .search_index import attach

received = messages.c.received_at


@dataclass
class Counted:
    """(minute since the epoch, ACK code or '', listener) -> messages, and each listener's last message time."""

    counts: dict[tuple[int, str, str], int] = field(default_factory=dict)
    last_at: dict[str, float] = field(default_factory=dict)
    #: Messages past the index not counted (more than ``TAIL_MAX``: the index is far behind or not running).
    uncounted: int = 0

    def add(self, minute: int, code: str | None, listener: str, count: int, last_at: float) -> None:
        key = (int(minute), code or "", listener)
        self.counts[key] = self.counts.get(key, 0) + int(count)
        self.last_at[listener] = max(last_at, self.last_at.get(listener, last_at))


def _grouped(since: float, until: float) -> Select[Any]:
    minute = cast(func.floor(received / 60), Integer)
    return (
        select(minute, messages.c.ack_code, messages.c.listener, func.count(), func.max(received))
        .where(received >= since)
        .where(received < until)
        .group_by(minute, messages.c.ack_code, messages.c.listener)
    )


def window(conn: Connection, first_minute: int, last_minute: int) -> Counted:
    """The messages received from the start of ``first_minute`` to the end of ``last_minute``."""
    since, until = first_minute * 60.0, (last_minute + 1) * 60.0
    counted = Counted()
    if conn.dialect.name != "sqlite":
        for row in conn.execute(_grouped(since, until)):
            counted.add(*row)
        return counted
    indexed = attach(conn)
    rows = conn.execute(
        select(message_minutes.c.minute, message_minutes.c.ack_code, message_minutes.c.listener,
               message_minutes.c.count, message_minutes.c.last_at)
        .where(message_minutes.c.minute >= first_minute).where(message_minutes.c.minute <= last_minute)
        .where(message_minutes.c.count > 0)
    )  # fmt: skip
    for row in rows:
        counted.add(*row)
    # ACKs decided after their message was counted, which the index has not applied yet (seconds' worth).
    applied = conn.exec_driver_sql(f"SELECT value FROM {INDEX_SCHEMA}.meta WHERE key = 'acks_to'").scalar()
    changes = conn.exec_driver_sql(
        "SELECT received_at, listener, old_code, new_code FROM ack_changes WHERE id > ? AND message_id <= ? "
        "ORDER BY id LIMIT ?",
        (int(applied or 0), indexed, TAIL_MAX),
    )
    for at, listener, old, new in changes:
        if since <= at < until:
            counted.add(int(at // 60), old, listener, -1, at)
            counted.add(int(at // 60), new, listener, 1, at)
    # By id, so the plan is the rowid range (at most TAIL_MAX rows) whatever the window; the time is checked here.
    tail = select(received, messages.c.ack_code, messages.c.listener).where(messages.c.id > indexed)
    for at, code, listener in conn.execute(tail.where(messages.c.id <= indexed + TAIL_MAX)):
        if since <= at < until:
            counted.add(int(at // 60), code, listener, 1, at)
    top = conn.execute(select(func.max(messages.c.id))).scalar() or 0
    counted.uncounted = max(0, top - indexed - TAIL_MAX)
    return counted


def newest(conn: Connection) -> tuple[int, float | None]:
    """The newest message's id (rows are never deleted, retention clears their contents: it is the count of
    messages logged) and the latest receive time: two index probes, where a count would read every entry."""
    top = conn.execute(select(func.max(messages.c.id))).scalar()
    last = conn.execute(select(func.max(received))).scalar()
    return int(top or 0), last
