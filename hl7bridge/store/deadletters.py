"""The dead letters' queries and updates: which commands are dead letters, the commands of their
appointments, and the change an operator's retry or discard makes (``workflow.deadletters`` holds the rules).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from hl7bridge.core.status import DEAD_LETTERS

from .schema import commands, meta

#: Ids per ``IN (...)`` list, under every database's limit on bound values.
CHUNK = 500

COLUMNS = (commands.c.id, commands.c.message_id, commands.c.appointment_key, commands.c.route, commands.c.kind,
           commands.c.status, commands.c.outcome, commands.c.updated_at, commands.c.attempts)  # fmt: skip


def dead_letters(
    conn: Connection,
    *,
    since: float | None = None,
    route: str | None = None,
    limit: int | None = None,
    after: int | None = None,
    lock: bool = False,
) -> list[Any]:
    """Open dead letters in command order, dead since ``since`` and of ``route`` when given; a page goes on from
    the command id ``after``. ``lock``: ``FOR UPDATE`` (see ``commands_by_id``)."""
    query = select(*COLUMNS).where(commands.c.status.in_(DEAD_LETTERS)).order_by(commands.c.id).limit(limit)
    if lock:
        query = query.with_for_update()
    if after is not None:
        query = query.where(commands.c.id > after)
    if since is not None:
        query = query.where(commands.c.updated_at >= since)
    if route:
        query = query.where(commands.c.route == route)
    return list(conn.execute(query).all())


def commands_by_id(conn: Connection, ids: Iterable[int], lock: bool = False) -> list[Any]:
    """The commands with these ids (dead letters or not), in command order. ``lock``: read ``FOR UPDATE``, so
    that on PostgreSQL nothing changes them between an operator's checks and the change (SQLite's write lock,
    taken by ``take_write_lock``, already holds every writer off; it has no row locks)."""
    wanted = sorted(set(ids))
    rows: list[Any] = []
    for start in range(0, len(wanted), CHUNK):
        query = select(*COLUMNS).where(commands.c.id.in_(wanted[start : start + CHUNK])).order_by(commands.c.id)
        rows += conn.execute(query.with_for_update() if lock else query).all()
    return sorted(rows, key=lambda row: row.id)


def appointment_commands(conn: Connection, keys: set[str], lock: bool = False) -> dict[str, list[Any]]:
    """Every command of these appointments, in order (the appointment index serves it); ``lock``: ``FOR UPDATE``."""
    found: dict[str, list[Any]] = {key: [] for key in keys}
    wanted = sorted(keys)
    for start in range(0, len(wanted), CHUNK):
        query = (select(commands.c.id, commands.c.appointment_key, commands.c.kind, commands.c.status)
                 .where(commands.c.appointment_key.in_(wanted[start : start + CHUNK])).order_by(commands.c.id))  # fmt: skip
        for row in conn.execute(query.with_for_update() if lock else query):
            found[row.appointment_key].append(row)
    return found


def settle_dead_letters(conn: Connection, ids: list[int], values: dict[str, Any]) -> None:
    """Change only what is still a dead letter (the write lock holds that true; this states it)."""
    for start in range(0, len(ids), CHUNK):
        conn.execute(
            commands.update()
            .where(commands.c.id.in_(ids[start : start + CHUNK]))
            .where(commands.c.status.in_(DEAD_LETTERS))
            .values(values)
        )


def take_write_lock(conn: Connection) -> None:
    """Begin with a write, so the checks that follow and the change commit as one: SQLite begins a transaction
    as a reader, and the dispatcher could settle a command between the read and the first write."""
    conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=meta.c.value))
