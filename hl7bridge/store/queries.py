"""Queries for operators (log, show, replay, stats)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    func,
    select,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.sql import Select

from hl7bridge.core.status import DEAD_LETTERS, CommandStatus, MessageStatus

from . import audit
from .audit import AuditEntry
from .outbox import AppointmentRow, appointment, outbox_depth
from .schema import NOT_ACCEPTED, attempts, commands, index_messages, messages

#: The message's open dead letters: a message whose command died still says so in ``log list``.
_OPEN_DEAD = (
    select(func.count())
    .where(commands.c.message_id == messages.c.id)
    .where(commands.c.status.in_(DEAD_LETTERS))
    .scalar_subquery()
)

LIST_COLUMNS = (
    messages.c.id,
    messages.c.received_at,
    messages.c.listener,
    messages.c.peer,
    messages.c.sending_application,
    messages.c.sending_facility,
    messages.c.control_id,
    messages.c.message_type,
    messages.c.event,
    messages.c.version,
    messages.c.action,
    messages.c.route,
    messages.c.note,
    messages.c.replay_of,
    messages.c.ack_code,
    messages.c.status,
    messages.c.error_location,
    messages.c.error,
    messages.c.duplicate_of,
    _OPEN_DEAD.label("dead_letters"),
)


def _received(engine: Engine, stmt: Select, since: float | None, event: str | None) -> list[dict[str, Any]]:
    """The messages ``stmt`` selects, of those received since ``since`` with the event ``event`` (if given)."""
    if since is not None:
        stmt = stmt.where(messages.c.received_at >= since)
    if event:
        stmt = stmt.where(messages.c.event == event.upper())
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def get_message(engine: Engine, message_id: int) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(messages).where(messages.c.id == message_id)).first()
    return dict(row._mapping) if row else None


def with_status(stmt: Any, status: str) -> Any:
    """Filter on a status, through the partial index for every status but 'accepted'. ``dead`` is not a
    message's own status: it selects the messages with an open dead letter, through the commands' index."""
    if status == CommandStatus.DEAD:
        return stmt.where(messages.c.id.in_(select(commands.c.message_id).where(commands.c.status.in_(DEAD_LETTERS))))
    stmt = stmt.where(messages.c.status == status)
    return stmt.where(text(NOT_ACCEPTED)) if status != MessageStatus.ACCEPTED else stmt


def _counts_by_status(conn: Any, since: float | None) -> dict[str, int]:
    """Messages per status from two index scans; grouping the table itself would read every raw message."""
    total = select(func.count()).select_from(messages)
    others = select(messages.c.status, func.count()).where(text(NOT_ACCEPTED)).group_by(messages.c.status)
    if since is not None:
        total = total.where(messages.c.received_at >= since)
        others = others.where(messages.c.received_at >= since)
    counts = {status: count for status, count in conn.execute(others)}
    accepted = (conn.execute(total).scalar() or 0) - sum(counts.values())
    return {MessageStatus.ACCEPTED.value: accepted, **counts} if accepted else counts


def now() -> float:
    return time.time()


def commands_for_messages(engine: Engine, message_ids: list[int]) -> list[dict[str, Any]]:
    if not message_ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(select(commands).where(commands.c.message_id.in_(message_ids)).order_by(commands.c.id))
        return [dict(r._mapping) for r in rows]


def attempts_for_commands(engine: Engine, command_ids: list[int]) -> list[dict[str, Any]]:
    if not command_ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(select(attempts).where(attempts.c.command_id.in_(command_ids)).order_by(attempts.c.id))
        return [dict(r._mapping) for r in rows]


def messages_for_replay(
    engine: Engine,
    ids: list[int] | None = None,
    status: str | None = None,
    since: float | None = None,
    event: str | None = None,
) -> list[dict[str, Any]]:
    """Messages to replay: by id, or by their own status (rejected) or their commands' (dead, failed)."""
    stmt = select(messages).order_by(messages.c.id)
    if ids:
        stmt = stmt.where(messages.c.id.in_(ids))
    if status == MessageStatus.REJECTED:
        stmt = with_status(stmt, MessageStatus.REJECTED)
    elif status in DEAD_LETTERS:
        owners = select(commands.c.message_id).where(commands.c.status == status)
        stmt = stmt.where(messages.c.id.in_(owners))
    return _received(engine, stmt, since, event)


def record_replay(
    engine: Engine,
    original: dict[str, Any],
    row: dict[str, Any],
    command_rows: list[dict[str, Any]],
    entry: AuditEntry | None = None,
) -> int:
    """Log a replay as a new message (``replay_of`` the original) with its commands, in one transaction, and
    ``entry`` (its ids then the original's and the new message's) in the audit log in the same one."""
    now = time.time()
    with engine.begin() as conn:
        new_row = dict(row, replay_of=original["id"])
        new_id = conn.execute(messages.insert().returning(messages.c.id), [new_row]).scalar()
        index_messages(conn, [new_id], [new_row])
        if command_rows:
            conn.execute(commands.insert(), [dict(c, message_id=new_id) for c in command_rows])
        conn.execute(
            commands.update()
            .where(commands.c.message_id == original["id"])
            .where(commands.c.status.in_(DEAD_LETTERS))
            .values(status="replayed", outcome=f"replayed as message {new_id}", updated_at=now)
        )
        if entry is not None:
            audit.record(conn, replace(entry, ids=(original["id"], int(new_id))))
    return int(new_id)


def appointment_state(engine: Engine, key: str) -> AppointmentRow | None:
    with engine.connect() as conn:
        return appointment(conn, key)


def stats(engine: Engine, since: float | None = None) -> dict[str, Any]:
    """The picture /metrics gives, from the database: for operators without Prometheus.

    The outbox and the open dead letters come from the same functions as the service's gauges and
    ``/healthz`` (``outbox_depth``, ``open_dead_letters``), so they agree with them. API calls are counted
    as ``hl7bridge_api_calls`` counts them, once per call: a bulk call logs one attempt row per command it
    carried (and a bisected 400 one per command of both halves), the same call id, time and answer in each."""
    now = time.time()

    def window(stmt: Any, column: Any) -> Any:
        return stmt.where(column >= since) if since is not None else stmt

    with engine.connect() as conn:
        by_status = _counts_by_status(conn, since)
        by_event = [
            {"event": e or "-", "ack": a or "-", "count": c}
            for e, a, c in conn.execute(
                window(select(messages.c.event, messages.c.ack_code, func.count()), messages.c.received_at)
                .group_by(messages.c.event, messages.c.ack_code)
                .order_by(messages.c.event, messages.c.ack_code)
            )
        ]
        last = conn.execute(select(func.max(messages.c.received_at))).scalar()
        command_status = dict(
            conn.execute(
                window(select(commands.c.status, func.count()), commands.c.created_at).group_by(commands.c.status)
            ).all()
        )
        dead, dead_since = open_dead_letters(conn)
        depth, oldest_age = outbox_depth(conn, now)
        one_row_per_call = window(
            select(attempts.c.call_id, attempts.c.at, attempts.c.operation, attempts.c.status_code,
                   attempts.c.duration_ms).distinct(),
            attempts.c.at,
        ).subquery()  # fmt: skip
        calls = [
            {
                "operation": op,
                "status": status if status is not None else "error",
                "count": count,
                "avg_ms": round(avg or 0.0, 1),
                "max_ms": round(top or 0.0, 1),
            }
            for op, status, count, avg, top in conn.execute(
                select(
                    one_row_per_call.c.operation,
                    one_row_per_call.c.status_code,
                    func.count(),
                    func.avg(one_row_per_call.c.duration_ms),
                    func.max(one_row_per_call.c.duration_ms),
                )
                .group_by(one_row_per_call.c.operation, one_row_per_call.c.status_code)
                .order_by(one_row_per_call.c.operation, one_row_per_call.c.status_code)
            )
        ]
    return {
        "since": since,
        "messages": by_status,
        "messages_by_event": by_event,
        "last_message_at": last,
        "commands": command_status,
        "outbox": {"depth": depth, "oldest_age_s": round(oldest_age, 1) if oldest_age is not None else None},
        "dead_letters": dead,
        "dead_letters_since": dead_since,
        "api_calls": calls,
    }


def later_message(engine: Engine, appointment_key: str, after_id: int) -> int | None:
    """The newest message for the same appointment that came after ``after_id`` (replays of it aside)."""
    if not appointment_key:
        return None
    stmt = (
        select(func.max(messages.c.id))
        .where(messages.c.appointment_key == appointment_key)
        .where(messages.c.id > after_id)
        .where(messages.c.status.in_((MessageStatus.ACCEPTED, MessageStatus.PENDING, MessageStatus.IGNORED)))
        .where((messages.c.replay_of.is_(None)) | (messages.c.replay_of != after_id))
    )
    with engine.connect() as conn:
        return conn.execute(stmt).scalar()


def open_dead_letters(conn: Any) -> tuple[int, float | None]:
    """How many dead letters wait for an operator, and since when the oldest (its last update).

    One definition for ``stats``, ``/status`` and the ``hl7bridge_dead_letters_open`` gauge, so that they
    never disagree. A discarded or retried command is no longer a dead letter."""
    count, oldest = conn.execute(
        select(func.count(), func.min(commands.c.updated_at)).where(commands.c.status.in_(DEAD_LETTERS))
    ).first()
    return int(count or 0), oldest


def last_message_at(conn: Any, listener: str) -> float | None:
    """When ``listener`` last received a message: the newest row of that listener, walking back by id.

    No index holds the listener (a write per message for a read at start-up): an active listener's last row
    is near the end, and only one that never received anything costs a scan, once."""
    stmt = select(messages.c.received_at).where(messages.c.listener == listener).order_by(messages.c.id.desc())
    return conn.execute(stmt.limit(1)).scalar()
