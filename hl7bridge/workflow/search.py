"""Find messages by appointment, patient, control id, sender or words, newest first, a page at a time.

Every filter is answered from what intake indexed (``search_keys`` and the ``messages_text`` FTS5 index,
filled by triggers on insert), never by reading raw messages, so a search costs the same on a log of a
million messages as on a small one. Pages are keyset pages: ``before`` is the last id of the page seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import String, bindparam, column, exists, func, select, table, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.sql import Select

from hl7bridge.core.status import MessageStatus
from hl7bridge.store import LIST_COLUMNS, messages, search_keys, with_status

#: The FTS5 index of the summary's words (a contentless table: it returns rowids, which are message ids).
messages_text = table("messages_text", column("rowid"))
#: Messages received this long before ``since`` still bound a text search's id range: ids follow arrival,
#: but concurrent connections can interleave by a little.
ARRIVAL_SLACK_S = 60.0
MAX_LIMIT = 100_000
#: What FTS5's unicode61 tokenizer keeps as a token: runs of letters and digits.
_TOKEN = re.compile(r"[^\W_]+")


class SearchError(ValueError):
    """A search that cannot be run as asked; the message says what to change."""


@dataclass(frozen=True)
class Filters:
    """What ``log list``, ``log export`` and the JSON API can ask for; every field optional."""

    status: str | None = None
    event: str | None = None
    since: float | None = None
    appointment: str | None = None
    patient: str | None = None
    control_id: str | None = None
    #: ``APP`` or ``APP^FACILITY`` (MSH-3, MSH-4).
    sender: str | None = None
    text: str | None = None

    def described(self) -> dict[str, Any]:
        """The filters given, for an audit entry (the patient id and words are patient data: named, not given)."""
        given = {k: v for k, v in asdict(self).items() if v not in (None, "")}
        for key in ("patient", "text"):
            if key in given:
                given[key] = "(given)"
        return given


@dataclass
class Page:
    rows: list[dict[str, Any]]
    #: More messages match beyond this page: ask again with ``before=next_before``.
    more: bool
    next_before: int | None

    def as_json(self) -> dict[str, Any]:
        return {"messages": self.rows, "more": self.more, "next_before": self.next_before}


def search(engine: Engine, filters: Filters, before: int | None = None, limit: int = 50) -> Page:
    """One page of the messages matching every filter, newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        raise SearchError(f"--limit must be from 1 to {MAX_LIMIT}")
    with engine.connect() as conn:
        stmt = query(conn, filters, before, ascending=False).limit(limit + 1)
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, more, rows[-1]["id"] if more else None)


def stream(
    conn: Connection, filters: Filters, columns: tuple[Any, ...], upto: int, batch: int = 500
) -> Iterator[dict[str, Any]]:
    """Every matching message up to id ``upto``, oldest first, in keyset batches (bounded memory)."""
    after = 0
    while True:
        stmt = query(conn, filters, None, ascending=True, columns=columns, after=after, upto=upto).limit(batch)
        rows = [dict(r._mapping) for r in conn.execute(stmt)]
        yield from rows
        if len(rows) < batch:
            return
        after = rows[-1]["id"]


def count(conn: Connection, filters: Filters, upto: int) -> int:
    inner = query(conn, filters, None, ascending=True, columns=(messages.c.id,), upto=upto).order_by(None)
    return int(conn.execute(select(func.count()).select_from(inner.subquery())).scalar() or 0)


def newest_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(messages.c.id))).scalar() or 0)


def query(
    conn: Connection,
    filters: Filters,
    before: int | None,
    ascending: bool,
    columns: tuple[Any, ...] = LIST_COLUMNS,
    after: int | None = None,
    upto: int | None = None,
) -> Select:
    """The statement for ``filters``: driven by the most selective index there is, the rest as lookups.

    Every driver yields message ids in order, so a page stops after ``limit`` rows. In order of selectivity: a
    control id, appointment or patient key; the words (FTS5); a status other than accepted (a few per cent of
    the log, by their partial index); a sender (up to a whole feed). The other keys are primary-key probes per
    row, and words not driving are one list of matches. A window (``since``) also bounds the ids, from the
    first message received in it, so that no walk goes on past its start."""
    _check(filters)
    keys = _keys(filters)
    if (keys or filters.text) and conn.dialect.name != "sqlite":
        raise SearchError("--appointment, --patient, --control-id, --sender and --text need the SQLite message log")
    narrow = [k for k in keys if not k.startswith("s:")]
    rare_status = filters.status is not None and filters.status != MessageStatus.ACCEPTED
    stmt = select(*columns)
    order = messages.c.id
    low = _first_id(conn, filters.since - ARRIVAL_SLACK_S) if filters.since is not None else None
    words = None
    if filters.text:
        match = text("messages_text MATCH :words").bindparams(bindparam("words", fts_query(filters.text), String()))
        words = select(messages_text.c.rowid).where(match)
        if low is not None:
            words = words.where(messages_text.c.rowid >= low)
    if narrow or (keys and words is None and not rare_status):
        driver = search_keys.alias("k")
        stmt = stmt.select_from(driver.join(messages, messages.c.id == driver.c.message_id))
        stmt = stmt.where(driver.c.key == keys[0])
        order = driver.c.message_id
        keys = keys[1:]
    elif words is not None:
        matched = words.subquery("t")
        stmt = stmt.select_from(matched.join(messages, messages.c.id == matched.c.rowid))
        order = matched.c.rowid
        words = None
    for key in keys:
        probe = search_keys.alias()
        stmt = stmt.where(exists().where(probe.c.key == key, probe.c.message_id == messages.c.id))
    if words is not None:
        stmt = stmt.where(messages.c.id.in_(words))
    if filters.status:
        stmt = with_status(stmt, filters.status)
    if filters.event:
        stmt = stmt.where(messages.c.event == filters.event.upper())
    if filters.since is not None:
        # The id bound lets an index walk in id order stop at the window's start; the time is the exact test.
        stmt = stmt.where(order >= low, messages.c.received_at >= filters.since)
    if before is not None:
        stmt = stmt.where(order < before)
    if after is not None:
        stmt = stmt.where(order > after)
    if upto is not None:
        stmt = stmt.where(order <= upto)
    return stmt.order_by(order.asc() if ascending else order.desc())


def explain(engine: Engine, filters: Filters, before: int | None = None) -> list[str]:
    """SQLite's query plan for a search (what the tests and the benchmark check: an index, not a scan)."""
    with engine.connect() as conn:
        stmt = query(conn, filters, before, ascending=False).limit(51)
        compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
        return [str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]


def fts_query(words: str) -> str:
    """The operator's words as an FTS5 query: every word must occur; ``word*`` is a prefix.

    Words are cut where the index's tokenizer cuts them (anything but letters and digits), and each is quoted,
    so no FTS5 syntax (AND, NEAR, column filters) can be given, or mistyped, by accident. The index keeps no
    positions (``detail=none``, a fraction of the size), so "post-op" finds "post" and "op" anywhere."""
    terms = []
    for word in words.split():
        tokens = _TOKEN.findall(word)
        for number, token in enumerate(tokens, 1):
            prefix = number == len(tokens) and word.endswith("*")
            terms.append(f'"{token}"' + ("*" if prefix else ""))
    if not terms:
        raise SearchError("--text needs a word (letters or digits) to look for")
    return " ".join(terms)


def _check(filters: Filters) -> None:
    if filters.text is not None and filters.since is None:
        raise SearchError(
            "--text searches a time window: add --since (e.g. --since 7d), or find the message by "
            "--patient, --appointment or --control-id"
        )
    for name in ("appointment", "patient", "control_id", "sender"):
        value = getattr(filters, name)
        if value is not None and not value.strip():
            raise SearchError(f"--{name.replace('_', '-')} needs a value")


def _keys(filters: Filters) -> list[str]:
    """The ``search_keys`` entries the filters name, most selective first."""
    keys = []
    if filters.control_id:
        keys.append("c:" + filters.control_id.strip())
    if filters.appointment:
        keys.append("a:" + filters.appointment.strip())
    if filters.patient:
        keys.append("p:" + filters.patient.strip())
    if filters.sender:
        keys.append("s:" + filters.sender.strip())
    return keys


def _first_id(conn: Connection, since: float) -> int:
    """The first message id received at or after ``since`` (past the newest when none was)."""
    found = conn.execute(
        select(messages.c.id).where(messages.c.received_at >= since).order_by(messages.c.received_at).limit(1)
    ).scalar()
    return int(found) if found is not None else newest_id(conn) + 1
