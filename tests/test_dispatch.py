"""Messages become journeys: the real service, the sandbox as a real HTTP server, a real SQLite file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningSandbox, RunningService, segments, start_service, wait_until
from .dispatch_support import (
    TOKEN,
    ack,
    attempts_of,
    commands_of,
    future,
    message_row,
    sandbox_for_module,
    service_toml,
    settled,
    siu,
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("bridge"), service_toml(sandbox.url), env=TOKEN)
    yield running
    running.stop()


def test_new_appointment_starts_a_journey(bridge: RunningService, sandbox: RunningSandbox) -> None:
    start = future(days=20, hour=9, minute=30)
    assert ack(bridge, siu("S12", "NEW-1", "A-NEW-1", start, phone="(555) 010-1234"))[1] == "AA"
    found = wait_until(lambda: sandbox.instances(appointmentId="A-NEW-1"), message="the instance")
    assert len(found) == 1
    params = found[0]["parameters"]
    assert params == {
        "patientId": "MRN100",
        "patientName": "ALICE TESTPATIENT",
        "appointmentId": "A-NEW-1",
        "appointmentDateTime": f"{start[:4]}-{start[4:6]}-{start[6:8]} 09:30:00",
        "phoneNumber": "5550101234",
    }
    assert found[0]["status"] == "InProgress"
    assert settled(bridge, "NEW-1")[0]["outcome"] == "triggered"


def test_resent_booking_does_not_start_a_second_journey(bridge: RunningService, sandbox: RunningSandbox) -> None:
    start = future(days=21)
    ack(bridge, siu("S12", "RESEND-1", "A-RESEND", start))
    settled(bridge, "RESEND-1")
    ack(bridge, siu("S12", "RESEND-2", "A-RESEND", start))
    assert settled(bridge, "RESEND-2")[0]["outcome"] == "already triggered with these parameters"
    assert len(sandbox.instances(appointmentId="A-RESEND")) == 1


def test_reschedule_cancels_and_triggers_anew(bridge: RunningService, sandbox: RunningSandbox) -> None:
    ack(bridge, siu("S12", "MOVE-1", "A-MOVE", future(days=22, hour=9)))
    settled(bridge, "MOVE-1")
    ack(bridge, siu("S13", "MOVE-2", "A-MOVE", future(days=23, hour=14)))
    settled(bridge, "MOVE-2")
    found = sandbox.instances(appointmentId="A-MOVE")
    assert sorted(i["status"] for i in found) == ["Cancelled", "InProgress"]
    active = next(i for i in found if i["status"] == "InProgress")
    assert active["parameters"]["appointmentDateTime"].endswith("14:30:00")


def test_modification_only_retriggers_when_parameters_change(bridge: RunningService, sandbox: RunningSandbox) -> None:
    start = future(days=24)
    ack(bridge, siu("S12", "MOD-1", "A-MOD", start))
    settled(bridge, "MOD-1")
    ack(bridge, siu("S14", "MOD-2", "A-MOD", start, appointment_type="OTHER"))
    assert settled(bridge, "MOD-2")[0]["outcome"] == "no change"
    assert len(sandbox.instances(appointmentId="A-MOD")) == 1
    ack(bridge, siu("S14", "MOD-3", "A-MOD", start, given="ALICIA"))
    settled(bridge, "MOD-3")
    found = sandbox.instances(appointmentId="A-MOD")
    assert sorted(i["status"] for i in found) == ["Cancelled", "InProgress"]
    assert next(i for i in found if i["status"] == "InProgress")["parameters"]["patientName"] == "ALICIA TESTPATIENT"


@pytest.mark.parametrize(
    ("event", "status"),
    [("S15", ""), ("S16", ""), ("S17", ""), ("S26", ""), ("S14", "Cancelled"), ("S14", "Complete")],
)
def test_cancellations_stop_the_journey(
    bridge: RunningService, sandbox: RunningSandbox, event: str, status: str
) -> None:
    appointment = f"A-STOP-{event}-{status or 'none'}"
    start = future(days=25)
    ack(bridge, siu("S12", f"{appointment}-1", appointment, start))
    settled(bridge, f"{appointment}-1")
    assert ack(bridge, siu(event, f"{appointment}-2", appointment, None, status=status))[1] == "AA"
    outcome = settled(bridge, f"{appointment}-2")[0]
    assert outcome["kind"] == "cancel" and outcome["outcome"] == "cancelled 1 instance(s)"
    assert [i["status"] for i in sandbox.instances(appointmentId=appointment)] == ["Cancelled"]


def test_cancelling_an_unknown_appointment_is_not_an_error(bridge: RunningService) -> None:
    assert ack(bridge, siu("S15", "UNKNOWN-1", "A-NEVER-SEEN", None))[1] == "AA"
    assert settled(bridge, "UNKNOWN-1")[0]["outcome"] == "nothing active to cancel"


def test_slot_events_are_ignored(bridge: RunningService, sandbox: RunningSandbox) -> None:
    assert ack(bridge, siu("S23", "SLOT-1", "A-SLOT", future()))[1] == "AA"
    row = message_row(bridge, "SLOT-1")
    assert row["status"] == "ignored"
    assert commands_of(bridge, "SLOT-1") == []


def test_missing_required_parameter_is_ae_naming_the_field(bridge: RunningService) -> None:
    msa = ack(bridge, siu("S12", "NOSTART-MAP", "A-X", future(), family="", given=""))
    assert msa[1] == "AE"
    err = segments(bridge.request(siu("S12", "NOSTART-MAP2", "A-X", future(), family="", given="")))["ERR"]
    assert err[2].split("^")[:3] == ["PID", "1", "5"]
    assert "patientName" in err[8]


def test_started_appointment_is_not_triggered(bridge: RunningService, sandbox: RunningSandbox) -> None:
    assert ack(bridge, siu("S12", "PAST-1", "A-PAST", future(days=-1)))[1] == "AA"
    row = message_row(bridge, "PAST-1")
    assert row["status"] == "ignored" and "already started" in row["note"]
    assert sandbox.instances(appointmentId="A-PAST") == []


def test_bulk_calls_are_coalesced(bridge: RunningService, sandbox: RunningSandbox) -> None:
    before = len(sandbox.calls("bulk"))
    with bridge.client() as client:
        payload = b"".join(
            b"\x0b" + siu("S12", f"BULK-{i}", f"A-BULK-{i}", future(days=40)) + b"\x1c\x0d" for i in range(60)
        )
        client.sock.sendall(payload)
        answers = [segments(client.receive())["MSA"][1] for _ in range(60)]
    assert answers == ["AA"] * 60
    wait_until(lambda: len([i for i in sandbox.get("/_sandbox/instances")
                            if i["parameters"]["appointmentId"].startswith("A-BULK-")]) == 60)  # fmt: skip
    assert len(sandbox.calls("bulk")) - before <= 3


def bisect_batch(bridge: RunningService, sandbox: RunningSandbox, prefix: str, count: int, bad: set[int]) -> None:
    """Send ``count`` bookings on one connection (one batch), those at ``bad`` without a phone, and check that
    the API's 400 for the batch was bisected down to exactly the bad instances."""
    with bridge.client() as client:
        for i in range(count):
            client.send(
                siu("S12", f"{prefix}-{i}", f"A-{prefix}-{i}", future(days=41), phone=None if i in bad else "555-0199")
            )
        assert [segments(client.receive())["MSA"][1] for _ in range(count)] == ["AA"] * count
    outcomes = {i: settled(bridge, f"{prefix}-{i}")[0] for i in range(count)}
    assert {i for i, o in outcomes.items() if o["status"] == "dead"} == bad, outcomes
    assert all("phoneNumber" in outcomes[i]["outcome"] and "is empty" in outcomes[i]["outcome"] for i in bad)
    assert all(o["status"] == "done" and o["outcome"] == "triggered" for i, o in outcomes.items() if i not in bad)
    started = {i["parameters"]["appointmentId"] for i in sandbox.get("/_sandbox/instances")}
    assert {a for a in started if a.startswith(f"A-{prefix}-")} == {
        f"A-{prefix}-{i}" for i in range(count) if i not in bad
    }

    def ours(call: dict) -> list[int]:
        ids = [i["parameters"]["appointmentId"] for i in (call["body"] or {}).get("instances", [])]
        return sorted(int(a.rsplit("-", 1)[1]) for a in ids if a.startswith(f"A-{prefix}-"))

    calls = [(c["status"], ours(c)) for c in sandbox.calls("bulk") if ours(c)]
    # Bisected: a 400 for several instances, then each bad one refused alone, each good one accepted once.
    assert any(status == 400 and len(batch) > 1 for status, batch in calls), calls
    assert sorted(b[0] for status, b in calls if status == 400 and len(b) == 1) == sorted(bad), calls
    accepted = [i for status, batch in calls if 200 <= status < 300 for i in batch]
    assert sorted(accepted) == [i for i in range(count) if i not in bad], calls
    for i in bad:
        summaries = [a["request_summary"] for a in attempts_of(bridge, outcomes[i]["id"])]
        assert any("[400: bisected]" in s for s in summaries), summaries


def test_a_bad_instance_is_bisected_out_of_the_batch(bridge: RunningService, sandbox: RunningSandbox) -> None:
    bisect_batch(bridge, sandbox, "BIS", 8, {5})


def test_several_bad_instances_at_different_depths_are_bisected_out(
    bridge: RunningService, sandbox: RunningSandbox
) -> None:
    """Neighbours (6, 7), a lone one deep in each half (0, 13): a bisection that stops early loses good ones."""
    bisect_batch(bridge, sandbox, "BIS2", 16, {0, 6, 7, 13})


def test_routes_choose_the_journey(tmp_path: Path, sandbox: RunningSandbox) -> None:
    dental = """
[[routes]]
name = "dental"
chat_bot_id = "dental"
time_zone = "America/New_York"
instance_identifiers = ["appointmentId"]
[routes.match]
department = ["DENTAL"]
[routes.parameters.patientId]
source = "patient_id"
[routes.parameters.appointmentId]
source = "appointment_id"
[routes.parameters.appointmentDateTime]
source = "start"
type = "datetime"
[routes.parameters.clinic]
constant = "Smile Clinic"
"""
    route_extra = '[routes.exclude]\nsending_facility = ["OTHER"]\n'
    config = service_toml(sandbox.url, extra_routes=dental, route_extra=route_extra,
                          dispatch_extra='unrouted = "reject"')  # fmt: skip
    service = start_service(tmp_path, config, env=TOKEN)
    try:
        start = future(days=30, hour=9, minute=0)
        ack(service, siu("S12", "ROUTE-D", "A-ROUTE-D", start, department="DENTAL"))
        ack(service, siu("S12", "ROUTE-R", "A-ROUTE-R", start))
        dental_found = wait_until(lambda: sandbox.instances(appointmentId="A-ROUTE-D"))
        assert dental_found[0]["chatBotId"] == "dental"
        assert dental_found[0]["parameters"]["clinic"] == "Smile Clinic"
        assert dental_found[0]["parameters"]["appointmentDateTime"].endswith("10:00:00")  # Chicago 09:00 in New York
        assert wait_until(lambda: sandbox.instances(appointmentId="A-ROUTE-R"))[0]["chatBotId"] == "reminders"
        msa = ack(service, siu("S12", "ROUTE-NONE", "A-ROUTE-N", start, facility="OTHER"))
        assert msa[1] == "AE" and "no route" in msa[3]
    finally:
        service.stop()
