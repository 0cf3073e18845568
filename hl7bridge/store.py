"""The message log: SQLAlchemy schema, the single writer thread with group commit, and queries.

The only module that touches the database. The reactor thread never waits on
it: work is queued to one writer thread, which commits whatever has queued up
in one transaction (one fsync for many messages) and hands results back.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class WriteResult:
    message_id: int | None
    duplicate_of: int | None = None
    original_ack: bytes | None = None
    original_ack_code: str | None = None
    error: str | None = None


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
            results = self._write(group)
            self.call_back(_deliver, group, results)
            if stop:
                return

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
