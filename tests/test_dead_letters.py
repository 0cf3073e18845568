"""`hl7bridge dead-letters`: an operator finds the commands the API refused, retries them after the fix, or
discards them with a reason; `log list`, `log show` and `stats` tell the truth about them; every action is
in the audit log.

The dead letters are real: a real service sends to a sandbox (its own process, over HTTP) whose "reminders"
journey lacks the phoneNumber parameter, a configuration mismatch the API answers with 400. The fix is the
sandbox restarted on the same port with the parameter; nothing retries a dead letter by itself, so they stay
dead until the operator acts, through the CLI, while the service runs.
"""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from hl7bridge.store import audit, open_engine

from .conftest import ROOT, RunningSandbox, RunningService, free_port, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, attempts_of, commands_of, future, query, service_toml, settled, siu

START = future(days=20, hour=10, minute=0)
LATER = future(days=21, hour=14, minute=30)
BROKEN_SANDBOX = SANDBOX_TOML.replace(
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime", "phoneNumber"]',
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime"]',
)


@dataclass
class Setting:
    service: RunningService
    sandbox: RunningSandbox
    metrics_port: int
    #: Control id -> its command id.
    dead: dict[str, int]
    #: A new, empty log of the same kind for a test's own service (None: a SQLite file in its directory).
    new_log: Callable[[], str | None]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def setting(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Setting]:
    """The whole module runs on a SQLite file, then on PostgreSQL."""
    assert BROKEN_SANDBOX != SANDBOX_TOML
    new_log: Callable[[], str | None] = lambda: None  # noqa: E731
    if request.param == "postgresql":
        new_log = request.getfixturevalue("postgres").create_database
    workdir = tmp_path_factory.mktemp("dead")
    port = free_port()
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"), BROKEN_SANDBOX, port=port)
    metrics_port = free_port()
    health = f'\n[health]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    service = start_service(workdir, service_toml(sandbox.url) + health, env=TOKEN, log_url=new_log())
    dead: dict[str, int] = {}
    try:

        def send(event: str, control: str, appointment: str, start: str | None) -> dict:
            assert service.request(siu(event, control, appointment, start)).count(b"MSA|AA|") == 1
            (command,) = settled(service, control)
            return command

        for control, appointment in [("DL-1", "A-DL-1"), ("DL-2", "A-DL-2"), ("DL-3", "A-DL-3"), ("DL-4", "A-DL-4"),
                                     ("DL-5", "A-DL-5"), ("DL-6", "A-DL-6"), ("DL-7", "A-DL-7")]:  # fmt: skip
            command = send("S12", control, appointment, START)
            assert command["status"] == "dead" and "phoneNumber" in command["outcome"], command
            dead[control] = command["id"]
        # A-DL-3 was cancelled after its booking died: that cancel is settled (nothing active to cancel).
        assert send("S15", "DL-3C", "A-DL-3", None)["status"] == "done"
        # A-DL-4 was moved after its booking died: the reschedule died too.
        moved = send("S13", "DL-4M", "A-DL-4", LATER)
        assert moved["status"] == "dead"
        dead["DL-4M"] = moved["id"]
        sandbox.stop()
        sandbox = start_sandbox(tmp_path_factory.mktemp("fixed"), SANDBOX_TOML, port=port)
        yield Setting(service, sandbox, metrics_port, dead, new_log)
    finally:
        service.stop()
        sandbox.stop()


def cli(setting: Setting, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hl7bridge", *args, "--database", setting.service.url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=setting.service.workdir)


def status_of(setting: Setting, command_id: int) -> dict:
    (row,) = query(setting.service, "SELECT * FROM commands WHERE id = ?", command_id)
    return row


def triggers_for(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    """The bulk calls the sandbox answered 204 that carried this appointment."""
    return [c for c in sandbox.calls("bulk") if c["status"] == 204
            and any(i["parameters"]["appointmentId"] == appointment for i in c["body"]["instances"])]  # fmt: skip


def entries(setting: Setting, action: str) -> list[audit.AuditEntry]:
    return audit.entries(open_engine(setting.service.url, create=False), action=action)


def verified(setting: Setting) -> None:
    check = audit.verify(open_engine(setting.service.url, create=False))
    assert check.broken_at is None and not check.problem, check


# ---- list --------------------------------------------------------------------------------------------


def test_list_shows_open_dead_letters_oldest_first_with_the_apis_reason(setting: Setting) -> None:
    listed = cli(setting, "dead-letters", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    page = json.loads(listed.stdout)
    letters = page["dead_letters"]
    assert page["more"] is False and page["next_after"] is None
    ids = [d["id"] for d in letters]
    assert ids == sorted(ids)
    (two,) = [d for d in letters if d["id"] == setting.dead["DL-2"]]
    message_id = commands_of(setting.service, "DL-2")[0]["message_id"]
    assert two["message_id"] == message_id and two["appointment"] == "MAIN|A-DL-2" and two["route"] == "reminders"
    assert two["kind"] == "book" and two["status"] == "dead" and two["attempts"] == 1
    assert "400" in two["reason"] and "phoneNumber" in two["reason"] and re.match(r"\d{4}-\d\d-\d\dT", two["since"])
    # Patient data stays out: the reason names the parameter, never the patient's values.
    assert "TESTPATIENT" not in listed.stdout and "MRN100" not in listed.stdout

    text = cli(setting, "dead-letters", "list")
    assert text.returncode == 0, text.stderr
    header, *rows = text.stdout.splitlines()
    assert header.split()[:4] == ["ID", "MESSAGE", "APPOINTMENT", "ROUTE"]
    (row,) = [r for r in rows if r.split()[0] == str(setting.dead["DL-2"])]
    assert f" {message_id} " in row and "MAIN|A-DL-2" in row and "phoneNumber" in row
    assert "open dead letter(s)" in text.stderr

    assert (
        json.loads(cli(setting, "dead-letters", "list", "--json", "--route", "nosuchroute").stdout)["dead_letters"]
        == []
    )
    assert json.loads(cli(setting, "dead-letters", "list", "--json", "--since", "1h").stdout)["dead_letters"] != []


def test_list_pages_oldest_first_and_says_when_more_remain(setting: Setting) -> None:
    everything = json.loads(cli(setting, "dead-letters", "list", "--json").stdout)["dead_letters"]
    assert len(everything) >= 3
    seen: list[int] = []
    after: list[str] = []
    while True:
        page = json.loads(cli(setting, "dead-letters", "list", "--json", "--limit", "2", *after).stdout)
        seen += [d["id"] for d in page["dead_letters"]]
        if not page["more"]:
            assert page["next_after"] is None
            break
        assert page["next_after"] == page["dead_letters"][-1]["id"]
        after = ["--after", str(page["next_after"])]
    assert seen == [d["id"] for d in everything]
    text = cli(setting, "dead-letters", "list", "--limit", "1")
    assert len(text.stdout.splitlines()) == 2  # the header and one
    assert f"the next page is the same command with --after {everything[0]['id']}" in text.stderr


# ---- retry -------------------------------------------------------------------------------------------


def test_retry_after_the_fix_sends_it_once_through_the_running_dispatcher(setting: Setting) -> None:
    command = setting.dead["DL-1"]
    dry = cli(setting, "dead-letters", "retry", str(command), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"would queue command {command} (book, appointment MAIN|A-DL-1" in dry.stdout
    assert status_of(setting, command)["status"] == "dead" and entries(setting, "retry") == []

    done = cli(setting, "dead-letters", "retry", str(command), "--by", "alice", "--reason", "phoneNumber added")
    assert done.returncode == 0, done.stderr
    assert f"queued command {command}" in done.stdout
    wait_until(lambda: status_of(setting, command)["status"] == "done", message="the retried command to be sent")
    row = status_of(setting, command)
    assert (row["resolution"], row["resolved_by"], row["resolution_reason"]) == (
        "retried",
        "alice",
        "phoneNumber added",
    )
    assert row["attempts"] == 1  # counted from 0 again: the backoff starts afresh
    assert len(setting.sandbox.instances(appointmentId="A-DL-1")) == 1
    assert len(triggers_for(setting.sandbox, "A-DL-1")) == 1

    (entry,) = entries(setting, "retry")
    assert (entry.actor, entry.ids, entry.reason, entry.target) == ("alice", (command,), "phoneNumber added", "command")
    assert row["resolution_audit"] == entry.id
    verified(setting)

    # Settled now: a second retry is refused, and nothing is sent twice.
    again = cli(setting, "dead-letters", "retry", str(command))
    assert again.returncode == 1 and f"refused command {command}: not an open dead letter: it is done" in again.stdout
    assert len(triggers_for(setting.sandbox, "A-DL-1")) == 1

    shown = cli(setting, "log", "show", str(row["message_id"]))
    assert re.search(rf"retried by alice at \S+: phoneNumber added \(audit entry {entry.id}\)", shown.stdout)


def test_retry_refuses_a_dead_booking_a_later_cancel_settled(setting: Setting) -> None:
    command = setting.dead["DL-3"]
    cancel = commands_of(setting.service, "DL-3C")[0]["id"]
    refused = cli(setting, "dead-letters", "retry", str(command))
    assert refused.returncode == 1
    assert (f"refused command {command}: superseded by command {cancel} (cancel, done) of the same appointment: "
            "retrying would undo it") in refused.stdout  # fmt: skip
    assert status_of(setting, command)["status"] == "dead"
    assert setting.sandbox.instances(appointmentId="A-DL-3") == []
    dry = cli(setting, "dead-letters", "retry", "--all", "--dry-run", "--json")
    assert command in [r["id"] for r in json.loads(dry.stdout)["refused"]]


def test_retry_keeps_an_appointments_order(setting: Setting) -> None:
    book, moved = setting.dead["DL-4"], setting.dead["DL-4M"]
    alone = cli(setting, "dead-letters", "retry", str(book))
    assert (
        alone.returncode == 1 and f"command {moved} (reschedule) of the same appointment came after it" in alone.stdout
    )
    assert status_of(setting, book)["status"] == "dead"

    both = cli(setting, "dead-letters", "retry", str(moved), str(book), "--json")
    assert both.returncode == 0, both.stderr
    assert [d["id"] for d in json.loads(both.stdout)["queued"]] == [book, moved]
    wait_until(lambda: status_of(setting, moved)["status"] == "done", message="the reschedule to be sent")
    assert status_of(setting, book)["status"] == "done"
    # The booking went first, the reschedule replaced it: one journey, at the new time.
    (active,) = [i for i in setting.sandbox.instances(appointmentId="A-DL-4") if i["status"] == "InProgress"]
    assert active["parameters"]["appointmentDateTime"].replace("-", "").replace(" ", "").replace(":", "") == LATER
    verified(setting)


def test_a_failed_sync_command_is_retried_in_the_background(setting: Setting, tmp_path: Path) -> None:
    """ack_mode "dispatched": an outage fails the command (the sender got AE). Retried while the outage still
    runs, it is no longer a sync command that fails at once: it waits out the outage, and is sent once."""
    listener = 'ack_mode = "dispatched"\ndispatch_timeout = 5'
    service = start_service(tmp_path, service_toml(setting.sandbox.url, listener_extra=listener), env=TOKEN,
                            log_url=setting.new_log())  # fmt: skip
    try:
        setting.sandbox.faults(outage={"mode": "503", "seconds": 600})
        assert b"MSA|AE|" in service.request(siu("S12", "DL-SYNC", "A-DL-SYNC", START))
        (failed,) = settled(service, "DL-SYNC")
        assert failed["status"] == "failed" and failed["sync"] == 1
        assert json.loads(service.cli("stats", "--json").stdout)["dead_letters"] == 1
        tried = len(attempts_of(service, failed["id"]))
        cmd = [sys.executable, "-m", "hl7bridge", "dead-letters", "retry", "--all", "--database", service.url]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        wait_until(lambda: len(attempts_of(service, failed["id"])) > tried, message="an attempt in the outage")
        assert commands_of(service, "DL-SYNC")[0]["status"] == "pending"
        setting.sandbox.faults(outage={"mode": "503", "seconds": 0})
        (sent,) = settled(service, "DL-SYNC", timeout=30)
        assert sent["status"] == "done" and sent["sync"] == 0
        assert len(triggers_for(setting.sandbox, "A-DL-SYNC")) == 1
    finally:
        service.stop()
        setting.sandbox.faults(outage={"mode": "503", "seconds": 0})


# ---- discard -----------------------------------------------------------------------------------------


def test_discard_needs_a_reason_and_records_who_when_and_why(setting: Setting) -> None:
    command = setting.dead["DL-5"]
    missing = cli(setting, "dead-letters", "discard", str(command))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "--reason" in missing.stderr
    blank = cli(setting, "dead-letters", "discard", str(command), "--reason", "  ")
    assert blank.returncode == 2 and status_of(setting, command)["status"] == "dead"

    done = cli(setting, "dead-letters", "discard", str(command), "--reason", "patient moved away", "--by", "bob")
    assert done.returncode == 0, done.stderr
    row = status_of(setting, command)
    assert row["status"] == "discarded" and "phoneNumber" in row["outcome"]
    assert (row["resolution"], row["resolved_by"], row["resolution_reason"]) == (
        "discarded",
        "bob",
        "patient moved away",
    )
    assert row["resolved_at"] is not None
    (entry,) = [e for e in entries(setting, "discard") if command in e.ids]
    assert (entry.actor, entry.reason, entry.channel) == ("bob", "patient moved away", "cli")
    assert row["resolution_audit"] == entry.id
    verified(setting)

    listed = json.loads(cli(setting, "dead-letters", "list", "--json").stdout)["dead_letters"]
    assert command not in [d["id"] for d in listed]
    shown = cli(setting, "log", "show", str(row["message_id"]))
    assert "discarded by bob at " in shown.stdout and ": patient moved away" in shown.stdout
    # Discarded is final: neither retried nor discarded again.
    retried = cli(setting, "dead-letters", "retry", str(command))
    assert retried.returncode == 1 and "it is discarded" in retried.stdout
    assert setting.sandbox.instances(appointmentId="A-DL-5") == []


def test_bad_input_is_one_line_and_exit_2(setting: Setting) -> None:
    for args in (["retry"], ["retry", "1", "--all"], ["list", "--since", "soon"]):
        result = cli(setting, "dead-letters", *args)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, args
    unknown = cli(setting, "dead-letters", "discard", "999999", "--reason", "typo")
    assert unknown.returncode == 1 and "refused command 999999: no command with this id" in unknown.stdout


# ---- log list, stats, metrics ------------------------------------------------------------------------


def test_log_list_shows_and_filters_messages_with_a_dead_letter(setting: Setting) -> None:
    dead_message = commands_of(setting.service, "DL-2")[0]["message_id"]
    cancel_message = commands_of(setting.service, "DL-3C")[0]["message_id"]
    listed = json.loads(cli(setting, "log", "list", "--status", "dead", "--json").stdout)["messages"]
    ids = [m["id"] for m in listed]
    assert dead_message in ids and cancel_message not in ids
    assert all(m["dead_letters"] >= 1 for m in listed)

    text = cli(setting, "log", "list")
    (row,) = [r for r in text.stdout.splitlines() if r.split()[0] == str(dead_message)]
    assert re.search(r"\sdead\s+1 dead letter\(s\)", row), row
    (other,) = [r for r in text.stdout.splitlines() if r.split()[0] == str(cancel_message)]
    assert " accepted " in other and "dead letter" not in other


def test_stats_counts_open_dead_letters_as_the_log_holds_them(setting: Setting) -> None:
    wait_until(lambda: not query(setting.service, "SELECT id FROM commands WHERE status IN ('pending', 'in_flight')"))
    open_now = query(setting.service, "SELECT COUNT(*) AS n FROM commands WHERE status IN ('dead', 'failed')")[0]["n"]
    assert open_now >= 1
    # A window counts messages and calls within it; open dead letters are a state, however old.
    for args in ((), ("--since", "1s")):
        data = json.loads(cli(setting, "stats", "--json", *args).stdout)
        assert data["dead_letters"] == open_now, args
        assert data["outbox"]["depth"] == 0
    assert f"open dead letters: {open_now}, the oldest since " in cli(setting, "stats").stdout
    metrics = f"http://127.0.0.1:{setting.metrics_port}/metrics"
    wait_until(lambda: "hl7bridge_outbox_depth 0.0" in requests.get(metrics, timeout=5).text, message="the gauge")


def test_stats_counts_api_calls_as_metrics_does(setting: Setting) -> None:
    """Two dead letters retried together leave in one bulk call, logged as one attempt row per command:
    `stats` counts that call once, as /metrics does."""
    six, seven = setting.dead["DL-6"], setting.dead["DL-7"]
    assert cli(setting, "dead-letters", "retry", str(six), str(seven)).returncode == 0
    wait_until(lambda: {status_of(setting, c)["status"] for c in (six, seven)} == {"done"}, message="the retries")
    (call,) = triggers_for(setting.sandbox, "A-DL-6")
    assert call in triggers_for(setting.sandbox, "A-DL-7"), "the two retries were not coalesced"
    wait_until(lambda: not query(setting.service, "SELECT id FROM commands WHERE status IN ('pending', 'in_flight')"))
    calls = json.loads(cli(setting, "stats", "--json").stdout)["api_calls"]
    assert {"operation": "trigger", "status": 204} in [{k: c[k] for k in ("operation", "status")} for c in calls]
    for row in calls:
        labels = {"operation": row["operation"], "status": str(row["status"])}
        assert row["count"] == metric(setting, "hl7bridge_api_calls_total", **labels), row


def metric(setting: Setting, name: str, **labels: str) -> float:
    text = requests.get(f"http://127.0.0.1:{setting.metrics_port}/metrics", timeout=5).text
    lines = [line for line in text.splitlines() if line.startswith(name + "{")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(f'{k}="{v}"' in line for k, v in labels.items()))


# ---- purge -------------------------------------------------------------------------------------------


def test_purge_is_audited_with_its_counts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    open_engine(url).dispose()
    cmd = [sys.executable, "-m", "hl7bridge", "purge", "--older-than", "30d", "--database", url]
    dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    engine = open_engine(url, create=False)
    assert audit.entries(engine) == []
    done = subprocess.run([*cmd, "--by", "carol"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (entry,) = audit.entries(engine)
    assert (entry.action, entry.actor, entry.target) == ("purge", "carol", "log")
    assert entry.details == {"older_than": "30d", "cutoff": entry.details["cutoff"], "found_messages": 0,
                             "found_commands": 0, "found_attempts": 0, "found_appointments": 0}  # fmt: skip
    check = audit.verify(engine)
    assert (check.checked, check.broken_at, check.problem) == (1, None, "")


def test_an_upgraded_log_has_the_same_commands_table_as_a_new_one(tmp_path: Path) -> None:
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        conn.executescript((ROOT / "tests" / "data" / "schema_v1.sql").read_text())
    new = tmp_path / "new.db"
    columns = {}
    for path in (old, new):
        with open_engine(f"sqlite:///{path}").connect() as conn:
            columns[path] = {(r[1], r[2]) for r in conn.exec_driver_sql("PRAGMA table_info(commands)")}
    assert columns[old] == columns[new]
    assert {"resolution", "resolved_by", "resolved_at", "resolution_reason", "resolution_audit"} <= {
        name for name, _type in columns[new]
    }


def test_a_later_command_committed_while_a_retry_waits_for_the_lock_is_seen(tmp_path: Path) -> None:
    """The retry's checks and its change are one write transaction: a command the service commits meanwhile
    (here, while this test holds the write lock) is seen, and the retry refused, instead of checked too early."""
    path = tmp_path / "log.db"
    open_engine(f"sqlite:///{path}").dispose()
    row = ("INSERT INTO commands (message_id, appointment_key, kind, route, chat_bot_id, time_zone, parameters, "
           "identifiers, status, step, attempts, next_attempt_at, sync, uncertain, created_at, updated_at) "
           "VALUES (1, 'MAIN|A-RACE', ?, 'reminders', 'reminders', 'UTC', '{}', '{}', ?, '', 1, 0, 0, 0, 0, 0)")  # fmt: skip
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO messages (received_at, listener, peer, status) VALUES (0, 'main', 'p', 'accepted')")
        dead = conn.execute(row, ("book", "dead")).lastrowid
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    cmd = [sys.executable, "-m", "hl7bridge", "dead-letters", "retry", str(dead), "--database", f"sqlite:///{path}"]
    retry = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        time.sleep(2.5)  # the retry has started and waits for the lock (up to the log's 5 s busy timeout)
        later = holder.execute(row, ("cancel", "done")).lastrowid
        holder.execute("COMMIT")
        out, err = retry.communicate(timeout=60)
    finally:
        holder.close()
        if retry.poll() is None:
            retry.kill()
    assert retry.returncode == 1, err
    assert f"refused command {dead}: superseded by command {later} (cancel, done)" in out
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT status FROM commands WHERE id = ?", (dead,)).fetchone() == ("dead",)
