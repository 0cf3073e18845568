"""What one message's timeline reads: the message, its commands and their attempts, its replays, and the audit
entries naming it or its commands, in one read transaction (one consistent picture), each part bounded."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Engine

from .audit import AuditEntry, naming
from .schema import REPLAYED, attempts, commands, configs, messages

#: The message's columns for operators; raw, ACK bytes, summary and the search columns (patient ids and words)
#: are read apart, as they hold patient data or need decoding.
APART = ("raw", "ack_raw", "summary", "search_terms", "search_text")
MESSAGE_COLUMNS = tuple(c for c in messages.c if c.name not in APART)
#: Which configuration produced a command (schema 9; NULL for commands written before it).
CONFIG_COLUMNS = (configs.c.digest.label("config_digest"), configs.c.path.label("config_path"),
                  configs.c.mtime.label("config_mtime"))  # fmt: skip
#: Bounds: a message replayed or acted on without end must not make its timeline unbounded.
REPLAYS_SHOWN = 100
AUDIT_SHOWN = 200
ATTEMPTS_SHOWN = 1000


@dataclass(frozen=True)
class TimelineRows:
    message: dict[str, Any]
    raw: bytes | None
    ack_raw: bytes | None
    summary: str | None
    commands: list[dict[str, Any]]
    #: The newest ``ATTEMPTS_SHOWN`` attempts of those commands, oldest first.
    attempts: list[dict[str, Any]]
    #: Messages replaying this one, oldest first (at most ``REPLAYS_SHOWN``).
    replayed_by: list[int]
    #: Entries naming the message or its commands, newest first (at most ``AUDIT_SHOWN``).
    audit: list[AuditEntry]


def message_exists(engine: Engine, message_id: int) -> bool:
    with engine.connect() as conn:
        return conn.execute(select(messages.c.id).where(messages.c.id == message_id)).first() is not None


def timeline_rows(engine: Engine, message_id: int) -> TimelineRows | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(*MESSAGE_COLUMNS, messages.c.raw, messages.c.ack_raw, messages.c.summary)
            .where(messages.c.id == message_id)
        ).first()  # fmt: skip
        if row is None:
            return None
        found = dict(row._mapping)
        raw, ack_raw, summary = found.pop("raw"), found.pop("ack_raw"), found.pop("summary")
        cmds = [dict(r._mapping) for r in conn.execute(
            select(commands, *CONFIG_COLUMNS).outerjoin(configs, configs.c.id == commands.c.config_id)
            .where(commands.c.message_id == message_id).order_by(commands.c.id)
        )]  # fmt: skip
        command_ids = [c["id"] for c in cmds]
        tried = []
        if command_ids:
            tried = [dict(r._mapping) for r in conn.execute(
                select(attempts).where(attempts.c.command_id.in_(command_ids))
                .order_by(attempts.c.id.desc()).limit(ATTEMPTS_SHOWN)
            )][::-1]  # fmt: skip
        replayed_by = list(conn.execute(
            select(messages.c.id).where(messages.c.replay_of == message_id).where(text(REPLAYED))
            .order_by(messages.c.id).limit(REPLAYS_SHOWN)
        ).scalars())  # fmt: skip
        entries = naming(conn, {"message": [message_id], "command": command_ids}, AUDIT_SHOWN)
    return TimelineRows(found, raw, ack_raw, summary, cmds, tried, replayed_by, entries)
