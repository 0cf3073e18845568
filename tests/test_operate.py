"""Operating the service: /healthz tells the truth when each part breaks, /metrics counts, logs hold no PHI,
SIGHUP reloads routes, retention purges, the schema upgrades in place, SIGTERM drains cleanly."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hl7bridge.store import SCHEMA_VERSION, StoreError, open_engine
from hl7bridge.store.search_index import catch_up, index_path

from .conftest import (
    ROOT,
    RunningSandbox,
    free_port,
    segments,
    start_sandbox,
    start_service,
    wait_until,
)
from .dispatch_support import SANDBOX_TOML, future, service_toml, siu

TOKEN = {"TEST_API_TOKEN": "test-token"}


def health_toml(port: int, stuck_after: float = 900, heartbeat: float = 0.2) -> str:
    return f'\n[health]\nlisten = "tcp:{port}:interface=127.0.0.1"\noutbox_stuck_after = {stuck_after}\nheartbeat_interval = {heartbeat}\n'


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RunningSandbox]:
    running = start_sandbox(tmp_path, SANDBOX_TOML)
    yield running
    running.stop()


def healthz(port: int) -> tuple[int, dict]:
    response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return response.status_code, response.json()


def metric(port: int, name: str, **labels: str) -> float:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_healthy_service_and_metrics(tmp_path: Path, sandbox: RunningSandbox) -> None:
    port = free_port()
    service = start_service(tmp_path, service_toml(sandbox.url) + health_toml(port), env=TOKEN)
    try:
        _status, body = wait_until(lambda: (lambda r: r if r[0] == 200 else None)(healthz(port)))
        checks = {"listeners", "descriptors", "database", "dispatch", "outbox"}
        assert body["status"] == "ok" and set(body["checks"]) == checks
        ack = segments(service.request(siu("S12", "M-1", "A-M-1", future())))["MSA"]
        assert ack[1] == "AA"
        service.request(siu("S12", "M-1", "A-M-1", future()))  # a duplicate
        wait_until(lambda: sandbox.instances(appointmentId="A-M-1"))
        wait_until(lambda: metric(port, "hl7bridge_api_calls_total", operation="trigger", status="204") >= 1)
        assert metric(port, "hl7bridge_messages_received_total", event="S12", ack="AA") == 2
        assert metric(port, "hl7bridge_duplicates_total") == 1
        assert metric(port, "hl7bridge_ack_latency_seconds_count") == 2
        assert metric(port, "hl7bridge_healthy") == 1
        assert "hl7bridge_outbox_depth" in requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    finally:
        service.stop()


def test_health_reports_paused_dispatch_and_recovers(tmp_path: Path, sandbox: RunningSandbox) -> None:
    port = free_port()
    service = start_service(tmp_path, service_toml(sandbox.url) + health_toml(port), env=TOKEN)
    try:
        sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
        service.request(siu("S12", "P-1", "A-P-1", future()))
        _status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(healthz(port)))
        assert body["failing"] == ["dispatch"] and "401" in body["checks"]["dispatch"]["detail"]
        assert metric(port, "hl7bridge_dispatch_paused") == 1
        sandbox.post(
            "/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances", "read.journey_instances"]}}
        )
        wait_until(lambda: healthz(port)[0] == 200, message="dispatch to resume")
        wait_until(lambda: sandbox.instances(appointmentId="A-P-1"))
        assert metric(port, "hl7bridge_dead_letters_total") == 0
    finally:
        service.stop()


def test_health_reports_a_stuck_outbox(tmp_path: Path, sandbox: RunningSandbox) -> None:
    port = free_port()
    service = start_service(tmp_path, service_toml(sandbox.url) + health_toml(port, stuck_after=1), env=TOKEN)
    try:
        sandbox.faults(outage={"mode": "503", "seconds": 30})
        service.request(siu("S12", "STUCK-1", "A-STUCK", future()))
        _status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(healthz(port)), timeout=20)
        assert body["failing"] == ["outbox"] and "waiting" in body["checks"]["outbox"]["detail"]
        assert metric(port, "hl7bridge_outbox_depth") >= 1
        # The stuck verdict (1 s) can come before the first failed call's count on a loaded machine.
        wait_until(lambda: metric(port, "hl7bridge_api_retries_total") >= 1, timeout=20, message="a retry counted")
    finally:
        service.stop()


def test_health_reports_an_unwritable_database(tmp_path: Path) -> None:
    port = free_port()
    service = start_service(tmp_path, "[listeners.main]\n" + health_toml(port))
    try:
        wait_until(lambda: healthz(port)[0] == 200)
        # Another writer holds the database's write lock: commits fail after busy_timeout.
        blocker = sqlite3.connect(service.database, timeout=1)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            _status, body = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(healthz(port)), timeout=30)
            assert "database" in body["failing"]
            ack = segments(service.request(siu("S15", "LOCKED-1", "A-L", None)))["MSA"]
            assert ack[1] == "AR", "a message that cannot be committed is never answered AA"
        finally:
            blocker.rollback()
            blocker.close()
        wait_until(lambda: healthz(port)[0] == 200, timeout=30, message="recovery once the lock is gone")
        assert segments(service.request(siu("S15", "LOCKED-2", "A-L", None)))["MSA"][1] == "AA"
    finally:
        service.stop()


def test_health_reports_listeners_down_during_shutdown(tmp_path: Path) -> None:
    """Between SIGTERM and exit /healthz answers 503 naming the shutdown, and never 200 again once it has."""
    port = free_port()
    service = start_service(tmp_path, "[listeners.main]\n" + health_toml(port))
    wait_until(lambda: healthz(port)[0] == 200)
    assert healthz(port)[1]["checks"]["listeners"]["ok"]
    seen: list[tuple[int, str]] = []
    polling = threading.Event()

    def poll() -> None:
        while service.process.poll() is None:
            try:
                status, body = healthz(port)
            except (requests.RequestException, ValueError):
                continue  # the health port closes last
            seen.append((status, body["checks"]["listeners"]["detail"]))
            polling.set()

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        assert polling.wait(10)
        service.stop()
    finally:
        poller.join(30)
    assert service.process.returncode == 0
    assert (503, "shutting down") in seen, seen
    first_down = seen.index((503, "shutting down"))
    assert all(status == 503 for status, _ in seen[first_down:]), seen


def test_logs_hold_no_phi_and_no_token(tmp_path: Path, sandbox: RunningSandbox) -> None:
    config = service_toml(sandbox.url).replace(
        "[listeners.main]", '[service]\nlog_level = "debug"\nlog_format = "json"\n\n[listeners.main]'
    )
    service = start_service(tmp_path, config, env=TOKEN)
    try:
        service.request(
            siu("S12", "LOG-1", "A-LOG", future(), family="SECRETFAMILY", given="SECRETGIVEN", patient="SECRETMRN")
        )
        service.request(siu("S12", "LOG-2", "A-LOG2", future(), family="", given=""))
        wait_until(lambda: sandbox.instances(appointmentId="A-LOG"))
    finally:
        output = service.stop()
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert lines, output
    text = output
    for secret in ("SECRETFAMILY", "SECRETGIVEN", "SECRETMRN", "test-token"):
        assert secret not in text
    about = [entry for entry in lines if entry.get("control_id") in ("LOG-1", "LOG-2")]
    assert {e["control_id"] for e in about} == {"LOG-1", "LOG-2"}
    assert all({"ts", "level", "logger", "msg"} <= set(e) for e in lines)


def test_sighup_reloads_routes_and_refuses_a_bad_config(tmp_path: Path, sandbox: RunningSandbox) -> None:
    service = start_service(tmp_path, service_toml(sandbox.url, dispatch_extra='unrouted = "reject"'), env=TOKEN)
    try:
        with service.client() as client:
            assert (
                segments(client.request(siu("S12", "HUP-1", "A-HUP-1", future(), facility="NEWSITE")))["MSA"][1] == "AA"
            )
            # Narrow the route to another facility: the same connection stays open across the reload.
            narrowed = service.config.read_text().replace(
                'instance_identifiers = ["appointmentId"]',
                'instance_identifiers = ["appointmentId"]\n[routes.match]\nsending_facility = ["OTHER"]\n',
                1,
            )
            service.config.write_text(narrowed)
            service.process.send_signal(signal.SIGHUP)
            wait_until(lambda: segments(client.request(siu("S12", f"HUP-{time.time()}", "A-HUP-2", future(), facility="NEWSITE")))["MSA"][1] == "AE",
                       message="the narrowed route to apply")  # fmt: skip
            service.config.write_text(narrowed + "\n[listeners.main]\nmax_connections = 'many'\n")
            service.process.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            assert (
                segments(client.request(siu("S12", "HUP-3", "A-HUP-3", future(), facility="OTHER")))["MSA"][1] == "AA"
            )
    finally:
        output = service.stop()
    assert "reload refused" in output and "configuration reloaded" in output


def test_purge_clears_phi_and_keeps_outcomes(tmp_path: Path, sandbox: RunningSandbox) -> None:
    service = start_service(tmp_path, service_toml(sandbox.url), env=TOKEN)
    try:
        service.request(siu("S12", "PURGE-1", "A-PURGE", future(), family="PURGEDNAME"))
        wait_until(lambda: sandbox.instances(appointmentId="A-PURGE"))
        time.sleep(0.3)
        dry = service.cli("purge", "--older-than", "0s", "--dry-run")
        assert "would clear" in dry.stdout and "1 message(s)" in dry.stdout
        done = service.cli("purge", "--older-than", "0s")
        assert "cleared" in done.stdout
    finally:
        service.stop()
    with sqlite3.connect(service.database) as conn:
        raw, summary, status, purged = conn.execute("SELECT raw, summary, status, purged_at FROM messages").fetchone()
        assert raw is None and summary is None and purged is not None and status == "accepted"
        params, outcome = conn.execute("SELECT parameters, outcome FROM commands").fetchone()
        assert params == "{}" and outcome == "triggered"
        assert conn.execute("SELECT count(*) FROM appointments WHERE parameters IS NOT NULL").fetchone()[0] == 0
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert b"PURGEDNAME" not in b"".join(r[0] or b"" for r in conn.execute("SELECT raw FROM messages"))


def test_old_schema_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.executescript((ROOT / "tests" / "data" / "schema_v1.sql").read_text())
        conn.execute(
            "INSERT INTO messages (received_at, listener, peer, raw, status, control_id) VALUES (1, 'main', 'p', x'4d5348', 'accepted', 'OLD-1')"
        )
    os.chmod(path, 0o600)
    engine = open_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        version = conn.exec_driver_sql("SELECT value FROM meta WHERE key = 'schema_version'").scalar()
        columns = [r[1] for r in conn.exec_driver_sql("PRAGMA table_info(messages)")]
        kept = conn.exec_driver_sql("SELECT control_id FROM messages").scalar()
    catch_up(engine)
    with sqlite3.connect(index_path(engine)) as index:
        indexed = [row[0] for row in index.execute("SELECT key FROM search_keys")]
    assert int(version) == SCHEMA_VERSION and "purged_at" in columns and kept == "OLD-1"
    assert indexed == ["c:OLD-1"]  # the search index is backfilled
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_newer_schema_is_refused_with_one_line(tmp_path: Path) -> None:
    path = tmp_path / "new.db"
    open_engine(f"sqlite:///{path}").dispose()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="newer hl7bridge"):
        open_engine(f"sqlite:///{path}")


def test_stats_command(tmp_path: Path, sandbox: RunningSandbox) -> None:
    service = start_service(tmp_path, service_toml(sandbox.url), env=TOKEN)
    try:
        service.request(siu("S12", "STATS-1", "A-STATS", future()))
        wait_until(lambda: sandbox.instances(appointmentId="A-STATS"))
        time.sleep(0.3)
        data = json.loads(service.cli("stats", "--json").stdout)
        assert data["messages"]["accepted"] == 1
        assert data["commands"]["done"] == 1
        assert any(c["operation"] == "trigger" and c["status"] == 204 for c in data["api_calls"])
        assert "outbox: 0 waiting" in service.cli("stats").stdout
    finally:
        service.stop()


def test_sigterm_answers_what_was_received_and_exits_zero(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    with service.client() as client:
        client.send(siu("S15", "TERM-1", "A-TERM", None))
        time.sleep(0.05)
        service.process.send_signal(signal.SIGTERM)
        answer = client.receive()
    assert segments(answer)["MSA"][1:3] == ["AA", "TERM-1"]
    service.process.wait(timeout=20)
    assert service.process.returncode == 0
    with sqlite3.connect(service.database) as conn:
        assert conn.execute("SELECT status FROM messages WHERE control_id = 'TERM-1'").fetchone()[0] == "accepted"
