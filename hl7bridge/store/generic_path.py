"""The generic write path: any database other than a SQLite file, through SQLAlchemy Core."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, select

from hl7bridge.core.status import MessageStatus

from .planner import COMMAND_COLUMNS, DuplicatePlan, WriteRequest, WriteResult
from .schema import commands, messages

_INSERT = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)
_INSERT_COMMANDS = commands.insert().returning(commands.c.id, sort_by_parameter_order=True)
_ORIGINAL = (
    select(messages.c.id, messages.c.ack_raw, messages.c.ack_code)
    .where(messages.c.sending_application == bindparam("app"))
    .where(messages.c.sending_facility == bindparam("fac"))
    .where(messages.c.control_id == bindparam("ctrl"))
    .where(messages.c.status == MessageStatus.ACCEPTED)
    .order_by(messages.c.id)
    .limit(1)
)


def write_generic(conn: Any, group: list[WriteRequest]) -> list[WriteResult]:
    """Any other database, through SQLAlchemy Core."""
    keys = list(dict.fromkeys(r.dedupe_key for r in group if r.dedupe_key))
    plan = DuplicatePlan(group, _originals(conn, keys))
    ids = [r.id for r in conn.execute(_INSERT, plan.rows)]
    command_rows = [dict(zip(COMMAND_COLUMNS, values, strict=True)) for values in plan.command_rows(ids)]
    command_ids = [r.id for r in conn.execute(_INSERT_COMMANDS, command_rows)] if command_rows else []
    in_group = plan.in_group_duplicates(ids)
    if in_group:
        conn.execute(
            messages.update()
            .where(messages.c.id == bindparam("i"))
            .values(duplicate_of=bindparam("d"), ack_raw=bindparam("a"), ack_code=bindparam("c")),
            [{"d": d, "a": a, "c": c, "i": i} for d, a, c, i in in_group],
        )
    return plan.results(ids, command_ids)


def _originals(conn: Any, keys: Sequence[tuple[str, str, str]]) -> dict[tuple[str, str, str], Any]:
    found = {}
    for key in keys:
        row = conn.execute(_ORIGINAL, {"app": key[0], "fac": key[1], "ctrl": key[2]}).first()
        if row is not None:
            found[key] = (row[0], row[1], row[2])
    return found
