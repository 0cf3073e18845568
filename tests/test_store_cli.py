"""The message log: durability settings, duplicates, group commit, schema guard, and the operator CLI."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
from sqlalchemy import update

from hl7bridge.store import StoreError, meta, open_engine

from .conftest import RunningService, fixture_bytes, segments, unique_control, with_msh

S12 = "siu/s12_epic_v251.hl7"


def test_database_file_is_private_and_wal(fresh_service: RunningService) -> None:
    fresh_service.request(fixture_bytes(S12))
    mode = stat.S_IMODE(os.stat(fresh_service.database).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(fresh_service.database.parent).st_mode) & 0o077 == 0
    with sqlite3.connect(fresh_service.database) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for suffix in ("-wal", "-shm"):
        side = Path(str(fresh_service.database) + suffix)
        if side.exists():
            assert stat.S_IMODE(os.stat(side).st_mode) & 0o077 == 0


def test_duplicate_gets_original_ack_and_nothing_twice(any_service: RunningService) -> None:
    raw = fixture_bytes(S12)
    first = any_service.request(raw)
    second = any_service.request(raw)
    assert second == first
    rows = any_service.log()
    assert [r["status"] for r in rows] == ["duplicate", "accepted"]
    assert rows[0]["duplicate_of"] == rows[1]["id"]
    third = any_service.request(unique_control(raw, "NEW-ID-1"))
    assert segments(third)["MSA"][2] == "NEW-ID-1"
    assert any_service.log("--status", "accepted")[0]["control_id"] == "NEW-ID-1"


def test_same_control_id_from_another_facility_is_not_a_duplicate(any_service: RunningService) -> None:
    """Duplicates are keyed by MSH-3, MSH-4 and MSH-10: another facility's message is its own, and its own ACK.

    Sent once one at a time (the original is in the log) and once pipelined (both in one group commit)."""
    raw = fixture_bytes(S12)
    for control, pipelined in (("FAC-SEQ", False), ("FAC-GROUP", True)):
        messages = [with_msh(raw, msh4=facility, msh10=control) for facility in ("SITE-A", "SITE-B")]
        if pipelined:
            with any_service.client() as client:
                client.sock.sendall(b"".join(b"\x0b" + m + b"\x1c\x0d" for m in messages))
                answers = [segments(client.receive()) for _ in messages]
        else:
            answers = [segments(any_service.request(m)) for m in messages]
        assert [(a["MSA"][1], a["MSA"][2], a["MSH"][6]) for a in answers] == [
            ("AA", control, "SITE-A"),
            ("AA", control, "SITE-B"),
        ]
        rows = [r for r in any_service.log() if r["control_id"] == control]
        assert sorted(r["status"] for r in rows) == ["accepted", "accepted"], rows
        assert all(r["duplicate_of"] is None for r in rows)


def test_duplicates_inside_one_group_commit(any_service: RunningService) -> None:
    raw = unique_control(fixture_bytes(S12), "SAME-IN-GROUP")
    with any_service.client() as client:
        client.sock.sendall(b"".join(b"\x0b" + raw + b"\x1c\x0d" for _ in range(5)))
        answers = [client.receive() for _ in range(5)]
    assert len(set(answers)) == 1
    statuses = sorted(r["status"] for r in any_service.log() if r["control_id"] == "SAME-IN-GROUP")
    assert statuses == ["accepted"] + ["duplicate"] * 4


def test_concurrent_messages_share_commits(any_service: RunningService) -> None:
    raw = fixture_bytes(S12)
    errors: list[str] = []

    def sender(n: int) -> None:
        with any_service.client() as client:
            for i in range(40):
                ack = segments(client.request(unique_control(raw, f"G{n}-{i}")))
                if ack["MSA"][1] != "AA":
                    errors.append(ack["MSA"][1])

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(any_service.log("--status", "accepted")) == 400


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/x.db"
    engine = open_engine(url)
    with engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="999"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer hl7bridge"):
        open_engine(url)


def test_log_list_filters_and_json(service: RunningService) -> None:
    service.request(unique_control(fixture_bytes(S12), "LIST-1"))
    service.request(fixture_bytes("malformed/s12_no_pid_v251.hl7"))
    rejected = service.log("--status", "rejected")
    assert rejected and all(r["status"] == "rejected" for r in rejected)
    assert rejected[0]["error_location"] == "PID"
    s12 = service.log("--event", "S12", "--since", "10m")
    assert any(r["control_id"] == "LIST-1" for r in s12)
    assert all(r["event"] == "S12" for r in s12)
    table = service.cli("log", "list", "--limit", "5").stdout
    assert "CONTROL ID" in table and "TESTPATIENT" not in table
    bad = service.cli("log", "list", "--since", "yesterday", check=False)
    assert bad.returncode == 2 and "is not a duration" in bad.stderr


def test_log_show_masks_phi_unless_asked(service: RunningService) -> None:
    service.request(unique_control(fixture_bytes(S12), "SHOW-1"))
    row = next(r for r in service.log() if r["control_id"] == "SHOW-1")
    masked = service.cli("log", "show", str(row["id"])).stdout
    assert "TESTPATIENT" not in masked and "PHI masked" in masked
    assert "MSA|AA|SHOW-1" in masked
    full = json.loads(service.cli("log", "show", str(row["id"]), "--raw", "--phi", "--json").stdout)
    assert full["summary"]["names"][0]["family"] == "TESTPATIENT"
    assert full["raw"][0].startswith("MSH|") and full["masked"] is False
    missing = service.cli("log", "show", "999999", check=False)
    assert missing.returncode == 2 and "no message with id 999999" in missing.stderr


def test_send_cli_reports_each_ack(service: RunningService, tmp_path: Path) -> None:
    good = tmp_path / "good.hl7"
    good.write_bytes(unique_control(fixture_bytes(S12), "SEND-1"))
    result = service.cli("send", "--to", f"127.0.0.1:{service.port}", str(good))
    assert result.stdout.startswith("AA ")
    bad = tmp_path / "bad.hl7"
    bad.write_bytes(fixture_bytes("malformed/s12_no_pid_v251.hl7"))
    result = service.cli("send", "--to", f"127.0.0.1:{service.port}", str(good), str(bad), check=False)
    assert result.returncode == 1
    assert "AE " in result.stdout
    incoming_ack = tmp_path / "ack.hl7"
    incoming_ack.write_bytes(fixture_bytes("malformed/ack_s12_v251.hl7"))
    again = tmp_path / "again.hl7"
    again.write_bytes(unique_control(fixture_bytes(S12), "SEND-2"))
    result = service.cli("send", "--to", f"127.0.0.1:{service.port}", "--read-timeout", "5", str(incoming_ack),
                         str(again), check=False)  # fmt: skip
    lines = result.stdout.splitlines()
    assert lines[0].startswith("--") and "never answer" in lines[0], "an ACK is sent without waiting for an answer"
    assert lines[1].startswith("AA ")
    refused = service.cli("send", "--to", "127.0.0.1:1", str(good), "--connect-timeout", "2", check=False)
    assert refused.returncode == 2 and "cannot send" in refused.stderr and "Traceback" not in refused.stderr


def test_check_explains_a_message(service: RunningService) -> None:
    from .conftest import FIXTURES

    result = service.cli("check", str(FIXTURES / S12))
    assert "PID-5" in result.stdout and "Patient Name" in result.stdout
    assert "answer: AA" in result.stdout
    assert "strict validation (hl7apy)" in result.stdout
    bad = service.cli("check", str(FIXTURES / "malformed/s12_start_month13_v251.hl7"), check=False)
    assert bad.returncode == 1 and "answer: AE" in bad.stdout
