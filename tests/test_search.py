"""Finding messages: every `log list` filter from what intake indexed, keyset pages, the text index's window,
retention clearing the patient index, the upgrade's backfill, and `log export`."""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from hl7bridge.store import audit as audit_log
from hl7bridge.store import messages, open_engine, purge, search_terms
from hl7bridge.store.search import TAIL_MAX
from hl7bridge.store.search_index import catch_up, index_path, indexed_to
from hl7bridge.workflow.export import open_export
from hl7bridge.workflow.search import Filters, explain, search

from .conftest import RunningService, fixture_bytes, start_service, wait_until

S12 = fixture_bytes("siu/s12_epic_v251.hl7").decode("latin-1")


def booking(control: str, placer: str, filler: str, patient: str, family: str, sender: str = "EPIC|MAINCLINIC",
            event: str = "S12") -> bytes:  # fmt: skip
    text = (
        S12.replace("|100000001|", f"|{control}|")
        .replace("APT10001^EPIC", f"{placer}^EPIC")
        .replace("F90001^EPIC", f"{filler}^EPIC")
        .replace("E1000001^^^MAINHOSP^MR", f"{patient}^^^MAINHOSP^MR")
        .replace("TESTPATIENT^ALICE", f"{family}^ALICE")
        .replace("EPIC|MAINCLINIC", sender, 1)
        .replace("SIU^S12^SIU_S12", f"SIU^{event}^SIU_{event}")
    )
    return text.encode("latin-1")


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> RunningService:
    """A service that took five bookings through the real intake (and one rejected message)."""
    running = start_service(tmp_path_factory.mktemp("search"))
    sent = [
        booking("Q-1", "PL-1", "FI-1", "MRN-1", "ORCHARD"),
        booking("Q-2", "PL-2", "FI-2", "MRN-2", "BRAMBLE"),
        booking("Q-3", "PL-1", "FI-1", "MRN-1", "ORCHARD", event="S14"),
        booking("Q-4", "PL-4", "FI-4", "MRN-4", "ORCHARD", sender="CERNER|EAST"),
        booking("Q-5", "PL-5", "FI-5", "MRN-5", "QUILLON", sender="CERNER|WEST"),
    ]
    for raw in sent:
        running.request(raw)
    running.request(fixture_bytes("malformed/s12_no_pid_v251.hl7"))
    indexed(running)
    yield running
    running.stop()


def indexed(service: RunningService) -> None:
    """Wait for the service's search indexer (its own thread, a batch every second) to take every message logged
    so far."""

    def current() -> bool:
        with sqlite3.connect(service.database) as conn:
            (top,) = conn.execute("SELECT max(id) FROM messages").fetchone()
        done = indexed_to(service.database)
        return done is not None and done >= top

    wait_until(current, message="the search index to take every message")


def ids(service: RunningService, *args: str) -> list[str]:
    return [r["control_id"] for r in service.log(*args)]


def test_each_filter_alone_and_combined(searched: RunningService) -> None:
    assert ids(searched, "--appointment", "PL-1") == ["Q-3", "Q-1"]
    assert ids(searched, "--appointment", "FI-2") == ["Q-2"]
    assert ids(searched, "--patient", "MRN-1") == ["Q-3", "Q-1"]
    assert ids(searched, "--patient", "Z1000001") == ["Q-5", "Q-4", "Q-3", "Q-2", "Q-1"]  # the second PID-3
    assert ids(searched, "--control-id", "Q-4") == ["Q-4"]
    assert ids(searched, "--sender", "CERNER") == ["Q-5", "Q-4"]
    assert ids(searched, "--sender", "CERNER^WEST") == ["Q-5"]
    assert ids(searched, "--text", "orchard", "--since", "1h") == ["Q-4", "Q-3", "Q-1"]
    assert ids(searched, "--text", "QUILL*", "--since", "1h") == ["Q-5"]
    assert ids(searched, "--text", "orchard", "--sender", "CERNER", "--since", "1h") == ["Q-4"]
    assert ids(searched, "--patient", "MRN-1", "--event", "S14") == ["Q-3"]
    assert ids(searched, "--appointment", "PL-1", "--control-id", "Q-1") == ["Q-1"]
    assert ids(searched, "--sender", "EPIC", "--since", "1h", "--status", "accepted") == ["Q-3", "Q-2", "Q-1"]
    assert ids(searched, "--patient", "MRN-1", "--status", "rejected") == []
    assert ids(searched, "--patient", "MRN-1", "--since", "0s") == []
    assert ids(searched, "--patient", "nobody") == []


def test_pages_say_when_more_remain(searched: RunningService) -> None:
    first = json.loads(searched.cli("log", "list", "--patient", "Z1000001", "--limit", "2", "--json").stdout)
    assert [r["control_id"] for r in first["messages"]] == ["Q-5", "Q-4"] and first["more"] is True
    rest = json.loads(searched.cli("log", "list", "--patient", "Z1000001", "--limit", "2", "--json",
                                   "--before", str(first["next_before"])).stdout)  # fmt: skip
    assert [r["control_id"] for r in rest["messages"]] == ["Q-3", "Q-2"] and rest["more"] is True
    last = json.loads(searched.cli("log", "list", "--patient", "Z1000001", "--limit", "2", "--json",
                                   "--before", str(rest["next_before"])).stdout)  # fmt: skip
    assert [r["control_id"] for r in last["messages"]] == ["Q-1"]
    assert last["more"] is False and last["next_before"] is None
    table = searched.cli("log", "list", "--sender", "EPIC", "--limit", "1")
    assert "more match" in table.stderr and "--before" in table.stderr
    assert "more match" not in searched.cli("log", "list", "--sender", "EPIC", "--limit", "5").stderr


def test_text_needs_a_window_and_other_bad_input_is_one_line(searched: RunningService) -> None:
    refused = searched.cli("log", "list", "--text", "orchard", check=False)
    assert refused.returncode == 2 and "--since" in refused.stderr and "Traceback" not in refused.stderr
    empty = searched.cli("log", "list", "--text", "**", "--since", "1h", check=False)
    assert empty.returncode == 2 and "word" in empty.stderr
    syntax = searched.cli("log", "list", "--text", 'NEAR(" AND', "--since", "1h", check=False)
    assert syntax.returncode == 0, syntax.stderr  # FTS5 syntax is quoted, never interpreted


def test_the_listing_shows_no_patient_data(searched: RunningService) -> None:
    table = searched.cli("log", "list", "--patient", "MRN-1").stdout
    assert "Q-1" in table and "ORCHARD" not in table and "MRN-1" not in table


FILTERS = [
    Filters(appointment="PL-1"),
    Filters(patient="MRN-1"),
    Filters(control_id="Q-1"),
    Filters(sender="EPIC"),
    Filters(sender="EPIC^MAINCLINIC", status="accepted", event="S12"),
    Filters(text="orchard", since=0.0),
    Filters(text="orchard", since=0.0, status="rejected"),
    Filters(patient="MRN-1", text="orchard", since=0.0),
    Filters(appointment="PL-1", patient="MRN-1", sender="EPIC", since=0.0),
    Filters(status="rejected"),
    Filters(status="rejected", sender="CERNER", since=0.0),
    Filters(text="orchard", sender="CERNER", since=0.0),
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f.described()))
def test_every_filter_is_answered_from_an_index(searched: RunningService, filters: Filters) -> None:
    """The driving step is a search key, the words' FTS5 index or a status index, never a walk of the messages
    table (a ``rowid<?`` search from a page's end is such a walk too); and nothing is sorted."""
    engine = open_engine(f"sqlite:///{searched.database}", create=False)
    for before in (None, 10**6):
        plan = explain(engine, filters, before=before)
        drivers = ("SEARCH k USING PRIMARY KEY", "SCAN messages_text VIRTUAL TABLE", "SEARCH messages USING INDEX ix_")
        assert plan[0].startswith(drivers), plan
        assert not [line for line in plan if "TEMP B-TREE" in line or line.startswith("SCAN messages ")], plan


def test_retention_clears_the_patient_index_and_the_words(fresh_service: RunningService) -> None:
    fresh_service.request(booking("R-1", "PL-9", "FI-9", "MRN-9", "HAWTHORN"))
    indexed(fresh_service)
    assert ids(fresh_service, "--patient", "MRN-9") == ["R-1"]
    fresh_service.cli("purge", "--older-than", "0s")
    assert ids(fresh_service, "--patient", "MRN-9") == []
    assert ids(fresh_service, "--text", "hawthorn", "--since", "1h") == []
    assert ids(fresh_service, "--appointment", "PL-9") == ["R-1"]  # outcomes stay findable
    with sqlite3.connect(index_path(fresh_service.database)) as conn:
        assert conn.execute("SELECT count(*) FROM search_keys WHERE key LIKE 'p:%'").fetchone() == (0,)
        conn.execute("INSERT INTO messages_text (messages_text, rank) VALUES ('integrity-check', 1)")


#: The schema version that brought the search index.
SEARCH_SCHEMA = 6


def test_an_older_log_is_backfilled_on_upgrade(fresh_service: RunningService) -> None:
    fresh_service.request(booking("U-1", "PL-7", "FI-7", "MRN-7", "WILLOWMERE"))
    fresh_service.stop()
    index_path(fresh_service.database).unlink()
    with sqlite3.connect(fresh_service.database) as conn:
        conn.execute("DROP INDEX ix_messages_not_accepted_id")
        conn.execute("ALTER TABLE messages DROP COLUMN search_terms")
        conn.execute("ALTER TABLE messages DROP COLUMN search_text")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SEARCH_SCHEMA - 1),))
    fresh_service.cli("upgrade", "--database", fresh_service.url)
    assert ids(fresh_service, "--patient", "MRN-7") == ["U-1"]
    assert ids(fresh_service, "--text", "willowmere", "--since", "1h") == ["U-1"]
    assert ids(fresh_service, "--sender", "EPIC^MAINCLINIC") == ["U-1"]


def test_export_formats_mask_patient_data_unless_asked(searched: RunningService, tmp_path: Path) -> None:
    out = searched.cli("log", "export", "--since", "1h", "--patient", "MRN-1", "--format", "jsonl")
    records = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["control_id"] for r in records] == ["Q-1", "Q-3"]  # oldest first
    assert "ORCHARD" not in out.stdout and "MRN-1" not in out.stdout and "E1000001" not in out.stdout
    assert records[0]["summary"]["names"][0]["family"] == "O***" and "PID|1***|" in records[0]["raw"]
    assert "exported 2 message(s)" in out.stderr and "masked" in out.stderr
    table = list(csv.DictReader(io.StringIO(searched.cli("log", "export", "--since", "1h", "--format", "csv").stdout)))
    assert [r["control_id"] for r in table][:5] == ["Q-1", "Q-2", "Q-3", "Q-4", "Q-5"]
    assert table[0]["patient_id"] == "M***" and table[0]["appointment_key"] == "MAINCLINIC|FI-1"
    hl7 = searched.cli("log", "export", "--since", "1h", "--control-id", "Q-2", "--format", "hl7").stdout
    assert hl7.startswith("MSH|^~\\&|EPIC|MAINCLINIC|") and "SCH|PL-2^EPIC|" in hl7
    assert "BRAMBLE" not in hl7 and "PID|1***|" in hl7
    assert audit_log.entries(open_engine(f"sqlite:///{searched.database}", create=False), action="export") == []
    refused = searched.cli("log", "export", "--format", "csv", check=False)
    assert refused.returncode == 2 and "--since" in refused.stderr


def test_a_phi_export_is_audited_and_written_0600(searched: RunningService, tmp_path: Path) -> None:
    target = tmp_path / "ticket.hl7"
    searched.cli("log", "export", "--since", "1h", "--patient", "MRN-1", "--format", "hl7", "--phi", "--by", "dana",
                 "--output", str(target))  # fmt: skip
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert target.read_text().count("TESTPATIENT") == 0 and target.read_text().count("ORCHARD^ALICE") == 2
    [entry] = audit_log.entries(open_engine(f"sqlite:///{searched.database}", create=False), action="export")
    assert entry.actor == "dana" and entry.details["count"] == 2 and entry.details["format"] == "hl7"
    assert entry.details["filters"]["patient"] == "(given)" and "MRN-1" not in json.dumps(entry.details)
    again = searched.cli("log", "export", "--since", "1h", "--output", str(target), check=False)
    assert again.returncode == 2 and "exists" in again.stderr


def test_a_failed_export_leaves_no_file_and_the_rerun_writes_it(searched: RunningService, tmp_path: Path) -> None:
    target = tmp_path / "failed.csv"
    failed = searched.cli("log", "export", "--since", "1h", "--text", "!!!", "--output", str(target), check=False)
    assert failed.returncode == 2 and "--text needs a word" in failed.stderr
    assert not target.exists()
    searched.cli("log", "export", "--since", "1h", "--format", "csv", "--output", str(target))
    assert target.read_text().startswith("id,received_at,")


def test_csv_cells_from_the_feed_are_never_formulas(fresh_service: RunningService) -> None:
    fresh_service.request(booking("=1+2", "PL-F", "FI-F", "@SUM(A1)", "-ORCHARD", sender="+APP|-EAST"))
    indexed(fresh_service)
    exported = fresh_service.cli("log", "export", "--since", "1h", "--format", "csv", "--phi").stdout
    (row,) = csv.DictReader(io.StringIO(exported))
    assert row["control_id"] == "'=1+2" and row["sending_application"] == "'+APP"
    assert row["sending_facility"] == "'-EAST" and row["patient_id"] == "'@SUM(A1)"
    assert row["patient_name"] == "ALICE -ORCHARD" and row["id"].isdigit()
    jsonl = json.loads(fresh_service.cli("log", "export", "--since", "1h", "--phi").stdout)
    assert jsonl["control_id"] == "=1+2"  # only CSV is read by spreadsheets


def test_log_show_with_patient_data_is_audited_as_unmask(searched: RunningService) -> None:
    (message,) = [r["id"] for r in searched.log("--control-id", "Q-2")]
    engine = open_engine(f"sqlite:///{searched.database}", create=False)
    searched.cli("log", "show", str(message))
    raw = searched.cli("log", "show", str(message), "--raw", "--json", "--by", "erin")
    assert "BRAMBLE" not in raw.stdout, "--raw alone shows the masked segments"
    assert audit_log.entries(engine, action="unmask") == []
    shown = searched.cli("log", "show", str(message), "--phi", "--by", "erin")
    assert "BRAMBLE" in shown.stdout
    searched.cli("log", "show", str(message), "--phi", "--raw", "--reason", "INC-7", "--by", "erin")
    entries = audit_log.entries(engine, action="unmask")
    assert [(e.actor, e.target, e.ids, e.reason) for e in entries] == [
        ("erin", "message", (message,), "INC-7"), ("erin", "message", (message,), "log show")]  # fmt: skip
    assert "BRAMBLE" not in json.dumps([e.details for e in entries])


def test_a_message_purged_before_it_was_indexed_leaves_the_index_sound(tmp_path: Path) -> None:
    """Retention removes words only of indexed messages: FTS5's 'delete' of words it never held would corrupt the
    contentless index."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    summary = {"patient_ids": [{"value": "MRN-P"}], "names": [{"family": "PURGED"}], "placer_appointment_id": "PL-P"}
    terms, words = search_terms("P-1", "EPIC", "MAIN", summary)
    with engine.begin() as conn:
        conn.execute(messages.insert(), [{"received_at": 1.0, "listener": "main", "peer": "p", "status": "accepted",
                                          "control_id": "P-1", "summary": json.dumps(summary), "search_terms": terms,
                                          "search_text": words}])  # fmt: skip
    purge(engine, cutoff=2.0)
    assert catch_up(engine) == 1
    with sqlite3.connect(index_path(engine)) as conn:
        conn.execute("INSERT INTO messages_text (messages_text, rank) VALUES ('integrity-check', 1)")
    assert [r["control_id"] for r in search(engine, Filters(control_id="P-1")).rows] == ["P-1"]
    assert search(engine, Filters(patient="MRN-P")).rows == []
    assert search(engine, Filters(text="purged", since=0.0)).rows == []


# --- messages the index has not reached yet ----------------------------------------------------------------


def logged(engine: Engine, *rows: tuple[str, str, str], received_at: float = 1000.0) -> None:
    """Log messages as intake does (control id, patient id, family name), without indexing them."""
    values = []
    for control, patient, family in rows:
        summary = {"patient_ids": [{"value": patient}], "names": [{"family": family}]}
        terms, words = search_terms(control, "EPIC", "MAIN", summary)
        values.append({"received_at": received_at, "listener": "main", "peer": "p", "status": "accepted",
                       "control_id": control, "summary": json.dumps(summary), "search_terms": terms,
                       "search_text": words})  # fmt: skip
    with engine.begin() as conn:
        conn.execute(messages.insert(), values)


def test_messages_past_the_index_are_searched_directly(tmp_path: Path) -> None:
    """With the indexer behind (service stopped, its job failing, CLI replays meanwhile), a search by key or
    words still finds every message, in one newest-first order and across keyset pages; so does an export."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    logged(engine, ("T-1", "MRN-T", "ROWAN"), ("T-2", "MRN-T", "ASPEN"))
    catch_up(engine)
    logged(engine, ("T-3", "MRN-T", "Rowän"), ("T-4", "MRN-U", "ROWAN"), ("T-5", "MRN-T", "OTHER"))

    def found(filters: Filters, limit: int = 50) -> list[str]:
        return [r["control_id"] for r in search(engine, filters, limit=limit).rows]

    assert found(Filters(patient="MRN-T")) == ["T-5", "T-3", "T-2", "T-1"]
    assert found(Filters(control_id="T-4")) == ["T-4"]
    assert found(Filters(text="rowan", since=0.0)) == ["T-4", "T-3", "T-1"]  # case and accents as FTS5 folds them
    assert found(Filters(text="ROW*", patient="MRN-T", since=0.0)) == ["T-3", "T-1"]
    assert found(Filters(text="rowan", since=2000.0)) == []
    first = search(engine, Filters(patient="MRN-T"), limit=3)
    assert [r["control_id"] for r in first.rows] == ["T-5", "T-3", "T-2"] and first.unindexed == 0
    rest = search(engine, Filters(patient="MRN-T"), before=first.next_before, limit=3)
    assert [r["control_id"] for r in rest.rows] == ["T-1"] and not rest.more
    export = open_export(engine, Filters(patient="MRN-T", since=0.0), "jsonl", False, "test")
    assert export.count == 4 and export.unindexed == 0
    assert [json.loads(line)["control_id"] for line in export.records()] == ["T-1", "T-2", "T-3", "T-5"]


def test_a_long_unindexed_tail_is_reported_not_silent(tmp_path: Path) -> None:
    """Past ``TAIL_MAX`` unindexed messages a search reads only the index, and says how many it did not search:
    the page's ``unindexed``, in ``--json`` and as a note on stderr."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    logged(engine, ("L-1", "MRN-L", "LARCH"))
    catch_up(engine)
    logged(engine, *((f"N-{n}", "MRN-L", "LARCH") for n in range(TAIL_MAX + 1)))
    page = search(engine, Filters(patient="MRN-L"))
    assert [r["control_id"] for r in page.rows] == ["L-1"] and page.unindexed == TAIL_MAX + 1
    assert search(engine, Filters(since=0.0), limit=1).unindexed == 0  # not a search of the index
    url = f"sqlite:///{tmp_path / 'log.db'}"
    listed = subprocess.run([sys.executable, "-m", "hl7bridge", "log", "list", "--patient", "MRN-L", "--json",
                             "--database", url], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert json.loads(listed.stdout)["unindexed"] == TAIL_MAX + 1
    assert f"{TAIL_MAX + 1} newest message(s) are not in the search index" in listed.stderr
    table = subprocess.run([sys.executable, "-m", "hl7bridge", "log", "list", "--patient", "MRN-L", "--database", url],
                           capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert table.stderr.count("not in the search index") == 1
    catch_up(engine, 1000)
    assert search(engine, Filters(patient="MRN-L")).unindexed == 0
    quiet = subprocess.run([sys.executable, "-m", "hl7bridge", "log", "list", "--patient", "MRN-L", "--database", url],
                           capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert "search index" not in quiet.stderr


def test_a_failing_indexer_logs_once_a_minute(fresh_service: RunningService) -> None:
    """The index job runs every second; its failure is one log line with a count of repeats, not one a second."""
    path = index_path(fresh_service.database)
    wait_until(lambda: indexed_to(fresh_service.database) is not None, message="the index file")
    with sqlite3.connect(path) as conn:
        conn.execute("DROP TABLE messages_text")
    fresh_service.request(booking("F-1", "PL-F", "FI-F", "MRN-F", "FIR"))
    assert ids(fresh_service, "--patient", "MRN-F") == ["F-1"]  # searched directly meanwhile
    time.sleep(3.5)
    lines = [line for line in fresh_service.stop().splitlines() if "search index:" in line]
    assert len(lines) == 1 and "messages_text" in lines[0], lines
