"""Commits on PostgreSQL whose outcome the bridge cannot know: a connection lost during COMMIT leaves the message
unanswered and its connection closed (the resend is then accepted, or deduplicated, once), a COMMIT the server
refused is answered AR 207, and a crash of the server with messages in flight gives AA to nothing it had not
committed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .conftest import RunningSandbox, free_port, segments, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, query, service_toml, siu
from .pg import PostgresServer

#: A test-only trigger that runs at COMMIT (deferred) for a marked message: LOST-* ends its own backend there, as
#: a crash or a network cut would, so the client sees its connection drop during COMMIT; REFUSED-* raises an error,
#: which the server answers (a failure known to have rolled back).
AT_COMMIT = """
CREATE FUNCTION at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.control_id LIKE 'LOST-%' THEN
        PERFORM pg_terminate_backend(pg_backend_pid());
    ELSIF NEW.control_id LIKE 'REFUSED-%' THEN
        RAISE EXCEPTION 'refused at commit';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER at_commit AFTER INSERT ON messages DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION at_commit();
"""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"), SANDBOX_TOML)
    yield running
    running.stop()


def test_a_commit_that_loses_its_connection_gets_no_ack_and_the_resend_is_accepted_once(
    postgres: PostgresServer, sandbox: RunningSandbox, tmp_path: Path
) -> None:
    url = postgres.create_database()
    database = url.rsplit("/", 1)[1]
    metrics_port = free_port()
    health = f'\n[health]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\n'
    bridge = start_service(tmp_path, service_toml(sandbox.url) + health, env=TOKEN, log_url=url)
    try:
        postgres.execute(AT_COMMIT, database)
        lost = siu("S12", "LOST-1", "A-LOST-1", future(days=40), patient="MRN-LOST")
        with bridge.client() as client:
            client.send(lost)
            with pytest.raises(ConnectionError):
                client.receive()
        refused = segments(bridge.request(siu("S12", "REFUSED-1", "A-REFUSED-1", future(days=40))))
        assert refused["MSA"][1] == "AR" and "207" in "|".join(refused.get("ERR", [])), refused
        assert not query(bridge, "SELECT id FROM messages WHERE control_id IN ('LOST-1', 'REFUSED-1')")
        metrics = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        assert 'hl7bridge_commit_outcome_unknown_total{listener="main"} 1.0' in metrics

        postgres.execute("DROP TRIGGER at_commit ON messages", database)
        answer = bridge.request(lost)
        assert segments(answer)["MSA"][1] == "AA"
        (row,) = query(bridge, "SELECT id, status FROM messages WHERE control_id = 'LOST-1'")
        assert row["status"] == "accepted"
        assert len(query(bridge, "SELECT id FROM commands WHERE message_id = ?", row["id"])) == 1
        wait_until(lambda: sandbox.instances(appointmentId="A-LOST-1"), message="the journey")
        assert len(sandbox.instances(appointmentId="A-LOST-1")) == 1
    finally:
        stderr = bridge.stop()
    (line,) = [x for x in stderr.splitlines() if "left unanswered" in x]
    assert "COMMIT" in line and "MRN-LOST" not in line and "TESTPATIENT" not in line.upper()


def test_postgresql_crashing_mid_feed_gives_no_aa_for_what_it_did_not_commit(
    own_postgres: PostgresServer, tmp_path: Path
) -> None:
    """Four senders, one message in flight each, a new control id per message (so that a message answered AA
    must be in the log by that id). The server is stopped with ``-m immediate`` (no checkpoint, connections cut,
    commits in progress lost or not) and started again. Every AA'd message is in the log, once; the bridge
    reconnects by itself and answers AA again."""
    bridge = start_service(tmp_path, log_url=own_postgres.create_database())
    answers: dict[str, str] = {}
    stop = threading.Event()
    lock = threading.Lock()

    def send(sender: int) -> None:
        client = None
        for n in range(100_000):
            if stop.is_set():
                break
            control = f"CRASH-{sender}-{n}"
            try:
                client = client or bridge.client(timeout=10)
                client.send(siu("S23", control, f"A-CRASH-{sender}"))
                code = segments(client.receive())["MSA"][1]
            except OSError:  # ConnectionError included: closed unanswered, or refused while the bridge was busy
                code = "closed"
                if client is not None:
                    client.close()
                client = None
            with lock:
                answers[control] = code
            if code != "AA":
                time.sleep(0.2)  # while the server is down: few AR lines (the service's stderr is a pipe nobody reads)
        if client is not None:
            client.close()

    def accepted() -> int:
        with lock:
            return sum(code == "AA" for code in answers.values())

    senders = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    try:
        for t in senders:
            t.start()
        wait_until(lambda: accepted() >= 200, timeout=60, message="AAs before the crash")
        own_postgres.stop("immediate")
        time.sleep(0.5)
        own_postgres.start()
        before = accepted()
        wait_until(lambda: accepted() >= before + 100, timeout=60, message="AAs after the restart")
    finally:
        stop.set()
        for t in senders:
            t.join(30)
    try:
        logged = [r["control_id"] for r in query(bridge, "SELECT control_id FROM messages")]
        given = {control for control, code in answers.items() if code == "AA"}
        assert given - set(logged) == set()
        assert len(logged) == len(set(logged))
        assert any(code != "AA" for code in answers.values())  # the crash was met mid-feed
        assert bridge.process.poll() is None
    finally:
        bridge.stop()
