"""The log on PostgreSQL, one instance: the schema created once however many instances start at once, a log
behind refused by `serve` and upgraded by `hl7bridge db upgrade`, messages in over MLLP committed before their
ACK and dispatched once, duplicates across writers settled by the unique key, the audit chain under concurrent
appends. The end-to-end test runs on a SQLite file too (``database_url``), so both logs keep the same promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from hl7bridge.store import StoreError, Writer, WriteRequest, WriteResult, messages, meta, open_engine, search_terms
from hl7bridge.store.generic_path import write_generic
from hl7bridge.store.queries import record_replay
from hl7bridge.store.schema import SCHEMA_VERSION
from hl7bridge.workflow.search import Filters, search

from .conftest import RunningSandbox, RunningService, segments, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, query, service_toml, settled, settled_commands, siu
from .pg import PostgresServer
from .test_search import booking


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd)  # fmt: skip


# ---- schema -------------------------------------------------------------------------------------------------


def test_instances_starting_at_once_on_an_empty_database_create_the_schema_once(postgres_url: str) -> None:
    """Eight opens race on an empty database: the advisory lock lets one create the tables, and the others find
    them (without it, concurrent CREATE TABLEs fail on PostgreSQL's catalog)."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        try:
            barrier.wait()
            open_engine(postgres_url).dispose()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    engine = open_engine(postgres_url, create=False)
    with engine.connect() as conn:
        assert conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalars().all() == [
            str(SCHEMA_VERSION)
        ]


def test_postgresql_log_is_read_committed_synchronous_and_keys_accepted_messages_uniquely(postgres_url: str) -> None:
    engine = open_engine(postgres_url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW transaction_isolation").scalar() == "read committed"
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"
        index = conn.exec_driver_sql(
            "SELECT indexdef FROM pg_indexes WHERE indexname = 'ux_messages_accepted_key'"
        ).scalar()
    assert index.startswith("CREATE UNIQUE INDEX") and "status" in index and "replay_of IS NULL" in index
    reader = open_engine(postgres_url, read_only=True)
    with reader.connect() as conn, pytest.raises(Exception, match="read-only"):
        conn.execute(update(meta).values(value=meta.c.value))


def test_commands_refuse_a_database_without_a_log(postgres_url: str, tmp_path: Path) -> None:
    done = cli("stats", "--database", postgres_url, cwd=tmp_path)
    assert done.returncode == 2 and "there is no message log" in done.stderr, done.stderr
    with pytest.raises(StoreError, match="no message log"):
        open_engine(postgres_url, create=False)


def test_serve_refuses_a_log_behind_and_db_upgrade_upgrades_it(postgres_url: str, tmp_path: Path) -> None:
    engine = open_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value=str(SCHEMA_VERSION - 1)))
    engine.dispose()
    refused = cli("serve", "--database", postgres_url, "--listen", "tcp:0:interface=127.0.0.1", cwd=tmp_path)
    assert refused.returncode != 0
    (line,) = [x for x in refused.stderr.splitlines() if "schema" in x]
    assert f"schema {SCHEMA_VERSION - 1}" in line and f"hl7bridge db upgrade --database {postgres_url}" in line
    assert "Traceback" not in refused.stderr
    other = cli("stats", "--database", postgres_url, cwd=tmp_path)
    assert other.returncode == 2 and "hl7bridge db upgrade" in other.stderr
    done = cli("db", "upgrade", "--database", postgres_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"upgraded the log from schema {SCHEMA_VERSION - 1} to {SCHEMA_VERSION}"
    again = cli("upgrade", "--database", postgres_url, cwd=tmp_path)
    assert again.stdout.strip() == f"the log is at schema {SCHEMA_VERSION}, current"
    running = start_service(tmp_path, log_url=postgres_url)
    try:
        assert segments(running.request(siu("S23", "UPG-1", "A-UPG-1")))["MSA"][1] == "AA"
    finally:
        running.stop()


# ---- ingest and dispatch, end to end --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"), SANDBOX_TOML)
    yield running
    running.stop()


def test_messages_are_committed_before_their_ack_dispatched_once_and_duplicates_replay_the_ack(
    database_url: str, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    tag = "PG" if database_url.startswith("postgresql") else "SQ"
    bridge = start_service(tmp_path, service_toml(sandbox.url), env=TOKEN, log_url=database_url)
    try:
        controls = [f"{tag}-E2E-{n}" for n in range(6)]
        answers = {}
        for n, control in enumerate(controls):
            answer = bridge.request(siu("S12", control, f"A-{control}", future(days=20 + n)))
            # Read the log the moment the ACK arrives: an AA must follow its commit, message and commands.
            (row,) = query(bridge, "SELECT id, status, ack_raw FROM messages WHERE control_id = ?", control)
            assert segments(answer)["MSA"][1] == "AA" and row["status"] == "accepted"
            assert bytes(row["ack_raw"]) == answer
            assert len(query(bridge, "SELECT id FROM commands WHERE message_id = ?", row["id"])) == 1
            answers[control] = answer
        for control in controls:
            assert settled(bridge, control)[0]["status"] == "done"
        for control in controls:
            assert len(sandbox.instances(appointmentId=f"A-{control}")) == 1
        calls = len(sandbox.calls("bulk"))
        again = bridge.request(siu("S12", controls[0], f"A-{controls[0]}", future(days=20)))
        assert again == answers[controls[0]]
        rows = query(bridge, "SELECT status, duplicate_of FROM messages WHERE control_id = ? ORDER BY id", controls[0])
        assert [r["status"] for r in rows] == ["accepted", "duplicate"] and rows[1]["duplicate_of"] is not None
        time.sleep(0.5)  # a second trigger, were one queued, would have left within the batch window (100 ms)
        assert len(sandbox.calls("bulk")) == calls
        assert len(query(bridge, "SELECT c.id FROM commands c JOIN messages m ON m.id = c.message_id "
                                 "WHERE m.control_id = ?", controls[0])) == 1  # fmt: skip
        stats = json.loads(bridge.cli("stats", "--json").stdout)
        assert stats["outbox"]["depth"] == 0 and stats["messages"] == {"accepted": 6, "duplicate": 1}
        operate(bridge, controls[0])
    finally:
        bridge.stop()


def operate(bridge: RunningService, control: str) -> None:
    """The operator's commands on the same log: list, show, replay (a second accepted row under the same key,
    which the unique key must let through as a replay), purge and the audit chain they leave."""
    listed = bridge.log()
    (first,) = [m for m in listed if m["control_id"] == control and m["status"] == "accepted"]
    shown = json.loads(bridge.cli("log", "show", str(first["id"]), "--json").stdout)
    assert shown["message"]["id"] == first["id"] and len(shown["commands"]) == 1
    assert shown["commands"][0]["status"] == "done"
    bridge.cli("replay", str(first["id"]), "--by", "tester", "--config", str(bridge.config))
    (replayed,) = query(bridge, "SELECT id, status FROM messages WHERE replay_of = ?", first["id"])
    assert replayed["status"] == "accepted"
    (command,) = settled_commands(
        lambda: query(bridge, "SELECT * FROM commands WHERE message_id = ?", replayed["id"]), "the replay"
    )
    assert command["outcome"] == "already triggered with these parameters"
    exported = bridge.cli("log", "export", "--since", "1h", "--format", "jsonl", "--database", bridge.url).stdout
    assert len(exported.splitlines()) == 8 and "TESTPATIENT" not in exported
    time.sleep(1.1)
    purged = bridge.cli("purge", "--older-than", "1s", "--by", "tester", "--database", bridge.url).stdout
    assert "8 message(s)" in purged, purged
    assert query(bridge, "SELECT count(*) AS n FROM messages WHERE raw IS NOT NULL")[0]["n"] == 0
    verified = bridge.cli("audit", "verify", "--json", "--database", bridge.url)
    assert json.loads(verified.stdout)["checked"] == 2


# ---- duplicates across writers -------------------------------------------------------------------------------


def _row(control: str) -> dict:
    return {
        "received_at": time.time(), "listener": "main", "peer": "127.0.0.1", "raw": b"MSH|...", "charset": "utf-8",
        "sending_application": "EPIC", "sending_facility": "MAIN", "control_id": control, "message_type": "SIU",
        "event": "S12", "version": "2.5.1", "appointment_key": f"MAIN|{control}", "action": "book", "route": "r",
        "note": None, "replay_of": None, "summary": None, "ack_code": "AA", "ack_text": None,
        "ack_raw": f"ACK {control}".encode(), "status": "accepted", "error": None, "error_location": None,
        "duplicate_of": None, "purged_at": None, "search_terms": None, "search_text": None,
    }  # fmt: skip


def test_two_writers_accepting_the_same_keys_at_once_keep_one_original_each(postgres_url: str) -> None:
    """Two writers (as two instances would) get the same 200 messages at the same moment, each with its own
    ACK bytes. Per key: one accepted row, the other a duplicate of it, answered with the accepted row's ACK."""
    engines = [open_engine(postgres_url), open_engine(postgres_url)]
    results: dict[tuple[int, str], WriteResult] = {}
    done = threading.Event()
    lock = threading.Lock()

    def direct(fn, *args):  # the writers deliver results on their own thread here
        fn(*args)

    writers = [Writer(engine, direct, max_group=20) for engine in engines]
    for w in writers:
        w.start()
    controls = [f"RACE-{n}" for n in range(200)]

    def on_done(writer: int, control: str):
        def record(result: WriteResult) -> None:
            with lock:
                results[(writer, control)] = result
                if len(results) == 2 * len(controls):
                    done.set()

        return record

    for control in controls:
        for n, w in enumerate(writers):
            row = dict(_row(control), ack_raw=f"ACK {control} from {n}".encode())
            w.submit(WriteRequest(row, ("EPIC", "MAIN", control), on_done(n, control)))
    assert done.wait(60)
    for w in writers:
        w.stop()
    assert not [r.error for r in results.values() if r.error]
    with engines[0].connect() as conn:
        rows = conn.execute(select(messages.c.id, messages.c.control_id, messages.c.status, messages.c.ack_raw,
                                   messages.c.duplicate_of).order_by(messages.c.id)).all()  # fmt: skip
        assert conn.execute(select(func.count()).select_from(messages)).scalar() == 400
    by_control: dict[str, list] = {}
    for row in rows:
        by_control.setdefault(row.control_id, []).append(row)
    for control in controls:
        pair = by_control[control]
        (accepted,) = [r for r in pair if r.status == "accepted"]
        (duplicate,) = [r for r in pair if r.status == "duplicate"]
        assert duplicate.duplicate_of == accepted.id and bytes(duplicate.ack_raw) == bytes(accepted.ack_raw)
        answered = {bytes(results[(n, control)].original_ack or accepted.ack_raw) for n in (0, 1)}
        assert answered == {bytes(accepted.ack_raw)}


def _write_one(writer: Writer, control: str) -> WriteResult:
    got: list[WriteResult] = []
    done = threading.Event()
    writer.submit(WriteRequest(_row(control), ("EPIC", "MAIN", control), lambda r: (got.append(r), done.set())))
    assert done.wait(30)
    return got[0]


def test_a_writer_connection_ended_between_groups_costs_no_message(
    postgres: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The writer pings a connection only after it sat idle (a ping per group was a round trip per group): one
    ended a moment ago (a restarted server, a terminated backend) fails the next group's first statement, before
    any COMMIT, and the group is written again on a new connection, once. After an idle second the ping finds
    it dead first, and nothing fails at all."""
    writer = Writer(open_engine(postgres_url), lambda fn, *args: fn(*args))
    writer.start()
    database = postgres_url.rsplit("/", 1)[1]
    end_writers = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'hl7bridge' "
                   f"AND datname = '{database}' AND pid <> pg_backend_pid()")  # fmt: skip
    try:
        assert _write_one(writer, "BEFORE").error is None
        with caplog.at_level("WARNING", logger="hl7bridge.store"):
            postgres.execute(end_writers, database)
            assert _write_one(writer, "RIGHT-AFTER").error is None
            assert "lost before the COMMIT of 1 message(s), nothing committed" in caplog.text
            caplog.clear()
            assert _write_one(writer, "WARM").error is None
            postgres.execute(end_writers, database)
            time.sleep(1.5)
            assert _write_one(writer, "AFTER-IDLE").error is None
            assert "lost before the COMMIT" not in caplog.text
    finally:
        writer.stop()
    with open_engine(postgres_url).connect() as conn:
        found = conn.execute(select(messages.c.control_id).order_by(messages.c.id)).scalars().all()
    assert found == ["BEFORE", "RIGHT-AFTER", "WARM", "AFTER-IDLE"]


def test_while_postgresql_is_down_messages_get_ar_and_after_its_restart_aa_without_restarting_the_bridge(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    """Stopped with ``-m immediate`` (a crash): the pool checks its connections before use, so the first message
    after a restart is not spent on a dead one; while it is down nothing is answered AA; the service runs on."""
    url = postgres.create_database()
    bridge = start_service(tmp_path, log_url=url)
    try:
        assert segments(bridge.request(siu("S23", "DOWN-1", "A-DOWN")))["MSA"][1] == "AA"
        postgres.stop("immediate")
        postgres.start()
        assert segments(bridge.request(siu("S23", "DOWN-2", "A-DOWN")))["MSA"][1] == "AA"
        postgres.stop("immediate")
        try:
            down = segments(bridge.request(siu("S23", "DOWN-3", "A-DOWN")))
            assert down["MSA"][1] == "AR" and "207" in "|".join(down.get("ERR", [])), down
        finally:
            postgres.start()
        assert bridge.process.poll() is None
        assert segments(bridge.request(siu("S23", "DOWN-4", "A-DOWN")))["MSA"][1] == "AA"
        rows = query(bridge, "SELECT control_id FROM messages ORDER BY id")
        assert [r["control_id"] for r in rows] == ["DOWN-1", "DOWN-2", "DOWN-4"]
    finally:
        bridge.stop()


def test_a_dispatched_resend_accepted_while_its_first_copy_waited_settles_as_its_duplicate(
    postgres_url: str, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    """``ack_mode = "dispatched"``: a resend that arrives while the first copy awaits the API is processed anew
    (no provisional AA). Both end accepted by the API; on PostgreSQL, where accepted originals are unique by key,
    the second to settle is recorded as the first's duplicate instead of failing the dispatcher's write."""
    listener = 'ack_mode = "dispatched"\ndispatch_timeout = 5'
    bridge = start_service(tmp_path, service_toml(sandbox.url, listener_extra=listener), env=TOKEN,
                           log_url=postgres_url)  # fmt: skip
    sandbox.faults(latency_ms=1000)
    try:
        message = siu("S12", "PG-DSP-RACE", "A-PG-DSP-RACE", future(days=30))
        with bridge.client() as original, bridge.client() as resend:
            original.send(message)
            wait_until(lambda: query(bridge, "SELECT id FROM messages WHERE control_id = 'PG-DSP-RACE'"))
            resend.send(message)
            answers = [segments(original.receive())["MSA"][1], segments(resend.receive())["MSA"][1]]
        assert answers == ["AA", "AA"]
        rows = query(bridge, "SELECT id, status, duplicate_of FROM messages WHERE control_id = ? ORDER BY id",
                     "PG-DSP-RACE")  # fmt: skip
        assert [r["status"] for r in rows] == ["accepted", "duplicate"] and rows[1]["duplicate_of"] == rows[0]["id"]
        assert len(sandbox.instances(appointmentId="A-PG-DSP-RACE")) == 1
    finally:
        sandbox.faults(latency_ms=0)
        bridge.stop()


# ---- search ----------------------------------------------------------------------------------------------------


def test_a_message_is_findable_by_key_and_words_once_answered_and_a_purge_clears_the_patients(
    postgres_url: str, tmp_path: Path
) -> None:
    """No index job on PostgreSQL: a message's keys and words are written with it, so the moment its AA is out it
    is in the index; `log list` finds it by every key and by words; a purge removes the patient's keys and every
    word, and keeps its control id, sender and appointments findable."""
    bridge = start_service(tmp_path, log_url=postgres_url)
    try:
        for raw, control in ((booking("K-1", "PL-1", "FI-1", "MRN-1", "ORCHARD"), "K-1"),
                             (booking("K-2", "PL-2", "FI-2", "MRN-2", "BRAMBLE"), "K-2"),
                             (booking("K-3", "PL-1", "FI-1", "MRN-1", "Orchärd", sender="CERNER|EAST"), "K-3")):  # fmt: skip
            assert segments(bridge.request(raw))["MSA"][1] == "AA"
            (row,) = query(bridge, "SELECT id FROM messages WHERE control_id = ?", control)
            assert query(
                bridge, "SELECT key FROM search_keys WHERE message_id = ? AND key = ?", row["id"], f"c:{control}"
            )
            assert query(bridge, "SELECT message_id FROM message_words WHERE message_id = ?", row["id"])
        assert not query(bridge, "SELECT value FROM meta WHERE key = 'search_indexed_to'")

        def ids(*args: str) -> list[str]:
            return [r["control_id"] for r in bridge.log(*args)]

        assert ids("--patient", "MRN-1") == ["K-3", "K-1"]
        assert ids("--appointment", "FI-2") == ["K-2"]
        assert ids("--control-id", "K-3") == ["K-3"]
        assert ids("--sender", "CERNER^EAST") == ["K-3"]
        assert ids("--sender", "EPIC", "--patient", "MRN-1") == ["K-1"]
        assert ids("--text", "orchard", "--since", "1h") == ["K-3", "K-1"]
        assert ids("--text", "orch* alice", "--sender", "EPIC", "--since", "1h") == ["K-1"]
        assert ids("--text", "orch", "--since", "1h") == []
        bridge.cli("purge", "--older-than", "0s", "--database", bridge.url)
        assert ids("--patient", "MRN-1") == []
        assert ids("--text", "orchard", "--since", "1h") == []
        assert ids("--appointment", "PL-1") == ["K-3", "K-1"]  # outcomes stay findable
        assert query(bridge, "SELECT count(*) AS n FROM search_keys WHERE key LIKE 'p:%'")[0]["n"] == 0
        assert query(bridge, "SELECT count(*) AS n FROM message_words")[0]["n"] == 0
    finally:
        bridge.stop()


def _searchable(control: str, patient: str, family: str) -> dict:
    summary = {"patient_ids": [{"value": patient}], "names": [{"family": family}]}
    terms, words = search_terms(control, "EPIC", "MAIN", summary)
    return dict(_row(control), search_terms=terms, search_text=words)


def test_a_message_committed_after_a_newer_one_is_findable_when_committed(postgres_url: str) -> None:
    """Two writers (two instances, or the service and a CLI replay): the first draws the lower id and commits
    last. Nothing waits for ids to become visible in order: each message is findable from its own commit, a
    replay too."""
    engine = open_engine(postgres_url)

    def found(**filters: object) -> list[str]:
        return [r["control_id"] for r in search(engine, Filters(**filters), limit=10).rows]

    with engine.connect() as late:
        with late.begin():
            (first,) = write_generic(late, [WriteRequest(_searchable("LATE-1", "MRN-L", "ROWAN"), None, print)])
            with engine.begin() as other:
                (second,) = write_generic(other, [WriteRequest(_searchable("EARLY-2", "MRN-L", "ASPEN"), None, print)])
            assert found(patient="MRN-L") == ["EARLY-2"]
            assert found(text="rowan", since=0.0) == []
        assert first.message_id < second.message_id
    assert found(patient="MRN-L") == ["EARLY-2", "LATE-1"]
    assert found(control_id="LATE-1") == ["LATE-1"]
    assert found(text="rowan", since=0.0) == ["LATE-1"]
    replayed = record_replay(engine, {"id": first.message_id}, _searchable("LATE-1", "MRN-L", "ROWAN"), [])
    assert [r["id"] for r in search(engine, Filters(control_id="LATE-1"), limit=10).rows] == [
        replayed,
        first.message_id,
    ]  # a replay is indexed as it is written too
    assert found(text="rowan", since=0.0) == ["LATE-1", "LATE-1"]


def test_a_group_holding_a_resend_is_planned_again_with_its_original(postgres_url: str) -> None:
    """A group goes in as though none of its keys were logged, its lookup in the same round trip as its rows. A
    resend found logged (here of a message accepted only as a replay, which the unique key does not hold, so its
    row would have gone in) takes the group's rows and index out, and the group is planned again: the resend a
    duplicate of the replay, its neighbours accepted, each message once in the log and in the index."""
    engine = open_engine(postgres_url)
    refused = dict(_searchable("RS-1", "MRN-R", "REDWOOD"), status="rejected", ack_code="AR")
    with engine.begin() as conn:
        (first,) = write_generic(conn, [WriteRequest(refused, None, print)])
    replay = record_replay(engine, {"id": first.message_id}, _searchable("RS-1", "MRN-R", "REDWOOD"), [])
    group = [
        WriteRequest(_searchable(c, "MRN-R", "REDWOOD"), ("EPIC", "MAIN", c), print) for c in ("RS-0", "RS-1", "RS-2")
    ]
    with engine.begin() as conn:
        results = write_generic(conn, group)
    assert [r.duplicate_of for r in results] == [None, replay, None]
    assert results[1].original_ack == b"ACK RS-1"
    with engine.connect() as conn:
        rows = conn.execute(select(messages.c.control_id, messages.c.status).order_by(messages.c.id)).all()
        keys = conn.exec_driver_sql("SELECT key, count(*) FROM search_keys WHERE starts_with(key, 'c:RS-') GROUP BY key "
                                    "ORDER BY key").all()  # fmt: skip
        words = conn.exec_driver_sql("SELECT count(*) FROM message_words").scalar()
    assert sorted(map(tuple, rows)) == [("RS-0", "accepted"), ("RS-1", "accepted"), ("RS-1", "duplicate"),
                                        ("RS-1", "rejected"), ("RS-2", "accepted")]  # fmt: skip
    assert [tuple(k) for k in keys] == [("c:RS-0", 1), ("c:RS-1", 3), ("c:RS-2", 1)] and words == 5


def _column_types(conn) -> dict[tuple[str, str], str]:
    rows = conn.exec_driver_sql("SELECT table_name, column_name, data_type FROM information_schema.columns "
                                "WHERE table_schema = 'public'")  # fmt: skip
    return {(t, c): kind for t, c, kind in rows}


#: Columns named like ids that hold the feed's or the API's strings, not row ids.
STRING_IDS = ("control_id", "chat_bot_id", "flow_id", "call_id")
#: Ids that are not numbers: an instance's is generated text at each start.
TEXT_ROW_IDS = (("instances", "id"),)


def _is_id(_table: str, column: str) -> bool:
    """A column holding a row id (or the row's own): BIGINT on PostgreSQL, as ids are."""
    named = column == "id" or column.endswith("_id") or column in ("replay_of", "duplicate_of", "resolution_audit")
    return named and column not in STRING_IDS and (_table, column) not in TEXT_ROW_IDS


def test_db_upgrade_widens_every_id_and_indexes_every_message_logged(postgres_url: str, tmp_path: Path) -> None:
    """A schema-9 PostgreSQL log: INTEGER ids where BIGINT ones point, no text index, no log id, and keys copied by
    the old batch job up to its mark, which missed a message committed late under a lower id. `db upgrade` (steps
    10 to 12) gives it its log id, widens the ids, and every message becomes findable by key and words; the mark
    goes."""
    engine = open_engine(postgres_url)
    with engine.begin() as conn:
        types = _column_types(conn)
        assert not [key for key, kind in types.items() if _is_id(*key) and kind != "bigint"], types
        assert types[("audit_refs", "ref")] == "text"
        for table, column in (("audit_refs", "audit_id"), ("commands", "config_id"), ("configs", "id"),
                              ("api_tokens", "id")):  # fmt: skip
            conn.exec_driver_sql(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE INTEGER")
        conn.exec_driver_sql("ALTER TABLE audit_refs ALTER COLUMN ref TYPE VARCHAR(128)")
        conn.exec_driver_sql("DROP TABLE message_words")
        conn.execute(messages.insert(), [_searchable(f"OLD-{n}", "MRN-OLD", "HAWTHORN") for n in (1, 2, 3)])
        conn.exec_driver_sql("INSERT INTO search_keys (key, message_id) SELECT 'c:' || control_id, id FROM messages "
                             "WHERE control_id = 'OLD-2'")  # fmt: skip
        conn.execute(meta.insert().values(key="search_indexed_to", value="2"))
        conn.execute(meta.delete().where(meta.c.key == "log_id"))  # given by step 13
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="9"))
    engine.dispose()
    done = cli("db", "upgrade", "--database", postgres_url, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    engine = open_engine(postgres_url, create=False)
    with engine.connect() as conn:
        types = _column_types(conn)
        assert not [key for key, kind in types.items() if _is_id(*key) and kind != "bigint"], types
        assert types[("audit_refs", "ref")] == "text"
        assert conn.execute(select(meta.c.value).where(meta.c.key == "search_indexed_to")).first() is None
        assert len(conn.execute(select(meta.c.value).where(meta.c.key == "log_id")).scalar_one()) == 32
        assert conn.execute(select(func.to_regclass("ack_changes"))).scalar() is None  # SQLite's only
    found = search(engine, Filters(patient="MRN-OLD"), limit=10).rows
    assert [r["control_id"] for r in found] == ["OLD-3", "OLD-2", "OLD-1"]
    assert [r["control_id"] for r in search(engine, Filters(text="hawthorn", since=0.0), limit=10).rows] == [
        "OLD-3", "OLD-2", "OLD-1"
    ]  # fmt: skip


def test_a_newer_schema_and_a_foreign_database_are_refused_untouched(postgres: PostgresServer) -> None:
    newer = postgres.create_database()
    engine = open_engine(newer)
    with engine.begin() as conn:
        conn.execute(update(meta).where(meta.c.key == "schema_version").values(value="999"))
    engine.dispose()
    with pytest.raises(StoreError, match="newer hl7bridge"):
        open_engine(newer)
    foreign = postgres.create_database()
    postgres.execute("CREATE TABLE patients (id int)", foreign.rsplit("/", 1)[1])
    with pytest.raises(StoreError, match="not an hl7bridge message log"):
        open_engine(foreign)
    assert postgres.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = 'public'", foreign.rsplit("/", 1)[1]
    ) == [("patients",)]
