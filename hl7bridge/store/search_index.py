"""The search index of a SQLite log, in a file of its own beside it (``<log>.search``): ``search_keys``, the FTS5
``messages_text`` and the dashboard's ``message_minutes``, derived from the log and rebuilt from it when missing,
damaged or not this log's.

Why a file of its own: in the log, indexing was a writer job holding SQLite's one write lock 17-23 ms once a
second, and every message arriving then waited for it (its p99 doubled). Here the ``Indexer`` thread writes the
index file on its own connection, reading new messages from the log through the same connection's read-only
``ATTACH`` (a WAL reader never blocks the log's writer): a message's commit never waits for index work and never
fsyncs index pages. Readers (searches, exports, the dashboard) see it through ``attach`` on their log connections,
under the schema name ``search``; unqualified names find it, the log holding no tables of those names.

What the file records in its ``meta``: its ``format``, the ``log_id`` of the log it was built from (a copy of
another log's index is refused), ``indexed_to`` (every message up to it is indexed; advanced in the transaction
that adds them), ``acks_to`` (the log's ``ack_changes`` applied to the minute counts), and ``purge_cutoff``: what
a purge has removed, or is about to, is never indexed again from an older read of the log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
from sqlalchemy.engine import Connection, Engine

from hl7bridge.core.logs import MonotonicClock, RefusalLog

from .schema import (
    BUSY_TIMEOUT_MS,
    LOG_ID_KEY,
    MINUTES_UPSERT,
    URI_ATTACH,
    StoreError,
    _first_line,
    _prepare_sqlite_file,
    get_meta,
)
from .schema import (
    INDEX_SCHEMA as SCHEMA,
)

log = logging.getLogger("hl7bridge.store")

#: The index file's layout; a file of another format is rebuilt.
INDEX_FORMAT = "1"
SUFFIX = ".search"
#: Messages per indexing transaction: what searches read past the index (``search.TAIL_MAX``), and more than this
#: machine takes in a second.
BATCH = 5000
#: The indexer's pause between batches once it has caught up.
INTERVAL = 1.0
#: Seconds between two ``quick_check``s of the index file by a reopening indexer.
CHECK_EVERY = 60.0

INDEX_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS search_keys (key VARCHAR(420) NOT NULL, message_id INTEGER NOT NULL, "
    "PRIMARY KEY (key, message_id)) WITHOUT ROWID",
    "CREATE VIRTUAL TABLE IF NOT EXISTS messages_text USING fts5(body, content='', detail=none)",
    "CREATE TABLE IF NOT EXISTS message_minutes (minute INTEGER NOT NULL, ack_code VARCHAR(2) NOT NULL, "
    "listener VARCHAR(64) NOT NULL, count INTEGER NOT NULL, last_at FLOAT NOT NULL, "
    "PRIMARY KEY (minute, ack_code, listener)) WITHOUT ROWID",
    # Messages whose words the index does not hold although they are indexed: a purge removed them, or the
    # indexer left them out under ``purge_cutoff``. FTS5's 'delete' of words it does not hold would corrupt it.
    "CREATE TABLE IF NOT EXISTS scrubbed (message_id INTEGER PRIMARY KEY)",
)
_META_KEYS = ("format", "log_id", "indexed_to", "acks_to", "purge_cutoff")


def index_path(log_url_or_path: Any) -> Path | None:
    """The index file of a SQLite log file (None for other databases and in-memory logs)."""
    url = getattr(log_url_or_path, "url", log_url_or_path)
    backend = getattr(url, "get_backend_name", None)
    if backend is not None:
        if backend() != "sqlite" or url.database in (None, "", ":memory:"):
            return None
        database = url.database
    else:
        database = str(log_url_or_path)
    return Path(os.path.abspath(database) + SUFFIX)


def _ro_uri(path: Path) -> str:
    return f"file:{quote(path.as_posix())}?mode=ro"


# --- readers -----------------------------------------------------------------------------------------------------


def attach(conn: Connection) -> int:
    """Attach the log's index read-only as ``search`` on a log connection, or an empty stand-in when there is no
    usable index (searches then read the log's newest messages directly, within their bound); the newest message
    id the index holds (0: none).

    The attachment stays with the pooled connection (an ATTACH opens the file: it was a millisecond a search) and
    is renewed when the file at the path is another one (the indexer replaced it); read-only, it takes no lock a
    writer could wait for."""
    info = conn.connection.info
    driver = conn.connection.driver_connection
    path = index_path(conn.engine)
    identity = _identity(path)
    held = info.get(SCHEMA)
    if held is not None and (held[0] != identity or held[1] is None):
        with contextlib.suppress(sqlite3.Error):
            driver.execute(f"DETACH DATABASE {SCHEMA}")
        held = info[SCHEMA] = None
    if held is None:
        usable = _attach_file(conn, driver, path) if identity is not None else False
        if not usable:
            _attach_stand_in(driver)
        held = info[SCHEMA] = (identity, usable)
    if not held[1]:
        return 0
    found = driver.execute(f"SELECT value FROM {SCHEMA}.meta WHERE key = 'indexed_to'").fetchone()
    return int(found[0]) if found else 0


def _identity(path: Path | None) -> tuple[int, int] | None:
    try:
        return None if path is None else (lambda st: (st.st_dev, st.st_ino))(os.stat(path))
    except OSError:
        return None


def _attach_file(conn: Connection, driver: Any, path: Path | None) -> bool | None:
    """Attach the index file; whether it serves this log (this format, this log's id, not past its newest message:
    else it is detached again and the indexer rebuilds it), None when it could not be read (tried again next
    time)."""
    try:
        driver.execute(f"ATTACH DATABASE ? AS {SCHEMA}", (_ro_uri(path) if URI_ATTACH else str(path),))
        found = _read_meta(driver, f"{SCHEMA}.meta")
        newest = driver.execute("SELECT coalesce(max(id), 0) FROM main.messages").fetchone()[0]
        if _usable(found, get_meta(conn, LOG_ID_KEY)) and int(found.get("indexed_to") or 0) <= newest:
            return True
        driver.execute(f"DETACH DATABASE {SCHEMA}")
    except sqlite3.Error:
        with contextlib.suppress(sqlite3.Error):
            driver.execute(f"DETACH DATABASE {SCHEMA}")
        return None
    return False


def _attach_stand_in(driver: Any) -> None:
    driver.execute(f"ATTACH DATABASE ':memory:' AS {SCHEMA}")
    for ddl in INDEX_DDL:
        driver.execute(ddl.replace("IF NOT EXISTS ", f"IF NOT EXISTS {SCHEMA}.", 1))


def _read_meta(driver: Any, table: str = "meta") -> dict[str, str]:
    keys = ",".join("?" * len(_META_KEYS))
    return dict(driver.execute(f"SELECT key, value FROM {table} WHERE key IN ({keys})", _META_KEYS).fetchall())


def _usable(found: dict[str, str], log_id: str | None) -> bool:
    return found.get("format") == INDEX_FORMAT and log_id is not None and found.get("log_id") == log_id


# --- the index file ----------------------------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{quote(path.as_posix())}", uri=True, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)  # fmt: skip
    conn.execute("PRAGMA journal_mode=WAL")
    # Derived data: a crash loses at most the last batch, which the next one redoes. Deleted patient ids are
    # overwritten, not left in free pages.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA secure_delete=ON")
    conn.execute("PRAGMA temp_store=MEMORY")
    return conn


def create_index(path: Path, log_id: str) -> sqlite3.Connection:
    """A new, empty index of the log ``log_id`` (0600, WAL) in place of whatever was at ``path``: built beside it
    and renamed into place whole, so a reader never attaches a file without its tables."""
    fresh = Path(f"{path}.new")
    for leftover in (fresh, Path(f"{fresh}-wal"), Path(f"{fresh}-shm")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    _prepare_sqlite_file(fresh)
    with contextlib.closing(_connect(fresh)) as conn:
        conn.execute("BEGIN IMMEDIATE")
        for ddl in INDEX_DDL:
            conn.execute(ddl)
        conn.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         [("format", INDEX_FORMAT), ("log_id", log_id), ("indexed_to", "0"), ("acks_to", "0"),
                          ("purge_cutoff", "0")])  # fmt: skip
        conn.execute("COMMIT")
    for leftover in (Path(f"{path}-wal"), Path(f"{path}-shm")):  # the replaced file's
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    os.replace(fresh, path)
    return _connect(path)


def _log_identity(log_path: Path) -> tuple[str | None, int]:
    """The log's ``log_id`` and its newest message id."""
    with contextlib.closing(sqlite3.connect(_ro_uri(log_path), uri=True)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (LOG_ID_KEY,)).fetchone()
        newest = conn.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
    return (None if row is None else str(row[0])), int(newest)


def indexed_to(log_path: Path) -> int | None:
    """How far the index file of the log at ``log_path`` reaches (None: there is none yet); for tests and benches."""
    path = index_path(log_path)
    if path is None or not path.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(_ro_uri(path), uri=True)) as conn:
            found = _read_meta(conn).get("indexed_to")
    except sqlite3.Error:
        return None
    return None if found is None else int(found)


#: ``problem``'s answer for an index file that does not exist (a new log's is made without a word).
MISSING = "it is missing"


def problem(path: Path, log_id: str | None, newest: int, check: bool = True) -> str | None:
    """Why the index file cannot serve this log (None: it can): missing, not SQLite, damaged (``quick_check``,
    unless ``check`` is off), another format, another log's, or past the log's newest message id ``newest`` (the
    log restored from a backup: ids would be reused). The file is read through SQLite alone: this process's readers
    may have it attached, and closing a descriptor of it opened outside SQLite would drop their locks on it
    (https://www.sqlite.org/howtocorrupt.html, 2.2)."""
    if not path.exists():
        return MISSING
    try:
        with contextlib.closing(sqlite3.connect(_ro_uri(path), uri=True)) as conn:
            checked = conn.execute("PRAGMA quick_check(1)").fetchone()[0] if check else "ok"
            if checked != "ok":
                return f"it is damaged (quick_check: {' '.join(str(checked).split())[:200]})"
            found = _read_meta(conn)
    except sqlite3.Error as exc:
        if "file is not a database" in str(exc):
            return "it is not a SQLite file"
        return f"it cannot be read ({exc.__class__.__name__}: {_first_line(exc)})"
    if found.get("format") != INDEX_FORMAT:
        return f"it has another format ({found.get('format')!r}, this release writes {INDEX_FORMAT!r})"
    if found.get("log_id") != log_id:
        return "it was built from another log"
    if int(found.get("indexed_to") or 0) > newest:
        return "it runs past the log's newest message (was the log restored from a backup?)"
    return None


def open_for_indexing(log_path: Path, check: bool = True) -> tuple[sqlite3.Connection, str | None]:
    """The index's writing connection with the log attached read-only as ``log``, and why the index had to be
    rebuilt (None: the existing one is sound, or a new log's was made; ``check``: with ``quick_check``, as
    ``integrity_check`` says)."""
    log_id, newest = _log_identity(log_path)
    if log_id is None:
        raise StoreError(f"the log {log_path} has no log id: upgrade it (hl7bridge upgrade)")
    path = index_path(log_path)
    assert path is not None
    why = problem(path, log_id, newest, check)
    conn = create_index(path, log_id) if why is not None else _connect(path)
    conn.execute("ATTACH DATABASE ? AS log", (_ro_uri(log_path),))
    conn.execute("CREATE TEMP TABLE batch (id INTEGER PRIMARY KEY, received_at FLOAT, listener TEXT, ack_code TEXT, "
                 "search_terms TEXT, search_text TEXT)")  # fmt: skip
    return conn, None if why == MISSING and newest == 0 else why


@contextlib.contextmanager
def _writing(conn: sqlite3.Connection) -> Iterator[dict[str, str]]:
    """One write transaction on the index, its write lock taken before anything is read from the log (so a purge,
    which takes it too, is either wholly before this batch's read of the log or wholly after it); its meta."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield _read_meta(conn)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def index_batch(conn: sqlite3.Connection, limit: int = BATCH) -> int:
    """Index the next ``limit`` messages of the log (``conn`` from ``open_for_indexing``); how many it took.

    Set-based: the batch's rows are read from the log once into a temporary table (their last columns lie past the
    raw message: three reads of the log cost a fifth more), then SQLite copies each message's ``search_terms`` (keys
    in the table's order: in arrival order each lands on a random leaf) and ``search_text``, and counts the batch
    into ``message_minutes``; Python only
    orders it, so the thread holds the GIL for microseconds while the reactor answers senders. ACKs decided after
    their message was counted (``ack_mode = "dispatched"``, the log's ``ack_changes``) move their counts. A
    message older than ``purge_cutoff`` is indexed without its patient keys and words (a purge has taken them,
    or is about to)."""
    with _writing(conn) as found:
        last = int(found.get("indexed_to") or 0)
        acks_to = int(found.get("acks_to") or 0)
        fence = float(found.get("purge_cutoff") or 0)
        # One read of the log's rows (their last columns lie past the raw message), then three statements over it.
        conn.execute("DELETE FROM temp.batch")
        conn.execute(
            "INSERT INTO temp.batch SELECT id, received_at, listener, ack_code, search_terms, search_text "
            "FROM log.messages WHERE id > ? ORDER BY id LIMIT ?",
            (last, limit),
        )
        top, count = conn.execute("SELECT max(id), count(*) FROM temp.batch").fetchone()
        changes = conn.execute(
            "SELECT id, message_id, received_at, listener, old_code, new_code FROM log.ack_changes WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (acks_to, limit),
        ).fetchall()
        for _id, message_id, at, listener, old, new in changes:
            if message_id <= last:
                _move_count(conn, int(at // 60), listener, old, new, at)
        if changes:
            conn.execute("UPDATE meta SET value = ? WHERE key = 'acks_to'", (str(changes[-1][0]),))
        if not count:
            return 0
        bounds = {"low": last, "high": top, "fence": fence}
        conn.execute(
            "INSERT OR IGNORE INTO search_keys (key, message_id) SELECT j.value, m.id FROM temp.batch AS m, "
            "json_each(m.search_terms) AS j WHERE m.received_at >= :fence OR j.value NOT LIKE 'p:%' ORDER BY 1, 2",
            bounds,
        )
        conn.execute(
            "INSERT INTO messages_text (rowid, body) SELECT id, search_text FROM temp.batch "
            "WHERE search_text IS NOT NULL AND received_at >= :fence",
            bounds,
        )
        if fence:
            conn.execute("INSERT OR IGNORE INTO scrubbed (message_id) SELECT id FROM temp.batch WHERE received_at < :fence",
                         bounds)  # fmt: skip
        conn.execute(MINUTES_UPSERT.replace("FROM messages", "FROM temp.batch"), bounds)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'indexed_to'", (str(top),))
    return int(count)


def _move_count(conn: sqlite3.Connection, minute: int, listener: str, old: str | None, new: str | None,
                at: float) -> None:  # fmt: skip
    conn.execute(
        "UPDATE message_minutes SET count = count - 1 WHERE minute = ? AND ack_code = ? AND listener = ?",
        (minute, old or "", listener),
    )
    conn.execute(
        "INSERT INTO message_minutes (minute, ack_code, listener, count, last_at) VALUES (?, ?, ?, 1, ?) "
        "ON CONFLICT (minute, ack_code, listener) DO UPDATE SET count = count + 1, last_at = max(last_at, excluded.last_at)",
        (minute, new or "", listener, at),
    )


def catch_up(log: Path | Engine, limit: int = BATCH, once: bool = False) -> int:
    """Index the messages logged so far, or one batch of ``limit`` (``once``), as the service's thread does (tests,
    benchmarks); how many were added."""
    log_path = Path(str(log.url.database)) if isinstance(log, Engine) else log
    conn, _why = open_for_indexing(log_path)
    total = 0
    try:
        while done := index_batch(conn, limit):
            total += done
            if once:
                break
    finally:
        conn.close()
    return total


# --- retention ---------------------------------------------------------------------------------------------------


def scrub(log_conn: Connection, ids: list[int], cutoff: float) -> None:
    """Before a purge of ``ids`` (messages older than ``cutoff``) commits in the log: remove their patient keys and
    words from the index, and raise its ``purge_cutoff`` so no batch indexes them again from an older read of the
    log. Committed first, so a crash in between leaves a message merely unfindable by patient or words, never a
    patient id kept past retention. ``log_conn`` holds the log's write lock (two purges never scrub the same
    message twice), and the words deleted are read from it: FTS5 needs the words it holds to delete them."""
    path = index_path(log_conn.engine)
    if path is None or not ids:
        return
    log_id = get_meta(log_conn, LOG_ID_KEY)
    if log_id is None:
        return
    if not path.exists():
        # Not yet built: created now with the cutoff, so the indexer's first batches leave these out.
        create_index(path, log_id).close()
    with contextlib.closing(_connect(path)) as conn, _writing(conn) as found:
        if found.get("log_id") != log_id or found.get("format") != INDEX_FORMAT:
            return  # another log's or format's file: the service rebuilds it, from the log as purged
        indexed_to = int(found.get("indexed_to") or 0)
        if cutoff > float(found.get("purge_cutoff") or 0):
            conn.execute("UPDATE meta SET value = ? WHERE key = 'purge_cutoff'", (repr(cutoff),))
        conn.execute("DELETE FROM scrubbed WHERE message_id < ?", (min(ids),))
        held = [i for i in ids if i <= indexed_to]
        if not held:
            return
        marks = ",".join("?" * len(held))
        done = {r[0] for r in conn.execute(f"SELECT message_id FROM scrubbed WHERE message_id IN ({marks})", held)}
        rows = log_conn.exec_driver_sql(
            f"SELECT id, search_terms, search_text FROM messages WHERE id IN ({marks})", tuple(held)
        ).all()
        keys = [(k, row.id) for row in rows for k in orjson.loads(row.search_terms or "[]") if k.startswith("p:")]
        conn.executemany("DELETE FROM search_keys WHERE key = ? AND message_id = ?", keys)
        words = [(row.id, row.search_text) for row in rows if row.search_text and row.id not in done]
        conn.executemany("INSERT INTO messages_text (messages_text, rowid, body) VALUES ('delete', ?, ?)", words)
        conn.executemany("INSERT OR IGNORE INTO scrubbed (message_id) VALUES (?)", [(i,) for i in held])


def compact_index(engine: Engine) -> None:
    """After a purge that scrubbed the index: FTS5 merges its segments into one (a deleted word stays in the
    segment that held it until a merge) and the WAL is copied in and truncated, so the purged words leave the
    file's bytes. Once per scrub: the merge rewrites the whole text index."""
    path = index_path(engine)
    if path is None or not problem_free(path):
        return
    with contextlib.closing(_connect(path)) as conn:
        newest = conn.execute("SELECT max(message_id) FROM scrubbed").fetchone()[0]
        done = conn.execute("SELECT value FROM meta WHERE key = 'optimized_to'").fetchone()
        if newest is not None and (done is None or int(done[0]) < newest):
            conn.execute("INSERT INTO messages_text (messages_text) VALUES ('optimize')")
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('optimized_to', ?)", (str(newest),))
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def problem_free(path: Path) -> bool:
    """Whether ``path`` is an index file this release writes (not whether it is this log's: see ``problem``)."""
    if not path.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(_ro_uri(path), uri=True)) as conn:
            return _read_meta(conn).get("format") == INDEX_FORMAT
    except sqlite3.Error:
        return False


# --- the service's thread ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IndexState:
    """What ``/status`` says of the index: being rebuilt (and why), failing, or neither."""

    rebuilding: str | None = None
    error: str | None = None
    indexed_to: int = 0

    @property
    def problem(self) -> str | None:
        """One sentence for ``/status`` (no patient data), or None."""
        if self.rebuilding:
            return (f"being rebuilt from the log ({self.rebuilding}), {self.indexed_to} message id(s) done; searches "
                    "meanwhile answer from what it holds and the 5,000 newest messages")  # fmt: skip
        if self.error:
            return f"new messages cannot be indexed ({self.error})"
        return None


class Indexer:
    """The thread that keeps the index file current: a batch a second, at once again after a full one."""

    def __init__(self, log_path: Path, interval: float = INTERVAL, batch: int = BATCH, check: bool = True) -> None:
        self.log_path = log_path
        self.check = check
        self.interval = interval
        self.batch = batch
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="hl7bridge-index", daemon=True)
        self._state = IndexState()
        #: A failing batch repeats every second: one line a minute, with the count of repeats.
        self._failures = RefusalLog(log, MonotonicClock())
        #: ``time.monotonic()`` of the last ``quick_check`` of the file (None: not yet).
        self._checked_at: float | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def state(self) -> IndexState:
        return self._state

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        pause = 0.0
        try:
            while not self._stop.wait(pause):
                pause = self.interval
                try:
                    if conn is None:
                        conn, why = open_for_indexing(self.log_path, self._check_now())
                        if why is not None:
                            log.warning("search index %s%s: rebuilding it from the log in the background (searches "
                                        "meanwhile read the messages it holds so far, and at most the 5,000 newest "
                                        "directly)", self.log_path, SUFFIX if why == MISSING else f" ({why})")  # fmt: skip
                            self._state = IndexState(rebuilding=why)
                    done = index_batch(conn, self.batch)
                    indexed_to = int(conn.execute("SELECT value FROM meta WHERE key = 'indexed_to'").fetchone()[0])
                    rebuilding = self._state.rebuilding if done == self.batch else None
                    if self._state.rebuilding and rebuilding is None:
                        log.info("search index rebuilt: %d messages", indexed_to)
                    self._state = IndexState(rebuilding=rebuilding, indexed_to=indexed_to)
                    pause = 0.0 if done == self.batch else self.interval
                except Exception as exc:  # noqa: BLE001 - the thread must outlive a failing batch
                    error = f"{exc.__class__.__name__}: {_first_line(exc)}"
                    self._state = IndexState(rebuilding=self._state.rebuilding, error=error,
                                             indexed_to=self._state.indexed_to)  # fmt: skip
                    self._failures.warn(("search-index",), "search index: new messages cannot be indexed (searches "
                                        "by key or words read them directly while few, then miss them): %s", error)  # fmt: skip
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()

    def _check_now(self) -> bool:
        """Whether this opening checks the whole file (``quick_check``): the first, and after a failing batch at
        most once a minute, as a batch failing every second reopens the file every second."""
        now = time.monotonic()
        if not self.check or (self._checked_at is not None and now - self._checked_at < CHECK_EVERY):
            return False
        self._checked_at = now
        return True
