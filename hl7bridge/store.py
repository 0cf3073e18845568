"""The message log: SQLAlchemy schema, the single writer thread with group commit, and queries.

The only module that touches the database. The reactor thread never waits on
it: work is queued to one writer thread, which commits whatever has queued up
in one transaction (one fsync for many messages) and hands results back.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any

from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    event,
    func,
    select,
    tuple_,
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import SQLAlchemyError

from .routing import Command

SCHEMA_VERSION = 1
log = logging.getLogger("hl7bridge.store")

metadata = MetaData()

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(256), nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("received_at", Float, nullable=False, doc="epoch seconds"),
    Column("listener", String(64), nullable=False),
    Column("peer", String(64), nullable=False),
    Column("raw", LargeBinary, nullable=True, doc="NULL once purged by retention"),
    Column("charset", String(32)),
    Column("sending_application", String(180)),
    Column("sending_facility", String(180)),
    Column("control_id", String(199)),
    Column("message_type", String(8)),
    Column("event", String(8)),
    Column("version", String(16)),
    Column("appointment_key", String(400)),
    Column("action", String(16)),
    Column("route", String(64)),
    Column("note", Text, doc="why the message was ignored, or how it was handled"),
    Column("replay_of", Integer),
    Column("summary", Text, doc="JSON of the parsed AppointmentEvent (PHI)"),
    Column("ack_code", String(2)),
    Column("ack_text", Text),
    Column("ack_raw", LargeBinary),
    Column("status", String(12), nullable=False),
    Column("error", Text),
    Column("error_location", String(32)),
    Column("duplicate_of", Integer),
    Index("ix_messages_sender_control", "sending_application", "sending_facility", "control_id"),
    Index("ix_messages_received_at", "received_at"),
    Index("ix_messages_status_received", "status", "received_at"),
    Index("ix_messages_event_received", "event", "received_at"),
    Index("ix_messages_appointment", "appointment_key"),
)


commands = Table(
    "commands",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("message_id", Integer, nullable=False),
    Column("appointment_key", String(400), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("route", String(64), nullable=False),
    Column("chat_bot_id", String(128), nullable=False),
    Column("time_zone", String(64), nullable=False),
    Column("flow_id", String(128)),
    Column("parameters", Text, nullable=False, doc="JSON (PHI)"),
    Column("identifiers", Text, nullable=False, doc="JSON"),
    Column("start_at", Float),
    Column("status", String(12), nullable=False, doc="pending in_flight done dead annihilated failed"),
    Column("step", String(16), nullable=False, default=""),
    Column("outcome", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("sync", Integer, nullable=False, default=0, doc="1: ack_mode dispatched, never retried in background"),
    Column("replay_of", Integer),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_commands_status_due", "status", "next_attempt_at"),
    Index("ix_commands_appointment", "appointment_key", "id"),
    Index("ix_commands_message", "message_id"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("command_id", Integer, nullable=False),
    Column("call_id", String(36), nullable=False, doc="shared by the commands of one bulk call"),
    Column("at", Float, nullable=False),
    Column("operation", String(16), nullable=False),
    Column("request_summary", Text, nullable=False),
    Column("status_code", Integer),
    Column("verdict", String(12), nullable=False),
    Column("response_body", Text),
    Column("error", Text),
    Column("duration_ms", Float, nullable=False),
    Index("ix_attempts_command", "command_id"),
    Index("ix_attempts_at", "at"),
)

appointments = Table(
    "appointments",
    metadata,
    Column("appointment_key", String(400), primary_key=True),
    Column("route", String(64), nullable=False),
    Column("chat_bot_id", String(128), nullable=False),
    Column("state", String(12), nullable=False, doc="active cancelled annihilated"),
    Column("parameters", Text, doc="JSON of what was last triggered (PHI)"),
    Column("updated_at", Float, nullable=False),
    Column("last_command_id", Integer),
)

OPEN_STATUSES = ("pending", "in_flight")


class StoreError(RuntimeError):
    """The database cannot be opened or used; the message says what to fix."""


def open_engine(url: str, synchronous: str = "FULL") -> Engine:
    """An engine for the log; SQLite files are created 0600 and run in WAL mode."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        _prepare_sqlite_file(FsPath(parsed.database))
    engine = create_engine(url, future=True)
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA busy_timeout=5000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            if found is None:
                conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(found) > SCHEMA_VERSION:
                raise StoreError(
                    f"the database {url} was written by a newer hl7bridge (schema {found}, this release "
                    f"knows {SCHEMA_VERSION}); upgrade hl7bridge or point --database at another file"
                )
    except SQLAlchemyError as exc:
        raise StoreError(
            f"cannot open the database {_safe(url)}: {exc.__class__.__name__}: {_first_line(exc)}"
        ) from None
    return engine


def _prepare_sqlite_file(path: FsPath) -> None:
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        if os.stat(path).st_mode & 0o077:
            os.chmod(path, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot create the database file {path}: {exc.strerror}") from None


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


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
            requests = [g for g in group if isinstance(g, WriteRequest)]
            jobs = [g for g in group if isinstance(g, Job)]
            if requests:
                results = self._write(requests)
                self.call_back(_deliver, requests, results)
                if self.on_commands is not None and any(r.command_ids for r in results):
                    self.on_commands()
            if jobs:
                self._run_jobs(jobs)
            if stop:
                return

    def _run_jobs(self, jobs: list[Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            with self.engine.begin() as conn:
                for job in jobs:
                    try:
                        with conn.begin_nested():
                            outcomes.append((job.work(conn), None))
                    except Exception as exc:  # noqa: BLE001 - reported to the job's owner
                        outcomes.append((None, exc))
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
                ids = [r.id for r in conn.execute(self._insert, rows)]
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

    def _originals(self, conn: Any, keys: Sequence[tuple[str, str, str]]) -> dict:
        if not keys:
            return {}
        found: dict[tuple[str, str, str], tuple[int, bytes, str]] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 300):
            chunk = unique[start : start + 300]
            stmt = (
                select(
                    messages.c.sending_application,
                    messages.c.sending_facility,
                    messages.c.control_id,
                    messages.c.id,
                    messages.c.ack_raw,
                    messages.c.ack_code,
                )
                .where(
                    tuple_(messages.c.sending_application, messages.c.sending_facility, messages.c.control_id).in_(
                        chunk
                    )
                )
                .where(messages.c.status == "accepted")
                .order_by(messages.c.id)
            )
            for app, fac, ctrl, mid, ack_raw, ack_code in conn.execute(stmt):
                found.setdefault((app, fac, ctrl), (mid, ack_raw, ack_code))
        return found


def _deliver(group: list[WriteRequest], results: list[WriteResult]) -> None:
    for request, result in zip(group, results, strict=True):
        try:
            request.on_done(result)
        except Exception:
            log.exception("result delivery failed")


# ---- queries for operators -------------------------------------------------------------------

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
)


def list_messages(
    engine: Engine,
    status: str | None = None,
    since: float | None = None,
    event: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    stmt = select(*LIST_COLUMNS).order_by(messages.c.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(messages.c.status == status)
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


def count_messages(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(messages.c.status, func.count()).group_by(messages.c.status))
        return {status: count for status, count in rows}


def now() -> float:
    return time.time()


# ---- the outbox ---------------------------------------------------------------------------------


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
        "replay_of": None,
        "created_at": now,
        "updated_at": now,
    }


def _command(row: Any) -> CommandRow:
    m = row._mapping
    return CommandRow(
        m["id"], m["message_id"], m["appointment_key"], m["kind"], m["route"], m["chat_bot_id"], m["time_zone"],
        m["flow_id"], json.loads(m["parameters"]), json.loads(m["identifiers"]), m["start_at"], m["status"],
        m["step"] or "", m["attempts"], bool(m["sync"]), m["created_at"],
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
        conn.execute(commands.update().where(commands.c.id == u.command_id).values(**values))
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


def record_ack(conn: Any, message_id: int, ack: Any, status: str, error: str) -> None:
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
    if status == "rejected":
        stmt = stmt.where(messages.c.status == "rejected")
    elif status in ("dead", "failed"):
        owners = select(commands.c.message_id).where(commands.c.status == status)
        stmt = stmt.where(messages.c.id.in_(owners))
    if since is not None:
        stmt = stmt.where(messages.c.received_at >= since)
    if event:
        stmt = stmt.where(messages.c.event == event.upper())
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(stmt)]


def record_replay(
    engine: Engine, original: dict[str, Any], row: dict[str, Any], command_rows: list[dict[str, Any]]
) -> int:
    """Log a replay as a new message (``replay_of`` the original) with its commands, in one transaction."""
    now = time.time()
    with engine.begin() as conn:
        new_id = conn.execute(
            messages.insert().returning(messages.c.id), [dict(row, replay_of=original["id"])]
        ).scalar()
        if command_rows:
            conn.execute(commands.insert(), [dict(c, message_id=new_id) for c in command_rows])
        conn.execute(
            commands.update()
            .where(commands.c.message_id == original["id"])
            .where(commands.c.status.in_(("dead", "failed")))
            .values(status="replayed", outcome=f"replayed as message {new_id}", updated_at=now)
        )
    return int(new_id)


def appointment_state(engine: Engine, key: str) -> AppointmentRow | None:
    with engine.connect() as conn:
        return appointment(conn, key)
