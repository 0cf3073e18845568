"""Operating files and signals that a sender or an operator's slip controls: metric labels stay a closed set,
log lines cannot be forged, a file that is not the log is never touched, the CLI never creates a second log,
and a damaged or odd database ends in one line that says what to do, never a traceback."""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from hl7bridge.core import logs
from hl7bridge.ops.metrics import Metrics
from hl7bridge.store import open_engine

from .conftest import free_port, start_service, wait_until
from .dispatch_support import siu

HUGE = "99999999999999999999"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)  # fmt: skip


def one_line_error(result: subprocess.CompletedProcess, status: int = 2) -> str:
    """The CLI's answer to a user error (exit 2) or a failure to act (exit 3): no traceback, the last stderr line
    says it."""
    assert result.returncode == status, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines, "no error message"
    return lines[-1]


def make_log(path: Path, rows: int = 0) -> None:
    """A real message log with ``rows`` messages (raw blobs big enough to span many pages)."""
    engine = open_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        for number in range(rows):
            conn.exec_driver_sql(
                "INSERT INTO messages (received_at, listener, peer, raw, status, event, message_type) "
                "VALUES (?, 'main', '127.0.0.1', ?, 'accepted', 'S12', 'SIU')",
                (1_700_000_000.0 + number, b"x" * 3000),
            )
    engine.dispose()  # the last connection's close checkpoints the WAL into the file


# --- metrics --------------------------------------------------------------------------------------------------


def test_metric_labels_take_only_known_codes() -> None:
    metrics = Metrics()
    before = len(metrics.exposition())
    for number in range(400):
        metrics.message("main", f"J{number:03d}", "AR", False)
        metrics.api_call("trigger", 600 + number % 300, 0.01)
    metrics.message("main", "S12", "AA", False)
    metrics.message("main", "S12", "X\nY", False)
    text = metrics.exposition().decode()
    assert len(text) - before < 4096, "sender-chosen codes grew /metrics"
    assert 'event="other"' in text and "J123" not in text and 'status="other"' in text
    assert 'hl7bridge_messages_received_total{ack="AA",event="S12",listener="main"} 1.0' in text
    assert 'ack="other"' in text


def test_junk_trigger_codes_do_not_grow_metrics(tmp_path: Path) -> None:
    port = free_port()
    # Warnings only: 400 lines of rejections would fill the stderr pipe nobody reads until the end.
    config = (
        f'[service]\nlog_level = "warning"\n[listeners.main]\n[health]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
    )
    service = start_service(tmp_path, config)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_until(lambda: requests.get(url, timeout=5).status_code == 200)
        with service.client() as client:
            client.request(siu("S12", "K-0", "A-K-0"))
            before = len(requests.get(url, timeout=5).content)
            for number in range(400):
                client.request(siu(f"Q{number:03d}", f"J-{number}", f"A-J-{number}"))
        text = requests.get(url, timeout=5).text
        assert len(text) - before < 2048, f"/metrics grew by {len(text) - before} bytes"
        assert "Q123" not in text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("hl7bridge_messages_received_total{") and 'event="other"' in line)  # fmt: skip
        assert counted == 400
    finally:
        service.stop()


# --- logs -----------------------------------------------------------------------------------------------------


def record(msg: str, *args: object, exc_info: object = None, **extra: object) -> logging.LogRecord:
    rec = logging.LogRecord("hl7bridge.pipeline", logging.INFO, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]
    rec.__dict__.update(extra)
    return rec


FORGED = "SIU^S12\n<2>hl7bridge.service: FORGED\r\x1b[2J\x00\u2028"


@pytest.mark.parametrize("formatter", [logs.TextFormatter(True), logs.TextFormatter(False), logs.JsonFormatter()])
def test_log_lines_escape_and_cap_sender_text(formatter: logging.Formatter) -> None:
    line = formatter.format(record("%s from %s answered %s", FORGED, "y" * 100_000, "AE", control_id=FORGED))
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
    assert "\u2028" not in line
    assert len(line) < 2 * logs.MAX_MESSAGE_CHARS
    text = json.loads(line)["msg"] if isinstance(formatter, logs.JsonFormatter) else line
    assert "\\n<2>hl7bridge.service: FORGED\\r\\x1b[2J\\x00\\u2028" in text
    assert "(+" in text and "chars)" in text


def test_every_traceback_line_carries_the_records_prefix() -> None:
    try:
        raise ValueError("bad value\n<0>hl7bridge: FORGED")
    except ValueError:
        rec = record("failed with Bearer abc.def", exc_info=sys.exc_info())
    lines = logs.TextFormatter(True).format(rec).split("\n")
    assert len(lines) > 2 and all(line.startswith("<6>") for line in lines)
    assert lines[0] == "<6>hl7bridge.pipeline: failed with Bearer [redacted]"
    assert lines[-1] == "<6>  <0>hl7bridge: FORGED"


def test_service_log_escapes_control_characters_from_a_sender(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    try:
        with service.client() as client:
            client.request(siu("Z\x1b[2J\x07", "C\x1b]0;owned\x07" + "9" * 3000, "A-LOG-1"))
        # The operator's terminal gets the sender's escape sequences as text too.
        shown = service.cli("log", "list").stdout + service.cli("log", "show", "1", "--raw").stdout
        shown += service.cli("stats").stdout + service.cli("replay", "--dry-run", "1", check=False).stdout
    finally:
        stderr = service.stop()
    assert "\x1b" not in stderr and "\x07" not in stderr
    assert "\\x1b[2J\\x07" in stderr and "99...(+" in stderr
    assert "\x1b" not in shown and "\x07" not in shown and "\\x1b]0;owned\\x07" in shown


# --- files: not a database, missing, loose ----------------------------------------------------------------------


@pytest.mark.parametrize("command", [["serve", "--listen", "tcp:0:interface=127.0.0.1"], ["log", "list"], ["stats"]])
def test_a_file_that_is_not_a_database_is_left_untouched(tmp_path: Path, command: list[str]) -> None:
    secret = tmp_path / "hl7bridge.key"
    secret.write_text("-----BEGIN PRIVATE KEY-----\nMIIE...\n", encoding="utf-8")
    secret.chmod(0o644)
    before = secret.stat()
    line = one_line_error(run(*command, "--database", f"sqlite:///{secret}", cwd=tmp_path))
    assert "not a SQLite database" in line and "untouched" in line
    after = secret.stat()
    assert stat.S_IMODE(after.st_mode) == 0o644
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert not list(tmp_path.glob("hl7bridge.key-*")), "SQLite side files were created"


def test_another_programs_sqlite_file_is_left_untouched(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE patients (name TEXT)")
    line = one_line_error(run("stats", "--database", f"sqlite:///{other}", cwd=tmp_path))
    assert "not an hl7bridge message log" in line
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["patients"]


@pytest.mark.parametrize(
    "command",
    [["log", "list"], ["log", "show", "1"], ["stats"], ["replay", "--dry-run", "1"],
     ["purge", "--dry-run", "--older-than", "1d"]],
)  # fmt: skip
def test_commands_never_create_a_log_at_a_missing_path(tmp_path: Path, command: list[str]) -> None:
    line = one_line_error(run(*command, cwd=tmp_path))
    assert "no message log at" in line and str(tmp_path / "var" / "hl7bridge.db") in line
    assert "--config" in line and "--database" in line
    assert not (tmp_path / "var").exists()


def test_a_loose_data_directory_is_reported(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    url = f"sqlite:///{data / 'log.db'}"
    result = run("check-config", "--database", url, cwd=tmp_path)
    assert result.returncode == 0 and f"warning: the log's directory {data} is open to group or others" in result.stdout
    service = start_service(tmp_path, extra=["--database", url])
    stderr = service.stop()
    assert "chmod 700" in stderr and "mode 0755" in stderr
    data.chmod(0o700)
    assert "warning" not in run("check-config", "--database", url, cwd=tmp_path).stdout


# --- section 4: integers, schema versions, a damaged log ---------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["log", "show", HUGE], ["log", "list", "--limit", HUGE], ["log", "list", "--limit", "0"],
     ["log", "list", "--limit", "-5"], ["replay", HUGE], ["replay", "--dry-run", "1", HUGE],
     ["log", "list", "--since", HUGE + "w"], ["send", "--read-timeout", "nan", "x.hl7"]],
)  # fmt: skip
def test_huge_or_bad_numbers_are_usage_errors(tmp_path: Path, command: list[str]) -> None:
    make_log(tmp_path / "log.db", rows=1)
    line = one_line_error(run(*command, "--database", f"sqlite:///{tmp_path / 'log.db'}", cwd=tmp_path)
                          if command[0] != "send" else run(*command, cwd=tmp_path))  # fmt: skip
    assert "expected" in line or "longer than 100 years" in line


@pytest.mark.parametrize("version", ["abc", "0", "-1", HUGE])
def test_an_odd_schema_version_is_one_line(tmp_path: Path, version: str) -> None:
    path = tmp_path / "log.db"
    make_log(path)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    url = f"sqlite:///{path}"
    for command in (["stats"], ["log", "list"], ["serve", "--listen", "tcp:0:interface=127.0.0.1"]):
        line = one_line_error(run(*command, "--database", url, cwd=tmp_path))
        assert "schema version" in line and "restore it from a backup" in line


def corrupt(path: Path) -> None:
    """Overwrite one interior page of the messages table's received_at index with junk."""
    with sqlite3.connect(path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'ix_messages_received_at'").fetchone()[0]
        table = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'messages'").fetchone()[0]
    with open(path, "r+b") as f:
        for page in (root, table):
            f.seek((page - 1) * page_size)
            f.write(bytes([0xA5]) * page_size)


def test_a_damaged_log_is_refused_at_start_and_every_command_says_so(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, rows=200)
    corrupt(path)
    url = f"sqlite:///{path}"
    line = one_line_error(run("serve", "--listen", "tcp:0:interface=127.0.0.1", "--database", url, cwd=tmp_path))
    assert f"the message log {path} is damaged" in line and "restore the log from a backup" in line
    assert ".recover" in line
    for command in (["stats"], ["log", "list"], ["log", "show", "5"], ["purge", "--dry-run", "--older-than", "1d"]):
        line = one_line_error(run(*command, "--database", url, cwd=tmp_path), status=3)
        assert "malformed" in line and "restore the log from a backup" in line, command


def test_integrity_check_can_be_turned_off(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    make_log(path, rows=200)
    corrupt(path)
    service = start_service(tmp_path, "[service]\nintegrity_check = \"off\"\n", extra=["--database",
                            f"sqlite:///{path}"])  # fmt: skip
    service.stop()
    assert os.path.exists(path)


def test_systemd_start_timeout_is_extended_while_the_log_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(10)
        service = start_service(tmp_path, env={"NOTIFY_SOCKET": str(path)})
        try:
            first, second = sock.recv(4096).decode(), sock.recv(4096).decode()
        finally:
            service.stop()
    assert first == "EXTEND_TIMEOUT_USEC=60000000\nSTATUS=Checking the message log"
    assert second.startswith("READY=1")
