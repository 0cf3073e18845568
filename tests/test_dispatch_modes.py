"""ACK modes and per-route event handling: the real service, the sandbox as its own process, real SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from .conftest import RunningSandbox, RunningService, segments, start_service, wait_until
from .dispatch_support import (
    TOKEN,
    ack,
    attempts_of,
    commands_of,
    future,
    iso,
    message_row,
    message_rows,
    sandbox_for_module,
    service_toml,
    settled,
    siu,
)

CHICAGO = ZoneInfo("America/Chicago")  # the feed's zone in service_toml
DISPATCHED = 'ack_mode = "dispatched"\ndispatch_timeout = 5'
OVERRIDES = """on_reschedule = "subflow"
reschedule_flow_id = "moved"
on_noshow = "subflow"
noshow_flow_id = "noshow"
skip_statuses = ["Pending"]
content_errors = "accept"
"""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@pytest.fixture
def no_faults(sandbox: RunningSandbox) -> Iterator[RunningSandbox]:
    """For tests that inject faults: none before, none after."""
    sandbox.faults(latency_ms=0, outage={"mode": "503", "seconds": 0})
    yield sandbox
    sandbox.faults(latency_ms=0, outage={"mode": "503", "seconds": 0})


@pytest.fixture(scope="module")
def dispatched(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("dispatched"), service_toml(sandbox.url, listener_extra=DISPATCHED),
                            env=TOKEN)  # fmt: skip
    yield running
    running.stop()


@pytest.fixture(scope="module")
def overrides(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("overrides"), service_toml(sandbox.url, route_extra=OVERRIDES),
                            env=TOKEN)  # fmt: skip
    yield running
    running.stop()


def bulk_calls_for(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    return [
        c for c in sandbox.calls("bulk")
        if any(i["parameters"].get("appointmentId") == appointment for i in (c["body"] or {}).get("instances", []))
    ]  # fmt: skip


# ---- ack_mode = "dispatched" ----------------------------------------------------------------------


def test_dispatched_aa_only_once_the_journey_exists(dispatched: RunningService, sandbox: RunningSandbox) -> None:
    start = future(days=30, hour=10)
    msa = ack(dispatched, siu("S12", "DSP-OK", "A-DSP-OK", start))
    found = sandbox.instances(appointmentId="A-DSP-OK")  # right after the ACK: no polling
    assert msa[1] == "AA" and msa[2] == "DSP-OK"
    assert len(found) == 1 and found[0]["status"] == "InProgress"
    assert found[0]["parameters"]["appointmentDateTime"] == iso(start)
    (cmd,) = commands_of(dispatched, "DSP-OK")
    assert cmd["sync"] == 1 and cmd["status"] == "done" and cmd["outcome"] == "triggered"
    row = message_row(dispatched, "DSP-OK")
    assert row["status"] == "accepted" and row["ack_code"] == "AA"


def test_dispatched_api_rejection_is_ae_with_the_api_message(
    dispatched: RunningService, sandbox: RunningSandbox
) -> None:
    answer = segments(dispatched.request(siu("S12", "DSP-NOPHONE", "A-DSP-NOPHONE", future(days=30), phone=None)))
    msa, err = answer["MSA"], answer["ERR"]
    assert msa[1] == "AE" and msa[2] == "DSP-NOPHONE"
    api_message = "parameter 'phoneNumber' is empty"
    assert api_message in msa[3]
    assert api_message in err[8]
    assert "400" in msa[3]
    (cmd,) = commands_of(dispatched, "DSP-NOPHONE")
    assert cmd["status"] == "dead" and api_message in cmd["outcome"]
    row = message_row(dispatched, "DSP-NOPHONE")  # recorded before the AE was sent: no polling
    assert row["status"] == "rejected"
    assert api_message in row["error"] and api_message in row["ack_text"]
    assert b"|AE|DSP-NOPHONE|" in row["ack_raw"]
    assert sandbox.instances(appointmentId="A-DSP-NOPHONE") == []


def test_dispatched_outage_is_ae_and_never_retried_in_the_background(
    dispatched: RunningService, no_faults: RunningSandbox
) -> None:
    sandbox = no_faults
    sandbox.faults(outage={"mode": "503", "seconds": 3})
    msa = ack(dispatched, siu("S12", "DSP-DOWN", "A-DSP-DOWN", future(days=30)))
    assert msa[1] == "AE"
    assert "not delivered to the Journeys API" in msa[3] and "unavailable" in msa[3]
    (cmd,) = commands_of(dispatched, "DSP-DOWN")
    assert cmd["status"] == "failed"
    # Once the API is back, a new message goes through at once; the failed one is left to the sender.
    wait_until(lambda: ack(dispatched, siu("S12", f"DSP-UP-{datetime.now().timestamp()}", "A-DSP-UP",
                                           future(days=30)))[1] == "AA",
               timeout=10, interval=0.3, message="the API to accept again")  # fmt: skip
    assert len(sandbox.instances(appointmentId="A-DSP-UP")) == 1
    assert sandbox.instances(appointmentId="A-DSP-DOWN") == []
    assert bulk_calls_for(sandbox, "A-DSP-DOWN") == []  # never accepted (503s carry no logged body)
    (cmd,) = commands_of(dispatched, "DSP-DOWN")
    assert cmd["status"] == "failed" and cmd["attempts"] == 1
    assert [a["status_code"] for a in attempts_of(dispatched, cmd["id"])] == [503]


def test_dispatched_messages_are_answered_at_once_while_dispatching_holds(
    dispatched: RunningService, no_faults: RunningSandbox
) -> None:
    """Three failed calls make dispatching hold to one probe on its backoff; a sender waiting for its verdict
    is not made to wait behind it: each of these messages is tried when it arrives, and answered AE."""
    no_faults.faults(outage={"mode": "503", "seconds": 30})
    for i in range(5):
        msa = ack(dispatched, siu("S12", f"DSP-HOLD-{i}", f"A-DSP-HOLD-{i}", future(days=30)))
        assert msa[1] == "AE" and "unavailable" in msa[3], (i, msa)
        (cmd,) = commands_of(dispatched, f"DSP-HOLD-{i}")
        assert cmd["status"] == "failed" and cmd["attempts"] == 1, cmd


def test_dispatched_duplicates_get_the_final_ack(dispatched: RunningService, sandbox: RunningSandbox) -> None:
    first = dispatched.request(siu("S12", "DSP-DUP", "A-DSP-DUP", future(days=30)))
    assert segments(first)["MSA"][1] == "AA"
    again = dispatched.request(siu("S12", "DSP-DUP", "A-DSP-DUP", future(days=30)))
    assert again == first  # the original ACK, byte for byte
    rows = message_rows(dispatched, "DSP-DUP")
    assert [r["status"] for r in rows] == ["accepted", "duplicate"]
    assert rows[1]["duplicate_of"] == rows[0]["id"]
    assert len(bulk_calls_for(sandbox, "A-DSP-DUP")) == 1
    assert len(sandbox.instances(appointmentId="A-DSP-DUP")) == 1

    # A message answered AE is not a duplicate to be acknowledged AA: its resend is judged again.
    rejected = segments(dispatched.request(siu("S12", "DSP-DUP-AE", "A-DSP-DUP-AE", future(days=30), phone=None)))
    assert rejected["MSA"][1] == "AE"
    wait_until(lambda: message_row(dispatched, "DSP-DUP-AE")["ack_code"] == "AE", message="the AE in the log")
    resent = segments(dispatched.request(siu("S12", "DSP-DUP-AE", "A-DSP-DUP-AE", future(days=30), phone=None)))
    assert resent["MSA"][1] == "AE"
    assert "parameter 'phoneNumber' is empty" in resent["MSA"][3]
    assert sandbox.instances(appointmentId="A-DSP-DUP-AE") == []


def test_dispatched_ack_is_logged_before_it_is_sent(dispatched: RunningService, no_faults: RunningSandbox) -> None:
    """The verdict's ACK is committed before it leaves: read the log the moment it arrives, and resend at once."""
    for control, phone, code, status in (("DSP-REC-AA", "555-0101", "AA", "accepted"),
                                         ("DSP-REC-AE", None, "AE", "rejected")):  # fmt: skip
        message = siu("S12", control, f"A-{control}", future(days=30), phone=phone)
        with dispatched.client() as client:
            answer = client.request(message)
            row = message_rows(dispatched, control)[0]  # no polling: it must be there already
            resent = client.request(message)
        assert segments(answer)["MSA"][1] == code, answer
        assert (row["status"], row["ack_code"], row["ack_raw"]) == (status, code, answer)
        if code == "AA":
            assert resent == answer  # the original ACK, byte for byte, as the log holds it
            assert [r["status"] for r in message_rows(dispatched, control)] == ["accepted", "duplicate"]
        else:
            assert segments(resent)["MSA"][1] == "AE"  # an AE's resend is judged again, never an AA


def test_dispatched_resend_during_the_verdict_gets_the_final_ack(
    dispatched: RunningService, no_faults: RunningSandbox
) -> None:
    """A resend that arrives while the original still awaits the API never gets a provisional AA."""
    sandbox = no_faults
    sandbox.faults(latency_ms=1000)
    for control, phone, final in (("DSP-RACE-AE", None, "AE"), ("DSP-RACE-AA", "555-0101", "AA")):
        message = siu("S12", control, f"A-{control}", future(days=30), phone=phone)  # no phone: the API says 400
        with dispatched.client() as original, dispatched.client() as resend:
            original.send(message)
            wait_until(lambda control=control: message_rows(dispatched, control), message="the original in the log")
            assert message_rows(dispatched, control)[0]["status"] == "pending"  # not yet decided
            resend.send(message)
            original_answer = segments(original.receive())["MSA"]
            resent_answer = segments(resend.receive())["MSA"]
        assert original_answer[1] == final, original_answer
        assert resent_answer[1] == final, resent_answer
        assert len(sandbox.instances(appointmentId=f"A-{control}")) == (1 if final == "AA" else 0)
        assert message_rows(dispatched, control)[0]["status"] == ("accepted" if final == "AA" else "rejected")


# ---- route event overrides ------------------------------------------------------------------------


def test_reschedule_runs_the_subflow_on_the_existing_instance(
    overrides: RunningService, sandbox: RunningSandbox
) -> None:
    assert ack(overrides, siu("S12", "SUB-1", "A-SUB", future(days=30, hour=9)))[1] == "AA"
    settled(overrides, "SUB-1")
    (original,) = sandbox.instances(appointmentId="A-SUB")
    assert ack(overrides, siu("S13", "SUB-2", "A-SUB", future(days=31, hour=15)))[1] == "AA"
    (cmd,) = settled(overrides, "SUB-2")
    assert (cmd["kind"], cmd["flow_id"], cmd["status"]) == ("subflow", "moved", "done")
    assert cmd["outcome"] == "subflow moved triggered"
    (instance,) = sandbox.instances(appointmentId="A-SUB")
    assert instance["id"] == original["id"]
    assert instance["status"] == "InProgress"
    assert instance["subflows"] == ["moved"]
    assert instance["lastStepExecuted"]["flowName"] == "moved"
    last = bulk_calls_for(sandbox, "A-SUB")[-1]
    assert last["body"]["flowId"] == "moved" and last["status"] == 204
    assert all(original["id"] not in c["path"] for c in sandbox.calls("execution"))  # never cancelled


def test_unchanged_modification_after_a_rescheduling_subflow_does_not_repeat_it(
    overrides: RunningService, sandbox: RunningSandbox
) -> None:
    assert ack(overrides, siu("S12", "SUBAGAIN-1", "A-SUBAGAIN", future(days=30, hour=9)))[1] == "AA"
    settled(overrides, "SUBAGAIN-1")
    moved_to = future(days=31, hour=15)
    assert ack(overrides, siu("S13", "SUBAGAIN-2", "A-SUBAGAIN", moved_to))[1] == "AA"
    settled(overrides, "SUBAGAIN-2")
    # The same appointment again (e.g. a note changed): nothing the journey knows has changed.
    assert ack(overrides, siu("S14", "SUBAGAIN-3", "A-SUBAGAIN", moved_to, appointment_type="OTHER"))[1] == "AA"
    (cmd,) = settled(overrides, "SUBAGAIN-3")
    (instance,) = sandbox.instances(appointmentId="A-SUBAGAIN")
    assert instance["subflows"] == ["moved"], cmd["outcome"]
    assert cmd["outcome"] == "no change"


def test_noshow_runs_the_noshow_subflow(overrides: RunningService, sandbox: RunningSandbox) -> None:
    start = future(days=30)
    assert ack(overrides, siu("S12", "NOSHOW-1", "A-NOSHOW", start))[1] == "AA"
    settled(overrides, "NOSHOW-1")
    assert ack(overrides, siu("S26", "NOSHOW-2", "A-NOSHOW", start))[1] == "AA"
    (cmd,) = settled(overrides, "NOSHOW-2")
    assert (cmd["kind"], cmd["flow_id"], cmd["status"]) == ("subflow", "noshow", "done")
    (instance,) = sandbox.instances(appointmentId="A-NOSHOW")
    assert instance["subflows"] == ["noshow"]
    assert instance["status"] == "InProgress"
    body = bulk_calls_for(sandbox, "A-NOSHOW")[-1]["body"]
    assert body["flowId"] == "noshow" and body["instances"] == [{"parameters": {"appointmentId": "A-NOSHOW"}}]


def test_noshow_reported_after_the_start_still_runs_the_subflow(
    overrides: RunningService, sandbox: RunningSandbox
) -> None:
    assert ack(overrides, siu("S12", "NOSHOW-LATE-1", "A-NOSHOW-LATE", future(days=30)))[1] == "AA"
    settled(overrides, "NOSHOW-LATE-1")
    # The patient did not come: the no-show is reported after the appointment's start, which it repeats.
    started = (datetime.now(CHICAGO) - timedelta(hours=1)).strftime("%Y%m%d%H%M%S")
    assert ack(overrides, siu("S26", "NOSHOW-LATE-2", "A-NOSHOW-LATE", started))[1] == "AA"
    row = message_row(overrides, "NOSHOW-LATE-2")
    assert row["status"] == "accepted", row["note"]
    (cmd,) = settled(overrides, "NOSHOW-LATE-2")
    assert cmd["status"] == "done", cmd["outcome"]
    assert sandbox.instances(appointmentId="A-NOSHOW-LATE")[0].get("subflows") == ["noshow"]


def test_noshow_without_a_start_still_runs_the_subflow(overrides: RunningService, sandbox: RunningSandbox) -> None:
    assert ack(overrides, siu("S12", "NOSHOW-NOSTART-1", "A-NOSHOW-NOSTART", future(days=30)))[1] == "AA"
    settled(overrides, "NOSHOW-NOSTART-1")
    assert ack(overrides, siu("S26", "NOSHOW-NOSTART-2", "A-NOSHOW-NOSTART", None))[1] == "AA"
    row = message_row(overrides, "NOSHOW-NOSTART-2")
    assert row["status"] == "accepted", (row["status"], row["error"])
    (cmd,) = settled(overrides, "NOSHOW-NOSTART-2")
    assert cmd["status"] == "done", cmd["outcome"]
    assert sandbox.instances(appointmentId="A-NOSHOW-NOSTART")[0].get("subflows") == ["noshow"]


def test_noshow_ignored_by_the_route(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> None:
    service = start_service(tmp_path_factory.mktemp("noshow-ignore"),
                            service_toml(sandbox.url, route_extra='on_noshow = "ignore"\n'), env=TOKEN)  # fmt: skip
    try:
        assert ack(service, siu("S12", "IGN-1", "A-IGN", future(days=30)))[1] == "AA"
        settled(service, "IGN-1")
        assert ack(service, siu("S26", "IGN-2", "A-IGN", None))[1] == "AA"
        row = message_row(service, "IGN-2")
        assert row["status"] == "ignored" and "no-show is ignored" in row["note"]
        assert commands_of(service, "IGN-2") == []
        (instance,) = sandbox.instances(appointmentId="A-IGN")
        assert instance["status"] == "InProgress" and "subflows" not in instance
        assert len(bulk_calls_for(sandbox, "A-IGN")) == 1
    finally:
        service.stop()


def test_skipped_status_is_logged_ignored(overrides: RunningService, sandbox: RunningSandbox) -> None:
    assert ack(overrides, siu("S12", "SKIP-1", "A-SKIP", future(days=30), status="Pending"))[1] == "AA"
    row = message_row(overrides, "SKIP-1")
    assert row["status"] == "ignored" and "Pending" in row["note"] and "skipped" in row["note"]
    assert commands_of(overrides, "SKIP-1") == []
    # Another status is not skipped.
    assert ack(overrides, siu("S12", "SKIP-2", "A-SKIP-2", future(days=30), status="Booked"))[1] == "AA"
    assert settled(overrides, "SKIP-2")[0]["status"] == "done"
    assert sandbox.instances(appointmentId="A-SKIP") == []
    assert len(sandbox.instances(appointmentId="A-SKIP-2")) == 1


def test_content_error_accepted_but_logged_rejected(overrides: RunningService, sandbox: RunningSandbox) -> None:
    answer = segments(overrides.request(siu("S12", "NONAME-1", "A-NONAME", future(days=30), family="", given="")))
    assert answer["MSA"][1] == "AA"
    assert "ERR" not in answer
    row = message_row(overrides, "NONAME-1")
    assert row["status"] == "rejected"
    assert "patientName" in row["error"] and "required" in row["error"]
    assert row["error_location"].startswith("PID")
    assert row["ack_code"] == "AA"
    assert commands_of(overrides, "NONAME-1") == []
    assert sandbox.instances(appointmentId="A-NONAME") == []
