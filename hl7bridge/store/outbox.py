"""The outbox: commands per appointment, their outcomes, attempts, and the appointment memory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import (
    func,
    select,
)

from ..routing import Command
from .schema import OPEN_STATUSES, appointments, attempts, commands, messages


@dataclass(frozen=True)
class CommandRow:
    id: int
    message_id: int
    appointment_key: str
    kind: str
    route: str
    chat_bot_id: str
    time_zone: str
    flow_id: str | None
    parameters: dict[str, str]
    identifiers: dict[str, str]
    start_at: float | None
    status: str
    step: str
    attempts: int
    sync: bool
    created_at: float
    uncertain: bool = False


@dataclass(frozen=True)
class AppointmentRow:
    appointment_key: str
    state: str
    parameters: dict[str, str] | None
    last_command_id: int | None


@dataclass
class CommandUpdate:
    """What the dispatcher decided for one command; applied in one writer transaction."""

    command_id: int
    status: str
    outcome: str = ""
    step: str | None = None
    next_attempt_at: float | None = None
    count_attempt: bool = False
    remember: tuple[str, str, str, str, dict[str, str] | None] | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    uncertain: bool | None = None


def command_values(command: Command, now: float, sync: bool = False) -> dict[str, Any]:
    """A ``commands`` row for a routed command (the writer fills in message_id)."""
    return {
        "appointment_key": command.appointment_key,
        "kind": command.kind,
        "route": command.route,
        "chat_bot_id": command.chat_bot_id,
        "time_zone": command.time_zone,
        "flow_id": command.flow_id,
        "parameters": json.dumps(command.parameters, ensure_ascii=False, sort_keys=True),
        "identifiers": json.dumps(command.identifiers, ensure_ascii=False, sort_keys=True),
        "start_at": command.start_at,
        "status": "pending",
        "step": "",
        "attempts": 0,
        "next_attempt_at": now,
        "sync": 1 if sync else 0,
        "uncertain": 0,
        "replay_of": None,
        "created_at": now,
        "updated_at": now,
    }


def _command(row: Any) -> CommandRow:
    m = row._mapping
    return CommandRow(
        m["id"], m["message_id"], m["appointment_key"], m["kind"], m["route"], m["chat_bot_id"], m["time_zone"],
        m["flow_id"], json.loads(m["parameters"]), json.loads(m["identifiers"]), m["start_at"], m["status"],
        m["step"] or "", m["attempts"], bool(m["sync"]), m["created_at"], bool(m["uncertain"]),
    )  # fmt: skip


def due_heads(conn: Any, now: float, limit: int, busy: set[str]) -> list[CommandRow]:
    """The first open command of each appointment, when it is due, oldest first."""
    c2 = commands.alias("c2")
    first_open = (
        select(func.min(c2.c.id))
        .where(c2.c.appointment_key == commands.c.appointment_key)
        .where(c2.c.status.in_(OPEN_STATUSES))
        .scalar_subquery()
    )
    stmt = (
        select(commands)
        .where(commands.c.status.in_(OPEN_STATUSES))
        .where(commands.c.next_attempt_at <= now)
        .where(commands.c.id == first_open)
        .order_by(commands.c.id)
        .limit(limit + len(busy))
    )
    rows = [_command(r) for r in conn.execute(stmt)]
    return [r for r in rows if r.appointment_key not in busy][:limit]


def next_due(conn: Any) -> float | None:
    stmt = select(func.min(commands.c.next_attempt_at)).where(commands.c.status.in_(OPEN_STATUSES))
    return conn.execute(stmt).scalar()


def open_cancels(conn: Any, keys: list[str]) -> dict[str, int]:
    """The first open cancel command of each appointment (for annihilating unsent triggers)."""
    found: dict[str, int] = {}
    for start in range(0, len(keys), 500):
        stmt = (
            select(commands.c.appointment_key, func.min(commands.c.id))
            .where(commands.c.appointment_key.in_(keys[start : start + 500]))
            .where(commands.c.status.in_(OPEN_STATUSES))
            .where(commands.c.kind == "cancel")
            .group_by(commands.c.appointment_key)
        )
        found.update({key: cid for key, cid in conn.execute(stmt)})
    return found


def appointments_for(conn: Any, keys: list[str]) -> dict[str, AppointmentRow]:
    found: dict[str, AppointmentRow] = {}
    for start in range(0, len(keys), 500):
        stmt = select(appointments).where(appointments.c.appointment_key.in_(keys[start : start + 500]))
        for row in conn.execute(stmt):
            m = row._mapping
            params = json.loads(m["parameters"]) if m["parameters"] else None
            found[m["appointment_key"]] = AppointmentRow(m["appointment_key"], m["state"], params, m["last_command_id"])
    return found


def appointment(conn: Any, key: str) -> AppointmentRow | None:
    row = conn.execute(select(appointments).where(appointments.c.appointment_key == key)).first()
    if row is None:
        return None
    m = row._mapping
    params = json.loads(m["parameters"]) if m["parameters"] else None
    return AppointmentRow(m["appointment_key"], m["state"], params, m["last_command_id"])


def mark_in_flight(conn: Any, ids: list[int], now: float) -> None:
    conn.execute(commands.update().where(commands.c.id.in_(ids)).values(status="in_flight", updated_at=now))


def apply_updates(conn: Any, updates: list[CommandUpdate], now: float) -> None:
    """Record outcomes, attempts and appointment memory for a set of commands."""
    for u in updates:
        values: dict[str, Any] = {"status": u.status, "updated_at": now}
        if u.outcome:
            values["outcome"] = u.outcome
        if u.step is not None:
            values["step"] = u.step
        if u.next_attempt_at is not None:
            values["next_attempt_at"] = u.next_attempt_at
        if u.count_attempt:
            values["attempts"] = commands.c.attempts + 1
        if u.uncertain is not None:
            values["uncertain"] = 1 if u.uncertain else 0
        conn.execute(commands.update().where(commands.c.id == u.command_id).values(**values))
        if u.status in ("done", "annihilated", "dead", "failed"):
            # ack_mode "dispatched" after a restart: nobody awaits the verdict, the log still records it.
            owner = select(commands.c.message_id).where(commands.c.id == u.command_id).scalar_subquery()
            conn.execute(
                messages.update()
                .where(messages.c.id == owner)
                .where(messages.c.status == "pending")
                .values(status="accepted" if u.status in ("done", "annihilated") else "rejected")
            )
        if u.attempts:
            conn.execute(attempts.insert(), [dict(a, command_id=u.command_id) for a in u.attempts])
        if u.remember is not None:
            key, route, bot, state, params = u.remember
            row = {
                "route": route,
                "chat_bot_id": bot,
                "state": state,
                "updated_at": now,
                "last_command_id": u.command_id,
            }
            if params is not None:
                row["parameters"] = json.dumps(params, ensure_ascii=False, sort_keys=True)
            done = conn.execute(appointments.update().where(appointments.c.appointment_key == key).values(**row))
            if done.rowcount == 0:
                conn.execute(appointments.insert().values(appointment_key=key, **row))


def record_ack(conn: Any, message_id: int, ack: Any, status: str, error: str | None) -> None:
    """The ACK finally sent for a message (ack_mode = "dispatched" decides it after the commit)."""
    conn.execute(
        messages.update()
        .where(messages.c.id == message_id)
        .values(ack_code=ack.code, ack_text=ack.text, ack_raw=ack.payload, status=status, error=error)
    )


def outbox_depth(conn: Any, now: float) -> tuple[int, float | None]:
    """Open commands and the age of the oldest, in seconds."""
    row = conn.execute(
        select(func.count(), func.min(commands.c.created_at)).where(commands.c.status.in_(OPEN_STATUSES))
    ).first()
    count, oldest = row if row else (0, None)
    return int(count or 0), (now - oldest) if oldest else None
