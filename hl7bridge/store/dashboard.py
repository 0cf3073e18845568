"""The dashboard's reads: messages per minute by ACK code and each listener's last message within a window, from
the covering index ``ix_messages_received`` (received_at, ack_code, listener): the cost follows the window's
messages, never the log's, and no message row (raw bytes, summary) is read. The rest are single index probes."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Integer, cast, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from .schema import messages

received = messages.c.received_at


def _per_minute(since: float, until: float) -> Select[Any]:
    minute = cast(received / 60, Integer).label("minute")
    return (
        select(minute, messages.c.ack_code, func.count())
        .where(received >= since)
        .where(received < until)
        .group_by(minute, messages.c.ack_code)
    )


def _listeners(since: float, until: float) -> Select[Any]:
    return (
        select(messages.c.listener, func.max(received))
        .where(received >= since)
        .where(received < until)
        .group_by(messages.c.listener)
    )


def per_minute(conn: Connection, since: float, until: float) -> list[tuple[int, str | None, int]]:
    """(minute since the epoch, ACK code, messages) for the messages received in [since, until)."""
    return [(int(m), code, int(n)) for m, code, n in conn.execute(_per_minute(since, until))]


def listeners_seen(conn: Connection, since: float, until: float) -> dict[str, float]:
    """Each listener that received a message in [since, until), and when it last did."""
    return {name: at for name, at in conn.execute(_listeners(since, until))}


def newest(conn: Connection) -> tuple[int, float | None]:
    """The newest message's id (rows are never deleted, retention clears their contents: it is the count of
    messages logged) and the latest receive time: two index probes, where a count would read every entry."""
    top = conn.execute(select(func.max(messages.c.id))).scalar()
    last = conn.execute(select(func.max(received))).scalar()
    return int(top or 0), last


def explain(conn: Connection, since: float, until: float) -> list[str]:
    """SQLite's plans for the window's two reads (the tests hold them to the covering index)."""
    plans = []
    for stmt in (_per_minute(since, until), _listeners(since, until)):
        compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
        plans += [str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]
    return plans
