"""Retention: patient data older than N days leaves the log; outcomes and counts stay.

Raw messages, parsed summaries (and the patient ids and words the search index
holds: a SQLite log's index file is scrubbed first, ``search_index.scrub``; PostgreSQL's entries are deleted in
the same transaction, ``schema.unindex_messages``), journey parameters and API response bodies
(search answers carry parameters) are cleared in small transactions, so the
writer is never held for long. SQLite then checkpoints its WAL and hands freed
pages back with an incremental vacuum, so the file does not grow without bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

from sqlalchemy import delete, func, literal_column, select, update
from sqlalchemy.engine import Engine

from hl7bridge.core.status import OPEN_STATUSES

from . import audit
from .audit import AuditEntry
from .deadletters import take_write_lock
from .schema import ack_changes, appointments, attempts, commands, messages, unindex_messages
from .search_index import compact_index, scrub


@dataclass
class PurgeCounts:
    messages: int = 0
    commands: int = 0
    attempts: int = 0
    appointments: int = 0

    def __iadd__(self, other: PurgeCounts) -> PurgeCounts:
        self.messages += other.messages
        self.commands += other.commands
        self.attempts += other.attempts
        self.appointments += other.appointments
        return self

    @property
    def total(self) -> int:
        return self.messages + self.commands + self.attempts + self.appointments


def due_for_purge(conn: Any, cutoff: float) -> PurgeCounts:
    """What a purge with this cutoff would clear (for --dry-run)."""
    count = PurgeCounts()
    count.messages = conn.execute(
        select(func.count()).where(messages.c.received_at < cutoff).where(messages.c.purged_at.is_(None))
    ).scalar()
    old = select(messages.c.id).where(messages.c.received_at < cutoff).where(messages.c.purged_at.is_(None))
    finished = commands.c.status.not_in(OPEN_STATUSES)
    count.commands = conn.execute(select(func.count()).where(commands.c.message_id.in_(old)).where(finished)).scalar()
    count.attempts = conn.execute(
        select(func.count()).where(attempts.c.at < cutoff).where(attempts.c.response_body.is_not(None))
    ).scalar()
    count.appointments = conn.execute(
        select(func.count()).where(appointments.c.updated_at < cutoff).where(appointments.c.parameters.is_not(None))
    ).scalar()
    return count


def purge_step(conn: Any, cutoff: float, limit: int = 500) -> PurgeCounts:
    """Clear one slice of old patient data; call until it returns a total of 0."""
    now = time.time()
    count = PurgeCounts()
    ids = [
        row[0]
        for row in conn.execute(
            select(messages.c.id)
            .where(messages.c.received_at < cutoff)
            .where(messages.c.purged_at.is_(None))
            .order_by(messages.c.id)
            .limit(limit)
        )
    ]
    if ids:
        if conn.dialect.name == "sqlite":
            take_write_lock(conn)  # two purges never scrub one message twice (FTS5 would be corrupted)
            scrub(conn, ids, cutoff)
            conn.execute(delete(ack_changes).where(ack_changes.c.message_id.in_(ids)))
        elif conn.dialect.name == "postgresql":
            # The patient's keys and every word, from the terms as indexed (a SQLite log's index file is scrubbed).
            indexed = conn.execute(select(messages.c.id, messages.c.search_terms, messages.c.search_text)
                                   .where(messages.c.id.in_(ids))).all()  # fmt: skip
            unindex_messages(conn, [r.id for r in indexed], [r._mapping for r in indexed], prefix="p:")
        count.messages = conn.execute(
            update(messages)
            .where(messages.c.id.in_(ids))
            .values(raw=None, summary=None, search_terms=_without_patients(conn), search_text=None, purged_at=now)
        ).rowcount
        count.commands = conn.execute(
            update(commands)
            .where(commands.c.message_id.in_(ids))
            .where(commands.c.status.not_in(OPEN_STATUSES))
            .values(parameters="{}", identifiers="{}")
        ).rowcount
    old_attempts = select(attempts.c.id).where(attempts.c.at < cutoff).where(attempts.c.response_body.is_not(None))
    count.attempts = conn.execute(
        update(attempts).where(attempts.c.id.in_(old_attempts.limit(limit))).values(response_body=None)
    ).rowcount
    old_memory = (
        select(appointments.c.appointment_key)
        .where(appointments.c.updated_at < cutoff)
        .where(appointments.c.parameters.is_not(None))
        .limit(limit)
    )
    count.appointments = conn.execute(
        update(appointments).where(appointments.c.appointment_key.in_(old_memory)).values(parameters=None)
    ).rowcount
    return count


def _without_patients(conn: Any) -> Any:
    """A purged message's search terms: its control id, sender and appointment keys stay (findable, and still to
    be indexed if the indexer has not taken it yet); its patient ids go."""
    if conn.dialect.name == "postgresql":
        return literal_column(
            "(SELECT json_agg(j.value)::text FROM json_array_elements_text(messages.search_terms::json) AS j(value) "
            "WHERE j.value NOT LIKE 'p:%')"
        )
    if conn.dialect.name != "sqlite":
        return None
    return literal_column(
        "(SELECT json_group_array(value) FROM json_each(messages.search_terms) WHERE value NOT LIKE 'p:%')"
    )


def purge(engine: Engine, cutoff: float, limit: int = 500, audited: AuditEntry | None = None) -> PurgeCounts:
    """Purge everything older than ``cutoff`` in slices, then give space back (SQLite).

    ``audited`` (an operator's purge) is recorded in the first slice's transaction, with the cutoff and what
    there was to clear: a purge interrupted after any slice has deleted patient data is on the record."""
    total = PurgeCounts()
    first = True
    while True:
        with engine.begin() as conn:
            if first and audited is not None:
                found = {f"found_{name}": n for name, n in asdict(due_for_purge(conn, cutoff)).items()}
                audit.record(conn, replace(audited, details={**audited.details, "cutoff": cutoff, **found}))
            step = purge_step(conn, cutoff, limit)
        first = False
        total += step
        if step.total == 0:
            break
    compact(engine)
    return total


def compact(engine: Engine) -> None:
    """Checkpoint the WAL into the main file and release free pages (no-op for other databases)."""
    if engine.dialect.name != "sqlite":
        return
    compact_index(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA main.wal_checkpoint(TRUNCATE)")
        conn.exec_driver_sql("PRAGMA main.incremental_vacuum")
        conn.commit()
