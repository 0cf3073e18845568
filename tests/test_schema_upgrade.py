"""The schema upgrade: all or nothing per step (DDL included), safe to run again, not stopped by a damaged row,
one line when it fails; and only `serve` and `hl7bridge upgrade` upgrade, never another CLI command."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from hl7bridge.store import SCHEMA_VERSION, StoreError, audit, open_engine, schema
from hl7bridge.store.search_index import catch_up, index_path

from .conftest import ROOT, start_service

GOOD = {"placer_appointment_id": "PL-1", "patient_ids": [{"value": "MRN-1"}], "names": [{"family": "ORCHARD"}]}
#: Summaries a damaged log may hold: not JSON, not UTF-8, not an object, an object of the wrong shape.
DAMAGED: tuple[Any, ...] = ("{not json", b"\xff\xfe{", "[1, 2]", json.dumps({"patient_ids": "MRN-2", "names": 3}))


def log_at(path: Path, version: int) -> str:
    """A log at an older schema version, as the releases of that version left it: the first released schema and
    the upgrade steps up to ``version``."""
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript((ROOT / "tests" / "data" / "schema_v1.sql").read_text())
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for step in range(2, version + 1):
            schema.MIGRATIONS[step](conn)
        conn.exec_driver_sql("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    engine.dispose()
    path.chmod(0o600)
    return f"sqlite:///{path}"


def add_messages(path: Path, summaries: list[Any]) -> None:
    with sqlite3.connect(path) as conn:
        for number, summary in enumerate(summaries, 1):
            conn.execute(
                "INSERT INTO messages (received_at, listener, peer, status, control_id, summary) "
                "VALUES (1, 'main', 'p', 'accepted', ?, CAST(? AS TEXT))",  # bytes: text, not UTF-8
                (f"C-{number}", json.dumps(summary) if isinstance(summary, dict) else summary),
            )


def version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])


def columns(path: Path, table: str) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}


def shape(path: Path, table: str) -> tuple[list[Any], ...]:
    """A table's columns, indexes and foreign keys as SQLite reports them (indexes by name: SQLAlchemy creates
    them in no fixed order)."""
    with sqlite3.connect(path) as conn:
        return (conn.execute(f"PRAGMA table_info({table})").fetchall(),
                sorted(row[1:] for row in conn.execute(f"PRAGMA index_list({table})")),
                conn.execute(f"PRAGMA foreign_key_list({table})").fetchall())  # fmt: skip


def keys(path: Path) -> dict[str, list[str]]:
    """The search keys of each message, from the log's index file (built from the log here, as the service does)."""
    catch_up(path)
    with sqlite3.connect(path) as conn:
        conn.execute("ATTACH DATABASE ? AS search", (str(index_path(path)),))
        found: dict[str, list[str]] = {}
        for control_id, key in conn.execute(
            "SELECT m.control_id, k.key FROM search.search_keys AS k JOIN messages AS m ON m.id = k.message_id "
            "ORDER BY 2"
        ):
            found.setdefault(control_id, []).append(key)
        return found


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)  # fmt: skip


@pytest.mark.parametrize("start", [1, 3, 5])
def test_an_older_log_with_damaged_summaries_upgrades_to_current(tmp_path: Path, start: int) -> None:
    path = tmp_path / "log.db"
    log_at(path, start)
    add_messages(path, [GOOD, *DAMAGED])
    open_engine(f"sqlite:///{path}").dispose()
    assert version(path) == SCHEMA_VERSION
    assert {"purged_at", "search_terms", "search_text"} <= columns(path, "messages")
    assert {"resolution", "resolution_audit", "uncertain"} <= columns(path, "commands")
    assert "audit" in tables(path)
    assert not {"search_keys", "messages_text", "message_minutes", "messages_search_purge"} & tables(path)
    assert {"users", "api_tokens", "sessions", "ix_api_tokens_user", "ix_sessions_user"} <= tables(path)
    found = keys(path)
    assert found.pop("C-1") == ["a:PL-1", "c:C-1", "p:MRN-1"]
    assert found == {f"C-{n}": [f"c:C-{n}"] for n in range(2, len(DAMAGED) + 2)}  # no patient terms, still listed


def test_a_v6_log_gets_the_accounts_tables_and_keeps_its_messages_and_audit_chain(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    url = log_at(path, 6)
    add_messages(path, [GOOD])
    engine = create_engine(url)  # not open_engine: that would upgrade
    with engine.begin() as conn:
        # Today's audit.record also writes the timeline's audit_refs (a later step): give the v6 log that table.
        schema.audit_refs.create(conn, checkfirst=True)
        audit.record(conn, audit.AuditEntry("alice", "cli", "retry", "command", (1,)))
    engine.dispose()
    done = cli("upgrade", "--database", url, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == f"upgraded the log from schema 6 to {SCHEMA_VERSION}\n"
    assert {"users", "api_tokens", "sessions", "ix_api_tokens_user", "ix_sessions_user"} <= tables(path)
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT control_id FROM messages").fetchall() == [("C-1",)]
    fresh = tmp_path / "new.db"
    open_engine(f"sqlite:///{fresh}").dispose()
    for table in ("users", "api_tokens", "sessions"):
        assert shape(path, table) == shape(fresh, table)
    verified = cli("audit", "verify", "--database", url, cwd=tmp_path)
    assert verified.returncode == 0 and "intact: 1 entries" in verified.stdout


def test_a_step_failing_half_way_leaves_the_log_whole_and_a_second_open_upgrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "log.db"
    url = log_at(path, 5)
    add_messages(path, [GOOD])

    def fail(*_args: Any) -> tuple[str | None, str | None]:
        raise RuntimeError("disk on fire")

    # The backfill of step 6, after its ALTERs and CREATEs.
    monkeypatch.setattr(schema, "search_terms", fail)
    with pytest.raises(StoreError) as refused:
        open_engine(url)
    line = str(refused.value)
    assert "\n" not in line and "from schema 5 to 6" in line and "RuntimeError: disk on fire" in line
    assert "left whole at schema 5" in line and "hl7bridge upgrade" in line
    assert version(path) == 5
    assert not {"search_terms", "search_text"} & columns(path, "messages")
    assert not {"search_keys", "messages_text", "ix_messages_not_accepted_id"} & tables(path)
    monkeypatch.undo()
    open_engine(url).dispose()
    assert version(path) == SCHEMA_VERSION and keys(path) == {"C-1": ["a:PL-1", "c:C-1", "p:MRN-1"]}


def test_a_step_finds_what_an_earlier_run_left_and_goes_on(tmp_path: Path) -> None:
    """A log left half-upgraded by an earlier release (its DDL committed one statement at a time) upgrades."""
    path = tmp_path / "log.db"
    url = log_at(path, 4)
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE commands ADD COLUMN resolution VARCHAR(16)")
        conn.execute("ALTER TABLE messages ADD COLUMN search_terms TEXT")
    open_engine(url).dispose()
    assert version(path) == SCHEMA_VERSION and "resolution_audit" in columns(path, "commands")


def test_only_serve_and_upgrade_upgrade_the_log(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    url = log_at(path, 5)
    add_messages(path, [GOOD])
    refusal = (
        f"the log is at schema 5 and this hl7bridge writes {SCHEMA_VERSION}: restart the service "
        "(`serve` upgrades the log in place) or run `hl7bridge upgrade`"
    )
    for command in (["stats"], ["log", "list"], ["dead-letters", "list"]):
        done = cli(*command, "--database", url, cwd=tmp_path)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1] == f"hl7bridge: {refusal}"
    status = cli("status", "--database", url, cwd=tmp_path)  # its own exit codes: 4, cannot tell
    assert status.returncode == 4 and refusal in status.stdout
    assert version(path) == 5 and "search_terms" not in columns(path, "messages")
    done = cli("upgrade", "--database", url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"upgraded the log from schema 5 to {SCHEMA_VERSION}\n"
    assert version(path) == SCHEMA_VERSION and keys(path) == {"C-1": ["a:PL-1", "c:C-1", "p:MRN-1"]}
    again = cli("upgrade", "--database", url, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == f"the log is at schema {SCHEMA_VERSION}, current\n"
    assert cli("stats", "--database", url, cwd=tmp_path).returncode == 0


def test_upgrade_never_creates_a_log(tmp_path: Path) -> None:
    done = cli("upgrade", "--database", f"sqlite:///{tmp_path / 'nowhere.db'}", cwd=tmp_path)
    assert done.returncode == 2 and "there is no message log" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "nowhere.db").exists()


def test_serve_upgrades_the_log_in_place(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log.db"
    path.parent.mkdir(mode=0o700)
    log_at(path, 5)
    add_messages(path, [GOOD])
    running = start_service(tmp_path)
    try:
        assert version(path) == SCHEMA_VERSION
        assert [m["control_id"] for m in running.log("--patient", "MRN-1")] == ["C-1"]
    finally:
        assert f"upgraded the message log to schema version {SCHEMA_VERSION}" in running.stop()


def test_an_upgrade_that_cannot_get_the_write_lock_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    url = log_at(path, 5)
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        done = cli("upgrade", "--database", url, cwd=tmp_path)
    finally:
        holder.close()
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "from schema 5 to 6" in line and "database is locked" in line and "left whole at schema 5" in line
    assert version(path) == 5 and "search_terms" not in columns(path, "messages")
