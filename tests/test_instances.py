"""Several instances on one PostgreSQL log (issue 20): two real ``serve`` processes, the real sandbox. One elected
dispatcher sends; a killed or stopped leader is taken over by the standby, which searches the trigger that was in
flight before it sends it again; a stopped leader resumed sends nothing more (its lease lapsed, its writes are
fenced by epoch); a message ingested by the standby wakes the leader through NOTIFY; status shows them all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from hl7bridge.api.console.pages import chart, page
from hl7bridge.app.instance import BEAT_EVERY
from hl7bridge.dispatch.child import FixedToken
from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.mapping.routing import Command
from hl7bridge.store import CommandUpdate, Job, OutboxWrite, Writer, command_values, commands, open_engine
from hl7bridge.store.cluster import (
    FORGET_AFTER,
    STALLED_AFTER_S,
    InstanceRow,
    StaleEpoch,
    check_epoch,
    claim_leadership,
    instance_rows,
    register_instance,
)
from hl7bridge.store.schema import APPLICATION_NAME, instances
from hl7bridge.workflow.dashboard import dashboard
from hl7bridge.workflow.status import LogFacts

from .conftest import RunningSandbox, RunningService, free_port, segments, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, ack, future, query, service_toml, settled, siu
from .test_dispatch_process import alive, children

#: The shortest lease the configuration takes: takeovers in the tests come within seconds.
LEASE = 2


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    running = start_sandbox(tmp_path_factory.mktemp("sandbox"), SANDBOX_TOML)
    yield running
    running.stop()


class Pair:
    """Two instances on one database; ``a`` started first, so its dispatcher leads."""

    def __init__(self, tmp_path: Path, url: str, sandbox: RunningSandbox, dispatch_extra: str = "",
                 lease: float = LEASE, listener_extra: str = "", service_extra: str = "") -> None:  # fmt: skip
        self.services: dict[str, RunningService] = {}
        self.configs: dict[str, tuple[Path, str]] = {}
        self.url = url
        self.health: dict[str, int] = {}
        for name in ("a", "b"):
            workdir = tmp_path / name
            workdir.mkdir()
            port = free_port()
            config = (f'[service]\ndispatch_lease = {lease}\ninstance_name = "node-{name}"\n'
                      f'pid_file = "{workdir / "hl7bridge.pid"}"\n{service_extra}\n'
                      f'[health]\nlisten = "tcp:{port}:interface=127.0.0.1"\nheartbeat_interval = 1\n'
                      + _dispatch(service_toml(sandbox.url, listener_extra=listener_extra), dispatch_extra))  # fmt: skip
            self.configs[name] = (workdir, config)
            self.services[name] = start_service(workdir, config, env=TOKEN, log_url=url)
            self.health[name] = port
            if name == "a":
                wait_until(lambda: self.leader() == "a", message="the first instance to lead")

    @property
    def a(self) -> RunningService:
        return self.services["a"]

    @property
    def b(self) -> RunningService:
        return self.services["b"]

    def leader(self) -> str | None:
        """Which service's dispatcher leads ("a", "b"), by the leader's row and the instances' pids."""
        rows = query(self.a, "SELECT i.pid FROM dispatch_leader d JOIN instances i ON i.id = d.instance")
        pids = {s.process.pid: n for n, s in self.services.items()}
        return pids.get(rows[0]["pid"]) if rows else None

    def restart(self, name: str) -> None:
        workdir, config = self.configs[name]
        self.services[name] = start_service(workdir, config, env=TOKEN, log_url=self.url)

    def status(self, name: str) -> dict:
        return requests.get(f"http://127.0.0.1:{self.health[name]}/status", timeout=5).json()

    def stop(self) -> None:
        for service in self.services.values():
            if service.process.poll() is None:
                for pid in children(service.process.pid):
                    os.kill(pid, signal.SIGCONT)
                os.kill(service.process.pid, signal.SIGCONT)
            service.stop()


def _dispatch(toml: str, settings: str) -> str:
    """``toml`` with these ``[dispatch]`` settings, replacing those it has."""
    for line in settings.splitlines():
        key = line.split("=", 1)[0].strip()
        toml, found = re.subn(rf"^{key} = .*$", line, toml, flags=re.MULTILINE)
        if not found:
            toml = toml.replace("[dispatch]\n", f"[dispatch]\n{line}\n")
    return toml


@pytest.fixture
def pair(tmp_path: Path, postgres_url: str, sandbox: RunningSandbox) -> Iterator[Pair]:
    running = Pair(tmp_path, postgres_url, sandbox)
    yield running
    running.stop()
    sandbox.faults(latency_ms=0)


def journeys_once(sandbox: RunningSandbox, appointments: list[str]) -> None:
    assert {a: len(sandbox.instances(appointmentId=a)) for a in appointments} == {a: 1 for a in appointments}


def test_killed_leader_is_taken_over_its_in_flight_trigger_searched_and_status_shows_it_down(
    pair: Pair, sandbox: RunningSandbox
) -> None:
    """kill -9 of the leading service mid-call: its dispatcher dies with it (its lock session ends), the standby
    takes over, searches the trigger left in flight (found: not sent again) and sends the rest."""
    sandbox.faults(latency_ms=3000)
    appointments = [f"A-KILL-{n}" for n in range(4)]
    for n, appointment in enumerate(appointments[:2]):
        assert segments(pair.a.request(siu("S12", f"KILL-{n}", appointment, future(days=10 + n))))["MSA"][1] == "AA"
    flying = wait_until(lambda: query(pair.a, "SELECT id FROM commands WHERE status = 'in_flight'"),
                        message="a call in flight")  # fmt: skip
    # Marked in flight before the call: killed before the API saw it, the search rightly finds nothing and the
    # trigger is sent ("triggered", a flake of this test); killed once the API has it (answered 3 s late), the
    # search must find it.
    wait_until(lambda: sandbox.calls("bulk"), message="the trigger at the API")
    pair.a.process.kill()
    pair.a.process.wait()
    sandbox.faults(latency_ms=0)
    for n, appointment in enumerate(appointments[2:], start=2):
        assert segments(pair.b.request(siu("S12", f"KILL-{n}", appointment, future(days=10 + n))))["MSA"][1] == "AA"
    for n in range(4):
        assert settled(pair.b, f"KILL-{n}", timeout=30)[0]["status"] == "done"
    assert pair.leader() == "b"
    journeys_once(sandbox, appointments)
    for command in flying:
        tried = query(pair.b, "SELECT operation FROM attempts WHERE command_id = ? ORDER BY id", command["id"])
        assert tried[0]["operation"] == "search", tried
    outcomes = query(pair.b, "SELECT outcome FROM commands WHERE id = ?", flying[0]["id"])
    assert "not sent again" in outcomes[0]["outcome"]

    def down() -> dict | None:
        status = pair.status("b")
        roles = {i["name"]: i["role"] for i in status["instances"]}
        return status if roles == {"node-a": "down", "node-b": "leader"} else None

    status = wait_until(down, timeout=30, message="node-a shown down")
    assert status["state"] == "degraded" and any("node-a" in r and "down" in r for r in status["reasons"])
    assert status["dispatch"]["role"] == "leader"
    assert [i["name"] for i in status["instances"] if i["this"]] == ["node-b"], "which instance answered"
    shown = pair.b.cli("status", "--config", str(pair.b.config), check=False).stdout
    assert "instance node-a" in shown and ": DOWN, heartbeat" in shown and "instance node-b" in shown, shown
    assert re.search(r"instance node-b \(\S+, pid \d+; this instance\): leader", shown), shown
    board = dashboard(open_engine(pair.b.url, create=False)).to_json()
    html = page(None, "dashboard.html", board=board, service=status, chart=chart([])).body.decode()
    assert "<td>node-a</td>" in html and '<td>node-b <span class="sub">this instance</span></td>' in html
    assert '<span class="badge badge-down">DOWN</span>' in html and '"badge badge-leader">leader<' in html
    # node-a restarted under its name replaces the row its killed run left: no instance is down any more.
    pair.restart("a")
    wait_until(lambda: pair.status("b")["state"] == "ok", timeout=30, message="node-a back as a standby")
    assert {i["name"]: i["role"] for i in pair.status("b")["instances"]} == {"node-a": "standby", "node-b": "leader"}


def test_stopped_leader_is_taken_over_and_resumed_sends_nothing_more(
    tmp_path: Path, postgres_url: str, sandbox: RunningSandbox
) -> None:
    """SIGSTOP of the leading service and its dispatcher while a trigger gathers in its bucket (a long batch
    window), past the lease: the standby ends the stuck lock session and sends it. SIGCONT: the old dispatcher,
    whose bucket is now due, sends nothing (its lease lapsed, its writes are fenced) and exits; a new one waits
    as a standby; every journey exactly once."""
    pair = Pair(tmp_path, postgres_url, sandbox, dispatch_extra="batch_window_ms = 1500")
    try:
        assert segments(pair.a.request(siu("S12", "STOP-0", "A-STOP-0", future(days=11))))["MSA"][1] == "AA"
        assert settled(pair.a, "STOP-0")[0]["status"] == "done"
        status = pair.status("b")
        assert status["state"] == "ok" and status["dispatch"]["role"] == "standby"
        assert {i["name"]: i["role"] for i in status["instances"]} == {"node-a": "leader", "node-b": "standby"}
        (old_child,) = children(pair.a.process.pid)
        stopped = [pair.a.process.pid, old_child]
        assert segments(pair.a.request(siu("S12", "STOP-1", "A-STOP-1", future(days=12))))["MSA"][1] == "AA"
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            assert segments(pair.b.request(siu("S12", "STOP-2", "A-STOP-2", future(days=13))))["MSA"][1] == "AA"
            for n in (1, 2):
                assert settled(pair.b, f"STOP-{n}", timeout=30)[0]["status"] == "done"
            assert pair.leader() == "b"
            calls = len(sandbox.calls())
        finally:
            for pid in reversed(stopped):
                os.kill(pid, signal.SIGCONT)
        wait_until(lambda: not alive(old_child), timeout=20, message="the deposed dispatcher to exit")
        wait_until(lambda: children(pair.a.process.pid), timeout=20, message="a new dispatcher process for node-a")
        assert len(sandbox.calls()) == calls
        # node-a ingests on; node-b's dispatcher sends what it took in.
        assert segments(pair.a.request(siu("S12", "STOP-3", "A-STOP-3", future(days=14))))["MSA"][1] == "AA"
        assert settled(pair.a, "STOP-3", timeout=30)[0]["status"] == "done"
        journeys_once(sandbox, [f"A-STOP-{n}" for n in range(4)])
        wait_until(lambda: {i["name"]: i["role"] for i in pair.status("a")["instances"]} == {
            "node-a": "standby", "node-b": "leader"}, timeout=20, message="node-a a standby")  # fmt: skip
        assert pair.status("a")["dispatch"]["role"] == "standby"
    finally:
        pair.stop()


def test_a_message_taken_in_by_the_standby_wakes_the_leader_through_notify(
    tmp_path: Path, postgres_url: str, sandbox: RunningSandbox
) -> None:
    """The backstop poll is set to 10 minutes: only the standby's NOTIFY can wake the leader in time. The standby
    then stops as promptly as any service; only the leader's instance ran the retention pass."""
    pair = Pair(
        tmp_path, postgres_url, sandbox, dispatch_extra="poll_interval = 600", service_extra="retention_days = 1"
    )
    try:
        time.sleep(1.0)  # the leader's first looks at the log are behind it: now it waits for a wake
        assert segments(pair.b.request(siu("S12", "NOTE-1", "A-NOTE-1", future(days=12))))["MSA"][1] == "AA"
        assert settled(pair.b, "NOTE-1", timeout=20)[0]["status"] == "done"
        assert pair.leader() == "a"
        # A standby's dispatcher process reads its pipe while it waits: it stops with its service, unkilled.
        stopped = pair.b.stop()
        assert pair.b.process.returncode == 0 and "did not stop in time" not in stopped, stopped
        # Housekeeping runs on the leader's instance only.
        assert "retention: cleared" in pair.a.stop() and "retention: cleared" not in stopped
    finally:
        pair.stop()


def test_a_standby_answers_a_dispatched_verdict_from_the_log(
    tmp_path: Path, postgres_url: str, sandbox: RunningSandbox
) -> None:
    """``ack_mode = "dispatched"`` on the standby: the leader elsewhere sends the command, and the standby's
    dispatcher process, which waits to lead, reads the verdict from the log for its service's sender."""
    pair = Pair(tmp_path, postgres_url, sandbox, listener_extra='ack_mode = "dispatched"\ndispatch_timeout = 8')
    try:
        assert segments(pair.b.request(siu("S12", "VERD-1", "A-VERD-1", future(days=12))))["MSA"][1] == "AA"
        assert query(pair.b, "SELECT status FROM commands")[0]["status"] == "done"
        assert pair.leader() == "a"
    finally:
        pair.stop()


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_write_of_a_deposed_dispatcher_is_refused_by_the_writer(kind: str, tmp_path: Path, request) -> None:
    """Fencing through the real writer: once a new leader has claimed the row, a write carrying the old epoch
    fails with ``StaleEpoch`` and changes nothing; the new epoch's write goes through."""
    url = f"sqlite:///{tmp_path / 'log.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    engine = open_engine(url)
    command = Command(kind="book", route="r", chat_bot_id="bot", time_zone="UTC", flow_id=None, parameters={},
                      identifiers={"appointmentId": "A-F"}, appointment_key="MAIN|A-F", start_at=None)  # fmt: skip
    with engine.begin() as conn:
        command_id = conn.execute(
            commands.insert().values({**command_values(command, 0.0), "message_id": 1})
        ).inserted_primary_key[0]
    with engine.connect() as conn:
        old = claim_leadership(conn, "old", 10.0)
        new = claim_leadership(conn, "new", 10.0)
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    try:

        def run(epoch: int) -> BaseException | None:
            update = CommandUpdate(command_id, "done", f"by {epoch}")
            return wait_until_done(writer, OutboxWrite(1.0, updates=[update], epoch=epoch))

        assert isinstance(run(old), StaleEpoch)
        with engine.connect() as conn:
            assert conn.execute(commands.select().where(commands.c.id == command_id)).first().status == "pending"
        assert run(new) is None
        with engine.connect() as conn:
            row = conn.execute(commands.select().where(commands.c.id == command_id)).first()
        assert (row.status, row.outcome) == ("done", f"by {new}")
    finally:
        writer.stop()


def wait_until_done(writer: Writer, write: OutboxWrite) -> BaseException | None:
    finished = threading.Event()
    outcome: list[BaseException | None] = []

    def done(_result: object, error: BaseException | None) -> None:
        outcome.append(error)
        finished.set()

    writer.submit_job(Job(write, done))
    assert finished.wait(30)
    return outcome[0]


def test_a_dispatcher_whose_lease_lapsed_starts_no_call(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """The lease guard alone: while ``may_send`` says no, a due command stays pending and the API sees no call;
    once it says yes, the command goes."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    command = Command(kind="book", route="reminders", chat_bot_id="reminders", time_zone="UTC", flow_id=None,
                      parameters={"appointmentId": "A-LEASE"}, identifiers={"appointmentId": "A-LEASE"},
                      appointment_key="MAIN|A-LEASE", start_at=None)  # fmt: skip
    with engine.begin() as conn:
        conn.execute(commands.insert().values({**command_values(command, time.time()), "message_id": 1}))
    fresh = [False]

    def calls() -> list[dict]:
        return [c for c in sandbox.calls() if "A-LEASE" in json.dumps(c["body"])]

    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    client = JourneysClient(ApiSettings(base_url=sandbox.url, org_id="test-org"), FixedToken("test-token"))
    dispatcher = Dispatcher(engine, writer, client, DispatchSettings(batch_window=0.05, poll_interval=0.1),
                            may_send=lambda: fresh[0])  # fmt: skip
    dispatcher.start()
    try:
        time.sleep(1.0)
        assert calls() == []
        with engine.connect() as conn:
            assert conn.execute(commands.select()).first().status == "pending"
        fresh[0] = True
        wait_until(calls, message="the call once the lease is fresh")
    finally:
        dispatcher.stop()
        writer.stop()


def test_instances_silent_for_a_day_are_removed(tmp_path: Path) -> None:
    """The heartbeat removes rows whose last heartbeat is older than a day (by the database's clock)."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    row = {
        "name": "gone",
        "host": "h",
        "pid": 1,
        "version": "0",
        "started_at": 0.0,
        "last_message_at": None,
        "lease": 10.0,
    }
    with engine.begin() as conn:
        register_instance(conn, dict(row, id="old"))
        conn.execute(instances.update().values(heartbeat_at=instances.c.heartbeat_at - FORGET_AFTER - 60))
        register_instance(conn, dict(row, id="new", name="here"))
        assert [i.id for i in instance_rows(conn)] == ["new"]


def test_a_claim_ends_a_stopped_instances_write_holding_the_leaders_row(postgres_url: str) -> None:
    """A dispatcher write of an instance stopped mid-transaction holds the row ``FOR SHARE`` for as long as it is
    stopped: the new leader's claim ends that session instead of waiting for it (a SIGSTOP behind HAProxy once
    took 38 s, until the SIGCONT), and the stopped write is gone with its session."""
    engine = open_engine(postgres_url)
    with engine.connect() as conn:
        old = claim_leadership(conn, "old", 10.0)
    stopped = engine.connect()
    stopped.begin()
    check_epoch(stopped, old)
    claimed: list[int] = []
    claimer = threading.Thread(target=lambda: claimed.append(claim_leadership(engine.connect(), "new", 10.0)))
    claimer.start()
    claimer.join(60)
    assert claimed == [old + 1], "the claim is still waiting for the stopped write"
    with pytest.raises(OperationalError):
        stopped.execute(select(1))
    stopped.invalidate()


def test_a_writers_transaction_left_idle_is_ended_by_the_server(postgres_url: str) -> None:
    """A stopped instance's open writer transaction would hold its row and key locks (and every other writer
    waiting on them) for as long as it is stopped: the writer's sessions end an idle transaction; a reader's
    (an export pausing between batches) do not."""
    engine = open_engine(postgres_url)
    writer = Writer(engine, lambda fn, *args: fn(*args))
    with writer.engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "5s"
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SHOW idle_in_transaction_session_timeout").scalar() == "0"
    writer.stop()


#: A process that opens a transaction on the log, sends a write in a pipeline without its Sync, and stops itself
#: there (SIGSTOP): an instance stopped in the middle of a writer group, as a paused VM or a debugger leaves it.
STALLED_WRITER = """
import os, signal, sys
import psycopg
conn = psycopg.connect(sys.argv[1], application_name=sys.argv[3])
cur = conn.cursor()
with conn.pipeline():
    cur.execute("UPDATE instances SET lease = lease WHERE name = %s", (sys.argv[2],))
    conn.pgconn.flush()
    print("locked", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
"""


def test_a_stopped_process_holding_locks_mid_pipeline_is_ended_and_the_writer_goes_on(
    tmp_path: Path, postgres_url: str, sandbox: RunningSandbox
) -> None:
    """A transaction stopped between the statements of a pipeline and its Sync counts as active, not idle: the
    server's idle-in-transaction timeout never ends it, and its row locks held the other instances' writers until
    the SIGCONT (the cluster's SIGSTOP scenario: no takeover in 40 s). An instance ends such a session after
    ``STALLED_AFTER_S`` of waiting on its client, and its writer goes on; a reader's transaction, which holds no
    row locks (an export pausing between batches), is left alone."""
    url = postgres_url.replace("postgresql+psycopg://", "postgresql://")
    config = '[service]\ninstance_name = "node-stall"\n' + service_toml(sandbox.url)
    service = start_service(tmp_path, config, env=TOKEN, log_url=postgres_url)
    stalled: subprocess.Popen | None = None
    try:
        assert ack(service, siu("S12", "STALL-1", "A-STALL-1", future()))[1] == "AA"
        wait_until(lambda: query(service, "SELECT id FROM instances WHERE name = ?", "node-stall"),
                   message="the instance's row")  # fmt: skip
        reader = psycopg.connect(url, application_name=APPLICATION_NAME)
        reader.execute("SELECT count(*) FROM messages").fetchone()  # its transaction stays open, idle
        stalled = subprocess.Popen([sys.executable, "-c", STALLED_WRITER, url, "node-stall", APPLICATION_NAME],
                                   stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert stalled.stdout is not None and stalled.stdout.readline().strip() == "locked"
        wait_until(lambda: Path(f"/proc/{stalled.pid}/stat").read_text().split(") ")[1][0] == "T",
                   message="the stalled writer to stop itself")  # fmt: skip
        # The instance's next heartbeat waits on the stopped transaction's row lock, and the messages behind it.
        time.sleep(BEAT_EVERY * 1.5)
        with service.client(timeout=STALLED_AFTER_S + BEAT_EVERY * 5) as client:
            assert segments(client.request(siu("S12", "STALL-2", "A-STALL-2", future())))["MSA"][1] == "AA"
        sessions = query(service, "SELECT pid FROM pg_stat_activity WHERE application_name = ?", APPLICATION_NAME)
        assert reader.info.backend_pid in {r["pid"] for r in sessions}
        assert reader.execute("SELECT 1").fetchone() == (1,)
        reader.close()
    finally:
        if stalled is not None:
            stalled.kill()
            stalled.wait(10)
        log = service.stop()
    assert "ended a database session" in log, log[-3000:]


def test_an_instance_is_a_standby_only_while_another_leads() -> None:
    """Before any dispatcher has claimed the log (one starting, or no routes), no instance stands by."""
    row = InstanceRow("i-1", "node-a", "vm", 1, "0", 0.0, 0.0, None, 10.0, 1.0)
    assert LogFacts(instances=(row,)).role(row) == "no leader yet"
    assert LogFacts(instances=(row,), leader="i-2").role(row) == "standby"
    assert LogFacts(instances=(row,), leader="i-1").role(row) == "leader"


def test_dispatch_now_on_a_standby_reaches_the_leader_and_status_shows_its_lease(
    tmp_path: Path, database_url: str, sandbox: RunningSandbox
) -> None:
    """The leader holds after an API outage (its probe minutes away); 'dispatch now' run on the standby's machine
    reaches it through the log (a marker it reads at its next poll, woken by NOTIFY on PostgreSQL): it probes at
    once, and the line names it. Status shows the leader's lease and how long ago it was renewed (PostgreSQL; on
    SQLite nothing is renewed: nobody else can take the file's lock)."""
    slow = "retry_initial = 300\nretry_max = 600\nauth_probe_interval = 300"
    pair = Pair(tmp_path, database_url, sandbox, dispatch_extra=slow)
    postgres = database_url.startswith("postgresql")
    appointments = [f"A-NOWX-{postgres}-{n}" for n in range(3)]  # the sandbox serves the module's tests
    try:
        sandbox.faults(outage={"mode": "503", "seconds": 600})
        for n, appointment in enumerate(appointments):  # one failed call each: the third makes the leader hold
            assert ack(pair.b, siu("S12", f"NOWX-{n}", appointment, future()))[1] == "AA"
            wait_until(lambda n=n: query(pair.b, "SELECT a.id FROM attempts a JOIN commands c ON c.id = a.command_id "
                                         "JOIN messages m ON m.id = c.message_id WHERE m.control_id = ?", f"NOWX-{n}"),
                       timeout=30, message="the booking to meet the outage")  # fmt: skip
        wait_until(lambda: pair.status("a")["dispatch"]["held"], timeout=30, message="the leader to hold")
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        time.sleep(1.0)
        assert not any(sandbox.instances(appointmentId=a) for a in appointments), "sent before 'dispatch now'"

        done = pair.b.cli("dispatch", "now", "--database", pair.url, "--config", str(pair.b.config), "--by", "ana")
        assert "3 waiting command(s) made due; the dispatcher of instance node-a dispatches now" in done.stdout
        for n in range(len(appointments)):
            assert settled(pair.a, f"NOWX-{n}", timeout=10)[0]["status"] == "done"
        journeys_once(sandbox, appointments)

        status = pair.status("b")
        leases = {i["name"]: i["lease"] for i in status["instances"]}
        assert leases["node-b"] is None and leases["node-a"]["seconds"] == LEASE
        renewed = leases["node-a"]["renewed_age_s"]
        assert 0 <= renewed < LEASE if postgres else renewed is None
        shown = pair.b.cli("status", "--config", str(pair.b.config), check=False).stdout
        lease = rf"\(lease {LEASE} s, renewed \d+\.\d s ago\)" if postgres else rf"\(lease {LEASE} s\)"
        assert re.search(rf"instance node-a \(.*\): leader {lease}, heartbeat", shown), shown
        board = dashboard(open_engine(pair.b.url, create=False)).to_json()
        html = page(None, "dashboard.html", board=board, service=status, chart=chart([])).body.decode()
        assert re.search(r'<td class="num">2 s(, renewed \d+ s ago)?</td>', html), html
    finally:
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        pair.stop()


def _no_routes(workdir: Path) -> str:
    """A service without routes (so without a dispatcher) that purges daily."""
    workdir.mkdir()
    return (f'[service]\nretention_days = 1\ninstance_name = "node-{workdir.name}"\n'
            f'pid_file = "{workdir / "hl7bridge.pid"}"\n\n[listeners.main]\ntime_zone = "America/Chicago"\n')  # fmt: skip


def test_without_routes_one_instance_runs_the_retention_pass(tmp_path: Path, database_url: str) -> None:
    """No routes, so no dispatcher elects a leader: the retention pass is elected alone (the housekeeping lock, and
    the pass recorded in the log), so of two instances only one purges that day."""
    services = []
    try:
        for name in ("a", "b"):
            services.append(start_service(tmp_path / name, _no_routes(tmp_path / name), log_url=database_url))
            wait_until(lambda: query(services[0], "SELECT value FROM meta WHERE key = 'retention_passed_at'"),
                       message="the first pass")  # fmt: skip
        time.sleep(2.0)  # the second instance's first look is behind it
    finally:
        outputs = [service.stop() for service in services]
    assert sorted("retention: cleared" in output for output in outputs) == [False, True], outputs


def test_without_routes_no_pass_starts_while_another_holds_the_housekeeping_lock(
    tmp_path: Path, database_url: str
) -> None:
    """The housekeeping lock held elsewhere (another instance's pass under way): this instance skips its pass."""
    import fcntl

    import psycopg
    from sqlalchemy import make_url

    from hl7bridge.store.cluster import HOUSEKEEPING_LOCK_KEY

    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        Path(url.database).parent.mkdir(parents=True)
        holder = open(f"{url.database}.lock", "wb")  # the log's lock file, never the log (dispatch.leader)
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX)
    else:
        holder = psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database)
        assert holder.execute("SELECT pg_try_advisory_lock(%s)", (HOUSEKEEPING_LOCK_KEY,)).fetchone() == (True,)
        holder.commit()
    service = None
    try:
        service = start_service(tmp_path / "a", _no_routes(tmp_path / "a"), log_url=database_url)
        time.sleep(2.0)  # its first look at start is behind it
    finally:
        output = service.stop() if service is not None else ""
        holder.close()
    assert "listening" in output and "retention: cleared" not in output, output


def test_the_sqlite_elections_never_close_a_descriptor_of_the_log(tmp_path: Path) -> None:
    """SQLite's locks are POSIX locks, which a process loses on a file when any descriptor of that file closes
    (https://www.sqlite.org/howtocorrupt.html, 2.2): a dispatcher thread or a housekeeping pass that opened and
    closed the log itself dropped the service's own shared lock on it, and the next process to close the log took
    itself for the last one and checkpointed and deleted the WAL under the service's open connections. They lock
    ``<log>.lock``: the service's lock holds through both, and the WAL stays."""
    import sqlite3
    import subprocess
    import sys

    from hl7bridge.app.instance import Instance
    from hl7bridge.dispatch.leader import Leadership

    log = tmp_path / "log.db"
    engine = open_engine(f"sqlite:///{log}")
    service = sqlite3.connect(log, isolation_level=None)
    service.execute("INSERT INTO meta (key, value) VALUES ('held', 'by the service')")
    try:
        leadership = Leadership(f"sqlite:///{log}", "here", 4.0)
        assert leadership.acquire(lambda: False)
        leadership.release()
        release = Instance(None, None, engine, "here", 4.0, lambda: None)._housekeeping_lock()
        assert release is not None
        release()
        engine.dispose()
        other = subprocess.run([sys.executable, "-c", "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); "
                                "c.execute('SELECT count(*) FROM meta').fetchall(); c.close()", str(log)],
                               capture_output=True, text=True, timeout=30)  # fmt: skip
        assert other.returncode == 0, other.stderr
        assert (tmp_path / "log.db-wal").exists(), "another process deleted the WAL under the service's connection"
    finally:
        service.close()
    assert (tmp_path / "log.db.lock").stat().st_mode & 0o777 == 0o600
