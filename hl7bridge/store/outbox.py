"""The outbox: commands per appointment, their outcomes, attempts, and the appointment memory."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from sqlalchemy import (
    String,
    and_,
    bindparam,
    case,
    func,
    literal,
    or_,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from hl7bridge.core.status import FINAL_STATUSES, OPEN_STATUSES, SUCCEEDED, CommandStatus, MessageStatus
from hl7bridge.mapping.routing import Command
from hl7bridge.store.cluster import check_epoch
from hl7bridge.store.schema import appointments, attempts, commands, messages


@dataclass(frozen=True)
class CommandRow(Command):
    """A command as the log holds it: the routed ``Command``, and where it stands."""

    id: int
    message_id: int
    status: str
    step: str
    attempts: int
    sync: bool
    created_at: float
    uncertain: bool = False
    next_attempt_at: float = 0.0


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
    #: The command's message, for the dead-letter log line (which names the id ``log show`` takes); not written.
    message_id: int | None = None


def command_values(command: Command, now: float, sync: bool = False, config_id: int | None = None) -> dict[str, Any]:
    """A ``commands`` row for a routed command (the writer fills in message_id); ``config_id``: the ``configs``
    row of the configuration that produced it."""
    return {
        "appointment_key": command.appointment_key,
        "kind": command.kind,
        "route": command.route,
        "chat_bot_id": command.chat_bot_id,
        "time_zone": command.time_zone,
        "flow_id": command.flow_id,
        "parameters": _json(command.parameters),
        "identifiers": _json(command.identifiers),
        "start_at": command.start_at,
        "status": CommandStatus.PENDING,
        "step": "",
        "attempts": 0,
        "next_attempt_at": now,
        "sync": 1 if sync else 0,
        "uncertain": 0,
        "replay_of": None,
        "created_at": now,
        "updated_at": now,
        "config_id": config_id,
    }


def _command(row: Any) -> CommandRow:
    m = row._mapping
    return CommandRow(
        kind=m["kind"], route=m["route"], chat_bot_id=m["chat_bot_id"], time_zone=m["time_zone"], flow_id=m["flow_id"],
        parameters=orjson.loads(m["parameters"]), identifiers=orjson.loads(m["identifiers"]),
        appointment_key=m["appointment_key"], start_at=m["start_at"], id=m["id"], message_id=m["message_id"],
        status=m["status"], step=m["step"] or "", attempts=m["attempts"], sync=bool(m["sync"]),
        created_at=m["created_at"], uncertain=bool(m["uncertain"]), next_attempt_at=m["next_attempt_at"],
    )  # fmt: skip


# The dispatcher runs these on every tick and the writer runs the updates for every API result. Building a
# statement costs more Python than running it (SQLAlchemy derives a cache key from each new construct), and
# that Python holds the GIL the listener needs, so each is built once, with bound parameters.
_C2 = commands.alias("c2")
_DUE_HEADS = (
    select(commands)
    .where(commands.c.status.in_(OPEN_STATUSES))
    .where(commands.c.next_attempt_at <= bindparam("now"))
    .where(
        commands.c.id
        == select(func.min(_C2.c.id))
        .where(_C2.c.appointment_key == commands.c.appointment_key)
        .where(_C2.c.status.in_(OPEN_STATUSES))
        .scalar_subquery()
    )
    .order_by(commands.c.id)
    .limit(bindparam("limit"))
)
_NEXT_DUE = select(func.min(commands.c.next_attempt_at)).where(commands.c.status.in_(OPEN_STATUSES))
_OPEN_CANCELS = (
    select(commands.c.appointment_key, func.min(commands.c.id))
    .where(commands.c.appointment_key.in_(bindparam("keys", expanding=True)))
    .where(commands.c.status.in_(OPEN_STATUSES))
    .where(commands.c.kind == "cancel")
    .group_by(commands.c.appointment_key)
)
_APPOINTMENTS = select(appointments).where(appointments.c.appointment_key.in_(bindparam("keys", expanding=True)))
_KEYS_PER_QUERY = 500


def due_heads(conn: Any, now: float, limit: int, busy: set[str]) -> list[CommandRow]:
    """The first open command of each appointment, when it is due, oldest first."""
    rows = [_command(r) for r in conn.execute(_DUE_HEADS, {"now": now, "limit": limit + len(busy)})]
    return [r for r in rows if r.appointment_key not in busy][:limit]


def next_due(conn: Any) -> float | None:
    return conn.execute(_NEXT_DUE).scalar()


def final_updates(conn: Any, command_ids: list[int]) -> list[CommandUpdate]:
    """Those of the commands that are final, as the updates their verdicts' waiters are answered with: a standby
    answers so for the leader elsewhere that settled them. One read for all of them, in the order asked."""
    if not command_ids:
        return []
    rows = conn.execute(
        select(commands.c.id, commands.c.status, commands.c.outcome)
        .where(commands.c.id.in_(command_ids))
        .where(commands.c.status.in_(sorted(FINAL_STATUSES)))
    ).all()
    final = {row.id: CommandUpdate(row.id, row.status, row.outcome or "") for row in rows}
    return [final[i] for i in command_ids if i in final]


def due_now(conn: Any, now: float) -> int:
    """End every open command's backoff: each is due at ``now`` (per-appointment order still holds). Returns how
    many were waiting. For when the cause of the failures is known to be gone: the API answers again after
    an outage, or an operator says so (``hl7bridge dispatch now``)."""
    return conn.execute(
        commands.update()
        .where(commands.c.status.in_(OPEN_STATUSES))
        .where(commands.c.next_attempt_at > now)
        .values(next_attempt_at=now)
    ).rowcount


def open_cancels(conn: Any, keys: list[str]) -> dict[str, int]:
    """The first open cancel command of each appointment (for annihilating unsent triggers)."""
    found: dict[str, int] = {}
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        found.update(
            {key: cid for key, cid in conn.execute(_OPEN_CANCELS, {"keys": keys[start : start + _KEYS_PER_QUERY]})}
        )
    return found


def appointments_for(conn: Any, keys: list[str]) -> dict[str, AppointmentRow]:
    found: dict[str, AppointmentRow] = {}
    for start in range(0, len(keys), _KEYS_PER_QUERY):
        for row in conn.execute(_APPOINTMENTS, {"keys": keys[start : start + _KEYS_PER_QUERY]}):
            m = row._mapping
            params = orjson.loads(m["parameters"]) if m["parameters"] else None
            found[m["appointment_key"]] = AppointmentRow(m["appointment_key"], m["state"], params, m["last_command_id"])
    return found


def appointment(conn: Any, key: str) -> AppointmentRow | None:
    row = conn.execute(select(appointments).where(appointments.c.appointment_key == key)).first()
    if row is None:
        return None
    m = row._mapping
    params = orjson.loads(m["parameters"]) if m["parameters"] else None
    return AppointmentRow(m["appointment_key"], m["state"], params, m["last_command_id"])


_MARK_IN_FLIGHT = (
    commands.update()
    .where(commands.c.id.in_(bindparam("ids", expanding=True)))
    .values(status=CommandStatus.IN_FLIGHT, updated_at=bindparam("now"))
)


def mark_in_flight(conn: Any, ids: list[int], now: float) -> None:
    conn.execute(_MARK_IN_FLIGHT, {"ids": ids, "now": now})


_UPDATE_COMMAND = (
    commands.update()
    .where(commands.c.id == bindparam("u_id"))
    # A final status is final, even to a late retry (IN would expand, which executemany refuses).
    .where(or_(*(commands.c.status == status for status in OPEN_STATUSES)))
    .values(
        status=bindparam("u_status"),
        updated_at=bindparam("u_now"),
        outcome=func.coalesce(bindparam("u_outcome"), commands.c.outcome),
        step=func.coalesce(bindparam("u_step"), commands.c.step),
        next_attempt_at=func.coalesce(bindparam("u_next"), commands.c.next_attempt_at),
        attempts=commands.c.attempts + bindparam("u_counted"),
        uncertain=func.coalesce(bindparam("u_uncertain"), commands.c.uncertain),
    )
)
_OTHER = messages.alias("other")
#: Another accepted original of the same (MSH-3, MSH-4, MSH-10): a resend that came while the first copy waited
#: for its verdict (``ack_mode = "dispatched"``) was processed anew and accepted first.
_ACCEPTED_BEFORE = (
    select(func.min(_OTHER.c.id))
    .where(_OTHER.c.sending_application == messages.c.sending_application)
    .where(_OTHER.c.sending_facility == messages.c.sending_facility)
    .where(_OTHER.c.control_id == messages.c.control_id)
    .where(_OTHER.c.status == MessageStatus.ACCEPTED)
    .where(_OTHER.c.replay_of.is_(None))
    .where(_OTHER.c.id != messages.c.id)
    .scalar_subquery()
)


def _settled(status: Any, dialect: str) -> dict[str, Any]:
    """The values that settle a pending message at ``status``. On PostgreSQL, where accepted originals are unique
    by key, one whose key another copy has been accepted under meanwhile becomes that copy's duplicate."""
    if dialect != "postgresql":
        return {"status": status}
    taken = and_(status == MessageStatus.ACCEPTED, messages.c.replay_of.is_(None), _ACCEPTED_BEFORE.is_not(None))
    return {
        "status": case((taken, MessageStatus.DUPLICATE.value), else_=status),
        "duplicate_of": case((taken, _ACCEPTED_BEFORE), else_=messages.c.duplicate_of),
    }


#: ack_mode "dispatched" after a restart: nobody awaits the verdict, the log still records it.
_SETTLE_MESSAGE = {
    dialect: messages.update()
    .where(messages.c.id == select(commands.c.message_id).where(commands.c.id == bindparam("u_id")).scalar_subquery())
    .where(messages.c.status == MessageStatus.PENDING)
    .values(_settled(bindparam("u_message_status", type_=String()), dialect))
    for dialect in ("sqlite", "postgresql")
}
_MEMORY_COLUMNS = ("route", "chat_bot_id", "state", "updated_at", "last_command_id")


def _memory_binds(with_parameters: bool) -> dict[str, Any]:
    names = (*_MEMORY_COLUMNS, "parameters") if with_parameters else _MEMORY_COLUMNS
    return {name: bindparam(f"a_{name}") for name in names}


_REMEMBER = {
    with_parameters: appointments.update()
    .where(appointments.c.appointment_key == bindparam("a_key"))
    .values(_memory_binds(with_parameters))
    for with_parameters in (False, True)
}
_FIRST_MEMORY = {
    with_parameters: appointments.insert().values(
        {"appointment_key": bindparam("a_key")} | _memory_binds(with_parameters)
    )
    for with_parameters in (False, True)
}


def _upserts(dialect: Any) -> dict[bool, Any]:
    """The memory's INSERT … ON CONFLICT DO UPDATE in a dialect's spelling, with and without parameters."""
    insert = dialect.insert
    built = {}
    for with_parameters in (False, True):
        binds = _memory_binds(with_parameters)
        statement = insert(appointments).values({"appointment_key": bindparam("a_key")} | binds)
        built[with_parameters] = statement.on_conflict_do_update(
            index_elements=[appointments.c.appointment_key], set_={name: statement.excluded[name] for name in binds}
        )
    return built


#: One INSERT … ON CONFLICT for a whole result where the database has it: the UPDATE-then-INSERT pair per
#: appointment was two thirds of the writer's time for a bulk trigger's result.
_UPSERT_MEMORY = {"sqlite": _upserts(sqlite), "postgresql": _upserts(postgresql)}

#: Statuses a command never leaves.


def apply_updates(conn: Any, updates: list[CommandUpdate], now: float) -> None:
    """Record outcomes, attempts and appointment memory for a set of commands.

    One statement per kind of change, each run for all the updates at once, in the updates' order."""
    conn.execute(_UPDATE_COMMAND, [
        {"u_id": u.command_id, "u_status": u.status, "u_now": now, "u_outcome": u.outcome or None, "u_step": u.step,
         "u_next": u.next_attempt_at, "u_counted": 1 if u.count_attempt else 0,
         "u_uncertain": None if u.uncertain is None else int(u.uncertain)}
        for u in updates
    ])  # fmt: skip
    settled = [{"u_id": u.command_id, "u_message_status": MessageStatus.ACCEPTED if u.status in SUCCEEDED else
                MessageStatus.REJECTED} for u in updates if u.status in FINAL_STATUSES]  # fmt: skip
    if settled:
        conn.execute(_SETTLE_MESSAGE["postgresql" if conn.dialect.name == "postgresql" else "sqlite"], settled)
    tried = [dict(a, command_id=u.command_id) for u in updates for a in u.attempts]
    if tried:
        conn.execute(attempts.insert(), tried)
    memos = [_memory_row(u.command_id, u.remember, now) for u in updates if u.remember is not None]
    upsert = _UPSERT_MEMORY.get(conn.dialect.name)
    # Runs of the same shape go together, in order: a later memo of an appointment overwrites an earlier one.
    for with_parameters, run in itertools.groupby(memos, key=lambda row: "a_parameters" in row):
        rows = list(run)
        # One key twice in a run goes row by row: PostgreSQL's batched INSERT refuses to touch a row twice.
        if upsert is not None and len({row["a_key"] for row in rows}) == len(rows):
            conn.execute(upsert[with_parameters], rows)
            continue
        for row in rows:
            if conn.execute(_REMEMBER[with_parameters], row).rowcount == 0:
                conn.execute(_FIRST_MEMORY[with_parameters], row)


def _memory_row(command_id: int, memo: tuple[str, str, str, str, dict[str, str] | None], now: float) -> dict[str, Any]:
    key, route, bot, state, params = memo
    row: dict[str, Any] = dict(zip(_MEMORY_COLUMNS, (route, bot, state, now, command_id), strict=True))
    if params is not None:
        row["parameters"] = _json(params)
    return {f"a_{name}": value for name, value in row.items()} | {"a_key": key}


@dataclass
class OutboxWrite:
    """A dispatcher write as data: commands marked in flight before their call, or the calls' outcomes.

    Being data, it crosses from the dispatcher's process to the service's, whose writer thread is the log's
    only writer: two processes taking turns at SQLite's write lock made the service's messages wait for a
    dispatcher transaction stalled on its own process's GIL or CPU."""

    now: float
    in_flight: list[int] = field(default_factory=list)
    updates: list[CommandUpdate] = field(default_factory=list)
    #: The writing dispatcher's leadership epoch (``store.cluster``): checked first, a stale one is refused.
    #: None: a dispatcher of the service's own process, which no other can depose.
    epoch: int | None = None

    def __call__(self, conn: Any) -> None:
        if self.epoch is not None:
            check_epoch(conn, self.epoch)
        if self.in_flight:
            mark_in_flight(conn, self.in_flight, self.now)
        if self.updates:
            apply_updates(conn, self.updates, self.now)

    def to_json(self) -> dict[str, Any]:
        return {"now": self.now, "in_flight": self.in_flight, "updates": [asdict(u) for u in self.updates],
                "epoch": self.epoch}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> OutboxWrite:
        updates = [CommandUpdate(**dict(u, remember=tuple(u["remember"]) if u["remember"] else None))
                   for u in data["updates"]]  # fmt: skip
        return cls(data["now"], list(data["in_flight"]), updates, data.get("epoch"))


def record_ack(conn: Any, message_id: int, ack: Any, status: str, error: str | None) -> None:
    """The ACK finally sent for a message (ack_mode = "dispatched" decides it after the commit)."""
    conn.execute(
        messages.update()
        .where(messages.c.id == message_id)
        .values(ack_code=ack.code, ack_text=ack.text, ack_raw=ack.payload, error=error)
        .values(_settled(literal(status, String()), conn.dialect.name))
    )


def outbox_depth(conn: Any, now: float) -> tuple[int, float | None]:
    """Open commands and the age of the oldest, in seconds."""
    row = conn.execute(
        select(func.count(), func.min(commands.c.created_at)).where(commands.c.status.in_(OPEN_STATUSES))
    ).first()
    count, oldest = row if row else (0, None)
    return int(count or 0), (now - oldest) if oldest else None


def _json(value: dict[str, str]) -> str:
    """Sorted keys: the same parameters always give the same text."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
