"""The operators' audit log: append-only, each entry chained to the one before by a SHA-256 hash.

Every operator action (retry, discard, replay, purge, repair; later the console's unmask and export)
appends one entry. ``verify`` recomputes the chain, so an entry edited, inserted or deleted anywhere but
at the very end shows as the first entry whose hash no longer follows. Entries name ids and reasons,
never patient data.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection, Engine

from .schema import audit_log as audit
from .schema import meta

#: The hash the first entry follows.
GENESIS = "0" * 64
#: ``meta`` key holding the newest entry's hash: deleting entries at the end breaks the chain's head.
HEAD_KEY = "audit_head"


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    channel: str
    action: str
    target: str
    ids: tuple[int | str, ...] = ()
    reason: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    at: float = 0.0
    id: int | None = None
    prev_hash: str = ""
    hash: str = ""

    def canonical(self) -> bytes:
        """What the hash covers: every field but the row id and the hash itself."""
        body = [self.at, self.actor, self.channel, self.action, self.target, list(self.ids), self.reason, self.details]
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def chained(prev_hash: str, entry: AuditEntry) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\n" + entry.canonical()).hexdigest()


def record(conn: Connection, entry: AuditEntry, now: float | None = None) -> AuditEntry:
    """Append ``entry`` inside the caller's transaction, so the action and its audit commit together.

    The row is inserted before the previous hash is read: the insert takes SQLite's write lock, so no other
    writer can append between the read and this entry (two appends never follow the same predecessor)."""
    at = time.time() if now is None else now
    row_id = conn.execute(
        audit.insert().values(
            at=at,
            actor=entry.actor,
            channel=entry.channel,
            action=entry.action,
            target=entry.target,
            ids=json.dumps(list(entry.ids)),
            reason=entry.reason,
            details=json.dumps(entry.details, sort_keys=True),
            prev_hash="",
            hash="",
        )
    ).inserted_primary_key[0]
    prev = conn.execute(select(audit.c.hash).where(audit.c.id < row_id).order_by(audit.c.id.desc()).limit(1))
    prev_hash = prev.scalar() or GENESIS
    done = AuditEntry(**{**entry.__dict__, "at": at, "id": row_id, "prev_hash": prev_hash})
    digest = chained(prev_hash, done)
    conn.execute(audit.update().where(audit.c.id == row_id).values(prev_hash=prev_hash, hash=digest))
    if conn.execute(meta.update().where(meta.c.key == HEAD_KEY).values(value=digest)).rowcount == 0:
        conn.execute(meta.insert().values(key=HEAD_KEY, value=digest))
    return AuditEntry(**{**done.__dict__, "hash": digest})


def _entry(row: Any) -> AuditEntry:
    return AuditEntry(
        actor=row.actor, channel=row.channel, action=row.action, target=row.target,
        ids=tuple(json.loads(row.ids)), reason=row.reason, details=json.loads(row.details), at=row.at,
        id=row.id, prev_hash=row.prev_hash, hash=row.hash,
    )  # fmt: skip


def entries(
    engine: Engine,
    *,
    since: float | None = None,
    action: str | None = None,
    before: int | None = None,
    limit: int = 100,
) -> list[AuditEntry]:
    """Newest first, keyset-paged by ``before`` (an entry id)."""
    query = select(audit).order_by(audit.c.id.desc()).limit(limit)
    if since is not None:
        query = query.where(audit.c.at >= since)
    if action:
        query = query.where(audit.c.action == action)
    if before is not None:
        query = query.where(audit.c.id < before)
    with engine.connect() as conn:
        return [_entry(row) for row in conn.execute(query)]


@dataclass(frozen=True)
class ChainCheck:
    checked: int
    #: The first entry whose hash does not follow, and why; None when the whole chain holds.
    broken_at: int | None = None
    problem: str = ""


def verify(engine: Engine, batch: int = 5000) -> ChainCheck:
    """Walk the chain in id order, in batches (bounded memory however long the log)."""
    prev_hash, last_id, checked = GENESIS, 0, 0
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(audit)).scalar() or 0
        head = conn.execute(select(meta.c.value).where(meta.c.key == HEAD_KEY)).scalar() or GENESIS
        while True:
            rows = conn.execute(select(audit).where(audit.c.id > last_id).order_by(audit.c.id).limit(batch)).all()
            if not rows:
                break
            for problem, row in _breaks(rows, prev_hash):
                if problem:
                    return ChainCheck(checked, row.id, problem)
                prev_hash, last_id, checked = row.hash, row.id, checked + 1
    if checked != total:
        return ChainCheck(checked, None, f"{total - checked} entries could not be read in order")
    if prev_hash != head:
        return ChainCheck(checked, None, "the newest entries were deleted: the last entry is not the recorded head")
    return ChainCheck(checked)


def _breaks(rows: Sequence[Any], prev_hash: str) -> Iterable[tuple[str, Any]]:
    for row in rows:
        if row.prev_hash != prev_hash:
            yield (
                f"entry {row.id} follows {row.prev_hash[:12]}…, not the entry before it ({prev_hash[:12]}…): an entry before it was deleted or edited",
                row,
            )
            return
        try:
            expected = chained(prev_hash, _entry(row))
        except (ValueError, TypeError):
            yield f"entry {row.id} cannot be read (its ids or details are not JSON): it was edited", row
            return
        if row.hash != expected:
            yield f"entry {row.id} does not match its hash: it was edited", row
            return
        yield "", row
        prev_hash = row.hash
