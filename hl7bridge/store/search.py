"""The search index's queries: messages by key (``search_keys``) and words (the ``messages_text`` FTS5 index),
newest or oldest first, in keyset pages or batches (``workflow.search`` holds the rules and the results).

On SQLite the service fills the index in batches about a second behind intake, in a file of its own
(``search_index``), up to its high-water mark. Messages past it are searched here from their own ``search_terms`` and
``search_text`` while they are few (``TAIL_MAX``), so results are complete; past that they are counted
(``Found.unindexed``), never silently left out. On PostgreSQL each message is indexed in the transaction that
writes it (``schema.index_messages``: keys in ``search_keys``, words in ``message_words``): no tail, nothing
unindexed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from sqlalchemy import String, bindparam, cast, column, exists, func, select, table, text
from sqlalchemy.dialects.postgresql import TSQUERY
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select

from hl7bridge.core.status import MessageStatus

from .queries import LIST_COLUMNS, with_status
from .schema import TOKEN, message_words, messages, search_keys, text_tokens
from .search_index import attach

#: The FTS5 index of the summary's words (a contentless table: it returns rowids, which are message ids).
messages_text = table("messages_text", column("rowid"))
#: Messages received this long before ``since`` still bound a text search's id range: ids follow arrival,
#: but concurrent connections can interleave by a little.
ARRIVAL_SLACK_S = 60.0
#: At most this many messages past the index are searched directly (a bounded read of their search columns).
TAIL_MAX = 5000


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

    @property
    def indexed(self) -> bool:
        """Whether the search index answers these filters (the others read ``messages`` directly)."""
        return bool(keys(self) or self.text)


@dataclass
class Found:
    rows: list[dict[str, Any]]
    #: Newer messages the index has not reached and that were not searched: they may match too.
    unindexed: int


@dataclass(frozen=True)
class _Scope:
    """Where a search looks: the index up to ``indexed_to``, and the matching messages past it (``tail``)."""

    indexed_to: int | None
    tail: tuple[int, ...]
    unindexed: int


def page(
    conn: Connection, filters: Filters, before: int | None, limit: int, columns: tuple[Any, ...] = LIST_COLUMNS
) -> Found:
    """Up to ``limit`` matching messages, newest first, below id ``before``."""
    scope = _scope(conn, filters)
    rows: list[dict[str, Any]] = []
    if scope.tail:
        rows = _rows(conn, _tail(filters, scope.tail, columns, before=before).order_by(messages.c.id.desc()), limit)
    if len(rows) < limit:
        stmt = query(conn, filters, before, ascending=False, columns=columns, upto=scope.indexed_to)
        rows += _rows(conn, stmt, limit - len(rows))
    return Found(rows, scope.unindexed)


def stream(
    conn: Connection, filters: Filters, columns: tuple[Any, ...], upto: int, batch: int = 500
) -> Iterator[dict[str, Any]]:
    """Every matching message up to id ``upto``, oldest first, in keyset batches (bounded memory)."""
    scope = _scope(conn, filters)
    top = upto if scope.indexed_to is None else min(upto, scope.indexed_to)
    after = 0
    while True:
        stmt = query(conn, filters, None, ascending=True, columns=columns, after=after, upto=top)
        rows = _rows(conn, stmt, batch)
        yield from rows
        if len(rows) < batch:
            break
        after = rows[-1]["id"]
    tail = [i for i in scope.tail if i <= upto]
    for start in range(0, len(tail), batch):
        chunk = tuple(tail[start : start + batch])
        yield from _rows(conn, _tail(filters, chunk, columns).order_by(messages.c.id), None)


def count(conn: Connection, filters: Filters, upto: int) -> tuple[int, int]:
    """How many messages up to id ``upto`` match, and how many messages past the index were not searched."""
    scope = _scope(conn, filters)
    top = upto if scope.indexed_to is None else min(upto, scope.indexed_to)
    inner = query(conn, filters, None, ascending=True, columns=(messages.c.id,), upto=top).order_by(None)
    total = int(conn.execute(select(func.count()).select_from(inner.subquery())).scalar() or 0)
    tail = tuple(i for i in scope.tail if i <= upto)
    if tail:
        tail_ids = _tail(filters, tail, (messages.c.id,)).subquery()
        total += int(conn.execute(select(func.count()).select_from(tail_ids)).scalar() or 0)
    return total, scope.unindexed


def newest_id(conn: Connection) -> int:
    return int(conn.execute(select(func.max(messages.c.id))).scalar() or 0)


def unindexed(conn: Connection) -> tuple[int, int]:
    """SQLite: the newest message id the index holds, and how many messages came after it (a primary-key range).
    The index is the log's own file, attached here (``search_index.attach``)."""
    indexed_to = attach(conn)
    behind = conn.execute(select(func.count()).where(messages.c.id > indexed_to)).scalar()
    return indexed_to, int(behind or 0)


def query(
    conn: Connection,
    filters: Filters,
    before: int | None,
    ascending: bool,
    columns: tuple[Any, ...] = LIST_COLUMNS,
    after: int | None = None,
    upto: int | None = None,
) -> Select:
    """The statement for ``filters`` over the index: driven by the most selective index there is, the rest as
    lookups.

    Every driver yields message ids in order, so a page stops after ``limit`` rows. In order of selectivity: a
    control id, appointment or patient key; the words (FTS5); a status other than accepted (a few per cent of
    the log, by their partial index); a sender (up to a whole feed). The other keys are primary-key probes per
    row, and words not driving are one list of matches. A window (``since``) also bounds the ids, from the
    first message received in it, so that no walk goes on past its start."""
    wanted = keys(filters)
    if (wanted or filters.text) and conn.dialect.name not in ("sqlite", "postgresql"):
        raise SearchError(f"--appointment, --patient, --control-id, --sender and --text need the search index, "
                          f"which a {conn.dialect.name} log does not have")  # fmt: skip
    if conn.dialect.name == "sqlite" and (wanted or filters.text):
        attach(conn)
    narrow = [k for k in wanted if not k.startswith("s:")]
    rare_status = filters.status is not None and filters.status != MessageStatus.ACCEPTED
    stmt = select(*columns)
    order = messages.c.id
    low = _first_id(conn, filters.since - ARRIVAL_SLACK_S) if filters.since is not None else None
    words = None
    if filters.text:
        words = _matching(conn, filters.text, low)
    if narrow or (wanted and words is None and not rare_status):
        driver = search_keys.alias("k")
        stmt = stmt.select_from(driver.join(messages, messages.c.id == driver.c.message_id))
        stmt = stmt.where(driver.c.key == wanted[0])
        order = driver.c.message_id
        wanted = wanted[1:]
    elif words is not None:
        matched = words.subquery("t")
        stmt = stmt.select_from(matched.join(messages, messages.c.id == matched.c.message_id))
        order = matched.c.message_id
        words = None
    for key in wanted:
        probe = search_keys.alias()
        stmt = stmt.where(exists().where(probe.c.key == key, probe.c.message_id == messages.c.id))
    if words is not None:
        stmt = stmt.where(messages.c.id.in_(words))
    stmt = _plain(stmt, filters)
    if filters.since is not None:
        # The id bound lets an index walk in id order stop at the window's start; the time is the exact test.
        stmt = stmt.where(order >= low)
    if before is not None:
        stmt = stmt.where(order < before)
    if after is not None:
        stmt = stmt.where(order > after)
    if upto is not None:
        stmt = stmt.where(order <= upto)
    return stmt.order_by(order.asc() if ascending else order.desc())


def _matching(conn: Connection, words: str, low: int | None) -> Select:
    """The ids (``message_id``) of the messages holding every word: FTS5's ``MATCH`` on SQLite, a ``tsquery`` of
    the same folded tokens on PostgreSQL's ``message_words`` (GIN), from ``low`` on."""
    if conn.dialect.name == "postgresql":
        found = message_words.c.message_id
        # A cast, not to_tsquery(): the tokens are taken as they are, as they were indexed.
        query_ = cast(bindparam("words", pg_tsquery(words), String()), TSQUERY)
        stmt = select(found).where(message_words.c.words.bool_op("@@")(query_))
    else:
        found = messages_text.c.rowid
        match = text("messages_text MATCH :words").bindparams(bindparam("words", fts_query(words), String()))
        stmt = select(found.label("message_id")).where(match)
    return stmt.where(found >= low) if low is not None else stmt


def explain(conn: Connection, filters: Filters, before: int | None = None) -> list[str]:
    """The query plan for a search over the index (what the tests and the benchmark check: an index, not a
    scan): SQLite's, or PostgreSQL's ``EXPLAIN`` lines."""
    stmt = query(conn, filters, before, ascending=False).limit(51)
    compiled = stmt.compile(conn, compile_kwargs={"literal_binds": True})
    if conn.dialect.name == "postgresql":
        return [str(r[0]).strip() for r in conn.exec_driver_sql(f"EXPLAIN (COSTS OFF) {compiled}".replace("%", "%%"))]
    return [str(r[-1]) for r in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]


def fts_query(words: str) -> str:
    """The operator's words as an FTS5 query: every word must occur; ``word*`` is a prefix.

    Words are cut where the index's tokenizer cuts them (anything but letters and digits), and each is quoted,
    so no FTS5 syntax (AND, NEAR, column filters) can be given, or mistyped, by accident. The index keeps no
    positions (``detail=none``, a fraction of the size), so "post-op" finds "post" and "op" anywhere."""
    return " ".join(f'"{token}"' + ("*" if prefix else "") for token, prefix in _terms(words))


def pg_tsquery(words: str) -> str:
    """The operator's words as PostgreSQL's ``tsquery`` over ``message_words``: the tokens folded as the index
    holds them (``text_tokens``), every one required, ``word*`` a prefix (``:*``). Tokens are letters and digits
    only, so nothing in them is ``tsquery`` syntax."""
    return " & ".join(f"'{token}'" + (":*" if prefix else "") for token, prefix in _terms(words, fold=True))


def keys(filters: Filters) -> list[str]:
    """The ``search_keys`` entries the filters name, most selective first."""
    found = []
    if filters.control_id:
        found.append("c:" + filters.control_id.strip())
    if filters.appointment:
        found.append("a:" + filters.appointment.strip())
    if filters.patient:
        found.append("p:" + filters.patient.strip())
    if filters.sender:
        found.append("s:" + filters.sender.strip())
    return found


def _terms(words: str, fold: bool = False) -> list[tuple[str, bool]]:
    """The tokens to find (``fold``: as the index holds them), each with whether it is a prefix."""
    terms = []
    for word in words.split():
        tokens = text_tokens(word) if fold else TOKEN.findall(word)
        terms += [(token, n == len(tokens) and word.endswith("*")) for n, token in enumerate(tokens, 1)]
    if not terms:
        raise SearchError("--text needs a word (letters or digits) to look for")
    return terms


def _scope(conn: Connection, filters: Filters) -> _Scope:
    if not filters.indexed or conn.dialect.name != "sqlite":
        return _Scope(None, (), 0)
    indexed_to, behind = unindexed(conn)
    if not behind or behind > TAIL_MAX:
        return _Scope(indexed_to, (), behind)
    return _Scope(indexed_to, _tail_matches(conn, filters, indexed_to), 0)


def _tail_matches(conn: Connection, filters: Filters, indexed_to: int) -> tuple[int, ...]:
    """The ids past the index whose own search columns match the keys and words (at most ``TAIL_MAX`` read)."""
    wanted = set(keys(filters))
    terms = _terms(filters.text, fold=True) if filters.text else []
    stmt = (select(messages.c.id, messages.c.search_terms, messages.c.search_text)
            .where(messages.c.id > indexed_to).order_by(messages.c.id).limit(TAIL_MAX))  # fmt: skip
    found = []
    for row in conn.execute(stmt):
        if wanted and not wanted <= set(orjson.loads(row.search_terms or "[]")):
            continue
        if terms:
            tokens = set(text_tokens(row.search_text or ""))
            if not all(any(t.startswith(term) for t in tokens) if prefix else term in tokens for term, prefix in terms):
                continue
        found.append(row.id)
    return tuple(found)


def _tail(filters: Filters, ids: tuple[int, ...], columns: tuple[Any, ...], before: int | None = None) -> Select:
    stmt = _plain(select(*columns).where(messages.c.id.in_(ids)), filters)
    return stmt.where(messages.c.id < before) if before is not None else stmt


def _plain(stmt: Select, filters: Filters) -> Select:
    """The filters the index does not answer: status, event, window."""
    if filters.status:
        stmt = with_status(stmt, filters.status)
    if filters.event:
        stmt = stmt.where(messages.c.event == filters.event.upper())
    if filters.since is not None:
        stmt = stmt.where(messages.c.received_at >= filters.since)
    return stmt


def _rows(conn: Connection, stmt: Select, limit: int | None) -> list[dict[str, Any]]:
    return [dict(r._mapping) for r in conn.execute(stmt.limit(limit))]


def _first_id(conn: Connection, since: float) -> int:
    """The first message id received at or after ``since`` (past the newest when none was)."""
    found = conn.execute(
        select(messages.c.id).where(messages.c.received_at >= since).order_by(messages.c.received_at).limit(1)
    ).scalar()
    return int(found) if found is not None else newest_id(conn) + 1
