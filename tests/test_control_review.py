"""Review fixes: the purge audited from its start, the dispatch target recorded through the writer, the pid file
and its checks, reload's one verdict, reconcile searching where the service dispatches."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from hl7bridge.store import AuditEntry, audit, open_engine, purge


def test_an_interrupted_purge_is_already_audited(tmp_path: Path) -> None:
    """The entry commits with the first slice: the slice that deletes patient data is never unrecorded."""
    path = tmp_path / "log.db"
    open_engine(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as conn:
        for _ in range(3):
            conn.execute("INSERT INTO messages (received_at, listener, peer, status, raw) "
                         "VALUES (0, 'main', 'p', 'accepted', x'4d5348')")  # fmt: skip
        # The second slice fails as a crash or a full disk would.
        conn.execute("CREATE TRIGGER interrupt BEFORE UPDATE OF purged_at ON messages WHEN NEW.id = 2 "
                     "BEGIN SELECT RAISE(ABORT, 'interrupted'); END")  # fmt: skip
    engine = open_engine(f"sqlite:///{path}", create=False)
    with pytest.raises(Exception, match="interrupted"):
        purge(
            engine, 1000.0, limit=1, audited=AuditEntry("carol", "cli", "purge", "log", details={"older_than": "30d"})
        )
    with engine.connect() as conn:
        purged = [r[0] for r in conn.exec_driver_sql("SELECT id FROM messages WHERE raw IS NULL")]
    assert purged == [1]
    (entry,) = audit.entries(engine)
    assert (entry.action, entry.actor) == ("purge", "carol")
    assert entry.details["cutoff"] == 1000.0
    assert entry.details["found_messages"] == 3
    assert entry.details["older_than"] == "30d"
