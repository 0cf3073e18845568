"""Dead letters: commands the API refused or that were given up on, for an operator to retry or discard.

A dead letter is a command whose status is in ``core.status.DEAD_LETTERS``. It no longer holds up its
appointment: the dispatcher goes on with the appointment's later commands. Retrying one therefore puts it
back into the outbox only when nothing came after it for that appointment (or what came after is retried
with it, in order): an old booking sent after a later cancel or reschedule would undo it. The retried
command goes through the running service's dispatcher like any other, so per-appointment order,
coalescing, the appointment memory and the search before resending an uncertain trigger all still hold.

Every retry and discard is one transaction with its audit entry; the transaction first takes the log's
write lock, so nothing the dispatcher settles can come between the checks and the change.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy.engine import Connection, Engine

from hl7bridge.core.status import DEAD_LETTERS, CommandStatus
from hl7bridge.dispatch.rules import masked_outcome
from hl7bridge.store import audit
from hl7bridge.store.audit import AuditEntry
from hl7bridge.store.deadletters import (
    appointment_commands,
    commands_by_id,
    dead_letters,
    settle_dead_letters,
    take_write_lock,
)

RETRIED = "retried"


@dataclass(frozen=True)
class DeadLetter:
    id: int
    message_id: int
    #: The appointment key (sending facility | filler or placer appointment id): an identifier, not patient data.
    appointment: str
    route: str
    kind: str
    status: str
    #: Why it died: the API's messages from the last attempt, as the dispatcher recorded them.
    reason: str
    #: When it died (epoch seconds).
    since: float
    attempts: int

    def to_json(self, masked: bool = False) -> dict[str, Any]:
        """``masked``: the API's words in ``reason`` masked (they may quote a patient's values), for the JSON API
        and the console, where patient data is masked for every role."""
        out = asdict(self)
        if masked:
            out["reason"] = masked_outcome(self.reason)
        return out


@dataclass(frozen=True)
class Refusal:
    id: int
    reason: str


@dataclass
class RetryResult:
    queued: list[DeadLetter] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    dry_run: bool = False
    audit_id: int | None = None

    def to_json(self, masked: bool = False) -> dict[str, Any]:
        return {"queued": [d.to_json(masked) for d in self.queued], "refused": [asdict(r) for r in self.refused],
                "dry_run": self.dry_run, "audit_id": self.audit_id}  # fmt: skip


@dataclass
class DiscardResult:
    discarded: list[DeadLetter] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    audit_id: int | None = None

    def to_json(self, masked: bool = False) -> dict[str, Any]:
        return {"discarded": [d.to_json(masked) for d in self.discarded], "refused": [asdict(r) for r in self.refused],
                "audit_id": self.audit_id}  # fmt: skip


def _letter(row: Any) -> DeadLetter:
    return DeadLetter(row.id, row.message_id, row.appointment_key, row.route, row.kind, row.status,
                      row.outcome or "", row.updated_at, row.attempts)  # fmt: skip


def list_open(
    engine: Engine,
    *,
    since: float | None = None,
    route: str | None = None,
    limit: int = 1000,
    after: int | None = None,
) -> list[DeadLetter]:
    """Open dead letters, oldest first (command order), dead since ``since`` and of ``route`` when given; a page
    goes on from the command id ``after``."""
    with engine.connect() as conn:
        return [_letter(row) for row in dead_letters(conn, since=since, route=route, limit=limit, after=after)]


def retry(
    engine: Engine,
    ids: Sequence[int] | None,
    actor: str,
    *,
    reason: str = "",
    dry_run: bool = False,
    channel: str = "cli",
) -> RetryResult:
    """Put dead letters (``ids``, or every open one for None) back into the outbox: pending, due now.

    The attempt count starts again from 0, so the backoff does too (the attempts table keeps the history);
    ``sync`` is cleared, since the sender had its answer long ago. ``step`` is cleared: a reschedule's
    cancel, done when it died, no longer holds once earlier commands retried with it have triggered, so it
    searches and cancels again. ``uncertain`` stays: a trigger whose last attempt may have reached the API
    is searched for before it is sent again."""
    now = time.time()
    if dry_run:
        with engine.connect() as conn:
            queued, refused = _retry_plan(conn, ids)
        return RetryResult(queued, refused, dry_run=True)
    with engine.begin() as conn:
        take_write_lock(conn)
        queued, refused = _retry_plan(conn, ids, lock=True)
        if not queued:
            return RetryResult([], refused)
        entry = audit.record(conn, AuditEntry(actor, channel, "retry", "command", tuple(d.id for d in queued),
                                              reason, {"queued": len(queued), "refused": [r.id for r in refused]}),
                             now)  # fmt: skip
        values = {
            "status": CommandStatus.PENDING, "next_attempt_at": now, "attempts": 0, "sync": 0, "step": "",
            "updated_at": now,
            "outcome": f"queued again by {actor} (audit entry {entry.id})", "resolution": RETRIED,
            "resolved_by": actor, "resolved_at": now, "resolution_reason": reason, "resolution_audit": entry.id,
        }  # fmt: skip
        settle_dead_letters(conn, [d.id for d in queued], values)
    return RetryResult(queued, refused, audit_id=entry.id)


def discard(engine: Engine, ids: Sequence[int], actor: str, reason: str, *, channel: str = "cli") -> DiscardResult:
    """Settle dead letters for good without sending them: ``discarded``, with who, when and why.

    The dispatcher's outcome (why it died) is kept beside the operator's reason."""
    if not reason.strip():
        raise ValueError("a reason is required to discard a dead letter")
    now = time.time()
    with engine.begin() as conn:
        take_write_lock(conn)
        rows = commands_by_id(conn, ids, lock=True)
        refused = _not_dead_letters(ids, rows)
        chosen = [_letter(row) for row in rows if row.status in DEAD_LETTERS]
        if not chosen:
            return DiscardResult([], refused)
        entry = audit.record(conn, AuditEntry(actor, channel, "discard", "command", tuple(d.id for d in chosen),
                                              reason, {"discarded": len(chosen)}), now)  # fmt: skip
        settle_dead_letters(conn, [d.id for d in chosen], {
            "status": CommandStatus.DISCARDED, "updated_at": now, "resolution": CommandStatus.DISCARDED.value,
            "resolved_by": actor, "resolved_at": now, "resolution_reason": reason, "resolution_audit": entry.id,
        })  # fmt: skip
    return DiscardResult(chosen, refused, audit_id=entry.id)


def _not_dead_letters(ids: Iterable[int], rows: list[Any]) -> list[Refusal]:
    found = {row.id: row for row in rows}
    refused = [Refusal(i, "no command with this id") for i in sorted(set(ids) - set(found))]
    refused += [Refusal(row.id, f"not an open dead letter: it is {row.status}")
                for row in rows if row.status not in DEAD_LETTERS]  # fmt: skip
    return refused


def _retry_plan(
    conn: Connection, ids: Sequence[int] | None, lock: bool = False
) -> tuple[list[DeadLetter], list[Refusal]]:
    """Which dead letters may go back into the outbox, in command order, and why the others may not (``lock``:
    their rows and their appointments' commands read ``FOR UPDATE``, for the change that follows)."""
    if ids is None:
        rows = dead_letters(conn, lock=lock)
        refused: dict[int, str] = {}
    else:
        rows = commands_by_id(conn, ids, lock=lock)
        refused = {r.id: r.reason for r in _not_dead_letters(ids, rows)}
    candidates = [row for row in rows if row.id not in refused]
    later = appointment_commands(conn, {row.appointment_key for row in candidates}, lock=lock)
    chosen = {row.id for row in candidates}
    # A refusal can strand an earlier dead letter of the same appointment: repeat until nothing changes.
    changed = True
    while changed:
        changed = False
        for row in candidates:
            if row.id not in chosen:
                continue
            blocker = next((c for c in later[row.appointment_key] if c.id > row.id and c.id not in chosen), None)
            if blocker is None:
                continue
            chosen.discard(row.id)
            changed = True
            if blocker.status in DEAD_LETTERS:
                refused[row.id] = (f"command {blocker.id} ({blocker.kind}) of the same appointment came after it and is "
                                   "also a dead letter: retry both together, or discard this one")  # fmt: skip
            else:
                refused[row.id] = (f"superseded by command {blocker.id} ({blocker.kind}, {blocker.status}) of the "
                                   "same appointment: retrying would undo it; discard this one")  # fmt: skip
    queued = [_letter(row) for row in candidates if row.id in chosen]
    return queued, [Refusal(i, why) for i, why in sorted(refused.items())]
