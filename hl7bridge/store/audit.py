"""The operators' audit log: append-only, each entry chained to the one before by a SHA-256 hash.

Every operator action (retry, discard, replay, purge, repair, reload, unmask, export) appends one entry.
``verify`` recomputes the chain: an entry edited, inserted or deleted (at the end too: ``meta.audit_head``
holds the newest hash) shows as the first entry whose hash no longer follows. What it cannot see alone is a
writer of the database who rewrites every later hash as well; against that, keep the head hash outside the
database (``hl7bridge audit verify`` prints it; ``--expect HASH`` later proves that entry is still in the
chain, unchanged, with everything before it). Entries name ids and reasons, never patient data.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from .schema import audit_log as audit
from .schema import audit_ref_rows, audit_refs, meta

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

    The head row is written first: that takes SQLite's write lock (and the row's lock on PostgreSQL, where it
    is then read ``FOR UPDATE``), so no other writer can append between reading the head and moving it (two
    appends never follow the same predecessor)."""
    at = time.time() if now is None else now
    head = meta.c.key == HEAD_KEY
    if conn.execute(meta.update().where(head).values(value=meta.c.value)).rowcount == 0:
        # The first append: another one may be inserting the head too (PostgreSQL waits for it, then skips).
        first = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}.get(conn.dialect.name)
        if first is None:
            conn.execute(meta.insert().values(key=HEAD_KEY, value=GENESIS))
        else:
            conn.execute(first(meta).values(key=HEAD_KEY, value=GENESIS).on_conflict_do_nothing())
    prev_hash = conn.execute(select(meta.c.value).where(head).with_for_update()).scalar_one()
    done = AuditEntry(**{**entry.__dict__, "at": at, "prev_hash": prev_hash})
    digest = chained(prev_hash, done)
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
            prev_hash=prev_hash,
            hash=digest,
        )
    ).inserted_primary_key[0]
    if refs := audit_ref_rows(row_id, entry.target, entry.ids):
        conn.execute(audit_refs.insert(), refs)
    conn.execute(meta.update().where(head).values(value=digest))
    return AuditEntry(**{**done.__dict__, "id": row_id, "hash": digest})


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


def naming(conn: Connection, refs: dict[str, Sequence[int | str]], limit: int) -> list[AuditEntry]:
    """The newest ``limit`` entries (newest first) that name any of ``refs`` (target -> ids), through
    ``audit_refs``: an index lookup per id, however long the audit log."""
    wanted = [(target, str(i)) for target, ids in refs.items() for i in ids]
    if not wanted:
        return []
    matching = select(audit_refs.c.audit_id).where(
        or_(*(and_(audit_refs.c.target == target, audit_refs.c.ref.in_([r for t, r in wanted if t == target]))
              for target in dict.fromkeys(t for t, _ in wanted)))
    )  # fmt: skip
    query = select(audit).where(audit.c.id.in_(matching)).order_by(audit.c.id.desc()).limit(limit)
    return [_entry(row) for row in conn.execute(query)]


@dataclass(frozen=True)
class ChainCheck:
    checked: int
    #: The first entry whose hash does not follow, and why; None when the whole chain holds.
    broken_at: int | None = None
    problem: str = ""
    #: The last good hash: worth keeping outside the database, for a later ``verify(expect=...)``.
    head: str = GENESIS


def verify(engine: Engine, batch: int = 5000, expect: str | None = None) -> ChainCheck:
    """Walk the chain in id order, in batches (bounded memory however long the log). ``expect``: a head hash
    kept outside the database earlier, which must be found in the chain."""
    prev_hash, last_id, checked, seen = GENESIS, 0, 0, expect is None
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(audit)).scalar() or 0
        head = conn.execute(select(meta.c.value).where(meta.c.key == HEAD_KEY)).scalar() or GENESIS
        while True:
            rows = conn.execute(select(audit).where(audit.c.id > last_id).order_by(audit.c.id).limit(batch)).all()
            if not rows:
                break
            for problem, row in _breaks(rows, prev_hash):
                if problem:
                    return ChainCheck(checked, row.id, problem, prev_hash)
                prev_hash, last_id, checked = row.hash, row.id, checked + 1
                seen = seen or row.hash == expect
    if checked != total:
        return ChainCheck(checked, None, f"{total - checked} entries could not be read in order", prev_hash)
    if prev_hash != head:
        return ChainCheck(
            checked, None, "the newest entries were deleted: the last entry is not the recorded head", prev_hash
        )
    if not seen:
        return ChainCheck(
            checked, None, "the expected hash is not in the chain: entries up to it were rewritten", prev_hash
        )
    return ChainCheck(checked, head=prev_hash)


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
