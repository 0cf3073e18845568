"""The dispatcher as a child process: it lives and dies with the service, restarts after a crash, is
alone on its log, and its metrics and pause state reach the service's /metrics and /healthz."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import requests

from hl7bridge.dispatch.child import ChildSpec
from hl7bridge.dispatch.journeys import DEFAULT_CANCEL_PATH, ApiSettings
from hl7bridge.store import CommandUpdate, OutboxWrite

from .conftest import ROOT, RunningSandbox, RunningService, free_port, start_service, wait_until
from .dispatch_support import TOKEN, ack, future, sandbox_for_module, service_toml, settled, siu


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def start(
    workdir: Path,
    sandbox: RunningSandbox,
    dispatch_extra: str = "",
    log_url: str | None = None,
    listener_extra: str = "",
) -> tuple[RunningService, int]:
    health = free_port()
    config = service_toml(sandbox.url, dispatch_extra=dispatch_extra, listener_extra=listener_extra)
    config += f'\n[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n'
    return start_service(workdir, config, env=TOKEN, log_url=log_url), health


def booked(service: RunningService, sandbox: RunningSandbox, control: str, appointment: str) -> None:
    assert ack(service, siu("S12", control, appointment, future()))[1] == "AA"
    assert [c["status"] for c in settled(service, control)] == ["done"]
    assert len(sandbox.instances(appointmentId=appointment)) == 1


def test_a_killed_dispatcher_process_is_restarted_and_delivery_goes_on(tmp_path: Path, sandbox: RunningSandbox) -> None:
    service, health = start(tmp_path, sandbox)
    try:
        first = wait_until(lambda: children(service.process.pid), message="the dispatcher process")[0]
        booked(service, sandbox, "DP-1", "DPA-1")
        metrics = requests.get(f"http://127.0.0.1:{health}/metrics", timeout=5).text
        assert 'hl7bridge_api_calls_total{operation="trigger",status="204"} 1.0' in metrics

        os.kill(first, signal.SIGKILL)
        # Messages keep being answered while the dispatcher is down; their commands wait in the log.
        assert ack(service, siu("S12", "DP-2", "DPA-2", future()))[1] == "AA"
        second = wait_until(lambda: [p for p in children(service.process.pid) if p != first],
                            message="a new dispatcher process")[0]  # fmt: skip
        assert second != first
        assert [c["status"] for c in settled(service, "DP-2")] == ["done"]
        assert len(sandbox.instances(appointmentId="DPA-2")) == 1
        assert requests.get(f"http://127.0.0.1:{health}/healthz", timeout=5).status_code == 200
    finally:
        stderr = service.stop()
    assert service.process.returncode == 0
    assert "the dispatcher process was killed by signal 9; starting it again in 0.5 s" in stderr
    assert "Traceback" not in stderr


def test_the_dispatcher_process_ends_with_the_service(tmp_path: Path, sandbox: RunningSandbox) -> None:
    (tmp_path / "term").mkdir()
    (tmp_path / "kill").mkdir()
    stopped, _ = start(tmp_path / "term", sandbox)
    child = wait_until(lambda: children(stopped.process.pid), message="the dispatcher process")[0]
    stopped.stop()
    assert stopped.process.returncode == 0
    assert not alive(child)

    killed, _ = start(tmp_path / "kill", sandbox)
    child = wait_until(lambda: children(killed.process.pid), message="the dispatcher process")[0]
    killed.process.kill()
    killed.process.wait()
    # Gone by itself (it watches its parent), so a restarted service never meets an old dispatcher still
    # sending; the bound is generous for a loaded machine; a child that does not watch never exits.
    wait_until(lambda: not alive(child), timeout=30, message="the orphaned dispatcher to exit")


def read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    """What ``fd`` gave until ``wanted`` appeared (or the timeout passed, or the writer closed it)."""
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen and select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        seen += chunk
    return seen


def test_a_second_dispatcher_on_the_same_log_waits(tmp_path: Path, sandbox: RunningSandbox, database_url: str) -> None:
    """On a SQLite file (its flock) and on PostgreSQL (a session advisory lock)."""
    service, _ = start(tmp_path, sandbox, log_url=database_url)
    tag = database_url.split(":", 1)[0]  # the module's sandbox is shared by both runs
    spec = ChildSpec(database=service.url, api=ApiSettings(base_url=sandbox.url, org_id="test-org",
                     cancel_path=DEFAULT_CANCEL_PATH, connect_timeout=1, read_timeout=2), settings={}, token="test-token")  # fmt: skip
    read_events, write_events = os.pipe()
    intruder = None
    try:
        # A delivery proves the service's own dispatcher holds the log before the intruder comes.
        booked(service, sandbox, f"DP-3-{tag}", f"DPA-3-{tag}")
        command = f"exec {sys.executable} -m hl7bridge.dispatch.child 3>&{write_events}"
        intruder = subprocess.Popen(["bash", "-c", command], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                    pass_fds=(write_events,))  # fmt: skip
        os.close(write_events)
        write_events = -1
        intruder.stdin.write(spec.to_line())
        intruder.stdin.flush()
        waiting = b"another dispatcher leads on this log; this one waits as a standby"
        assert waiting in read_until(intruder.stderr.fileno(), waiting, 30)
        assert not select.select([read_events], [], [], 0)[0], "the second dispatcher started beside the first"
        # While it waits, the service's own dispatcher keeps the log.
        booked(service, sandbox, f"DP-5-{tag}", f"DPA-5-{tag}")
        service.stop()
        # The lock is free once the service's dispatcher is gone: the intruder takes it and says so.
        assert b'"ready"' in read_until(read_events, b'"ready"', 15), "the second dispatcher did not start"
    finally:
        service.stop()
        if intruder is not None:
            intruder.kill()
            intruder.wait()
        if write_events >= 0:
            os.close(write_events)
        os.close(read_events)


def test_run_in_thread_keeps_the_dispatcher_in_the_service(tmp_path: Path, sandbox: RunningSandbox) -> None:
    service, _ = start(tmp_path, sandbox, dispatch_extra='run_in = "thread"')
    try:
        booked(service, sandbox, "DP-4", "DPA-4")
        assert children(service.process.pid) == []
    finally:
        service.stop()
    assert service.process.returncode == 0


def test_run_in_thread_leads_the_log_and_a_second_service_on_it_stands_by(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """The service's own dispatcher thread is elected as the process is (the SQLite file's lock): status names it
    the leader; a second thread-mode service on the same file stands by and sends nothing (each trigger reaches
    the API once, whichever service took the message in) while it answers its senders' dispatched verdicts from the
    log (AA, not the timeout's AE), and leads once the first stops."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    thread = 'run_in = "thread"'
    first, health_first = start(tmp_path / "a", sandbox, dispatch_extra=thread)
    second: RunningService | None = None

    def status(port: int) -> dict:
        return requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()

    def triggered(appointment: str) -> int:
        return sum(appointment in str(c["body"]) for c in sandbox.calls("bulk"))

    try:
        wait_until(lambda: status(health_first)["dispatch"]["role"] == "leader", message="the thread to lead")
        second, health_second = start(tmp_path / "b", sandbox, dispatch_extra=thread, log_url=first.url,
                                      listener_extra='ack_mode = "dispatched"\ndispatch_timeout = 8')  # fmt: skip
        wait_until(lambda: status(health_second)["dispatch"]["role"] == "standby", message="the second to stand by")
        roles = {i["pid"]: i["role"] for i in status(health_second)["instances"]}
        assert roles == {first.process.pid: "leader", second.process.pid: "standby"}
        appointments = [f"DTA-{n}" for n in range(4)]
        for n, appointment in enumerate(appointments):
            assert ack(second if n % 2 else first, siu("S12", f"DT-{n}", appointment, future()))[1] == "AA"
        for n in range(len(appointments)):
            assert [c["status"] for c in settled(first, f"DT-{n}")] == ["done"]
        time.sleep(1.0)  # a doubling standby's calls would come within its poll
        assert {a: triggered(a) for a in appointments} == {a: 1 for a in appointments}

        first.stop()
        wait_until(lambda: status(health_second)["dispatch"]["role"] == "leader", message="the standby to lead")
        booked(second, sandbox, "DT-9", "DTA-9")
    finally:
        first.stop()
        if second is not None:
            second.stop()


def sample_writes() -> list[OutboxWrite]:
    """Writes with every field a dispatcher sets, non-ASCII text included; built the same in both processes."""
    attempt = {"call_id": "c-1", "at": 1.5, "operation": "search", "request_summary": "POST /search",
               "status_code": 200, "verdict": "success", "response_body": "[{\"name\": \"Zoë\"}]", "error": None,
               "duration_ms": 3.0}  # fmt: skip
    updates = [
        CommandUpdate(7, "done", "cancelled 1 instance(s)", count_attempt=True, attempts=[attempt],
                      remember=("MAIN|A-1", "reminders", "bot", "cancelled", None)),
        CommandUpdate(8, "pending", "retrying in 2.0 s: HTTP 503", next_attempt_at=12.5, uncertain=True,
                      remember=("MAIN|A-2", "reminders", "bot", "active", {"appointmentId": "A-2", "name": "Zoë"})),
        CommandUpdate(9, "pending", "cancelled 1 instance(s)", step="cancelled"),
    ]  # fmt: skip
    return [OutboxWrite(10.0, in_flight=[3, 4]), OutboxWrite(11.0, updates=updates)]


CHILD_WRITER = """
import sys
from hl7bridge.dispatch.child import EventPipe, ServiceWrites
from hl7bridge.store import Job
from tests.test_dispatch_process import sample_writes
sink = ServiceWrites(EventPipe(int(sys.argv[1])))
for write in sample_writes():
    sink.submit_job(Job(write, lambda _result, _error: None))
"""


def test_a_write_crosses_to_the_service_unchanged() -> None:
    """A child process sends its writes through ``ServiceWrites`` over a real pipe, as the dispatcher does;
    the service's reading of each line (``orjson`` then ``OutboxWrite.from_json``) rebuilds them equal."""
    read_events, write_events = os.pipe()
    try:
        child = subprocess.run([sys.executable, "-c", CHILD_WRITER, str(write_events)], pass_fds=(write_events,),
                               cwd=ROOT, capture_output=True, timeout=60)  # fmt: skip
        os.close(write_events)
        write_events = -1
        assert child.returncode == 0, child.stderr
        lines = read_until(read_events, b"\x00", 10).splitlines()
    finally:
        os.close(read_events)
        if write_events >= 0:
            os.close(write_events)
    events = [orjson.loads(line) for line in lines]
    assert [e["write"] for e in events] == [1, 2]
    assert [OutboxWrite.from_json(e) for e in events] == sample_writes()


def test_the_child_answers_at_once_for_a_command_already_final(tmp_path: Path) -> None:
    """The parent may ask to wait for a command that settled before it asked: the child reads its status from
    the log and answers with it, rather than waiting for an update that never comes."""
    from hl7bridge.dispatch.child import Child, EventPipe
    from hl7bridge.dispatch.leader import Leadership
    from hl7bridge.store import commands, open_engine

    url = f"sqlite:///{tmp_path / 'log.db'}"
    with open_engine(url).begin() as conn:
        conn.execute(commands.insert().values(message_id=1, appointment_key="MAIN|A-1", kind="trigger", route="r",
                                              chat_bot_id="bot", time_zone="UTC", parameters="{}", identifiers="{}",
                                              status="done", outcome="triggered instance 7", next_attempt_at=0.0,
                                              created_at=0.0, updated_at=0.0))  # fmt: skip
    read_events, write_events = os.pipe()
    try:
        spec = ChildSpec(database=url, api=ApiSettings(base_url="http://127.0.0.1:9"), settings={}, token="t")
        child = Child(spec, EventPipe(write_events), Leadership(url, "test", 10.0))
        child.wait_for(1)
        child.wait_for(2)
        os.close(write_events)
        write_events = -1
        events = [orjson.loads(line) for line in read_until(read_events, b"\x00", 5).splitlines() if line.strip()]
    finally:
        os.close(read_events)
        if write_events >= 0:
            os.close(write_events)
    assert [e["final"] for e in events if "final" in e] == [
        {"command_id": 1, "status": "done", "outcome": "triggered instance 7"}
    ]
