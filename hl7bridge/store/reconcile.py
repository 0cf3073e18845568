"""What reconciliation reads from the log (the appointment memory, paged) and how it queues a repair."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import exists, func, select
from sqlalchemy.engine import Connection

from hl7bridge.core.status import OPEN_STATUSES
from hl7bridge.mapping.routing import Command
from hl7bridge.store.outbox import command_values
from hl7bridge.store.schema import appointments, commands

#: The appointment memory's state while the log does not know what the API holds: the dispatcher then
#: searches before it acts (a cancel or a re-trigger is never settled from memory alone).
UNCERTAIN = "uncertain"


@dataclass(frozen=True)
class Expected:
    """What the log says one appointment should have at the API, and the command that last decided it."""

    appointment_key: str
    route: str
    chat_bot_id: str
    state: str
    parameters: dict[str, str] | None
    updated_at: float
    last_command_id: int | None
    #: The latest command of the appointment: its message, identifiers, zone and start time.
    message_id: int | None
    identifiers: dict[str, str]
    time_zone: str
    start_at: float | None
    #: Commands of the appointment still open: its state is in flux, so it is not judged.
    busy: bool


_C2, _C3 = commands.alias("c2"), commands.alias("c3")
_LATEST = select(func.max(_C3.c.id)).where(_C3.c.appointment_key == appointments.c.appointment_key).scalar_subquery()
_BUSY = exists().where(_C2.c.appointment_key == appointments.c.appointment_key).where(_C2.c.status.in_(OPEN_STATUSES))
_PAGE = (
    select(
        appointments,
        commands.c.message_id,
        commands.c.identifiers,
        commands.c.time_zone,
        commands.c.start_at,
        _BUSY.label("busy"),
    )
    .select_from(appointments.outerjoin(commands, commands.c.id == _LATEST))
    .order_by(appointments.c.appointment_key)
)


def expected_page(conn: Connection, since: float, route: str | None, after: str, limit: int) -> list[Expected]:
    """Appointments whose memory changed since ``since``, after the key ``after``, at most ``limit``."""
    stmt = _PAGE.where(appointments.c.updated_at >= since).where(appointments.c.appointment_key > after)
    if route is not None:
        stmt = stmt.where(appointments.c.route == route)
    return [_expected(row._mapping) for row in conn.execute(stmt.limit(limit))]


def _expected(m: Any) -> Expected:
    return Expected(
        appointment_key=m["appointment_key"], route=m["route"], chat_bot_id=m["chat_bot_id"], state=m["state"],
        parameters=orjson.loads(m["parameters"]) if m["parameters"] else None, updated_at=m["updated_at"],
        last_command_id=m["last_command_id"], message_id=m["message_id"],
        identifiers=orjson.loads(m["identifiers"]) if m["identifiers"] else {}, time_zone=m["time_zone"] or "",
        start_at=m["start_at"], busy=bool(m["busy"]),
    )  # fmt: skip


def queue_repair(conn: Connection, expected: Expected, command: Command, now: float) -> int | None:
    """Queue ``command`` for the dispatcher and mark the appointment's memory uncertain, in the caller's
    transaction; None (nothing written) when the appointment changed since it was read or has open
    commands: the service is working on it, and a repair would race that work."""
    untouched = (
        appointments.update()
        .where(appointments.c.appointment_key == expected.appointment_key)
        .where(appointments.c.state == expected.state)
        .where(appointments.c.updated_at == expected.updated_at)
        .where(~exists().where(commands.c.appointment_key == expected.appointment_key)
               .where(commands.c.status.in_(OPEN_STATUSES)))
        .values(state=UNCERTAIN, updated_at=now)
    )  # fmt: skip
    if conn.execute(untouched).rowcount != 1:
        return None
    values = dict(command_values(command, now), message_id=expected.message_id)
    return int(conn.execute(commands.insert().returning(commands.c.id), [values]).scalar_one())
