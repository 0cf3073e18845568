"""SQLAlchemy schema of the message log, opening the database, and upgrading older files in place."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sqlite3
import stat
import time
import unicodedata
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from pathlib import Path as FsPath
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    cast,
    column,
    create_engine,
    event,
    func,
    inspect,
    select,
    text,
)
from sqlalchemy import table as table_clause
from sqlalchemy.dialects.postgresql import TSVECTOR
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import DisconnectionError, SQLAlchemyError

from hl7bridge.core.status import MessageStatus

SCHEMA_VERSION = 13
#: How long a connection waits for another one's write lock before it gives up.
BUSY_TIMEOUT_MS = 5000
log = logging.getLogger("hl7bridge.store")

metadata = MetaData()


def _text(length: int) -> Any:
    """A string column: ``VARCHAR(length)`` on SQLite, which never enforces it, and ``TEXT`` on PostgreSQL, which
    would: a feed's over-long MSH-9 in a rejected message must not fail the INSERT of its whole group there."""
    return String(length).with_variant(Text(), "postgresql")


#: Row ids: SQLite's 64-bit rowid; on PostgreSQL ``BIGINT`` (BIGSERIAL), as ``INTEGER`` would end at 2**31 rows.
Id = Integer().with_variant(BigInteger(), "postgresql")
#: The partial index's condition; a query must repeat it word for word for SQLite to use the index.
NOT_ACCEPTED = f"status <> '{MessageStatus.ACCEPTED}'"
#: The replay index's condition (only replays are indexed).
REPLAYED = "replay_of IS NOT NULL"
#: The messages whose (MSH-3, MSH-4, MSH-10) a resend repeats: accepted, and not an operator's replay (a copy of
#: its original under the same key). PostgreSQL holds them unique, so that two writers can never both accept one.
ACCEPTED_ORIGINAL = f"status = '{MessageStatus.ACCEPTED}' AND replay_of IS NULL"

meta = Table(
    "meta",
    metadata,
    Column("key", _text(64), primary_key=True),
    Column("value", _text(256), nullable=False),
)

messages = Table(
    "messages",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("received_at", Float, nullable=False, doc="epoch seconds"),
    Column("listener", _text(64), nullable=False),
    Column("peer", _text(64), nullable=False),
    Column("raw", LargeBinary, nullable=True, doc="NULL once purged by retention"),
    Column("charset", _text(32)),
    Column("sending_application", _text(180)),
    Column("sending_facility", _text(180)),
    Column("control_id", _text(199)),
    Column("message_type", _text(8)),
    Column("event", _text(8)),
    Column("version", _text(16)),
    Column("appointment_key", _text(400)),
    Column("action", _text(16)),
    Column("route", _text(64)),
    Column("note", Text, doc="why the message was ignored, or how it was handled"),
    Column("replay_of", Id),
    Column("summary", Text, doc="JSON of the parsed AppointmentEvent (PHI)"),
    Column("ack_code", _text(2)),
    Column("ack_text", Text),
    Column("ack_raw", LargeBinary),
    Column("status", _text(12), nullable=False),
    Column("error", Text),
    Column("error_location", _text(32)),
    Column("duplicate_of", Id),
    Column("purged_at", Float, doc="when retention removed the raw message and parsed summary"),
    Column("search_terms", Text, doc="JSON list of the message's search_keys (PHI: patient ids); NULL once purged"),
    Column("search_text", Text, doc="the words the text index holds (PHI); NULL once purged"),
    Index("ix_messages_sender_control", "sending_application", "sending_facility", "control_id"),
    Index("ix_messages_received_at", "received_at"),
    # Only the messages operators look for (rejected, ignored, duplicate, pending): an accepted message,
    # nearly every one, writes no entry here. Every B-tree an insert touches is one more WAL page.
    Index(
        "ix_messages_not_accepted",
        "status",
        "received_at",
        sqlite_where=text(NOT_ACCEPTED),
        postgresql_where=text(NOT_ACCEPTED),
    ),
    Index("ix_messages_appointment", "appointment_key"),
    # The replays of a message (its timeline); intake writes no replay, so no entry is added on the hot path.
    Index("ix_messages_replay_of", "replay_of", sqlite_where=text(REPLAYED), postgresql_where=text(REPLAYED)),
    # The same few messages in id order (an index ends in the rowid): `log list --status rejected` pages through
    # them newest first without sorting every one.
    Index(
        "ix_messages_not_accepted_id", "status", sqlite_where=text(NOT_ACCEPTED), postgresql_where=text(NOT_ACCEPTED)
    ),
    # PostgreSQL only: the writer's INSERT … ON CONFLICT DO NOTHING finds a concurrent acceptance of the same key
    # by it (waiting for that transaction to end). On SQLite the writer holds the write lock from its lookup to
    # its commit, and an existing log may hold two accepted copies (a resend answered while its first copy waited
    # for the API's verdict), which a new unique index would refuse.
    Index(
        "ux_messages_accepted_key",
        "sending_application",
        "sending_facility",
        "control_id",
        unique=True,
        postgresql_where=text(ACCEPTED_ORIGINAL),
    ).ddl_if(dialect="postgresql"),
)


#: An operator's last decision on a dead letter (``dead-letters retry`` or ``discard``), for ``log show``.
RESOLUTION_COLUMNS: tuple[tuple[str, Any, str], ...] = (
    ("resolution", _text(16), "retried or discarded"),
    ("resolved_by", _text(128), "the operator (--by, default the OS user)"),
    ("resolved_at", Float(), "epoch seconds"),
    ("resolution_reason", Text(), "the operator's reason (--reason)"),
    ("resolution_audit", Id, "the audit entry that records the decision"),
)

commands = Table(
    "commands",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("message_id", Id, nullable=False),
    Column("appointment_key", _text(400), nullable=False),
    Column("kind", _text(16), nullable=False),
    Column("route", _text(64), nullable=False),
    Column("chat_bot_id", _text(128), nullable=False),
    Column("time_zone", _text(64), nullable=False),
    Column("flow_id", _text(128)),
    Column("parameters", Text, nullable=False, doc="JSON (PHI)"),
    Column("identifiers", Text, nullable=False, doc="JSON"),
    Column("start_at", Float),
    Column("status", _text(12), nullable=False, doc="pending in_flight done dead annihilated failed discarded"),
    Column("step", _text(16), nullable=False, default=""),
    Column("outcome", Text),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("sync", Integer, nullable=False, default=0, doc="1: ack_mode dispatched, never retried in background"),
    Column("uncertain", Integer, nullable=False, default=0, doc="1: the last attempt may have reached the API"),
    Column("replay_of", Id),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    *(Column(name, kind, doc=doc) for name, kind, doc in RESOLUTION_COLUMNS),
    Column("config_id", Id, doc="configs.id: the configuration that produced the command (schema 9)"),
    Index("ix_commands_status_due", "status", "next_attempt_at"),
    Index("ix_commands_appointment", "appointment_key", "id"),
    Index("ix_commands_message", "message_id"),
    Index("ix_commands_status_updated", "status", "updated_at"),
)

#: One row per distinct configuration that produced commands: the digest of its effective settings
#: (``app.config_digest``), the file's path and its mtime when it was loaded.
configs = Table(
    "configs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("digest", String(64), nullable=False, doc="SHA-256 of the canonical JSON of the effective settings"),
    Column("path", Text, nullable=False),
    Column("mtime", Float, doc="the file's mtime when loaded; NULL for built-in defaults"),
    Column("loaded_at", Float, nullable=False, doc="when the service first ran it"),
    Index("ix_configs_identity", "digest", "path", "mtime", unique=True),
)

#: The one dispatcher of the log (one row, ``id`` 1): ``epoch`` grows with each new leader, whose writes carry it
#: and are refused once it is not the row's (fencing); ``renewed_at`` (database clock, epoch seconds) is renewed
#: every second by the leader; a standby ends a leader whose renewal is older than ``lease`` seconds.
dispatch_leader = Table(
    "dispatch_leader",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=False),
    Column("epoch", Id, nullable=False),
    Column("instance", String(64), nullable=False, doc="the leader's instances.id"),
    Column("backend_pid", Integer, doc="PostgreSQL: the server process of the leader's lock session"),
    Column("renewed_at", Float, nullable=False),
    Column("lease", Float, nullable=False),
)

#: The service processes on this log, each heartbeating its row every few seconds (database clock).
instances = Table(
    "instances",
    metadata,
    Column("id", String(64), primary_key=True, doc="generated at each start"),
    Column("name", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("version", String(32), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("heartbeat_at", Float, nullable=False),
    Column("last_message_at", Float),
    Column("lease", Float, nullable=False, doc="the instance's dispatch_lease: down after 3 of them"),
)

attempts = Table(
    "attempts",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("command_id", Id, nullable=False),
    Column("call_id", _text(36), nullable=False, doc="shared by the commands of one bulk call"),
    Column("at", Float, nullable=False),
    Column("operation", _text(16), nullable=False),
    Column("request_summary", Text, nullable=False),
    Column("status_code", Integer),
    Column("verdict", _text(12), nullable=False),
    Column("response_body", Text),
    Column("error", Text),
    Column("duration_ms", Float, nullable=False),
    Index("ix_attempts_command", "command_id"),
    Index("ix_attempts_at", "at"),
)

appointments = Table(
    "appointments",
    metadata,
    Column("appointment_key", _text(400), primary_key=True),
    Column("route", _text(64), nullable=False),
    Column("chat_bot_id", _text(128), nullable=False),
    Column("state", _text(12), nullable=False, doc="active cancelled annihilated"),
    Column("parameters", Text, doc="JSON of what was last triggered (PHI)"),
    Column("updated_at", Float, nullable=False),
    Column("last_command_id", Id),
)

audit_log = Table(
    "audit",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False, doc="epoch seconds"),
    Column("actor", _text(128), nullable=False, doc="who: an OS user, or a console account"),
    Column("channel", _text(16), nullable=False, doc="cli, api, console"),
    Column("action", _text(32), nullable=False, doc="retry discard replay purge unmask export ..."),
    Column("target", _text(16), nullable=False, doc="what the ids name: message, command, user, log"),
    Column("ids", Text, nullable=False, doc="JSON list of the ids acted on"),
    Column("reason", Text, nullable=False, default=""),
    Column("details", Text, nullable=False, default="{}", doc="JSON; never patient data"),
    Column("prev_hash", _text(64), nullable=False),
    Column("hash", _text(64), nullable=False, doc="sha256 over prev_hash and this entry: edits break the chain"),
    Index("ix_audit_at", "at"),
    # Ids never reused: an entry deleted at the end is not replaced by the next one under its id.
    sqlite_autoincrement=True,
)

#: Which ids each audit entry names, one row each: "the entries naming this message or its commands" is then an
#: index lookup, however long the audit log (``ids`` in ``audit`` is a JSON list, which no index reaches).
audit_refs = Table(
    "audit_refs",
    metadata,
    Column("target", _text(16), primary_key=True, doc="what the id names: message, command, user, ..."),
    Column("ref", _text(128), primary_key=True, doc="the id, as text (user names are ids too)"),
    Column("audit_id", Id, primary_key=True),
    sqlite_with_rowid=False,
)

#: Messages per minute, ACK code ('' when none was sent) and listener, for the dashboard: a SQLite log's are counted
#: in its search index file with the index (``search_index``, a batch a second, off the writer's hot path), moved
#: when a dispatched message's ACK is decided later (``ack_changes``). A window is then read in a few hundred rows,
#: however busy the hour was. A PostgreSQL log has the table but counts its windows from the messages.
message_minutes = Table(
    "message_minutes",
    metadata,
    Column("minute", Integer, primary_key=True, doc="epoch seconds // 60"),
    Column("ack_code", String(2), primary_key=True),
    Column("listener", String(64), primary_key=True),
    Column("count", Integer, nullable=False),
    Column("last_at", Float, nullable=False, doc="the newest message counted here"),
    sqlite_with_rowid=False,
)

search_keys = Table(
    "search_keys",
    metadata,
    Column(
        "key",
        _text(420),
        primary_key=True,
        doc="kind prefix + value: a: appointment, p: patient (PHI), c: control id, s: sender",
    ),
    Column("message_id", Id, primary_key=True),
    sqlite_with_rowid=False,
)

#: Tables only a PostgreSQL log has (``_create`` makes them there).
postgres_metadata = MetaData()

#: PostgreSQL's text index (``--text``), the counterpart of SQLite's FTS5 ``messages_text``: a message's
#: ``text_tokens`` as a ``tsvector`` made by ``array_to_tsvector`` (the tokens as they are: PostgreSQL's own parser
#: and dictionaries cut and fold words otherwise than FTS5, and by the database's locale), under a GIN index.
#: Written with the message by ``index_messages``; retention deletes a purged message's row.
message_words = Table(
    "message_words",
    postgres_metadata,
    Column("message_id", BigInteger, primary_key=True, autoincrement=False),
    Column("words", TSVECTOR, nullable=False),
    Index("ix_message_words", "words", postgresql_using="gin"),
)

#: Console and API accounts (``workflow.accounts``). A name is an operator's, not a patient's.
users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True, doc="[A-Za-z0-9._@-], 1 to 64 characters"),
    Column("role", String(16), nullable=False, doc="viewer operator admin"),
    Column("password_hash", String(256), nullable=False, doc="argon2id, PHC string; never the password"),
    Column("created_at", Float, nullable=False),
    Column("password_changed_at", Float, nullable=False),
    Column("last_login_at", Float),
)

#: API tokens: only the SHA-256 of each secret is kept (the secret is shown once, when issued).
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_name", String(64), ForeignKey("users.name", ondelete="CASCADE"), nullable=False),
    Column("secret_sha256", String(64), nullable=False, unique=True),
    Column("label", String(128), nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("last_used_at", Float),
    Index("ix_api_tokens_user", "user_name"),
)

#: Console sessions, keyed by the SHA-256 of the cookie's secret.
sessions = Table(
    "sessions",
    metadata,
    Column("secret_sha256", String(64), primary_key=True),
    Column("user_name", String(64), ForeignKey("users.name", ondelete="CASCADE"), nullable=False),
    Column("csrf", String(64), nullable=False, doc="random per session; forms and the JSON API echo it"),
    Column("created_at", Float, nullable=False),
    Column("last_seen_at", Float, nullable=False, doc="written at most once a minute"),
    Column("idle_seconds", Float, nullable=False, doc="ends when unused this long"),
    Column("expires_at", Float, nullable=False, doc="ends then, however used"),
    Index("ix_sessions_user", "user_name"),
    Index("ix_sessions_expires", "expires_at"),
)

#: Summary fields whose words go into the text index (names, reason, type, provider, place).
TEXT_FIELDS = ("reason", "appointment_type", "provider_name", "location", "department")
NAME_FIELDS = ("family", "given", "middle")


def search_terms(
    control_id: str | None, application: str | None, facility: str | None, summary: dict[str, Any] | None
) -> tuple[str | None, str | None]:
    """A message's ``search_terms`` (a JSON array of its ``search_keys``) and ``search_text`` (the words of its
    names, reason, type, provider and place), as intake stores them with the message and the upgrade backfills
    them: the one definition of what is searchable. The indexes are filled from them (``search_index`` on SQLite,
    ``index_messages`` on PostgreSQL)."""
    keys = [f"c:{control_id}" if control_id else ""]
    if application:
        keys += [f"s:{application}", f"s:{application}^{facility or ''}"]
    words = ""
    if summary:
        keys += [f"a:{summary.get('placer_appointment_id') or ''}", f"a:{summary.get('filler_appointment_id') or ''}"]
        keys += [f"p:{p.get('value') or ''}" for p in summary.get("patient_ids") or ()]
        parts = [n.get(f) for n in summary.get("names") or () for f in NAME_FIELDS]
        words = " ".join(w for w in (*parts, *(summary.get(f) for f in TEXT_FIELDS)) if w)
    terms = list(dict.fromkeys(k for k in keys if len(k) > 2))
    return (orjson.dumps(terms).decode() if terms else None), (words or None)


#: What FTS5's unicode61 tokenizer keeps as a token: runs of letters and digits.
TOKEN = re.compile(r"[^\W_]+")


def text_tokens(words: str) -> list[str]:
    """The tokens of ``words`` as SQLite's FTS5 ``unicode61`` tokenizer indexes them: runs of letters and
    digits, lower-cased, a Latin letter's single diacritic removed ("José" is "jose"; "ß", "ø", "й" and "ǖ" stay).
    The one definition of a word outside SQLite: PostgreSQL's text index and the search of messages past
    SQLite's index use it, so that ``--text`` finds the same messages on both logs (``tests/test_search_text.py``
    compares them on one set of cases)."""
    return [token.lower() if token.isascii() else "".join(map(_folded_char, token)) for token in TOKEN.findall(words)]


@lru_cache(maxsize=4096)
def _folded_char(char: str) -> str:
    """unicode61's folding of one character: the simple lower case (İ is i), and a Latin letter with one
    diacritic (its canonical decomposition an ASCII letter and one combining mark) as that letter."""
    low = char.lower()[:1]
    parts = unicodedata.normalize("NFD", low)
    if len(parts) == 2 and parts[0].isascii() and unicodedata.combining(parts[1]):
        return parts[0]
    return low


#: ``meta`` key of a log before schema 13 (SQLite) or 12 (PostgreSQL): the newest message id its in-log search index
#: held. Those steps remove it: a SQLite log's index file keeps its own mark, PostgreSQL needs none.
INDEXED_KEY = "search_indexed_to"
#: Counts the messages of an id range into ``message_minutes`` (SQLite's upsert; the WHERE keeps it unambiguous).
MINUTES_UPSERT = """INSERT INTO message_minutes (minute, ack_code, listener, count, last_at)
    SELECT CAST(received_at / 60 AS INTEGER), coalesce(ack_code, ''), listener, count(*), max(received_at)
    FROM messages WHERE id > :low AND id <= :high GROUP BY 1, 2, 3
    ON CONFLICT (minute, ack_code, listener) DO UPDATE
    SET count = count + excluded.count, last_at = max(last_at, excluded.last_at)"""
#: ``meta`` key: a random id given to a SQLite log when created (or upgraded to schema 13); its search index file
#: records it, so that another log's index (a copied file, a restored backup of the wrong one) is never read as its.
LOG_ID_KEY = "log_id"
#: SQLite: every ACK decided after its message was logged (``ack_mode = "dispatched"``), for the minute counts of the
#: index file (``search_index``), which apply each once; retention removes them with the messages' patient data.
ACK_CHANGES_DDL = (
    """CREATE TABLE IF NOT EXISTS ack_changes (id INTEGER PRIMARY KEY AUTOINCREMENT, message_id INTEGER NOT NULL,
        received_at FLOAT NOT NULL, listener VARCHAR(64) NOT NULL, old_code VARCHAR(2), new_code VARCHAR(2))""",
    """CREATE TRIGGER IF NOT EXISTS messages_ack_changes AFTER UPDATE OF ack_code ON messages
        WHEN OLD.ack_code IS NOT NEW.ack_code BEGIN
        INSERT INTO ack_changes (message_id, received_at, listener, old_code, new_code)
            VALUES (OLD.id, OLD.received_at, OLD.listener, OLD.ack_code, NEW.ack_code);
    END""",
)
#: The schema name a SQLite log connection attaches its search index file under (``search_index.attach``).
INDEX_SCHEMA = "search"
#: ``ack_changes`` for the statements that read or prune it.
ack_changes = table_clause("ack_changes", column("id"), column("message_id"))


def _uri_everywhere() -> bool:
    """Whether this SQLite reads URI file names in ATTACH on any connection (``SQLITE_USE_URI``), so a log
    connection can attach the search index read-only (``mode=ro``)."""
    with contextlib.closing(sqlite3.connect(":memory:")) as conn:
        return any(row[0] in ("USE_URI", "USE_URI=1") for row in conn.execute("PRAGMA compile_options"))


URI_ATTACH = _uri_everywhere()
#: The tables a SQLite log keeps in its search index file instead (``search_index``); PostgreSQL keeps them.
INDEX_FILE_TABLES = ("search_keys", "message_minutes")


#: The index's statements on PostgreSQL: one per batch, whatever its size, its entries as arrays (``unnest``), so
#: that it is one prepared statement (psycopg's ``executemany`` of a row per key cost the writer 2 ms of CPU a group
#: of 20, and a second statement 0.25 ms more). The keys come from the stored ``search_terms`` JSON, on the server,
#: in the keys' order; the words are ``text_tokens``, which only Python makes (letters and digits: a space joins
#: them safely).
_TERMS = "unnest(%s::bigint[], %s::text[]) AS t(i, terms), json_array_elements_text(t.terms::json) AS j(value)"
_INDEX = ("WITH words AS (INSERT INTO message_words (message_id, words) "
          "SELECT i, array_to_tsvector(string_to_array(w, ' ')) FROM unnest(%s::bigint[], %s::text[]) AS t(i, w) "
          "ON CONFLICT DO NOTHING) "
          f"INSERT INTO search_keys (key, message_id) SELECT j.value, t.i FROM {_TERMS} ORDER BY 1, 2 "
          "ON CONFLICT DO NOTHING")  # fmt: skip
_UNINDEX = ("WITH words AS (DELETE FROM message_words WHERE message_id = ANY(%s::bigint[])) "
            f"DELETE FROM search_keys AS s USING {_TERMS} WHERE s.key = j.value AND s.message_id = t.i "
            "AND starts_with(j.value, %s)")  # fmt: skip


def index_messages(conn: Any, ids: Sequence[int], rows: Sequence[Any]) -> None:
    """PostgreSQL: put messages' search keys and words into the index in the caller's transaction, the one that
    writes the messages: the one way a message becomes findable there (the writer, a replay, the upgrade's
    backfill). Several writers commit in any order, and a message indexed in its own transaction is findable the
    moment it is committed, with no high-water mark to fall behind. Inside the writer's pipeline the statement
    travels with the rows, no round trip of its own. Elsewhere a no-op: a SQLite log's index is a file of its own,
    filled in batches by a thread of its own (``search_index``)."""
    if conn.dialect.name != "postgresql" or not ids:
        return
    word_ids: list[int] = []
    words: list[str] = []
    for message_id, row in zip(ids, rows, strict=True):
        if row["search_text"] and (tokens := text_tokens(row["search_text"])):
            word_ids.append(message_id)
            words.append(" ".join(set(tokens)))
    terms = [row["search_terms"] for row in rows]
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(_INDEX, (word_ids, words, list(ids), terms))


def unindex_messages(conn: Any, ids: Sequence[int], rows: Sequence[Any], prefix: str = "") -> None:
    """PostgreSQL: take messages' words and their keys starting with ``prefix`` out of the index again, by their
    exact entries (``search_keys`` is keyed by the key first: a delete by message id alone would read it all).
    ``rows`` are the messages as indexed (their ``search_terms``)."""
    if conn.dialect.name != "postgresql" or not ids:
        return
    terms = [row["search_terms"] for row in rows]
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(_UNINDEX, (list(ids), list(ids), terms, prefix))


#: Messages per backfill statement when an older log is upgraded.
BACKFILL_BATCH = 5000


#: The first 16 bytes of every SQLite 3 database file.
SQLITE_MAGIC = b"SQLite format 3\x00"
DAMAGED_HINT = (
    "stop the service, keep a copy of the file, and restore the log from a backup (or salvage what is "
    "readable with: sqlite3 {path} .recover | sqlite3 {path}.recovered, then point service.database at that)"
)


class StoreError(RuntimeError):
    """The database cannot be opened or used; the message says what to fix."""


def open_engine(
    url: str, synchronous: str = "FULL", read_only: bool = False, create: bool = True, in_use: bool = False
) -> Engine:
    """An engine for the log; SQLite files are created 0600 and run in WAL mode.

    An existing file that is not a SQLite database is refused untouched. ``create=False`` (the CLI's
    commands) refuses a missing file instead of creating an empty log beside the real one, and an older schema
    instead of upgrading it: between ``pip install --upgrade`` and the restart the old service still runs on the
    log, and an upgrade under it would hold the write lock through the backfill. Upgrading is the job of
    ``serve`` (``create=True``) and of ``hl7bridge upgrade`` (``upgrade_log``). ``read_only`` (a SQLite file
    that the service has opened): for the dispatcher's process, which reads the outbox and hands its writes to
    the service, so that SQLite itself refuses any write from it. ``in_use``: a SQLite log this process already
    has connections to (an elected dispatcher's claim): the file is not opened outside SQLite to be checked, as
    closing any descriptor of it would drop the locks SQLite holds on it in this process
    (https://www.sqlite.org/howtocorrupt.html, 2.2); SQLite refuses a file that is not a database itself."""
    return _open(url, synchronous, read_only, create, upgrade=create, in_use=in_use)[0]


def upgrade_log(url: str, synchronous: str = "FULL") -> tuple[int, int]:
    """Upgrade an existing log in place (``hl7bridge upgrade``): the schema version it was at, and the current."""
    engine, found = _open(url, synchronous, read_only=False, create=False, upgrade=True)
    engine.dispose()
    return (found or SCHEMA_VERSION), SCHEMA_VERSION


def _open(
    url: str, synchronous: str, read_only: bool, create: bool, upgrade: bool, in_use: bool = False
) -> tuple[Engine, int | None]:
    """``open_engine``, also telling the schema version the log was at (None: a new log)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "postgresql":
        return _open_postgres(url, read_only, create, upgrade)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if read_only:
        if not (is_sqlite and parsed.database and parsed.database != ":memory:"):
            raise StoreError(f"only a SQLite file or PostgreSQL can be opened read-only, not {_safe(url)}")
        path = FsPath(parsed.database).resolve().as_posix()
        engine = create_engine("sqlite://", future=True, creator=lambda: sqlite3.connect(
            f"file:{quote(path)}?mode=ro", uri=True, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000))  # fmt: skip
        event.listen(engine, "connect", lambda dbapi_conn, _record: dbapi_conn.execute("PRAGMA temp_store=MEMORY"))
        try:
            with engine.connect() as conn:
                found = _schema_version(conn, url)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot read the database {_safe(url)}: {_first_line(exc)}") from None
        if found != SCHEMA_VERSION:
            raise StoreError(f"the database {_safe(url)} has schema {found}, this release {SCHEMA_VERSION}")
        return engine, found
    if is_sqlite and parsed.database and parsed.database != ":memory:" and not in_use:
        _prepare_sqlite_file(FsPath(parsed.database), create)
    engine = create_engine(url, future=True)
    if is_sqlite:

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            # Sorts and statement journals that outgrow the cache stay in memory, not in files under /var/tmp
            # (where they would hold patient data, and show as passing descriptors).
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.close()

        if not URI_ATTACH:

            @event.listens_for(engine, "checkin")
            def _detach_index(dbapi_conn: Any, record: Any) -> None:
                """Without URI file names the index is attached read-write (``search_index.attach``): a pooled
                connection goes back without it, as its next user may be a writer (whose ``BEGIN IMMEDIATE`` would
                take the index's write lock too)."""
                if record is not None and record.info.pop(INDEX_SCHEMA, None) is not None:
                    with contextlib.suppress(sqlite3.Error):
                        dbapi_conn.execute(f"DETACH DATABASE {INDEX_SCHEMA}")

    try:
        with engine.begin() as conn:
            found = _found_version(conn, url)
        if found is not None and found < SCHEMA_VERSION:
            if not upgrade:
                raise StoreError(
                    f"the log is at schema {found} and this hl7bridge writes {SCHEMA_VERSION}: restart the service "
                    "(`serve` upgrades the log in place) or run `hl7bridge upgrade`"
                )
            _upgrade(engine, found, url)
        if found != SCHEMA_VERSION:
            # A current log is only read here: opening it must not wait for (or take) the write lock.
            with engine.connect() as conn, _ddl_transaction(conn):
                _create(conn, new=found is None)
    except SQLAlchemyError as exc:
        hint = f"; {DAMAGED_HINT.format(path=parsed.database)}" if damaged(exc) else ""
        raise StoreError(
            f"cannot open the database {_safe(url)}: {exc.__class__.__name__}: {_first_line(exc)}{hint}"
        ) from None
    return engine, found


def _found_version(conn: Any, url: str) -> int | None:
    """The log's schema version, refusing a database that is not a log and a log newer than this release."""
    found = _schema_version(conn, url)
    if found is None and inspect(conn).get_table_names():
        raise StoreError(
            f"the database {_safe(url)} holds tables but is not an hl7bridge message log (no schema "
            "version); left untouched: point --database or service.database at the log"
        )
    if found is not None and found > SCHEMA_VERSION:
        raise StoreError(
            f"the database {_safe(url)} was written by a newer hl7bridge (schema {found}, this release "
            f"knows {SCHEMA_VERSION}); upgrade hl7bridge or point --database at another file"
        )
    return found


def _create(conn: Any, new: bool = True) -> None:
    """The tables a log lacks, and a new log's version (inside ``_ddl_transaction``)."""
    if conn.dialect.name == "sqlite":
        metadata.create_all(conn, tables=[t for t in metadata.sorted_tables if t.name not in INDEX_FILE_TABLES])
        for ddl in ACK_CHANGES_DDL:
            conn.exec_driver_sql(ddl)
    else:
        metadata.create_all(conn)
        postgres_metadata.create_all(conn)
    if new:
        conn.execute(meta.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
        conn.execute(meta.insert().values(key=LOG_ID_KEY, value=uuid.uuid4().hex))


#: Connections the service keeps open to PostgreSQL (the writer, the dispatcher's reads, health probes, index and
#: retention jobs), and how many more it may open for a burst.
POSTGRES_POOL_SIZE = 5
POSTGRES_MAX_OVERFLOW = 10
#: ``pg_advisory_xact_lock`` key that serialises schema creation and upgrades ("hl7b"): instances starting at
#: once on an empty database wait for the first to create the tables, then find them.
SCHEMA_LOCK_KEY = 0x686C3762


#: ``pg_try_advisory_lock`` key ("hl7d") that the elected dispatcher of a PostgreSQL log holds for its session, as
#: it holds a ``flock`` on a SQLite file (``dispatch.leader``).
DISPATCH_LOCK_KEY = 0x686C3764


def try_session_lock(conn: Any, key: int) -> bool:
    """Take a session advisory lock on a PostgreSQL log if it is free (then commit: the lock outlives the
    transaction, and an open one would hold back vacuum)."""
    taken = bool(conn.execute(select(func.pg_try_advisory_lock(key))).scalar())
    conn.commit()
    return taken


def try_dispatch_lock(conn: Any) -> bool:
    """The dispatcher's session lock (``dispatch.leader``)."""
    return try_session_lock(conn, DISPATCH_LOCK_KEY)


#: A writer's transaction never waits for its client between statements: one that does belongs to a stopped or hung
#: process (SIGSTOP, a paused VM) whose row and key locks would hold up every other instance's writer (a resend of
#: its unanswered message waits on its uncommitted key). The server ends such a transaction after this long; its
#: COMMIT then fails (no ACK), and the resend is deduplicated.
WRITER_IDLE_IN_TRANSACTION_MS = 5000
#: The ``application_name`` of hl7bridge's PostgreSQL sessions (what ``cluster.end_stalled_sessions`` may end).
APPLICATION_NAME = "hl7bridge"


#: A writer's connection is checked with a round trip before use only after sitting idle this long (seconds).
WRITER_PING_IDLE_S = 1.0


def writing_engine(engine: Engine) -> Engine:
    """The engine a writer commits through: on PostgreSQL one whose sessions end a transaction left idle past
    ``WRITER_IDLE_IN_TRANSACTION_MS``, kept apart from the readers' (an export pauses between its batches while
    its consumer reads); elsewhere ``engine`` itself. Its connections are checked before use only once idle for
    ``WRITER_PING_IDLE_S``: a ping before every group was one more round trip a message group (three waits and
    0.07 ms of the writer's CPU, and the server's), while a connection in use a moment ago is as alive as a ping
    would say. One that died meanwhile fails its group (no ACK), and SQLAlchemy then replaces every connection
    the pool held before the failure."""
    if engine.dialect.name != "postgresql":
        return engine
    return _postgres_engine(engine.url.render_as_string(hide_password=False), False, WRITER_IDLE_IN_TRANSACTION_MS,
                            ping_idle=WRITER_PING_IDLE_S)  # fmt: skip


def _ping_when_idle(engine: Engine, idle: float) -> None:
    """SQLAlchemy's pessimistic disconnect check, for a connection idle longer than ``idle`` seconds only."""

    @event.listens_for(engine.pool, "checkin")
    def _idle_since(_dbapi_connection: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine.pool, "checkout")
    def _ping(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= idle:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:  # any failure: the pool replaces the connection and tries again
            raise DisconnectionError(f"connection found dead after {time.monotonic() - since:.0f} s idle") from exc


def _postgres_engine(url: str, read_only: bool, idle_in_transaction_ms: int = 0, ping_idle: float = 0.0) -> Engine:
    """An engine for PostgreSQL: READ COMMITTED (each statement sees what committed before it, as the writer's
    duplicate lookup needs), ``synchronous_commit = on`` whatever the server's default (an ACK follows a COMMIT
    that reached the disk), connections checked before use (a restarted server or a failover leaves the pool's
    connections dead; with ``ping_idle``, only those idle longer than that), and read-only sessions for the
    dispatcher's process, whose writes go through the service's writer."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    options = "-c synchronous_commit=on" + (" -c default_transaction_read_only=on" if read_only else "")
    if idle_in_transaction_ms:
        options += f" -c idle_in_transaction_session_timeout={idle_in_transaction_ms}"
    try:
        engine = create_engine(
            parsed,
            pool_pre_ping=not ping_idle,
            pool_size=POSTGRES_POOL_SIZE,
            max_overflow=POSTGRES_MAX_OVERFLOW,
            isolation_level="READ COMMITTED",
            connect_args={"options": options, "application_name": APPLICATION_NAME},
        )
    except ModuleNotFoundError as exc:
        raise StoreError(
            f"{_safe(url)} needs the PostgreSQL driver ({exc.name} is not installed): pip install 'hl7bridge[postgres]'"
        ) from None
    if ping_idle:
        _ping_when_idle(engine, ping_idle)
    return engine


def _open_postgres(url: str, read_only: bool, create: bool, upgrade: bool) -> tuple[Engine, int | None]:
    """PostgreSQL: an empty database gets the schema (``create``); an older schema is refused unless this is
    ``hl7bridge db upgrade`` (``upgrade``): several instances may run on one database, and an upgrade under
    the others' feet is an operator's decision, taken with them stopped."""
    engine = _postgres_engine(url, read_only)
    try:
        with engine.connect() as conn:
            found = _found_version(conn, url)
        if found is not None and found < SCHEMA_VERSION and not (upgrade and not create):
            raise StoreError(
                f"the log {_safe(url)} is at schema {found} and this hl7bridge writes {SCHEMA_VERSION}: stop every "
                f"instance on it and run `hl7bridge db upgrade --database {_safe(url)}`"
            )
        if found is not None and found < SCHEMA_VERSION:
            _upgrade(engine, found, url)
        elif found is None:
            if not create or read_only:
                raise StoreError(
                    f"there is no message log in {_safe(url)}; name the service's with --config FILE (its "
                    "service.database) or --database, or start `hl7bridge serve` on it first"
                )
            with engine.connect() as conn, _ddl_transaction(conn):
                # Another instance may have created it while this one waited for the lock.
                if _schema_version(conn, url) is None:
                    _create(conn)
    except SQLAlchemyError as exc:
        engine.dispose()
        raise StoreError(
            f"cannot open the database {_safe(url)}: {exc.__class__.__name__}: {_first_line(exc)}"
        ) from None
    except StoreError:
        engine.dispose()
        raise
    return engine, found


def damaged(exc: BaseException) -> bool:
    """Whether SQLite found the file corrupt (as opposed to locked, full or unwritable)."""
    name = getattr(getattr(exc, "orig", exc), "sqlite_errorname", "")
    return isinstance(name, str) and name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


def integrity_problem(engine: Engine) -> str | None:
    """``PRAGMA quick_check``'s first finding on a SQLite log (None when sound): every page and B-tree is read,
    so a damaged file is refused at start instead of failing later under load, message by message."""
    if engine.dialect.name != "sqlite":
        return None
    try:
        with engine.connect() as conn:
            found = conn.exec_driver_sql("PRAGMA main.quick_check(1)").scalar()
    except SQLAlchemyError as exc:
        return _first_line(exc)
    return None if found == "ok" else " ".join(str(found).split())


def _schema_version(conn: Any, url: str) -> int | None:
    if "meta" not in inspect(conn).get_table_names():
        return None
    found = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    if found is None:
        return None
    text = str(found).strip()
    if not (text.isascii() and text.isdigit() and len(text) < 10 and int(text) >= 1):
        raise StoreError(
            f"the database {_safe(url)} records schema version {text[:20]!r}, which no "
            f"hl7bridge writes (1 to {SCHEMA_VERSION}); the file is damaged or not a message log: restore it "
            "from a backup or point --database at another file"
        )
    return int(text)


def _add_column(conn: Any, table: str, name: str, ddl: str) -> None:
    """``ALTER TABLE ADD COLUMN`` unless the column is there: a step must be safe to run again."""
    if name not in {c["name"] for c in inspect(conn).get_columns(table)}:
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")


def _v2_retention(conn: Any) -> None:
    _add_column(conn, "messages", "purged_at", "FLOAT")
    _add_column(conn, "commands", "uncertain", "INTEGER NOT NULL DEFAULT 0")
    conn.exec_driver_sql("CREATE INDEX IF NOT EXISTS ix_commands_status_updated ON commands (status, updated_at)")


def _v3_lean_indexes(conn: Any) -> None:
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_messages_status_received")
    conn.exec_driver_sql("DROP INDEX IF EXISTS ix_messages_event_received")
    conn.exec_driver_sql(
        f"CREATE INDEX IF NOT EXISTS ix_messages_not_accepted ON messages (status, received_at) WHERE {NOT_ACCEPTED}"
    )


def _v4_audit(conn: Any) -> None:
    audit_log.create(conn, checkfirst=True)


def _v5_resolutions(conn: Any) -> None:
    for name, kind, _doc in RESOLUTION_COLUMNS:
        _add_column(conn, "commands", name, str(kind.compile(dialect=conn.dialect)))


def _readable_summary(raw: bytes | None) -> dict[str, Any] | None:
    """A logged summary as intake wrote it, or None when it is missing or damaged (not JSON, not UTF-8, not an
    object): one unreadable row must not stop the upgrade of the whole log."""
    try:
        summary = json.loads(raw) if raw else None
    except ValueError:
        return None
    return summary if isinstance(summary, dict) else None


def _v6_search(conn: Any) -> None:
    """The search index, backfilled from the messages already logged, a batch of ids at a time (the terms with
    intake's own ``search_terms``). A damaged summary gives its message no patient terms, not a failed upgrade."""
    _add_column(conn, "messages", "search_terms", "TEXT")
    _add_column(conn, "messages", "search_text", "TEXT")
    conn.exec_driver_sql(
        f"CREATE INDEX IF NOT EXISTS ix_messages_not_accepted_id ON messages (status) WHERE {NOT_ACCEPTED}"
    )
    if conn.dialect.name != "sqlite":  # a SQLite log's index is a file of its own (schema 13)
        search_keys.create(conn, checkfirst=True)
    # As bytes: a summary that is not UTF-8 would make the driver fail the whole batch as text.
    for rows in _batches(conn, messages.c.id, messages.c.control_id, messages.c.sending_application,
                         messages.c.sending_facility, cast(messages.c.summary, LargeBinary).label("summary")):  # fmt: skip
        filled = []
        for row in rows:
            fields = (row.control_id, row.sending_application, row.sending_facility)
            try:
                terms, words = search_terms(*fields, _readable_summary(row.summary))
            except (AttributeError, TypeError):  # a JSON object of the wrong shape
                terms, words = search_terms(*fields, None)
            filled.append({"i": row.id, "terms": terms, "words": words})
        conn.execute(
            messages.update().where(messages.c.id == bindparam("i"))
            .values(search_terms=bindparam("terms"), search_text=bindparam("words")),
            filled,
        )  # fmt: skip


def _batches(conn: Any, key: Any, *columns: Any) -> Iterator[list[Any]]:
    """An upgrade's backfill reads: the rows of ``key``'s table in ``key`` order, ``BACKFILL_BATCH`` at a time
    (bounded memory however long the log); each batch is read whole before it is handed over."""
    last = 0
    while rows := conn.execute(select(key, *columns).where(key > last).order_by(key).limit(BACKFILL_BATCH)).all():
        yield rows
        last = rows[-1][0]


def _v7_accounts(conn: Any) -> None:
    for table in (users, api_tokens, sessions):
        table.create(conn, checkfirst=True)


def _v8_timeline(conn: Any) -> None:
    """The timeline's and the dashboard's lookups: the replays of a message (a partial index), the audit entries
    naming an id (``audit_refs``, backfilled from the entries already written, a batch at a time), and the
    messages per minute (``message_minutes``; a SQLite log's are in its index file since schema 13)."""
    conn.exec_driver_sql(f"CREATE INDEX IF NOT EXISTS ix_messages_replay_of ON messages (replay_of) WHERE {REPLAYED}")
    audit_refs.create(conn, checkfirst=True)
    for rows in _batches(conn, audit_log.c.id, audit_log.c.target, audit_log.c.ids):
        refs = [ref for row in rows for ref in audit_ref_rows(row.id, row.target, _readable_ids(row.ids))]
        if refs:
            conn.execute(audit_refs.insert().prefix_with("OR IGNORE", dialect="sqlite"), refs)
    if conn.dialect.name != "sqlite":  # a SQLite log counts its minutes in its index file (schema 13)
        message_minutes.create(conn, checkfirst=True)


def audit_ref_rows(audit_id: int, target: str, ids: Any) -> list[dict[str, Any]]:
    """The ``audit_refs`` rows of one entry: one per distinct id it names."""
    return [{"target": target, "ref": ref, "audit_id": audit_id} for ref in dict.fromkeys(str(i) for i in ids)]


def _readable_ids(raw: str | None) -> list[Any]:
    """An entry's ids as written, or none when they were edited into something else (``audit verify`` says so)."""
    try:
        ids = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [i for i in ids if isinstance(i, (int, str))] if isinstance(ids, list) else []


def _v9_configs(conn: Any) -> None:
    """Which configuration produced each command: the ``configs`` table and ``commands.config_id``."""
    configs.create(conn, checkfirst=True)
    _add_column(conn, "commands", "config_id", "INTEGER")


def _v10_reserved(conn: Any) -> None:
    """Nothing: the number went to a change that did not ship with steps 11 and 12 (step 13 took its place, as a log
    at 12 never runs 10 again)."""


def _v11_instances(conn: Any) -> None:
    """Dispatch across instances: the leader's row (lease, epoch for fencing) and the instances' heartbeats."""
    dispatch_leader.create(conn, checkfirst=True)
    instances.create(conn, checkfirst=True)


#: Id columns that were INTEGER on PostgreSQL where the ids they hold are BIGINT (or will be: configs, tokens).
_POSTGRES_BIGINT_IDS = (("audit_refs", "audit_id"), ("commands", "config_id"), ("configs", "id"), ("api_tokens", "id"))


def _v12_postgres_index(conn: Any) -> None:
    """PostgreSQL (SQLite: nothing, its types are already these and its index is a file of its own, step 13): every id
    column BIGINT, ``audit_refs``' strings TEXT, and the search index as intake now writes it
    (``index_messages``): the text index made, and the keys and words of every message logged put in, a batch of
    ids at a time, whatever ``search_indexed_to`` said (a message committed late under a lower id was missed by
    it); that mark goes."""
    if conn.dialect.name != "postgresql":
        return
    for table, name in _POSTGRES_BIGINT_IDS:
        conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {name} TYPE BIGINT")
        sequence = conn.execute(select(func.pg_get_serial_sequence(table, name))).scalar()
        if sequence:
            conn.exec_driver_sql(f"ALTER SEQUENCE {sequence} AS BIGINT")
    conn.exec_driver_sql("ALTER TABLE audit_refs ALTER COLUMN target TYPE TEXT, ALTER COLUMN ref TYPE TEXT")
    message_words.create(conn, checkfirst=True)
    for rows in _batches(conn, messages.c.id, messages.c.search_terms, messages.c.search_text):
        index_messages(conn, [r.id for r in rows], [r._mapping for r in rows])
    conn.execute(meta.delete().where(meta.c.key == INDEXED_KEY))


def _v13_index_file(conn: Any) -> None:
    """A SQLite log's search index leaves it for a file of its own (``search_index``): its tables and triggers are
    dropped here, and the service builds the file from the log's ``search_terms`` and ``search_text`` (which stay)
    at its next start, in the background. The log gets its ``log_id``, and ``ack_changes`` for the minute counts.
    PostgreSQL gets the log id only: its index stays in the log (written at intake since step 12)."""
    if get_meta(conn, LOG_ID_KEY) is None:
        conn.execute(meta.insert().values(key=LOG_ID_KEY, value=uuid.uuid4().hex))
    if conn.dialect.name != "sqlite":
        return
    for trigger in ("messages_search_purge", "messages_minutes_ack"):
        conn.exec_driver_sql(f"DROP TRIGGER IF EXISTS {trigger}")
    for table in ("messages_text", *INDEX_FILE_TABLES):
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {table}")
    conn.execute(meta.delete().where(meta.c.key == INDEXED_KEY))
    for ddl in ACK_CHANGES_DDL:
        conn.exec_driver_sql(ddl)


#: In-place upgrades: version -> the step that brings a database from version-1 to it.
MIGRATIONS: dict[int, Callable[[Any], None]] = {
    2: _v2_retention,
    3: _v3_lean_indexes,
    4: _v4_audit,
    5: _v5_resolutions,
    6: _v6_search,
    7: _v7_accounts,
    8: _v8_timeline,
    9: _v9_configs,
    10: _v10_reserved,
    11: _v11_instances,
    12: _v12_postgres_index,
    13: _v13_index_file,
}


@contextlib.contextmanager
def _ddl_transaction(conn: Any) -> Iterator[None]:
    """One transaction that holds DDL too. Python's sqlite3 (before ``autocommit``) begins a transaction only
    before INSERT/UPDATE/DELETE, so each ``ALTER``/``CREATE`` would commit by itself and a step failing half-way
    would leave its first columns behind: here the driver's own transaction control is off and the step runs in
    an explicit ``BEGIN IMMEDIATE`` (the write lock at once, waiting ``busy_timeout`` for it), all or nothing."""
    if conn.dialect.name != "sqlite":
        with conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
            yield
        return
    driver = conn.connection.driver_connection
    saved = driver.isolation_level
    driver.isolation_level = None
    try:
        with conn.begin():
            conn.exec_driver_sql("BEGIN IMMEDIATE")
            yield
    finally:
        # A connection the failure closed: the step's own error is the one to tell.
        with contextlib.suppress(sqlite3.ProgrammingError):
            driver.isolation_level = saved


def _upgrade(engine: Engine, found: int, url: str) -> None:
    """Apply each step in its own transaction together with the version it reaches, so that a failed or killed
    upgrade leaves the log at the last version completed, whole, and the next open resumes from there."""
    for version in range(found + 1, SCHEMA_VERSION + 1):
        try:
            with engine.connect() as conn, _ddl_transaction(conn):
                if (_schema_version(conn, url) or 0) >= version:
                    continue  # another upgrade took this step while this one waited for the lock
                MIGRATIONS[version](conn)
                conn.execute(meta.update().where(meta.c.key == "schema_version").values(value=str(version)))
        except Exception as exc:  # noqa: BLE001 - any failure: the step rolled back, one line, never a traceback
            hint = f"; {DAMAGED_HINT.format(path=make_url(url).database)}" if damaged(exc) else ""
            raise StoreError(
                f"cannot upgrade the log {_safe(url)} from schema {version - 1} to {version} ({exc.__class__.__name__}: "
                f"{_first_line(exc)}); the log is left whole at schema {version - 1}: fix the cause and run "
                f"`hl7bridge upgrade` or start the service again{hint}"
            ) from None
        log.info("upgraded the message log to schema version %d", version)


def _prepare_sqlite_file(path: FsPath, create: bool = True) -> None:
    """Create the file 0600, or check that the existing one is a SQLite database before touching it.

    The check reads the open descriptor, so what is checked is what gets ``fchmod``ed."""
    if not create and not path.exists():
        raise StoreError(
            f"there is no message log at {path.resolve()}; name the service's with --config FILE (its "
            "service.database) or --database sqlite:////path/to/hl7bridge.db"
        )
    try:
        if not path.parent.exists():
            path.parent.mkdir(mode=0o700, parents=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StoreError(f"{path} is not a regular file; point --database at the message log")
            head = os.pread(fd, len(SQLITE_MAGIC), 0) if info.st_size else b""
            if info.st_size and head != SQLITE_MAGIC:
                raise StoreError(
                    f"{path} is not a SQLite database (left untouched); point --database or service.database "
                    "at the message log, or at a path where a new one may be created"
                )
            if info.st_mode & 0o077:
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
        if os.stat(path).st_size == 0:
            # auto_vacuum can only be chosen before the first page is written (and before WAL mode):
            # it lets retention hand freed pages back to the file system.
            with contextlib.closing(sqlite3.connect(path)) as conn:
                conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
                conn.execute("VACUUM")
    except OSError as exc:
        raise StoreError(f"cannot create the database file {path}: {exc.strerror}") from None


def loose_directory(url: str) -> str | None:
    """A warning when the existing directory of a SQLite log lets group or others read or write in it."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    directory = FsPath(parsed.database).resolve().parent
    try:
        mode = stat.S_IMODE(os.stat(directory).st_mode)
    except OSError:
        return None
    if not mode & 0o066:
        return None
    return (
        f"the log's directory {directory} is open to group or others (mode {mode:04o}) and the log holds "
        f"patient data: chmod 700 {directory} (systemd: StateDirectoryMode=0700)"
    )


def _safe(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else ""


def heartbeat(conn: Any, now: float) -> None:
    """A tiny write that proves the database takes commits (the health check's probe)."""
    set_meta(conn, "heartbeat", repr(now))


def set_meta(conn: Any, key: str, value: str) -> None:
    done = conn.execute(meta.update().where(meta.c.key == key).values(value=value))
    if done.rowcount == 0:
        conn.execute(meta.insert().values(key=key, value=value))


def get_meta(conn: Any, key: str) -> str | None:
    return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()


#: ``meta`` keys: the Journeys API base URL the service dispatches to (``--sandbox`` and ``--api-url`` replace the
#: config's), and when it recorded it; a separate ``replay`` process reads them.
DISPATCH_URL_KEY = "dispatch_base_url"
DISPATCH_URL_AT_KEY = "dispatch_base_url_at"
#: ``meta`` keys: the ``configs`` id the service runs now (recorded at start and on each reload), and the last
#: reload's outcome (``applied <at> <config id>`` or ``refused <at> <first reason>``), which ``reload`` waits for.
RUNNING_CONFIG_KEY = "running_config_id"
RELOAD_OUTCOME_KEY = "config_reload"
