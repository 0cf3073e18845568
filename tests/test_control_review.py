"""Review fixes: the purge audited from its start, the dispatch target recorded through the writer, the pid file
and its checks, reload's one verdict, reconcile searching where the service dispatches."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from hl7bridge.ops import control
from hl7bridge.store import AuditEntry, audit, open_engine, purge
from hl7bridge.workflow.dispatch_target import dispatch_target

from .conftest import (
    EXAMPLE_SERVED,
    RunningService,
    free_port,
    segments,
    start_sandbox,
    start_service,
    wait_until,
)
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


def test_the_service_waits_for_a_cli_holding_the_write_lock_then_records_its_configuration_and_target(
    tmp_path: Path,
) -> None:
    """Every command names the configuration that produced it, so start-up records it before it accepts anything:
    while a CLI holds the write lock it waits (saying so) instead of failing, then records it and its target."""
    database = tmp_path / "var" / "log.db"
    database.parent.mkdir()
    open_engine(f"sqlite:///{database}").dispose()
    holder = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Event()

    def release() -> None:
        holder.rollback()
        released.set()

    timer = threading.Timer(15.0, release)
    timer.start()
    try:
        service = start_service(tmp_path, service_toml("http://127.0.0.1:9"), env=TOKEN)
        assert released.is_set(), "the service started before it could record its configuration"
    finally:
        timer.cancel()
        holder.close()
    try:
        wait_until(lambda: recorded_target(database) == "http://127.0.0.1:9", message="target recorded")
        (row,) = sqlite3.connect(database).execute("SELECT count(*) FROM configs").fetchall()
        assert row == (1,)
    finally:
        log = service.stop()
    assert "another process holds the log's write lock: waiting for it to record the configuration" in log


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


# --- reload and the pid file ---------------------------------------------------------------------------------

EXAMPLE = EXAMPLE_SERVED


def sandboxed(tmp_path: Path) -> RunningService:
    return start_service(tmp_path, EXAMPLE, extra=["--sandbox", "--sandbox-listen", f"tcp:{free_port()}"])


def test_reload_by_pid_reaches_a_service_without_a_pid_file(tmp_path: Path) -> None:
    """systemd's ``reload --pid $MAINPID``: a service started before pid files (or unable to write one)."""
    service = sandboxed(tmp_path)
    try:
        service.database.with_suffix(".pid").unlink()
        args = ("reload", "--config", str(service.config), "--database", service.url, "--by", "systemd")
        done = service.cli(*args, "--pid", str(service.process.pid))
        assert f"reload sent to the service (pid {service.process.pid})" in done.stdout
        other = service.cli(*args, "--pid", str(os.getpid()), check=False)
        assert other.returncode == 2 and "is not 'hl7bridge serve'" in other.stderr, other.stderr
        assert len(other.stderr.splitlines()) == 1
    finally:
        output = service.stop()
    assert output.count("configuration reloaded") == 1, output


def test_sighup_refuses_what_check_config_refuses(tmp_path: Path) -> None:
    """``kill -HUP`` (or a file changed after ``hl7bridge reload`` checked it) gets check-config's verdict too."""
    service = sandboxed(tmp_path)
    try:
        service.config.write_text(EXAMPLE.replace("[routes.parameters.phoneNumber]", "[routes.parameters.mobile]"))
        checked = service.cli("check-config", "--config", str(service.config), check=False)
        assert checked.returncode == 1 and "journey mismatch: routes[reminders].parameters.mobile" in checked.stderr
        # Handled before the stop that follows it: both reach the reactor in order (SIGHUP is the lower signal).
        service.process.send_signal(signal.SIGHUP)
    finally:
        output = service.stop()
    assert "reload refused, keeping the running config: journey mismatch: routes[reminders].parameters.mobile" in output
    assert "configuration reloaded" not in output


@pytest.fixture
def impostor() -> Iterator[subprocess.Popen]:
    """A process whose command line holds ``hl7bridge`` and ``serve``, as ``hl7bridge log list --text serve``."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "hl7bridge", "log", "list",
                                "--text", "serve"])  # fmt: skip
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_only_hl7bridge_serve_itself_is_signalled(tmp_path: Path, impostor: subprocess.Popen) -> None:
    pid_file = tmp_path / "hl7bridge.pid"
    pid_file.write_text(f"{impostor.pid}\n")
    with pytest.raises(control.ControlError, match="is not 'hl7bridge serve'"):
        control.service_pid(pid_file)


def test_a_pid_file_naming_a_later_process_is_refused(tmp_path: Path) -> None:
    """The start time recorded with the pid: a pid reused after a crash is not signalled."""
    service = start_service(tmp_path)
    try:
        pid_file = service.database.with_suffix(".pid")
        assert control.service_pid(pid_file) == service.process.pid
        pid, started = pid_file.read_text().split()
        pid_file.write_text(f"{pid} {int(started) - 1}\n")
        with pytest.raises(control.ControlError, match="not the process that wrote it"):
            control.service_pid(pid_file)
    finally:
        service.stop()


def test_the_pid_file_is_not_written_through_a_planted_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    pid_file = tmp_path / "run" / "hl7bridge.pid"
    pid_file.parent.mkdir()
    pid_file.with_name(f".{pid_file.name}.{os.getpid()}").symlink_to(victim)
    control.write_pid(pid_file)
    assert victim.read_text() == "keep\n"
    assert pid_file.read_text().split()[0] == str(os.getpid())
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o600
