"""Showing patient data to an operator is an operator action: audited (``unmask``) before the data is shown,
as a ``--phi`` export is, so the audit log answers who saw whose data. The entry names message ids, never the
data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.store.audit import AuditEntry, record


def record_unmask(
    engine: Engine, actor: str, ids: Sequence[int], reason: str, channel: str = "cli", **details: Any
) -> int:
    """Commit the ``unmask`` entry for the messages ``ids``; its audit id. Call it before showing anything."""
    with engine.begin() as conn:
        entry = record(conn, AuditEntry(actor, channel, "unmask", "message", tuple(ids), reason, details))
    assert entry.id is not None
    return entry.id
