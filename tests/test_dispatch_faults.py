"""Dispatch under a misbehaving Journeys API: the real service and the sandbox as two processes over HTTP.

The sandbox is reset before every test (faults, instances, calls, tokens). Tests whose service state
matters (a token from the environment, a crash, no HTTP connection kept alive yet) start their own
service; the others share one, each with its own appointments. Commands and attempts are read
straight from the service's SQLite file.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import requests

from .conftest import RunningSandbox, RunningService, segments, start_service, wait_until
from .dispatch_support import (
    OPEN,
    TOKEN,
    ack,
    attempts_of,
    commands_of,
    future,
    iso,
    query,
    sandbox_for_module,
    service_toml,
    settled,
    siu,
)


@pytest.fixture(scope="module")
def shared_sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@pytest.fixture
def sandbox(shared_sandbox: RunningSandbox) -> RunningSandbox:
    """The module's sandbox, made fresh: port open again, no faults, no instances or calls, both tokens valid."""
    wait_until(lambda: reachable(shared_sandbox), timeout=10, message="the sandbox to listen")
    shared_sandbox.post("/_sandbox/reset", {})
    shared_sandbox.post("/_sandbox/tokens", {"add": {
        "test-token": ["create.journey_instances", "read.journey_instances"],
        "read-only-token": ["read.journey_instances"],
    }})  # fmt: skip
    return shared_sandbox


@pytest.fixture
def bridge_dir(tmp_path: Path) -> Path:
    workdir = tmp_path / "bridge"
    workdir.mkdir()
    return workdir


@pytest.fixture(scope="module")
def shared_bridge(tmp_path_factory: pytest.TempPathFactory, shared_sandbox: RunningSandbox) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("bridge"), service_toml(shared_sandbox.url), env=TOKEN)
    yield running
    running.stop()


@pytest.fixture
def bridge(shared_bridge: RunningService, sandbox: RunningSandbox) -> RunningService:
    """The shared service, once the sandbox is fresh."""
    return shared_bridge


@pytest.fixture(scope="module")
def shared_quick_bridge(tmp_path_factory: pytest.TempPathFactory,
                        shared_sandbox: RunningSandbox) -> Iterator[RunningService]:  # fmt: skip
    """read_timeout = 1 s instead of 2, so that a 1.2 s answer is one that never came."""
    config = service_toml(shared_sandbox.url)
    assert "read_timeout = 2" in config
    running = start_service(tmp_path_factory.mktemp("quick"), config.replace("read_timeout = 2", "read_timeout = 1"),
                            env=TOKEN)  # fmt: skip
    yield running
    running.stop()


@pytest.fixture
def quick_bridge(shared_quick_bridge: RunningService, sandbox: RunningSandbox) -> RunningService:
    return shared_quick_bridge


def active(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    return [i for i in sandbox.instances(appointmentId=appointment) if i["status"] == "InProgress"]


def delivered_bulks(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    """The bulk calls the sandbox accepted (204) that carried this appointment, in arrival order."""
    return [
        c for c in sandbox.calls("bulk")
        if c["status"] == 204
        and any(i["parameters"].get("appointmentId") == appointment for i in (c["body"] or {}).get("instances", []))
    ]  # fmt: skip


def calls_about(sandbox: RunningSandbox, mention: str, kind: str | None = None) -> list[dict]:
    """The API calls whose body mentions ``mention`` (an appointment id or a test's prefix): the test's own,
    whatever another test's leftover commands still send after the sandbox's reset."""
    return [c for c in sandbox.calls(kind) if mention in json.dumps(c["body"])]


def searched_for(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    return [
        c for c in sandbox.calls("search")
        if any(s.get("rightOperand") == appointment
               for s in ((c["body"] or {}).get("filterSpecification") or {}).get("specifications", []))
    ]  # fmt: skip


def reachable(sandbox: RunningSandbox) -> bool:
    try:
        sandbox.get("/_sandbox/instances")
    except requests.RequestException:
        return False
    return True


def chicago_in(seconds: float) -> str:
    """An HL7 timestamp ``seconds`` from now, in the feed's zone (America/Chicago)."""
    return (datetime.now(ZoneInfo("America/Chicago")) + timedelta(seconds=seconds)).strftime("%Y%m%d%H%M%S")


# ---- transient failures are retried ----------------------------------------------------------------


def test_flaky_api_is_retried_until_every_appointment_has_one_journey(
    bridge: RunningService, sandbox: RunningSandbox
) -> None:
    sandbox.faults(error_rate=0.5)
    moved: dict[str, str] = {}
    controls: list[str] = []
    saw_retry_then_success = False
    # Rounds until the random faults have hit some command before it went through: each call fails with
    # probability 0.5, so several rounds of several calls without a single 500 are out of the question.
    for r in range(8):
        batch = [(f"FLAKY-{r}-{i}", siu("S12", f"FLAKY-{r}-{i}", f"A-FLAKY-{r}-{i}", future(days=30 + i, hour=9)))
                 for i in range(3)]  # fmt: skip
        new_start = future(days=35, hour=15)  # the first appointment moves right after its booking
        batch.append((f"FLAKY-{r}-MOVE", siu("S13", f"FLAKY-{r}-MOVE", f"A-FLAKY-{r}-0", new_start)))
        moved[f"A-FLAKY-{r}-0"] = new_start
        with bridge.client() as client:
            for _, message in batch:
                client.send(message)
            assert [segments(client.receive())["MSA"][1] for _ in batch] == ["AA"] * len(batch)
        for control, _ in batch:
            controls.append(control)
            settled(bridge, control, timeout=30)
        for control in controls:
            for cmd in commands_of(bridge, control):
                codes = [a["status_code"] for a in attempts_of(bridge, cmd["id"])]
                if any(c is not None and c >= 500 for c in codes) and codes[-1] in (200, 204):
                    first_error = next(n for n, c in enumerate(codes) if c is not None and c >= 500)
                    assert first_error < len(codes) - 1
                    saw_retry_then_success = True
        if saw_retry_then_success:
            break
    sandbox.faults(error_rate=0.0)
    assert saw_retry_then_success, "no command met a 500 and then went through"
    # Injected faults are answered before the body is read (none is logged): these counts cannot be filtered.
    assert any(c["status"] == 500 for c in sandbox.calls()), "the sandbox injected no fault"
    for control in controls:
        for cmd in commands_of(bridge, control):
            assert cmd["status"] == "done", cmd
    appointments = {f"A-FLAKY-{r2}-{i}" for r2 in range(r + 1) for i in range(3)}
    for appointment in sorted(appointments):
        running = active(sandbox, appointment)
        assert len(running) == 1, (appointment, running)
        if appointment in moved:
            assert running[0]["parameters"]["appointmentDateTime"] == iso(moved[appointment])
            assert sorted(i["status"] for i in sandbox.instances(appointmentId=appointment)) == [
                "Cancelled",
                "InProgress",
            ]


def test_every_api_call_of_a_command_is_in_its_attempts(bridge: RunningService, sandbox: RunningSandbox) -> None:
    sandbox.faults(error_rate=1.0)
    assert ack(bridge, siu("S12", "ALLCALLS-1", "A-ALLCALLS", future(days=30)))[1] == "AA"
    wait_until(lambda: [a for c in commands_of(bridge, "ALLCALLS-1") for a in attempts_of(bridge, c["id"])],
               message="a first (failed) attempt")  # fmt: skip
    sandbox.faults(error_rate=0.0)
    (cmd,) = settled(bridge, "ALLCALLS-1")
    assert cmd["status"] == "done"
    calls = [(c["path"].rsplit("/", 1)[-1], c["status"]) for c in sandbox.calls()]  # faults log no body
    assert ("search", 200) in calls  # the 500 may have done the work: the retry looked first
    recorded = [({"trigger": "bulk"}.get(a["operation"], a["operation"]), a["status_code"])
                for a in attempts_of(bridge, cmd["id"])]  # fmt: skip
    assert recorded == calls


def test_rate_limit_retry_after_is_honoured(bridge: RunningService, sandbox: RunningSandbox) -> None:
    sandbox.faults(rate_limit_every=2, retry_after=1)
    # One at a time, so every other API call of the sequence is answered 429 with Retry-After: 1: two
    # bookings make at least three calls, one of them throttled.
    for i in range(2):
        assert ack(bridge, siu("S12", f"RATE-{i}", f"A-RATE-{i}", future(days=30)))[1] == "AA"
        settled(bridge, f"RATE-{i}")
    throttled = 0
    for i in range(2):
        (cmd,) = commands_of(bridge, f"RATE-{i}")
        assert cmd["status"] == "done" and cmd["outcome"] == "triggered"
        tries = attempts_of(bridge, cmd["id"])
        assert tries[-1]["status_code"] == 204
        for earlier, later in pairwise(tries):
            if earlier["status_code"] == 429:
                throttled += 1
                assert later["at"] - earlier["at"] >= 1.0, (earlier, later)
        assert len(active(sandbox, f"A-RATE-{i}")) == 1
    assert throttled >= 1
    assert [c["status"] for c in sandbox.calls("bulk")].count(429) == throttled  # a 429 logs no body


# ---- outages -----------------------------------------------------------------------------------------


@pytest.fixture
def fresh_bridge(bridge_dir: Path, sandbox: RunningSandbox) -> Iterator[RunningService]:
    running = start_service(bridge_dir, service_toml(sandbox.url), env=TOKEN)
    yield running
    running.stop()


def test_outage_refused_then_503_then_timeout_keeps_the_feed_going_and_delivers_in_order(
    fresh_bridge: RunningService, sandbox: RunningSandbox
) -> None:
    bridge = fresh_bridge
    # The service has made no call yet: the refused port is met by a new connection.
    first, second = future(days=31, hour=9), future(days=32, hour=16)
    expected_once = ["A-OUT-R", "A-OUT-5", "A-OUT-T"]

    # 1. The port is closed.
    sandbox.faults(outage={"mode": "refuse", "seconds": 2})
    wait_until(lambda: not reachable(sandbox), timeout=5, message="the sandbox port to close")
    assert ack(bridge, siu("S12", "OUT-R", "A-OUT-R", future(days=30)))[1] == "AA"
    assert ack(bridge, siu("S12", "OUT-SEQ-1", "A-OUT-SEQ", first))[1] == "AA"
    wait_until(lambda: any(a["error"] and "connection" in a["error"]
                           for c in commands_of(bridge, "OUT-R") for a in attempts_of(bridge, c["id"])),
               message="a refused connection")  # fmt: skip
    wait_until(lambda: reachable(sandbox), timeout=10, message="the sandbox to listen again")

    # 2. 503 for everything.
    sandbox.faults(outage={"mode": "503", "seconds": 2})
    assert ack(bridge, siu("S12", "OUT-5", "A-OUT-5", future(days=30)))[1] == "AA"
    assert ack(bridge, siu("S13", "OUT-SEQ-2", "A-OUT-SEQ", second))[1] == "AA"
    # Dispatching holds by now (three refused calls): the oldest command is the one that meets each outage.
    wait_until(lambda: query(bridge, "SELECT 1 FROM attempts WHERE status_code = 503"), message="a 503")

    # 3. No answer at all (read_timeout is 2 s).
    sandbox.faults(outage={"mode": "timeout", "seconds": 2})
    assert ack(bridge, siu("S12", "OUT-T", "A-OUT-T", future(days=30)))[1] == "AA"
    wait_until(lambda: query(bridge, "SELECT 1 FROM attempts WHERE error LIKE '%timeout%'"), message="a timed-out call")

    # Recovery: everything delivered, each once, and the reschedule after the booking.
    for control in ("OUT-R", "OUT-SEQ-1", "OUT-5", "OUT-SEQ-2", "OUT-T"):
        assert all(c["status"] == "done" for c in settled(bridge, control, timeout=20)), control
    for appointment in expected_once:
        assert len(sandbox.instances(appointmentId=appointment)) == 1, appointment
        assert len(active(sandbox, appointment)) == 1, appointment
        assert len(delivered_bulks(sandbox, appointment)) == 1, appointment
    found = sandbox.instances(appointmentId="A-OUT-SEQ")
    assert sorted(i["status"] for i in found) == ["Cancelled", "InProgress"]
    (running,) = active(sandbox, "A-OUT-SEQ")
    assert running["parameters"]["appointmentDateTime"] == iso(second)
    order = [i["parameters"]["appointmentDateTime"] for b in delivered_bulks(sandbox, "A-OUT-SEQ")
             for i in b["body"]["instances"] if i["parameters"]["appointmentId"] == "A-OUT-SEQ"]  # fmt: skip
    assert order == [iso(first), iso(second)]


def test_an_outage_holds_dispatch_to_the_oldest_command_on_its_backoff(
    bridge: RunningService, sandbox: RunningSandbox
) -> None:
    """Three failed calls in a row and the API counts as down: only the oldest open command is tried, one
    call at a time, on its own backoff; the rest wait untried instead of each retrying against a dead API.
    The first answer ends the hold, and everything is delivered once."""
    sandbox.faults(outage={"mode": "503", "seconds": 60})
    controls = [f"HOLD-{i}" for i in range(12)]
    with bridge.client() as client:
        for i, control in enumerate(controls):
            client.send(siu("S12", control, f"A-HOLD-{i}", future(days=30 + i)))
        assert [segments(client.receive())["MSA"][1] for _ in controls] == ["AA"] * len(controls)
    ids = [cmd["id"] for control in controls for cmd in commands_of(bridge, control)]
    marks = ",".join("?" * len(ids))

    def tried() -> list[dict]:
        return query(bridge, f"SELECT command_id, call_id, at, status_code FROM attempts WHERE command_id IN ({marks})"
                             " ORDER BY at, id", *ids)  # fmt: skip

    wait_until(lambda: max(Counter(a["command_id"] for a in tried()).values(), default=0) >= 7, timeout=30,
               message="one command's seventh attempt")  # fmt: skip
    sandbox.faults(outage={"mode": "503", "seconds": 0})
    for control in controls:
        assert settled(bridge, control, timeout=30)[0]["status"] == "done", control
    failed = [a for a in tried() if a["status_code"] == 503]
    calls = list(dict.fromkeys(a["call_id"] for a in failed))
    per_call = Counter(a["call_id"] for a in failed)
    # The calls before the hold may carry a bulk of several; once it holds, each call carries one command.
    assert len(calls) >= 6 and all(per_call[c] == 1 for c in calls[4:]), [per_call[c] for c in calls]
    head = min(ids)
    head_times = [a["at"] for a in failed if a["command_id"] == head]
    gaps = [b - a for a, b in pairwise(head_times)]
    # The oldest, on its growing backoff: each wait at least the jittered floor of its step (half of 0.2 s, 0.4 s,
    # 0.8 s, then retry_max 1 s; the hold's cap, probe_interval 0.5 s, never cuts below it). Lower bounds only: a
    # loaded machine lengthens waits, never shortens them.
    floors = [0.5 * min(1.0, 0.2 * 2**k) for k in range(len(gaps))]
    assert len(head_times) >= 7 and all(g >= f * 0.99 for g, f in zip(gaps, floors, strict=True)), (gaps, floors)
    probes = [a for a in failed if a["call_id"] in calls[4:]]
    assert {a["command_id"] for a in probes} == {head}, probes
    for i in range(len(controls)):
        assert len(sandbox.instances(appointmentId=f"A-HOLD-{i}")) == 1


def test_refuse_outage_also_refuses_kept_alive_connections(bridge: RunningService, sandbox: RunningSandbox) -> None:
    assert ack(bridge, siu("S12", "KA-WARM", "A-KA-WARM", future(days=30)))[1] == "AA"
    settled(bridge, "KA-WARM")  # the service now holds a pooled HTTP connection to the sandbox
    sandbox.faults(outage={"mode": "refuse", "seconds": 2})
    wait_until(lambda: not reachable(sandbox), timeout=5, message="the sandbox port to close")
    assert ack(bridge, siu("S12", "KA-1", "A-KA", future(days=30)))[1] == "AA"
    (cmd,) = settled(bridge, "KA-1")
    assert cmd["status"] == "done"
    first_try = attempts_of(bridge, cmd["id"])[0]
    assert first_try["status_code"] is None and "connection" in first_try["error"], first_try
    assert len(sandbox.instances(appointmentId="A-KA")) == 1


def test_booking_and_cancel_during_an_outage_annihilate(bridge: RunningService, sandbox: RunningSandbox) -> None:
    sandbox.faults(outage={"mode": "503", "seconds": 2})
    # A-ANN: the booking meets the 503 (which says nothing was done), then its cancellation arrives.
    assert ack(bridge, siu("S12", "ANN-1", "A-ANN", future(days=30)))[1] == "AA"
    wait_until(lambda: [a for c in commands_of(bridge, "ANN-1") for a in attempts_of(bridge, c["id"])],
               message="the booking to meet the outage")  # fmt: skip
    assert ack(bridge, siu("S15", "ANN-2", "A-ANN", None))[1] == "AA"
    # A-ANN-B: booking and cancellation arrive together, in one write.
    with bridge.client() as client:
        client.sock.sendall(b"".join(b"\x0b" + m + b"\x1c\x0d" for m in (
            siu("S12", "ANN-B-1", "A-ANN-B", future(days=30)), siu("S15", "ANN-B-2", "A-ANN-B", None))))  # fmt: skip
        assert [segments(client.receive())["MSA"][1] for _ in range(2)] == ["AA", "AA"]
    for control in ("ANN", "ANN-B"):
        (booked,) = settled(bridge, f"{control}-1")
        (cancelled,) = settled(bridge, f"{control}-2")
        assert booked["status"] == "annihilated", booked
        assert booked["outcome"] == f"cancelled by command {cancelled['id']} before it was sent"
        assert cancelled["status"] == "annihilated", cancelled
        assert cancelled["outcome"] == "its trigger was never sent; nothing to cancel"
        assert attempts_of(bridge, cancelled["id"]) == []
    assert {a["status_code"] for c in commands_of(bridge, "ANN-1") for a in attempts_of(bridge, c["id"])} == {503}
    # After the outage the API works again: a later booking goes through, the annihilated pairs send nothing.
    assert ack(bridge, siu("S12", "ANN-AFTER", "A-ANN-AFTER", future(days=30)))[1] == "AA"
    assert settled(bridge, "ANN-AFTER")[0]["status"] == "done"
    for appointment in ("A-ANN", "A-ANN-B"):
        assert sandbox.instances(appointmentId=appointment) == []
        assert searched_for(sandbox, appointment) == []
        assert delivered_bulks(sandbox, appointment) == []
    # No cancel was attempted for them (a cancel searches first); other tests' leftovers may still cancel theirs.


def test_booking_and_cancel_during_a_token_pause_annihilate(bridge: RunningService, sandbox: RunningSandbox) -> None:
    """A second guard, by another road: the booking waits in a 401 pause (nothing done), then its cancel comes."""
    sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
    assert ack(bridge, siu("S12", "ANN-AUTH-1", "A-ANN-AUTH", future(days=30)))[1] == "AA"
    wait_until(lambda: [a for c in commands_of(bridge, "ANN-AUTH-1") for a in attempts_of(bridge, c["id"])],
               message="the booking to meet the 401")  # fmt: skip
    assert ack(bridge, siu("S15", "ANN-AUTH-2", "A-ANN-AUTH", None))[1] == "AA"
    sandbox.post("/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances", "read.journey_instances"]}})
    (booked,) = settled(bridge, "ANN-AUTH-1")
    (cancelled,) = settled(bridge, "ANN-AUTH-2")
    assert (booked["status"], booked["outcome"]) == (
        "annihilated",
        f"cancelled by command {cancelled['id']} before it was sent",
    )
    assert (cancelled["status"], cancelled["outcome"]) == (
        "annihilated",
        "its trigger was never sent; nothing to cancel",
    )
    assert {a["status_code"] for a in attempts_of(bridge, booked["id"])} == {401}
    assert attempts_of(bridge, cancelled["id"]) == []
    assert sandbox.instances(appointmentId="A-ANN-AUTH") == []
    assert searched_for(sandbox, "A-ANN-AUTH") == [] and delivered_bulks(sandbox, "A-ANN-AUTH") == []


# ---- the token ---------------------------------------------------------------------------------------


def test_revoked_token_pauses_dispatch_until_it_is_valid_again(bridge: RunningService, sandbox: RunningSandbox) -> None:
    sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
    controls = [f"AUTH-{i}" for i in range(3)]
    for i, control in enumerate(controls):
        assert ack(bridge, siu("S12", control, f"A-AUTH-{i}", future(days=30)))[1] == "AA"

    def refused_twice() -> bool:
        return len([c for c in calls_about(sandbox, "A-AUTH-") if c["status"] == 401]) >= 2

    wait_until(refused_twice, message="the API to refuse the token twice (the pause's probe)")
    cmds = [c for control in controls for c in commands_of(bridge, control)]
    assert all(c["status"] in OPEN for c in cmds), cmds
    assert not [c for c in cmds if c["status"] == "dead"]
    codes = [a["status_code"] for c in cmds for a in attempts_of(bridge, c["id"])]
    assert 401 in codes and all(code == 401 for code in codes)
    assert [
        i for i in sandbox.get("/_sandbox/instances") if i["parameters"]["appointmentId"].startswith("A-AUTH")
    ] == []

    paused = [c for c in cmds if c["outcome"]]
    assert paused and all(c["outcome"] == "paused: Missing or invalid access token" for c in paused), paused

    sandbox.post("/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances", "read.journey_instances"]}})
    for i, control in enumerate(controls):
        (cmd,) = settled(bridge, control)
        assert cmd["status"] == "done" and cmd["outcome"] == "triggered"
        assert len(active(sandbox, f"A-AUTH-{i}")) == 1


def test_token_without_create_scope_pauses_and_dead_letters_nothing(bridge_dir: Path, sandbox: RunningSandbox) -> None:
    service = start_service(bridge_dir, service_toml(sandbox.url), env={"TEST_API_TOKEN": "read-only-token"})
    try:
        for i in range(2):
            assert ack(service, siu("S12", f"RO-{i}", f"A-RO-{i}", future(days=30)))[1] == "AA"
        wait_until(lambda: len([c for c in calls_about(sandbox, "A-RO-", "bulk") if c["status"] == 403]) >= 2,
                   message="403 from the bulk endpoint, twice")  # fmt: skip
        cmds = [c for i in range(2) for c in commands_of(service, f"RO-{i}")]
        assert all(c["status"] in OPEN for c in cmds), cmds
        assert query(service, "SELECT * FROM commands WHERE status = 'dead'") == []
        tries = [a for c in cmds for a in attempts_of(service, c["id"])]
        assert tries and all(a["status_code"] == 403 and a["verdict"] == "auth" for a in tries)
        assert "create.journey_instances" in tries[0]["response_body"]
        assert sandbox.get("/_sandbox/instances") == []
    finally:
        log = service.stop()
    assert "dispatching paused" in log


# ---- time runs out ---------------------------------------------------------------------------------


def test_appointment_that_starts_during_an_outage_is_dead_lettered(
    bridge: RunningService, sandbox: RunningSandbox
) -> None:
    sandbox.faults(outage={"mode": "503", "seconds": 6})
    assert ack(bridge, siu("S12", "LATE-1", "A-LATE", chicago_in(3)))[1] == "AA"
    (cmd,) = settled(bridge, "LATE-1", timeout=10)
    assert cmd["status"] == "dead"
    assert "started" in cmd["outcome"]
    assert {a["status_code"] for a in attempts_of(bridge, cmd["id"])} == {503}
    assert sandbox.instances(appointmentId="A-LATE") == []
    assert delivered_bulks(sandbox, "A-LATE") == []


# ---- crash and resume --------------------------------------------------------------------------------


def crash_in_flight(bridge_dir: Path, sandbox: RunningSandbox, control: str, appointment: str) -> RunningService:
    """A service killed while its trigger call is under way: the sandbox has the call, the log says in_flight."""
    first = start_service(bridge_dir, service_toml(sandbox.url), env=TOKEN)
    try:
        sandbox.faults(latency_ms=3000)
        assert ack(first, siu("S12", control, appointment, future(days=30)))[1] == "AA"
        wait_until(lambda: [c for c in commands_of(first, control) if c["status"] == "in_flight"],
                   message="the command to be in flight")  # fmt: skip
        # The sandbox has taken the call (and created the instance); its answer is still seconds away.
        wait_until(
            lambda: calls_about(sandbox, f'"{appointment}"', "bulk"), message="the bulk call to reach the sandbox"
        )
        first.process.kill()
        first.process.wait()
    finally:
        first.stop()
    sandbox.faults(latency_ms=0)
    assert commands_of(first, control)[0]["status"] == "in_flight"
    assert len(sandbox.instances(appointmentId=appointment)) == 1
    return first


def test_crash_during_a_call_does_not_trigger_twice(bridge_dir: Path, sandbox: RunningSandbox) -> None:
    crash_in_flight(bridge_dir, sandbox, "CRASH-1", "A-CRASH")
    second = start_service(bridge_dir, service_toml(sandbox.url), env=TOKEN)  # same workdir: same database
    try:
        (cmd,) = settled(second, "CRASH-1")
        assert cmd["status"] == "done"
        assert cmd["outcome"] in ("found after restart; not sent again", "triggered")
        assert cmd["outcome"] == "found after restart; not sent again"  # the call had reached the sandbox
        assert len(sandbox.instances(appointmentId="A-CRASH")) == 1
        assert len(calls_about(sandbox, '"A-CRASH"', "bulk")) == 1
        assert len(searched_for(sandbox, "A-CRASH")) == 1
    finally:
        second.stop()


def test_crash_check_that_fails_is_not_skipped(bridge_dir: Path, sandbox: RunningSandbox) -> None:
    crash_in_flight(bridge_dir, sandbox, "CRASH2-1", "A-CRASH2")
    sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})  # the restarted service cannot search at first
    second = start_service(bridge_dir, service_toml(sandbox.url), env=TOKEN)
    try:
        wait_until(
            lambda: [c for c in searched_for(sandbox, "A-CRASH2") if c["status"] == 401], message="a refused search"
        )
        sandbox.post("/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances",
                                                                 "read.journey_instances"]}})  # fmt: skip
        (cmd,) = settled(second, "CRASH2-1")
        assert cmd["status"] == "done"
        assert len(sandbox.instances(appointmentId="A-CRASH2")) == 1, cmd["outcome"]
    finally:
        second.stop()


# ---- calls whose answer came too late (read_timeout 1 s, answers after 1.2 s) -----------------------------------------------------------------


def test_trigger_whose_answer_timed_out_is_not_sent_twice(
    quick_bridge: RunningService, sandbox: RunningSandbox
) -> None:
    bridge = quick_bridge
    # The API creates the instance at once but answers after read_timeout: the bridge cannot tell.
    sandbox.faults(latency_ms=1200)
    assert ack(bridge, siu("S12", "SLOW-1", "A-SLOW", future(days=30)))[1] == "AA"
    wait_until(lambda: calls_about(sandbox, '"A-SLOW"', "bulk"), message="the bulk call to reach the sandbox")
    sandbox.faults(latency_ms=0)
    (cmd,) = settled(bridge, "SLOW-1")
    assert cmd["status"] == "done"
    assert cmd["outcome"] == "an earlier attempt went through; not sent again"
    tries = attempts_of(bridge, cmd["id"])
    assert tries[0]["operation"] == "trigger" and "timeout" in tries[0]["error"]
    assert tries[-1]["operation"] == "search" and tries[-1]["status_code"] == 200
    assert len(sandbox.instances(appointmentId="A-SLOW")) == 1
    assert len(calls_about(sandbox, '"A-SLOW"', "bulk")) == 1


def test_cancel_after_a_timed_out_trigger_still_cancels(quick_bridge: RunningService, sandbox: RunningSandbox) -> None:
    bridge = quick_bridge
    sandbox.faults(latency_ms=1200)
    assert ack(bridge, siu("S12", "SLOWC-1", "A-SLOWC", future(days=30)))[1] == "AA"
    wait_until(lambda: calls_about(sandbox, '"A-SLOWC"', "bulk"), message="the bulk call to reach the sandbox")
    # The cancel is logged while the booking's answers are still too late, so it comes before any resend.
    assert ack(bridge, siu("S15", "SLOWC-2", "A-SLOWC", None))[1] == "AA"
    sandbox.faults(latency_ms=0)
    (booked,) = settled(bridge, "SLOWC-1")
    (cancelled,) = settled(bridge, "SLOWC-2")
    assert (booked["status"], cancelled["status"]) == ("annihilated", "done"), (booked, cancelled)
    assert booked["outcome"] == f"superseded by cancel command {cancelled['id']}; not sent again"
    assert cancelled["outcome"] == "cancelled 1 instance(s)"
    assert [i["status"] for i in sandbox.instances(appointmentId="A-SLOWC")] == ["Cancelled"]
    assert len(calls_about(sandbox, '"A-SLOWC"', "bulk")) == 1
