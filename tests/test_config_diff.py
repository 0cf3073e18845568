"""`hl7bridge config diff`: a new configuration judged against the traffic the feed really sent.

A real service logs every fixture (and a few messages of our own) into a real SQLite file with a base
configuration; then each test changes one thing in a copy of it (a parameter's source, a route's match, the
name rule, the event override, `content_errors`) and runs `python -m hl7bridge config diff`: the diff must
report exactly that change, on exactly the messages it concerns, and nothing else. Which messages those are is
worked out independently, from the log's own rows and raw messages.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.app.config import load
from hl7bridge.app.config_diff import TomlSides
from hl7bridge.app.config_digest import digest, effective_settings
from hl7bridge.hl7.er7 import Er7Message
from hl7bridge.store import open_engine
from hl7bridge.workflow.config_diff import ConfigRef, DiffReport, diff

from .conftest import FIXTURES, RunningService, free_port, start_service, wait_until
from .dispatch_support import future, siu

START = future(days=20, hour=10, minute=0)

BASE = f"""
[listeners.main]
time_zone = "America/Chicago"

[api]
base_url = "http://127.0.0.1:{free_port()}"
org_id = "test-org"
token_env = "NO_SUCH_TOKEN_VARIABLE"
token_credential = ""

[dispatch]
retry_initial = 30
retry_max = 60

[[routes]]
name = "reminders"
chat_bot_id = "reminders"
time_zone = "America/Chicago"
instance_identifiers = ["appointmentId"]
on_reschedule = "retrigger"
content_errors = "reject"

[routes.match]
sending_application = []

[routes.parameters.patientId]
source = ["PID-3.1", "patient_id"]
required = true

[routes.parameters.patientName]
template = "{{given_name}} {{family_name}}"
required = true

[routes.parameters.appointmentId]
source = ["SCH-2.1", "SCH-1.1"]
required = true

[routes.parameters.appointmentDateTime]
source = ["start"]
type = "datetime"
required = true

[routes.parameters.phoneNumber]
source = ["patient_phone"]
type = "phone"
required = true
"""


def changed(old: str, new: str) -> str:
    assert BASE.count(old) == 1, old
    return BASE.replace(old, new)


@dataclass
class Logged:
    workdir: Path
    service: RunningService
    config: Path
    database: Path

    def rows(self, sql: str, *args: object) -> list[sqlite3.Row]:
        con = sqlite3.connect(self.database)
        con.row_factory = sqlite3.Row
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def diff(self, config_text: str | None, *args: str, name: str = "new.toml") -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hl7bridge", "config", "diff", "--database", f"sqlite:///{self.database}",
               "--since", "1d", *args]  # fmt: skip
        if config_text is not None:
            path = self.workdir / name
            path.write_text(config_text, encoding="utf-8")
            cmd += ["--config", str(path)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.workdir)

    def diff_json(self, config_text: str, *args: str) -> dict:
        done = self.diff(config_text, "--json", "--against", str(self.config), *args)
        assert done.returncode in (0, 1), done.stderr
        report = json.loads(done.stdout)
        assert report["messages"] > 50
        assert done.returncode == (1 if report["differences"] else 0)
        return report


def fixture_files() -> list[Path]:
    return sorted(p for d in ("siu", "demo", "batch") for p in (FIXTURES / d).glob("*.hl7"))


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Logged]:
    workdir = tmp_path_factory.mktemp("config-diff")
    service = start_service(workdir, BASE)
    try:
        with service.client() as client:
            for path in fixture_files():
                client.request(path.read_bytes())
            # Our own: a booking without a phone (AE under the base: phoneNumber is required), a cancel, a
            # reschedule, and a booking from another sender.
            client.request(siu("S12", "CD-NOPHONE", "A-CD-NOPHONE", START, phone=None))
            client.request(siu("S12", "CD-BOOK", "A-CD-1", START))
            client.request(siu("S13", "CD-MOVE", "A-CD-1", future(days=21, hour=9, minute=0)))
            client.request(siu("S15", "CD-CANCEL", "A-CD-1", START))
        yield Logged(workdir, service, workdir / "hl7bridge.toml", service.database)
    finally:
        service.stop()


def differences(report: dict) -> list[dict]:
    return report["differences"]


def message_ids_with_commands(logged: Logged, kind: str | None = None) -> set[int]:
    sql = (
        "SELECT DISTINCT c.message_id FROM commands c JOIN messages m ON m.id = c.message_id WHERE m.replay_of IS NULL"
    )
    if kind:
        sql += " AND c.kind = ?"
    return {r["message_id"] for r in logged.rows(sql, *((kind,) if kind else ()))}


def test_an_unchanged_configuration_reports_no_difference(logged: Logged) -> None:
    same = "# the same settings, laid out otherwise\n" + BASE.replace("retry_initial = 30", "retry_initial = 5")
    report = logged.diff_json(same)
    assert differences(report) == [] and report["summary"] == {"ack": 0, "command": 0, "parameter": 0}
    assert report["new"]["digest"] == report["against"]["digest"] == digest(load(logged.config))
    done = logged.diff(same, "--against", str(logged.config))
    assert done.returncode == 0, done.stderr
    assert "no difference" in done.stdout and "same effective settings" in done.stdout


def test_against_defaults_to_the_configuration_the_service_recorded(logged: Logged) -> None:
    done = logged.diff(BASE, name="copy.toml")
    assert done.returncode == 0, done.stderr
    assert f"against: {logged.config}" in done.stdout
    assert "the configuration the service runs" in done.stdout


def test_a_parameter_source_changes_only_that_parameter(logged: Logged) -> None:
    report = logged.diff_json(changed('source = ["SCH-2.1", "SCH-1.1"]', 'source = ["SCH-1.1", "SCH-2.1"]'), "--phi")
    found = differences(report)
    assert found and {(d["kind"], d["parameter"]) for d in found} == {("parameter", "appointmentId")}
    # Exactly the messages with commands whose placer and filler ids differ, each before -> after as sent.
    expected = {}
    for row in logged.rows("SELECT id, raw, charset FROM messages WHERE replay_of IS NULL AND duplicate_of IS NULL"):
        if row["id"] not in message_ids_with_commands(logged):
            continue
        message = Er7Message.parse(row["raw"].decode(row["charset"] or "utf-8"))
        placer, filler = message.get("SCH-1.1"), message.get("SCH-2.1")
        if placer and filler and placer != filler:
            expected[row["id"]] = (filler, placer)
    assert {d["message_id"]: (d["before"], d["after"]) for d in found} == expected
    audit = logged.rows("SELECT action, ids, details FROM audit WHERE action = 'unmask' ORDER BY id DESC LIMIT 1")
    assert audit and set(json.loads(audit[0]["ids"])) == set(expected)


def test_parameters_are_masked_unless_phi(logged: Logged) -> None:
    report = logged.diff_json(
        changed('template = "{given_name} {family_name}"', 'template = "{family_name}, {given_name}"')
    )
    found = differences(report)
    assert found and {(d["kind"], d["parameter"]) for d in found} == {("parameter", "patientName")}
    assert report["masked"] and all(d["before"].endswith("***") and d["after"].endswith("***") for d in found)


def test_the_name_rule_changes_only_the_name(logged: Logged) -> None:
    report = logged.diff_json(
        changed('template = "{given_name} {family_name}"', 'template = "{family_name}, {given_name}"'), "--phi"
    )
    found = differences(report)
    assert {(d["kind"], d["parameter"]) for d in found} == {("parameter", "patientName")}
    booked = message_ids_with_commands(logged) - message_ids_with_commands(logged, "cancel")
    assert {d["message_id"] for d in found} == booked
    for d in found:
        given, family = d["before"].rsplit(" ", 1) if " " in d["before"] else ("", d["before"])
        assert d["after"] == f"{family}, {given}"


def test_a_route_match_changes_only_the_commands_of_the_other_senders(logged: Logged) -> None:
    report = logged.diff_json(changed("sending_application = []", 'sending_application = ["EPIC"]'))
    found = differences(report)
    assert found and {d["kind"] for d in found} == {"command"}
    others = {r["id"] for r in logged.rows("SELECT id FROM messages WHERE sending_application <> 'EPIC'")}
    assert {d["message_id"] for d in found} == message_ids_with_commands(logged) & others
    assert all(
        d["after"] == "none" and d["before"].split()[0] in ("book", "reschedule", "modify", "cancel") for d in found
    )


def test_the_event_override_changes_only_the_reschedules(logged: Logged) -> None:
    config = changed('on_reschedule = "retrigger"', 'on_reschedule = "subflow"\nreschedule_flow_id = "moved"')
    found = differences(logged.diff_json(config))
    assert found and {d["kind"] for d in found} == {"command"}
    moved = message_ids_with_commands(logged, "reschedule") | message_ids_with_commands(logged, "modify")
    assert {d["message_id"] for d in found} == moved
    assert all(d["before"].startswith(("reschedule via route reminders", "modify via route reminders")) for d in found)
    assert all(d["after"].startswith("subflow via route reminders (journey reminders, flow moved") for d in found)


def test_content_errors_accept_changes_only_the_ack(logged: Logged) -> None:
    found = differences(logged.diff_json(changed('content_errors = "reject"', 'content_errors = "accept"')))
    assert found and {d["kind"] for d in found} == {"ack"}
    rejected = {r["id"] for r in logged.rows(
        "SELECT id FROM messages WHERE ack_code = 'AE' AND route = 'reminders' AND replay_of IS NULL")}  # fmt: skip
    assert {d["message_id"] for d in found} == rejected
    assert all(d["before"].startswith("AE naming ") and d["after"] == "AA" for d in found)


def test_the_route_filter_and_the_text_report(logged: Logged) -> None:
    config = changed("sending_application = []", 'sending_application = ["EPIC"]')
    done = logged.diff(config, "--against", str(logged.config))
    assert done.returncode == 1, done.stderr
    assert "would be handled differently" in done.stdout and "commands:" in done.stdout
    first = min(message_ids_with_commands(logged) - {r["id"] for r in logged.rows(
        "SELECT id FROM messages WHERE sending_application = 'EPIC'")})  # fmt: skip
    assert f" message {first} book via route reminders" in done.stdout  # the oldest example first
    refused = logged.diff(config, "--against", str(logged.config), "--route", "nowhere")
    assert refused.returncode == 2 and "no route named 'nowhere'" in refused.stderr


def test_purged_messages_are_skipped_and_counted(logged: Logged, tmp_path: Path) -> None:
    copy = tmp_path / "log.db"
    con = sqlite3.connect(logged.database)
    con.execute(f"VACUUM INTO '{copy}'")
    con.close()
    con = sqlite3.connect(copy)
    with con:
        con.execute("UPDATE messages SET raw = NULL WHERE id IN (SELECT id FROM messages ORDER BY id LIMIT 3)")
    con.close()
    done = subprocess.run([sys.executable, "-m", "hl7bridge", "config", "diff", "--database", f"sqlite:///{copy}",
                           "--since", "1d", "--config", str(logged.config), "--against", str(logged.config), "--json"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["skipped_purged"] == 3


def test_worker_processes_give_the_same_report(logged: Logged) -> None:
    new = changed('template = "{given_name} {family_name}"', 'template = "{family_name}, {given_name}"')
    sides = TomlSides((BASE, "base"), (new, "new"))
    engine = open_engine(f"sqlite:///{logged.database}", create=False)

    def run(**options: int) -> dict:
        report = DiffReport(ConfigRef("new", "x"), ConfigRef("base", "y"), 0.0, None, masked=False)
        return diff(engine, sides, report, **options).to_json()

    in_process = run(workers=1)
    pooled = run(workers=2, in_process_up_to=0)
    assert in_process["differences"] and pooled == in_process


def test_the_digest_covers_what_decides_a_message_and_no_secret() -> None:
    import tomllib

    from hl7bridge.app.config import parse

    base = parse(tomllib.loads(BASE))
    layout = parse(tomllib.loads(BASE.replace('token_env = "NO_SUCH_TOKEN_VARIABLE"', 'token_env = "OTHER"')
                                 .replace("retry_max = 60", "retry_max = 90")))  # fmt: skip
    assert digest(layout) == digest(base)
    assert "NO_SUCH_TOKEN" not in json.dumps(effective_settings(base), default=str)
    for old, new in (('source = ["SCH-2.1", "SCH-1.1"]', 'source = ["SCH-1.1"]'),
                     ('content_errors = "reject"', 'content_errors = "accept"'),
                     ('time_zone = "America/Chicago"\n\n[api]', 'time_zone = "UTC"\n\n[api]')):  # fmt: skip
        assert digest(parse(tomllib.loads(changed(old, new)))) != digest(base), old


def test_log_show_names_the_configuration_of_each_command(logged: Logged) -> None:
    (row,) = logged.rows("SELECT message_id, config_id FROM commands ORDER BY id LIMIT 1")
    (config,) = logged.rows("SELECT digest, path FROM configs WHERE id = ?", row["config_id"])
    assert config["digest"] == digest(load(logged.config)) and config["path"] == str(logged.config)
    shown = logged.service.cli("log", "show", str(row["message_id"]))
    assert f"configuration {logged.config} (digest {config['digest'][:12]}" in shown.stdout


def test_reload_records_the_new_configuration_and_a_refusal(tmp_path: Path) -> None:
    """``hl7bridge reload`` waits for the service's verdict and names the digest it runs; the next command names
    the new configuration; a SIGHUP with a file check-config refuses is recorded as refused, the old one kept."""
    service = start_service(tmp_path, BASE)
    try:
        renamed = changed('template = "{given_name} {family_name}"', 'template = "{family_name}, {given_name}"')
        service.config.write_text(renamed, encoding="utf-8")
        done = service.cli("reload", "--config", str(service.config), "--database", service.url)
        new = digest(load(service.config))
        assert f"which runs it now (digest {new[:12]})" in done.stdout, done.stdout
        service.request(siu("S12", "CD-AFTER", "A-CD-AFTER", START))
        used = ("SELECT f.digest FROM commands c JOIN configs f ON f.id = c.config_id "
                "JOIN messages m ON m.id = c.message_id WHERE m.control_id = ?")  # fmt: skip
        assert _one(service.database, used, "CD-AFTER") == new
        service.config.write_text(BASE.replace("[routes.match]", "[routes.wrong]"), encoding="utf-8")
        service.process.send_signal(signal.SIGHUP)
        outcome = wait_until(lambda: _meta(service.database, "config_reload"), message="the refusal recorded")
        assert "routes" in outcome
        running = "SELECT f.digest FROM meta m JOIN configs f ON f.id = CAST(m.value AS INTEGER) WHERE m.key = ?"
        assert _one(service.database, running, "running_config_id") == new
    finally:
        output = service.stop()
    assert f"digest {new}" in output and "reload refused" in output


def _one(database: Path, sql: str, *args: object) -> Any:
    con = sqlite3.connect(database)
    try:
        row = con.execute(sql, args).fetchone()
    finally:
        con.close()
    return row[0] if row else None


def _meta(database: Path, key: str) -> str | None:
    value = _one(database, "SELECT value FROM meta WHERE key = ?", key)
    return value if value and value.startswith("refused") else None


def test_a_route_journey_changes_only_the_commands(logged: Logged) -> None:
    found = differences(logged.diff_json(changed('chat_bot_id = "reminders"', 'chat_bot_id = "reminders-v2"')))
    assert found and {d["kind"] for d in found} == {"command"}
    assert {d["message_id"] for d in found} == message_ids_with_commands(logged)
    assert all("(journey reminders," in d["before"] and "(journey reminders-v2," in d["after"] for d in found)


def test_a_replay_names_the_configuration_it_was_replayed_with(tmp_path: Path) -> None:
    service = start_service(tmp_path, BASE)
    try:
        service.request(siu("S12", "CD-REPLAY", "A-CD-REPLAY", START, phone=None))  # AE: phoneNumber required
        (message_id,) = [m["id"] for m in service.log() if m["control_id"] == "CD-REPLAY"]
        relaxed = tmp_path / "relaxed.toml"
        relaxed.write_text(BASE.replace('type = "phone"\nrequired = true', 'type = "phone"'), encoding="utf-8")
        service.cli("replay", str(message_id), "--config", str(relaxed))
        used = ("SELECT f.digest, f.path FROM commands c JOIN configs f ON f.id = c.config_id "
                "JOIN messages m ON m.id = c.message_id WHERE m.replay_of = ?")  # fmt: skip
        con = sqlite3.connect(service.database)
        try:
            row = con.execute(used, (message_id,)).fetchone()
        finally:
            con.close()
        assert row == (digest(load(relaxed)), str(relaxed))
    finally:
        service.stop()


def test_the_progress_bar_is_drawn_on_a_terminal_only(logged: Logged) -> None:
    import os
    import pty

    cmd = [sys.executable, "-m", "hl7bridge", "config", "diff", "--database", f"sqlite:///{logged.database}",
           "--since", "1d", "--config", str(logged.config), "--against", str(logged.config)]  # fmt: skip
    leader, follower = pty.openpty()
    try:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=follower, timeout=60, cwd=logged.workdir)
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0 and b"no difference" in done.stdout
    assert b"100% of" in drawn and b"\x1b[K" in drawn
    piped = subprocess.run(cmd, capture_output=True, timeout=60, cwd=logged.workdir)
    assert piped.returncode == 0 and piped.stderr == b""
