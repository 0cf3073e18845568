"""The operators' audit log is append-only in effect: any edit or deletion shows in ``verify``."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys

import pytest

from hl7bridge.store import audit, open_engine
from hl7bridge.store.audit import AuditEntry


def _append(url: str, actor: str, count: int) -> None:
    engine = open_engine(url)
    for i in range(count):
        with engine.begin() as conn:
            audit.record(conn, AuditEntry(actor, "cli", "retry", "command", (i,), reason="after the fix"))


@pytest.fixture
def url(database_url: str) -> str:
    """Each test on a SQLite file and on PostgreSQL."""
    return database_url


def test_entries_chain_and_read_back_newest_first(url: str) -> None:
    _append(url, "alice", 3)
    engine = open_engine(url)
    found = audit.entries(engine)
    assert [e.ids for e in found] == [(2,), (1,), (0,)]
    assert found[0].prev_hash == found[1].hash and found[2].prev_hash == audit.GENESIS
    assert found[0].actor == "alice" and found[0].reason == "after the fix"
    check = audit.verify(engine)
    assert (check.checked, check.broken_at, check.problem, check.head) == (3, None, "", found[0].hash)
    assert [e.ids for e in audit.entries(engine, before=found[0].id, limit=1)] == [(1,)]


@pytest.mark.parametrize(
    ("tamper", "broken_at", "says"),
    [
        ("UPDATE audit SET reason = 'nothing to see' WHERE id = 2", 2, "edited"),
        ("UPDATE audit SET ids = '[99]' WHERE id = 1", 1, "edited"),
        ("UPDATE audit SET details = 'not json' WHERE id = 3", 3, "edited"),
        ("DELETE FROM audit WHERE id = 2", 3, "deleted or edited"),
        ("DELETE FROM audit WHERE id = 4", None, "newest entries were deleted"),
    ],
)
def test_an_edited_or_deleted_entry_breaks_the_chain(url: str, tamper: str, broken_at: int | None, says: str) -> None:
    _append(url, "alice", 4)
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(tamper)
    check = audit.verify(engine)
    assert check.broken_at == broken_at and says in check.problem


def test_appends_from_two_processes_keep_one_chain(url: str) -> None:
    open_engine(url).dispose()
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append, args=(url, name, 40)) for name in ("alice", "bob")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    engine = open_engine(url)
    check = audit.verify(engine)
    assert (check.checked, check.problem) == (80, "")
    assert {e.actor for e in audit.entries(engine, limit=100)} == {"alice", "bob"}


def _cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hl7bridge", "audit", *args, "--database", url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_the_audit_cli_lists_pages_and_verifies(url: str) -> None:
    _append(url, "alice", 3)
    listed = _cli(url, "list", "--limit", "2")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert "alice" in lines[1] and "retry" in lines[1] and "“after the fix”" in lines[1]
    assert len(lines) == 4 and lines[-1] == "more entries are older: add --before 2"
    page = json.loads(_cli(url, "list", "--before", "2", "--json").stdout)
    assert [e["ids"] for e in page["entries"]] == [[0]] and page["more"] is False
    ok = _cli(url, "verify")
    head = audit.entries(open_engine(url), limit=1)[0].hash
    assert ok.returncode == 0 and ok.stdout.splitlines() == [
        "audit log intact: 3 entries, each chained to the one before",
        f"head {head} (keep it elsewhere; 'audit verify --expect' checks it later)",
    ]
    with open_engine(url).begin() as conn:
        conn.exec_driver_sql("UPDATE audit SET actor = 'mallory' WHERE id = 2")
    broken = _cli(url, "verify")
    assert broken.returncode == 1 and "entry 2 does not match its hash: it was edited" in broken.stderr
    assert json.loads(_cli(url, "verify", "--json").stdout)["broken_at"] == 2


def test_an_anchored_head_exposes_a_rewritten_history(url: str) -> None:
    """Whoever can write the database can rewrite every hash after an edit; a head kept elsewhere cannot be."""
    _append(url, "alice", 3)
    engine = open_engine(url)
    anchor = audit.verify(engine).head
    _append(url, "bob", 2)
    assert audit.verify(engine, expect=anchor).problem == ""
    with engine.begin() as conn:
        rows = conn.exec_driver_sql("SELECT * FROM audit ORDER BY id").mappings().all()
        conn.exec_driver_sql("DELETE FROM audit")
        conn.exec_driver_sql("DELETE FROM meta WHERE key = 'audit_head'")
        for row in rows:
            forged = AuditEntry(
                "mallory" if row["id"] == 2 else row["actor"], row["channel"], row["action"], row["target"],
                tuple(json.loads(row["ids"])), row["reason"], json.loads(row["details"]),
            )  # fmt: skip
            audit.record(conn, forged, now=row["at"])
    rewritten = audit.verify(engine)
    assert rewritten.problem == "", "a full rewrite is invisible to the chain alone"
    check = audit.verify(engine, expect=anchor)
    assert "the expected hash is not in the chain" in check.problem
    assert _cli(url, "verify", "--expect", anchor).returncode == 1


def test_appends_after_a_deleted_last_entry_show_the_gap(url: str) -> None:
    _append(url, "alice", 3)
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit WHERE id = 3")
    _append(url, "bob", 1)
    check = audit.verify(engine)
    assert check.broken_at == 4 and "deleted or edited" in check.problem
    assert [e.id for e in audit.entries(engine)] == [4, 2, 1]
