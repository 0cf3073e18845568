"""Review fixes: the purge audited from its start, the dispatch target recorded through the writer, the pid file
and its checks, reload's one verdict, reconcile searching where the service dispatches."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from hl7bridge.store import AuditEntry, audit, open_engine, purge
from hl7bridge.workflow.dispatch_target import dispatch_target

from .conftest import RunningService, segments, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, service_toml, settled, siu


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


def test_the_service_starts_while_a_cli_holds_the_write_lock_and_records_its_target_after(tmp_path: Path) -> None:
    """Recording where it dispatches goes through the writer: start-up neither waits for the lock nor fails."""
    database = tmp_path / "var" / "log.db"
    database.parent.mkdir()
    open_engine(f"sqlite:///{database}").dispose()
    holder = sqlite3.connect(database, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(15.0, holder.rollback)
    release.start()
    try:
        service = start_service(tmp_path, service_toml("http://127.0.0.1:9"), env=TOKEN)
        assert holder.in_transaction, "the service started only once the lock was given up"
    finally:
        release.cancel()
        holder.rollback()
        holder.close()
    try:
        wait_until(lambda: recorded_target(database) == "http://127.0.0.1:9", message="target recorded")
    finally:
        service.stop()


def recorded_target(database: Path) -> str | None:
    engine = open_engine(f"sqlite:///{database}", create=False)
    try:
        return dispatch_target(engine, "").base_url or None
    finally:
        engine.dispose()


def reconcile(service: RunningService, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hl7bridge", "reconcile", "--config", str(service.config), "--database", service.url]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env={**os.environ, **TOKEN})


def test_reconcile_searches_where_the_service_dispatches_not_the_config(tmp_path: Path) -> None:
    """``serve --api-url`` elsewhere than api.base_url: reconcile refuses until the API is named, then searches
    it, so a triggered appointment is not reported missing."""
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    service = start_service(tmp_path, service_toml("http://127.0.0.1:9"), env=TOKEN, extra=["--api-url", sandbox.url])
    try:
        assert segments(service.request(siu("S12", "RT-1", "A-RT-1", future())))["MSA"][1] == "AA"
        (command,) = settled(service, "RT-1")
        assert command["status"] == "done"
        refused = reconcile(service)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert f"--api-url {sandbox.url}" in refused.stderr
        checked = reconcile(service, "--api-url", sandbox.url)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert checked.stdout.startswith(f"searched {sandbox.url} (where the service started at "), checked.stdout
        assert "checked 1 appointment(s)" in checked.stdout and "no drift" in checked.stdout, checked.stdout
        as_json = json.loads(reconcile(service, "--api-url", sandbox.url, "--json").stdout)
        assert (
            as_json["searched"] == as_json["dispatch_target"]["base_url"] == sandbox.url and as_json["findings"] == []
        )
    finally:
        service.stop()
        sandbox.stop()
