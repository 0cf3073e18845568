"""A message's timeline (``workflow.timeline``) and its masked raw segments (``hl7.phi``): patient data never
leaves masked without an audited reason, the reason is committed before anything is read, and ``log show`` is
the timeline's formatter. Real service, real SQLite file, real CLI."""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import event, func, select

from hl7bridge.dispatch.rules import masked_outcome
from hl7bridge.hl7.phi import mask_segments
from hl7bridge.store import (
    SCHEMA_VERSION,
    audit_log,
    get_message,
    messages,
    open_engine,
    record_replay,
    upgrade_log,
)
from hl7bridge.store.audit import AuditEntry, entries, record
from hl7bridge.store.search_index import catch_up, index_path
from hl7bridge.workflow.timeline import MAX_REASON_CHARS, Unmask, UnmaskError, timeline

from .conftest import FIXTURES, RunningService, fixture_bytes, start_service, unique_control

S12 = "siu/s12_epic_v251.hl7"


# --- mask_segments ------------------------------------------------------------------------------------------


def test_masks_patient_segments_and_keeps_what_carries_no_patient_data() -> None:
    text = (
        "MSH|^~\\&|EPIC|MAIN|BRIDGE|X|20270101120000||SIU^S12^SIU_S12|C-1|P|2.5.1\r"
        "SCH|PL-1^EPIC|FI-1^EPIC|||||Knee pain after fall^free text|ROUTINE|30|min|^^30^20270315093000||DR^WHO\r"
        "TQ1|||||||20270315093000\r"
        'PID|1||MRN77^^^HOSP^MR||ORCHARD^ALICE^Q||19800101|F|||12 Elm St^^Springfield^MA^01101||""\r'
        "NTE|1||Patient afraid of needles\r"
        "ZPI|secret\r"
        "AIP|1||1234^SMITH^JOHN\n"
        "Jane Doe on a line of her own"
    )
    shown = mask_segments(text)
    lines = shown.split("\r")
    assert lines[0] == text.split("\r")[0]
    assert lines[1].split("|")[1:3] == ["PL-1^EPIC", "FI-1^EPIC"]
    assert lines[1].split("|")[7] == "K***^f***" and lines[1].split("|")[8:12] == ["ROUTINE", "30", "min",
                                                                                  "^^30^20270315093000"]  # fmt: skip
    assert lines[1].split("|")[13] == "D***^W***"
    assert lines[2] == "TQ1|||||||20270315093000"
    assert lines[3] == 'PID|1***||M***^^^H***^M***||O***^A***^Q***||1***|F***|||1***^^S***^M***^0***||""'
    assert lines[4] == "NTE|1***||P***" and lines[5] == "ZPI|s***"
    aip, loose = lines[6].split("\n")
    assert aip == "AIP|1||1234^SMITH^JOHN" and loose == "J***"
    for value in ("ORCHARD", "ALICE", "MRN77", "19800101", "Elm", "Springfield", "needles", "Knee", "secret", "Jane"):
        assert value not in shown


def test_separators_come_from_the_header_and_a_letter_is_never_one() -> None:
    custom = "MSH#@*\\!#EPIC\rPID#1##MRN1@@@H@MR##DOE@JANE\r"
    assert mask_segments(custom).split("\r")[1] == "PID#1***##M***@@@H***@M***##D***@J***"
    # A header declaring a letter as a separator is no header: its line is masked, with HL7's default separators.
    lettered = "MSHX^~\\&XEPIC\rPID|1||DOE^JANE\r"
    assert mask_segments(lettered) == "M***^~\\***&X***\rPID|1***||D***^J***\r"


hl7ish = st.text(alphabet=st.sampled_from(list('MSHPIDSCH|^~\\&#@\r\n "1AZaz\x00é\u2028')), max_size=400)


@settings(max_examples=400, deadline=None)
@given(hl7ish)
def test_mask_segments_never_raises_and_keeps_the_shape(text: str) -> None:
    shown = mask_segments(text)
    assert shown.count("\r") == text.count("\r") and shown.count("\n") == text.count("\n")
    # Each value becomes at most four characters: the output is bounded by the input's size.
    assert len(shown) <= 4 * len(text)


def _steps(text: str) -> int:
    """The work of masking ``text``, counted (Python lines run, opcode by opcode, and calls): not a duration."""
    steps = 0

    def trace(frame: Any, what: str, _arg: Any) -> Any:
        nonlocal steps
        frame.f_trace_opcodes = True
        steps += 1
        return trace

    def profile(_frame: Any, what: str, _arg: Any) -> None:
        nonlocal steps
        steps += what == "c_call"

    sys.settrace(trace)
    sys.setprofile(profile)
    try:
        mask_segments(text)
    finally:
        sys.settrace(None)
        sys.setprofile(None)
    return steps


@pytest.mark.parametrize(
    "unit",
    [
        "PID|1||M^^^H^MR||DOE^J~X&Y||\r",  # many segments
        "A^",  # one endless field of components
        "MSH|^~\\&|E\r",  # a header after each segment
        "x" * 50,  # one value with no separator
        "SCH|" + "|" * 30 + "\n",  # SCH with more fields than it has
    ],
)
def test_mask_segments_work_grows_linearly(unit: str) -> None:
    small, large = _steps("MSH|^~\\&|E\r" + unit * 2000), _steps("MSH|^~\\&|E\r" + unit * 4000)
    assert large <= 2.1 * small, (small, large)


# --- the timeline over every fixture ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def every_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """A service that took every file under fixtures/ over MLLP (the incoming ACK is never answered)."""
    running = start_service(tmp_path_factory.mktemp("fixtures"))
    with running.client(timeout=20) as client:
        for path in sorted(FIXTURES.rglob("*.hl7")):
            client.send(path.read_bytes())
            if path.name != "ack_s12_v251.hl7":
                client.receive()
    yield running
    running.stop()


def _phi_values(shown: dict[str, Any]) -> set[str]:
    """The patient data of an unmasked timeline: the summary's names, ids, birth date, phones and e-mail, and
    every value of PID-11 (the address, which the summary does not keep)."""
    summary = shown["summary"] or {}
    found = {n.get(k) for n in summary.get("names") or () for k in ("family", "given", "middle")}
    found |= {p.get("value") for p in summary.get("patient_ids") or ()}
    found |= {t.get(k) for t in summary.get("telecoms") or () for k in ("number", "email")}
    found |= {summary.get("patient_phone"), summary.get("patient_email"), summary.get("birth_date")}
    if summary.get("birth_date"):
        found.add(summary["birth_date"].replace("-", ""))
    for segment in shown["raw"] or ():
        if segment.startswith("PID") and len(segment) > 3:
            fields = segment.split(segment[3])
            if len(fields) > 11:
                found |= {part for part in _leaves(fields[11]) if len(part) >= 3}
        if segment.startswith("SCH") and len(segment) > 3:
            fields = segment.split(segment[3])
            if len(fields) > 7 and fields[7].strip("^"):
                # The reason for the visit (SCH-7): clinical free text ("HIV follow-up") and its code.
                found |= {summary.get("reason"), summary.get("reason_code")}
    # Values of one or two characters (a middle initial) occur anywhere; the others must not.
    return {v for v in found if isinstance(v, str) and len(v) >= 3}


def _leaves(field: str) -> list[str]:
    for separator in "~^&":
        field = field.replace(separator, "\x00")
    return [p for p in field.split("\x00") if p]


def test_no_patient_value_of_any_fixture_leaves_a_masked_timeline(every_fixture: RunningService) -> None:
    engine = open_engine(every_fixture.url, create=False)
    with engine.connect() as conn:
        count = conn.execute(select(func.count()).select_from(audit_log)).scalar()
    ids = [r["id"] for r in every_fixture.log()]
    assert len(ids) >= len(list(FIXTURES.rglob("*.hl7")))
    checked = 0
    for message_id in ids:
        masked = timeline(engine, message_id)
        assert masked is not None and masked.masked
        text = json.dumps(masked.to_json(), ensure_ascii=False)
        json.loads(text)
        full = timeline(engine, message_id, unmask=Unmask("tester", "fixture check", "cli"))
        assert full is not None and not full.masked
        values = _phi_values(full.to_json())
        checked += bool(values)
        leaked = sorted(v for v in values if v in text)
        assert leaked == [], (message_id, leaked)
    assert checked >= 40, "most fixtures carry patient data"
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(audit_log)).scalar() == count + len(ids)


# --- unmask: a reason, audited first ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("timeline"))
    running.request(unique_control(fixture_bytes(S12), "TL-1"))
    yield running
    running.stop()


def _audit_rows(engine: Any) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(audit_log)).scalar()


@pytest.mark.parametrize("reason", ["", "   ", "x" * (MAX_REASON_CHARS + 1)])
def test_unmask_without_a_reason_is_refused_and_writes_nothing(logged: RunningService, reason: str) -> None:
    engine = open_engine(logged.url, create=False)
    before = _audit_rows(engine)
    with pytest.raises(UnmaskError):
        timeline(engine, 1, unmask=Unmask("mallory", reason, "api"))
    assert _audit_rows(engine) == before


def test_unmask_is_committed_before_the_data_is_read(logged: RunningService) -> None:
    engine = open_engine(logged.url, create=False)
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda _c, _cur, sql, *_rest: statements.append(sql))
    event.listen(engine, "commit", lambda _conn: statements.append("COMMIT"))
    shown = timeline(engine, 1, unmask=Unmask("erin", "  patient called about the time  ", "api"))
    assert shown is not None and shown.summary is not None
    assert shown.summary["names"][0]["family"] == "TESTPATIENT"
    # The entry is in the audit log the timeline itself read, in a transaction begun after it was committed.
    (entry,) = [e for e in shown.audit if e["action"] == "unmask" and e["actor"] == "erin"]
    assert (entry["channel"], entry["target"], entry["ids"], entry["reason"]) == (
        "api", "message", [1], "patient called about the time")  # fmt: skip
    inserted = next(i for i, sql in enumerate(statements) if sql.startswith("INSERT INTO audit "))
    read = next(i for i, sql in enumerate(statements) if "messages.raw" in sql)
    commit = next(i for i, sql in enumerate(statements) if i > inserted and sql.startswith("COMMIT"))
    assert inserted < read and commit < read, statements
    assert timeline(engine, 99999, unmask=Unmask("erin", "looking", "api")) is None
    assert not [e for e in shown.audit if 99999 in e["ids"]]


def test_a_masked_timeline_reads_without_writing(logged: RunningService) -> None:
    engine = open_engine(logged.url, create=False)
    before = _audit_rows(engine)
    shown = timeline(engine, 1)
    assert shown is not None and shown.masked and _audit_rows(engine) == before
    assert shown.summary is not None and shown.summary["names"][0]["family"] == "T***"
    assert shown.raw is not None and shown.raw[0].startswith("MSH|") and any(s.startswith("PID|") for s in shown.raw)
    assert "TESTPATIENT" not in json.dumps(shown.to_json())
    assert shown.ack is not None and "MSA|AA|TL-1" in shown.ack
    assert shown.message["id"] == 1 and isinstance(shown.message["received_at"], float)
    assert "search_terms" not in shown.message and "raw" not in shown.message


# --- replays and the audit entries naming a message or its commands -------------------------------------------


def test_replays_and_audit_entries_of_a_message_and_its_commands(logged: RunningService) -> None:
    engine = open_engine(logged.url, create=False)
    original = logged.log("--control-id", "TL-1")[0]["id"]
    row = get_message(engine, original)
    assert row is not None
    command = {"appointment_key": "MAIN|F1", "kind": "book", "route": "r", "chat_bot_id": "bot", "time_zone": "UTC",
               "parameters": '{"firstName": "ALICE"}', "identifiers": '{"appointmentId": "F1"}', "status": "dead",
               "next_attempt_at": 0.0, "created_at": 1.0, "updated_at": 1.0}  # fmt: skip
    copy = {k: v for k, v in row.items() if k != "id"}
    newer = record_replay(engine, row, copy, [command], AuditEntry("rita", "cli", "replay", "message"))
    with engine.begin() as conn:
        record(conn, AuditEntry("otto", "cli", "retry", "command", (987654,), "not this one"))
        record(conn, AuditEntry("otto", "cli", "unmask", "message", (newer + 1000,), "nor this"))
    shown = timeline(engine, original)
    assert shown is not None
    assert shown.replays == {"replay_of": None, "replayed_by": [newer]}
    (replay_entry,) = [e for e in shown.audit if e["action"] == "replay"]
    assert replay_entry["actor"] == "rita" and replay_entry["ids"] == [original, newer]
    assert all(e["reason"] not in ("not this one", "nor this") for e in shown.audit)
    replay = timeline(engine, newer)
    assert replay is not None and replay.replays == {"replay_of": original, "replayed_by": []}
    assert [e["action"] for e in replay.audit] == ["replay"]
    ((made, parameters),) = [(c["id"], c["parameters"]) for c in replay.commands]
    assert parameters == {"firstName": "A***"}
    with engine.begin() as conn:
        record(conn, AuditEntry("otto", "cli", "discard", "command", (made,), "for the timeline"))
    again = timeline(engine, newer)
    assert again is not None and [e["reason"] for e in again.audit] == ["for the timeline", ""]
    assert "ALICE" not in json.dumps(again.to_json())


# --- log show over the timeline -----------------------------------------------------------------------------------


def test_log_show_raw_is_masked_and_phi_needs_an_audited_reason(logged: RunningService) -> None:
    engine = open_engine(logged.url, create=False)
    message = str(logged.log("--control-id", "TL-1")[0]["id"])
    before = _audit_rows(engine)
    masked = logged.cli("log", "show", message, "--raw").stdout
    assert "raw message (PHI masked; --phi shows it):" in masked and "  PID|1***||" in masked
    assert "TESTPATIENT" not in masked and _audit_rows(engine) == before
    as_json = json.loads(logged.cli("log", "show", message, "--json").stdout)
    assert as_json["masked"] is True and set(as_json) >= {"message", "summary", "raw", "ack", "commands", "replays"}
    blank = logged.cli("log", "show", message, "--phi", "--reason", " ", check=False)
    assert blank.returncode == 2 and "reason is required" in blank.stderr and _audit_rows(engine) == before
    alone = logged.cli("log", "show", message, "--reason", "why", check=False)
    assert alone.returncode == 2 and "--reason goes with --phi" in alone.stderr
    shown = logged.cli("log", "show", message, "--phi", "--raw", "--reason", "ticket 4711", "--by", "erin").stdout
    assert "TESTPATIENT" in shown and "PHI masked" not in shown
    assert "audit:" in shown and "erin via cli: unmask message " + message + ": ticket 4711" in shown
    logged.cli("log", "show", message, "--phi", "--by", "erin")
    unmasks = entries(engine, action="unmask")
    assert [(e.actor, e.reason) for e in unmasks[:2]] == [("erin", "log show"), ("erin", "ticket 4711")]


def test_a_purged_message_has_no_raw(tmp_path: Path) -> None:
    service = start_service(tmp_path)
    try:
        service.request(unique_control(fixture_bytes(S12), "TL-P"))
        service.cli("purge", "--older-than", "0s", "--by", "p")
        engine = open_engine(service.url, create=False)
        shown = timeline(engine, 1)
        unmasked = timeline(engine, 1, unmask=Unmask("p", "after purge", "cli"))
    finally:
        service.stop()
    assert shown is not None and shown.raw is None and shown.summary is None
    assert unmasked is not None and unmasked.raw is None


def test_an_older_log_gets_the_audit_references_and_minute_counts_on_upgrade(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(messages.insert(), [{"received_at": 1.0, "listener": "main", "peer": "p", "status": "accepted",
                                          "ack_code": "AA"}])  # fmt: skip
        record(conn, AuditEntry("ann", "cli", "unmask", "message", (1, 1), "before the upgrade"))
        record(conn, AuditEntry("ann", "cli", "reload", "service", (4242,), "another target"))
    engine.dispose()
    with sqlite3.connect(tmp_path / "log.db") as conn:
        conn.execute("DROP TABLE audit_refs")
        conn.execute("DROP INDEX ix_messages_replay_of")
        conn.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    assert upgrade_log(url) == (6, SCHEMA_VERSION)
    engine = open_engine(url, create=False)
    shown = timeline(engine, 1)
    assert shown is not None and [e["reason"] for e in shown.audit] == ["before the upgrade"]
    with sqlite3.connect(tmp_path / "log.db") as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        refs = conn.execute("SELECT target, ref FROM audit_refs ORDER BY target").fetchall()
    catch_up(engine)
    with sqlite3.connect(index_path(engine)) as conn:
        minutes = conn.execute("SELECT minute, ack_code, listener, count FROM message_minutes").fetchall()
    assert {"ix_messages_replay_of", "messages_ack_changes"} <= names
    assert refs == [("message", "1"), ("service", "4242")]
    assert minutes == [(0, "AA", "main", 1)]


# --- command outcomes: the API's words masked --------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefix",
    ["rejected by the API (400): ", "given up after 5 such attempts: ", "API unavailable: ", "paused: ",
     "retrying; the attempt at 10:11:12 failed: ", "API refused the token: "],
)  # fmt: skip
def test_an_outcome_keeps_what_happened_and_masks_what_the_api_said(prefix: str) -> None:
    said = "instances[0]: no active instance matches {'patientId': 'MRN-4417'}; 'QUIMBLEDORF' is not valid"
    shown = masked_outcome(prefix + said)
    assert shown == prefix + "i***; '***"
    assert "MRN-4417" not in shown and "QUIMBLEDORF" not in shown


@pytest.mark.parametrize(
    "outcome",
    ["triggered", "cancelled 1 instance(s)", "API unavailable: connection error: [Errno 111] Connection refused",
     "retrying; the attempt at 10:11:12 failed: timeout: ReadTimeout", "rejected by the API (400): HTTP 400",
     "given up after 5 such attempts: expected 204 No Content, got 200", None, ""],
)  # fmt: skip
def test_an_outcome_of_our_own_words_stays_readable(outcome: str | None) -> None:
    assert masked_outcome(outcome) == outcome


def test_an_ack_echoing_the_offending_value_is_masked_there(tmp_path: Path) -> None:
    """With ``ack_phi = true`` the ACK's text quotes what was sent (a name, a birth date): MSA and ERR are kept in a
    masked view, but not that value."""
    running = start_service(tmp_path, config_text="[service]\nack_phi = true\n")
    try:
        ack = running.request(unique_control(fixture_bytes("malformed/s12_start_month13_v251.hl7"), "TL-PHI"))
        assert b"(sent: '20271305093000')" in ack
        engine = open_engine(running.url, create=False)
        (message_id,) = [r["id"] for r in running.log() if r["control_id"] == "TL-PHI"]
        shown = timeline(engine, message_id)
        assert shown is not None
        assert "(sent: '2***')" in shown.ack and "(sent: '2***')" in shown.message["ack_text"]
        assert "20271305093000" not in shown.ack + shown.message["ack_text"]
        assert "TQ1-7" in shown.ack, "the field at fault stays readable"
        full = timeline(engine, message_id, unmask=Unmask("tester", "vendor ticket", "cli"))
        assert full is not None and "(sent: '20271305093000')" in full.message["ack_text"]
    finally:
        running.stop()
