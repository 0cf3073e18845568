"""The search index of a SQLite log in a file of its own (``store.search_index``): retention scrubs it first,
it is rebuilt when missing, damaged or another log's, and a real schema-9 log upgrades to the same answers."""

from __future__ import annotations

import gzip
import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from hl7bridge.store import messages, open_engine, purge, search_terms
from hl7bridge.store.search_index import Indexer, catch_up, index_path, indexed_to, open_for_indexing, scrub
from hl7bridge.workflow.dashboard import dashboard
from hl7bridge.workflow.search import Filters, search
from hl7bridge.workflow.status import Facts, assess

from .conftest import ROOT, fixture_bytes, start_service, unique_control, wait_until

NOW = time.time()
#: Family names that share no first letter, so FTS5 stores each whole (it keeps a term as the prefix it shares with
#: the previous one and the rest): a name left in the index file is found in its bytes.
NAMES = ("alderton", "birchall", "cedarman", "dunmore", "elmsley", "fernside", "gorsefield", "hawthorne",
         "ivybridge", "juniperly", "kestrelby", "larchmont", "maplethorpe", "nettleford", "oakhurst", "pinewood",
         "quinceby", "rowanberry", "sycamoreton", "thistlewood")  # fmt: skip
OLD = NOW - 40 * 86400


def fill(engine: Engine, count: int = 20) -> None:
    """``count`` messages: the first half 40 days old (patient MRN-OLD-n), the rest recent (MRN-NEW-n)."""
    rows = []
    for n in range(count):
        old = n < count // 2
        summary = {"placer_appointment_id": f"PL-{n}", "patient_ids": [{"value": f"MRN-{'OLD' if old else 'NEW'}-{n}"}],
                   "names": [{"family": NAMES[n].upper()}], "reason": "Check up"}  # fmt: skip
        terms, words = search_terms(f"C-{n}", "EPIC", "NORTH", summary)
        rows.append({"received_at": (OLD if old else NOW) + n, "listener": "main", "peer": "p", "status": "accepted",
                     "ack_code": "AA", "control_id": f"C-{n}", "summary": json.dumps(summary), "search_terms": terms,
                     "search_text": words})  # fmt: skip
    with engine.begin() as conn:
        conn.execute(messages.insert(), rows)


def found(engine: Engine, **filters: object) -> list[str]:
    return sorted(r["control_id"] for r in search(engine, Filters(**filters)).rows)  # type: ignore[arg-type]


def index_bytes(engine: Engine) -> bytes:
    """The index file's bytes after a checkpoint (what a backup or a stolen disk holds)."""
    path = index_path(engine)
    assert path is not None
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.read_bytes() + (Path(f"{path}-wal").read_bytes() if Path(f"{path}-wal").exists() else b"")


def text_index_sound(engine: Engine) -> None:
    with sqlite3.connect(index_path(engine)) as conn:
        conn.execute("INSERT INTO messages_text (messages_text, rank) VALUES ('integrity-check', 1)")


def test_the_log_holds_no_index_and_the_index_file_is_private(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    fill(engine)
    assert catch_up(engine) == 20
    path = index_path(engine)
    assert path == tmp_path / "log.db.search" and path.stat().st_mode & 0o777 == 0o600
    with sqlite3.connect(tmp_path / "log.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
    assert not {"search_keys", "messages_text", "message_minutes"} & names
    assert found(engine, patient="MRN-NEW-12") == ["C-12"] and found(engine, text=NAMES[15], since=0.0) == ["C-15"]


def test_a_purge_leaves_no_purged_patient_in_the_index_file_and_keeps_the_other_keys(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    fill(engine)
    catch_up(engine)
    before = index_bytes(engine)
    assert b"MRN-OLD-3" in before and NAMES[3].encode() in before  # FTS5 keeps words folded
    counts = purge(engine, NOW - 30 * 86400)
    assert counts.messages == 10
    after = index_bytes(engine)
    for n in range(10):
        assert f"MRN-OLD-{n}".encode() not in after and NAMES[n].encode() not in after
    assert b"MRN-NEW-12" in after and NAMES[12].encode() in after
    text_index_sound(engine)
    assert found(engine, patient="MRN-OLD-3") == [] and found(engine, text=NAMES[3], since=0.0) == []
    assert found(engine, appointment="PL-3") == ["C-3"] and found(engine, control_id="C-4") == ["C-4"]
    assert found(engine, patient="MRN-NEW-12") == ["C-12"] and found(engine, text=NAMES[12], since=0.0) == ["C-12"]
    # The index rebuilt from the purged log gives the same answers.
    index_path(engine).unlink()
    catch_up(engine)
    assert b"MRN-OLD-3" not in index_bytes(engine) and found(engine, appointment="PL-3") == ["C-3"]


def test_a_crash_between_the_scrub_and_the_purge_leaves_the_message_unfindable_and_the_index_sound(
    tmp_path: Path,
) -> None:
    """The index is scrubbed and committed first; the log's purge then fails (a crash): the message keeps its
    patient data in the log but is not found by it, and the purge run again does not delete its words twice."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    fill(engine)
    catch_up(engine)
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        scrub(conn, [1, 2], NOW - 30 * 86400)
        conn.rollback()
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM messages WHERE purged_at IS NULL").scalar() == 20
    assert found(engine, patient="MRN-OLD-1") == [] and found(engine, text=NAMES[1], since=0.0) == []
    assert found(engine, patient="MRN-OLD-3") == ["C-3"]
    assert purge(engine, NOW - 30 * 86400).messages == 10
    text_index_sound(engine)
    assert b"MRN-OLD-1" not in index_bytes(engine) and found(engine, appointment="PL-1") == ["C-1"]


def test_messages_a_purge_is_taking_are_never_indexed_from_an_older_read(tmp_path: Path) -> None:
    """A purge raises the index's cutoff in its scrub: a batch after it leaves the old messages' patient keys and
    words out even though the log still holds them (its purge not yet committed), and a later scrub of those
    messages deletes no words the index never held."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    fill(engine)
    catch_up(engine, limit=2, once=True)  # messages 1 and 2 indexed, the rest not yet
    with engine.connect() as conn:
        conn.exec_driver_sql("BEGIN IMMEDIATE")
        scrub(conn, list(range(1, 11)), NOW - 30 * 86400)
        conn.rollback()  # the purge never commits: the log keeps everything
    assert catch_up(engine) == 18
    assert b"MRN-OLD-7" not in index_bytes(engine) and b"MRN-NEW-17" in index_bytes(engine)
    assert found(engine, appointment="PL-7") == ["C-7"] and found(engine, patient="MRN-NEW-17") == ["C-17"]
    purge(engine, NOW - 30 * 86400)
    text_index_sound(engine)


@pytest.mark.parametrize("damage", ["missing", "garbage", "corrupt", "foreign", "old_format", "restored_log"])
def test_an_unusable_index_is_rebuilt_from_the_log_in_the_background(tmp_path: Path, damage: str) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    fill(engine)
    catch_up(engine)
    path = index_path(engine)
    assert path is not None
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"not a database at all" * 100)
    elif damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[4096 + 100 : 4096 * 3] = b"\xa5" * (4096 * 2 - 100)
        path.write_bytes(bytes(data))
    elif damage == "foreign":
        other = open_engine(f"sqlite:///{tmp_path / 'other.db'}")
        catch_up(other)
        shutil.copy(index_path(other), path)
    elif damage == "old_format":
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = '0' WHERE key = 'format'")
    else:  # the log restored from a backup older than the index: its next messages would reuse indexed ids
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE meta SET value = '25' WHERE key = 'indexed_to'")
    if damage != "missing":  # searches meanwhile read the log's newest messages, within their bound
        assert found(engine, patient="MRN-NEW-12") == ["C-12"]
    conn, why = open_for_indexing(tmp_path / "log.db")
    conn.close()
    assert why is not None and "MRN" not in why
    indexer = Indexer(tmp_path / "log.db", interval=0.05)
    indexer.start()
    try:
        wait_until(lambda: indexer.state().indexed_to == 20 and indexer.state().rebuilding is None)
    finally:
        indexer.stop()
    assert found(engine, patient="MRN-OLD-3") == ["C-3"] and found(engine, text=NAMES[15], since=0.0) == ["C-15"]
    text_index_sound(engine)


def test_the_status_names_a_rebuild() -> None:
    from hl7bridge.store.search_index import IndexState

    problem = IndexState(rebuilding="it is damaged (quick_check: ...)", indexed_to=5000).problem
    status = assess(Facts(now=NOW, search_index_problem=problem))
    assert status.state == "degraded" and status.reasons[0].startswith("The search index: being rebuilt")
    assert status.to_json()["search_index"] == {"ok": False, "problem": problem}
    assert IndexState(indexed_to=9).problem is None


@pytest.mark.parametrize("fixture", ["schema_v9.db.gz", "schema_v12.db.gz"])
def test_a_real_older_log_upgrades_to_the_same_search_answers(tmp_path: Path, fixture: str) -> None:
    """Both were written by releases that kept the index in the log (see ``schema_v9.py``): 40 messages, 30 indexed,
    5 purged, one ACK decided later."""
    path = tmp_path / "log.db"
    path.write_bytes(gzip.decompress((ROOT / "tests" / "data" / fixture).read_bytes()))
    path.chmod(0o600)
    with sqlite3.connect(path) as conn:
        old_keys = conn.execute("SELECT key, message_id FROM search_keys ORDER BY 1, 2").fetchall()
        old_words = {w: conn.execute("SELECT rowid FROM messages_text WHERE messages_text MATCH ? ORDER BY 1",
                                     (w,)).fetchall() for w in ("appleby", "bramble", "orchard", "post")}  # fmt: skip
        old_minutes = conn.execute("SELECT minute, ack_code, listener, count FROM message_minutes WHERE count > 0 "
                                   "ORDER BY 1, 2, 3").fetchall()  # fmt: skip
    engine = open_engine(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert conn.execute("SELECT value FROM meta WHERE key = 'search_indexed_to'").fetchone() is None
    assert not {"search_keys", "messages_text", "message_minutes", "messages_search_purge"} & names
    assert catch_up(engine) == 40
    with sqlite3.connect(index_path(engine)) as conn:
        keys = conn.execute("SELECT key, message_id FROM search_keys WHERE message_id <= 30 ORDER BY 1, 2").fetchall()
        words = {w: conn.execute("SELECT rowid FROM messages_text WHERE messages_text MATCH ? AND rowid <= 30 "
                                 "ORDER BY 1", (w,)).fetchall() for w in old_words}  # fmt: skip
        minutes = conn.execute("SELECT minute, ack_code, listener, count FROM message_minutes WHERE count > 0 "
                               "ORDER BY 1, 2, 3").fetchall()  # fmt: skip
    assert keys == old_keys and words == old_words and words["orchard"] == []
    # The old log counted the indexed 30 (the AE decided later moved); the new index counts all 40.
    assert sum(m[3] for m in minutes) == 40 and {m for m in old_minutes} <= {m for m in minutes} | {
        m for m in old_minutes if m[0] > max(o[0] for o in old_minutes) - 100
    }
    assert ("AE" in {m[1] for m in minutes}) and found(engine, patient="MRN-OLD") == []
    assert found(engine, appointment="PL-2") == ["C-2"] and len(found(engine, patient="MRN-A")) == 18
    shown = dashboard(engine, minutes=1440)
    assert shown.uncounted == 0 and shown.window_counts.get("AE") == 1


def test_the_running_service_indexes_in_its_own_thread_and_rebuilds_a_damaged_index(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    try:
        for control in ("X-1", "X-2"):
            service.request(unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), control))
        path = tmp_path / "var" / "log.db.search"
        wait_until(lambda: b"X-2" in _read(path) + _read(Path(f"{path}-wal")), message="indexed")
        # The index's write lock held elsewhere (a purge scrubbing it, a long rebuild): messages are still logged
        # and answered, each committed on the log alone; the index catches up once the lock is free.
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            for control in ("Y-1", "Y-2", "Y-3"):
                answer = service.request(unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), control))
                assert b"MSA|AA|" in answer
        finally:
            holder.close()
        engine = open_engine(service.url, create=False)
        wait_until(lambda: found(engine, control_id="Y-3") == ["Y-3"] and indexed_to(service.database) == 5,
                   message="indexed after the lock")  # fmt: skip
    finally:
        first = service.stop()
    assert "search index" not in first  # a new log's index is made without a warning (nothing to rebuild)
    path.write_bytes(b"garbage" * 1000)
    service = start_service(tmp_path)
    try:
        wait_until(lambda: _read(path).startswith(b"SQLite format 3"), message="rebuilt")
        engine = open_engine(service.url, create=False)
        wait_until(lambda: found(engine, control_id="X-2") == ["X-2"], message="found after the rebuild")
    finally:
        stderr = service.stop()
    assert "search index" in stderr and "rebuilding it from the log" in stderr and "not a SQLite file" in stderr


def _read(path: Path) -> bytes:
    """A file's bytes, or none while it does not exist (the indexer replaces a damaged one)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
