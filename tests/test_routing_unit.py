"""Routing decisions in-process (no sockets): each rule of ``Router.plan`` alone, so a mutation shows."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from hl7bridge.core.status import MessageStatus
from hl7bridge.hl7.er7 import Er7Message
from hl7bridge.hl7.problems import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, Problem
from hl7bridge.hl7.siu import AppointmentEvent, PatientId
from hl7bridge.mapping.parameters import ParameterSpec
from hl7bridge.mapping.routing import BOOK, CANCEL, MODIFY, RESCHEDULE, SUBFLOW, Criteria, Route, Router

CHICAGO = ZoneInfo("America/Chicago")
NOW = datetime(2027, 3, 1, tzinfo=UTC).timestamp()
START = datetime(2027, 3, 15, 14, 30, tzinfo=UTC)

EVENT = AppointmentEvent(
    event="S12", control_id="C1", version="2.5.1", sending_application="EPIC", sending_facility="MAIN",
    action="book", placer_appointment_id="P1", filler_appointment_id="F1", start=START, status="Booked",
    appointment_type="Follow-up", appointment_type_code="FU", patient_ids=(PatientId("MRN1", "HOSP", "MR"),),
    provider_id="DOC1", provider_name="TESTDOCTOR", location="EXAM3", location_facility="MAINHOSP",
    department="CARDIO",
)  # fmt: skip
PARAMS = (
    ParameterSpec("appointment_id", ("appointment_id",), required=True),
    ParameterSpec("when", ("start",), type="datetime"),
    ParameterSpec("mrn", ("patient_id",)),
)
ROUTE = Route("clinic", "bot-1", "America/New_York", PARAMS, ("appointment_id",), flow_id="flow-main")


def plan(event: AppointmentEvent = EVENT, *routes: Route, unrouted: str = "ignore", listener: str = "main"):
    return Router(routes or (ROUTE,), unrouted).plan(event, listener, CHICAGO, NOW)


def test_a_booking_becomes_one_trigger_with_mapped_parameters_in_the_route_zone() -> None:
    result = plan()
    assert result.status == MessageStatus.ACCEPTED and result.route == "clinic" and result.problem is None
    [command] = result.commands
    assert (command.kind, command.route, command.chat_bot_id, command.flow_id) == (BOOK, "clinic", "bot-1", "flow-main")
    assert command.parameters == {"appointment_id": "F1", "when": "2027-03-15 10:30:00", "mrn": "MRN1"}
    assert command.identifiers == {"appointment_id": "F1"}
    assert command.appointment_key == "MAIN|F1" and command.start_at == START.timestamp()
    assert command.time_zone == "America/New_York" and "book via route clinic" == result.note


def test_an_ignored_event_plans_nothing_and_says_so() -> None:
    result = plan(replace(EVENT, action="ignore", event="S25"))
    assert (result.status, result.commands, result.route) == (MessageStatus.IGNORED, [], None)
    assert result.note == "S25 needs no action"


@pytest.mark.parametrize(
    ("unrouted", "status"), [("ignore", MessageStatus.IGNORED), ("reject", MessageStatus.REJECTED)]
)
def test_an_unrouted_event_is_ignored_or_rejected_as_configured(unrouted: str, status: str) -> None:
    elsewhere = replace(ROUTE, match=Criteria(sending_facility=("OTHER",)))
    result = plan(EVENT, elsewhere, unrouted=unrouted)
    assert result.status == status and result.commands == [] and result.note == "no route matches this appointment"
    assert (result.problem is not None) == (unrouted == "reject")
    if result.problem is not None:
        assert (result.problem.location, result.problem.code) == ("MSH-4", REQUIRED_FIELD_MISSING)


def test_event_values_are_compared_without_surrounding_spaces() -> None:
    spaced = replace(EVENT, sending_facility=" MAIN ", department="cardio ")
    assert plan(spaced, replace(ROUTE, match=Criteria(sending_facility=("main",), department=("CARDIO",)))).route


def test_the_first_route_that_applies_wins() -> None:
    first = replace(ROUTE, name="first", match=Criteria(department=("cardio",)))
    second = replace(ROUTE, name="second")
    assert plan(EVENT, first, second).route == "first"
    assert plan(replace(EVENT, department="ONCO"), first, second).route == "second"


@pytest.mark.parametrize(
    ("criteria", "hit"),
    [
        (Criteria(sending_application=("epic",)), True),
        (Criteria(sending_application=("CERNER",)), False),
        (Criteria(sending_facility=(" main ",)), True),
        (Criteria(location=("MAINHOSP",)), True),
        (Criteria(location=("EXAM3",)), True),
        (Criteria(location=("EXAM4",)), False),
        (Criteria(appointment_type=("FU",)), True),
        (Criteria(appointment_type=("Follow-up",)), True),
        (Criteria(provider=("DOC1",)), True),
        (Criteria(provider=("testdoctor",)), True),
        (Criteria(provider=("DOC2",)), False),
        (Criteria(sending_application=("EPIC",), department=("ONCO",)), False),
        (Criteria(sending_application=("EPIC", "CERNER"), department=("CARDIO",)), True),
    ],
)
def test_match_needs_every_listed_attribute_case_and_space_insensitive(criteria: Criteria, hit: bool) -> None:
    assert (plan(EVENT, replace(ROUTE, match=criteria)).route == "clinic") is hit


@pytest.mark.parametrize(
    ("criteria", "excluded"),
    [
        (Criteria(), False),
        (Criteria(department=("cardio",)), True),
        (Criteria(department=("ONCO",), provider=("DOC1",)), True),
        (Criteria(department=("ONCO",), provider=("DOC2",)), False),
    ],
)
def test_exclude_drops_the_route_when_any_listed_attribute_matches(criteria: Criteria, excluded: bool) -> None:
    assert (plan(EVENT, replace(ROUTE, exclude=criteria)).route is None) is excluded


def test_a_route_bound_to_listeners_takes_only_their_messages() -> None:
    bound = replace(ROUTE, listeners=("east",))
    assert plan(EVENT, bound, listener="east").route == "clinic"
    assert plan(EVENT, bound, listener="west").route is None


def test_a_skipped_status_is_ignored_by_the_route() -> None:
    result = plan(replace(EVENT, status="blocked"), replace(ROUTE, skip_statuses=("BLOCKED",)))
    assert (result.status, result.route, result.commands) == (MessageStatus.IGNORED, "clinic", [])
    assert result.note == "status blocked is skipped by the route"


@pytest.mark.parametrize("action", ["book", "reschedule", "modify"])
def test_an_appointment_that_started_is_not_triggered_again(action: str) -> None:
    started = replace(EVENT, action=action, start=datetime.fromtimestamp(NOW, UTC))
    result = plan(started)
    assert (result.status, result.commands) == (MessageStatus.IGNORED, [])
    assert result.note == "the appointment has already started"
    assert plan(started, replace(ROUTE, skip_started=False)).commands


def test_a_cancel_of_a_started_appointment_still_cancels() -> None:
    result = plan(replace(EVENT, action="cancel", start=datetime.fromtimestamp(NOW - 60, UTC)))
    assert [c.kind for c in result.commands] == [CANCEL]


def test_a_cancel_carries_only_the_identifiers() -> None:
    [command] = plan(replace(EVENT, action="cancel")).commands
    assert (command.kind, command.flow_id) == (CANCEL, None)
    assert command.parameters == command.identifiers == {"appointment_id": "F1"}


@pytest.mark.parametrize(("action", "kind"), [("reschedule", RESCHEDULE), ("modify", MODIFY)])
def test_a_reschedule_retriggers_by_default(action: str, kind: str) -> None:
    [command] = plan(replace(EVENT, action=action)).commands
    assert (command.kind, command.flow_id, command.parameters["mrn"]) == (kind, "flow-main", "MRN1")


def test_a_reschedule_can_run_a_subflow_instead() -> None:
    route = replace(ROUTE, reschedule="subflow", reschedule_flow_id="flow-moved")
    [command] = plan(replace(EVENT, action="reschedule"), route).commands
    assert (command.kind, command.flow_id) == (SUBFLOW, "flow-moved")
    [command] = plan(replace(EVENT, action="reschedule"), replace(route, reschedule_flow_id="")).commands
    assert command.kind == RESCHEDULE


def test_a_noshow_cancels_by_default_runs_a_subflow_or_is_ignored() -> None:
    noshow = replace(EVENT, action="noshow", start=datetime.fromtimestamp(NOW - 3600, UTC))
    assert [c.kind for c in plan(noshow).commands] == [CANCEL]
    [command] = plan(noshow, replace(ROUTE, noshow="subflow", noshow_flow_id="flow-missed")).commands
    assert (command.kind, command.flow_id, command.start_at) == (SUBFLOW, "flow-missed", None)
    assert command.parameters == {"appointment_id": "F1"}
    ignored = plan(noshow, replace(ROUTE, noshow="ignore"))
    assert (ignored.status, ignored.note) == (MessageStatus.IGNORED, "no-show is ignored by the route")


def test_an_empty_identifier_rejects_naming_its_field() -> None:
    result = plan(replace(EVENT, placer_appointment_id="", filler_appointment_id=""))
    assert result.status == MessageStatus.REJECTED and result.commands == []
    assert result.problem is not None and result.problem.location == "SCH-2"
    assert not result.accept_anyway


def test_an_optional_identifier_that_is_empty_still_rejects() -> None:
    route = replace(ROUTE, instance_identifiers=("mrn",))
    result = plan(replace(EVENT, patient_ids=()), route)
    assert result.status == MessageStatus.REJECTED and result.problem.location == "PID-3"
    assert "instance identifier is empty" in result.note


def test_content_errors_accept_marks_the_rejection_to_be_acknowledged() -> None:
    route = replace(ROUTE, content_errors="accept")
    result = plan(replace(EVENT, placer_appointment_id="", filler_appointment_id=""), route)
    assert result.status == MessageStatus.REJECTED and result.accept_anyway


def test_a_required_parameter_only_fails_a_creating_command() -> None:
    route = replace(ROUTE, parameters=(*PARAMS, ParameterSpec("phone", ("patient_phone",), required=True)))
    assert plan(EVENT, route).status == MessageStatus.REJECTED
    assert [c.kind for c in plan(replace(EVENT, action="cancel"), route).commands] == [CANCEL]


# Survivors of `make mutation` (docs/testing.md): each case below fails under one of them.


def test_an_unrouted_rejection_says_why_to_the_sender() -> None:
    elsewhere = replace(ROUTE, match=Criteria(sending_facility=("OTHER",)))
    problem = plan(EVENT, elsewhere, unrouted="reject").problem
    assert problem == Problem("MSH-4", REQUIRED_FIELD_MISSING, "no route matches this appointment")


def test_without_a_clock_reading_the_plan_uses_the_current_time() -> None:
    future = Router((ROUTE,)).plan(replace(EVENT, start=datetime(2999, 1, 1, tzinfo=UTC)), "main", CHICAGO)
    past = Router((ROUTE,)).plan(replace(EVENT, start=datetime(2000, 1, 1, tzinfo=UTC)), "main", CHICAGO)
    assert ([c.kind for c in future.commands], past.note) == ([BOOK], "the appointment has already started")


def test_a_cancel_without_a_start_has_no_start() -> None:
    [command] = plan(replace(EVENT, action="cancel", start=None)).commands
    assert (command.kind, command.start_at) == (CANCEL, None)


def test_a_route_that_ignores_an_event_is_still_named() -> None:
    started = plan(replace(EVENT, start=datetime.fromtimestamp(NOW, UTC)))
    noshow = plan(replace(EVENT, action="noshow"), replace(ROUTE, noshow="ignore"))
    assert (started.route, noshow.route) == ("clinic", "clinic")


def test_naive_hl7_timestamps_are_read_in_the_feed_zone() -> None:
    message = Er7Message.parse("MSH|^~\\&|EPIC|MAIN|||20270101120000||SIU^S12|C1|P|2.5.1\rTQ1|||||||20270315093000\r")
    route = replace(ROUTE, parameters=(ParameterSpec("when", ("TQ1-7",), type="datetime"),))
    [command] = plan(replace(EVENT, message=message), route).commands
    assert command.parameters == {"when": "2027-03-15 10:30:00"}


def test_an_empty_identifier_is_rejected_with_its_name_and_reason_under_the_route() -> None:
    result = plan(replace(EVENT, patient_ids=()), replace(ROUTE, instance_identifiers=("mrn",)))
    text = "journey parameter 'mrn': instance identifier is empty"
    assert result.problem == Problem("PID-3", REQUIRED_FIELD_MISSING, text)
    assert (result.note, result.route) == (text, "clinic")


def test_a_bad_parameter_value_reaches_the_problem_but_not_its_text() -> None:
    message = Er7Message.parse("MSH|^~\\&|EPIC|MAIN|||20270101120000||SIU^S12|C1|P|2.5.1\rNTE|1|P|2027031X\r")
    route = replace(ROUTE, parameters=(ParameterSpec("when", ("NTE-3",), type="datetime"),))
    problem = plan(replace(EVENT, message=message), route).problem
    assert (problem.location, problem.code, problem.value) == ("NTE-3", DATA_TYPE_ERROR, "2027031X")
    assert problem.text.startswith("journey parameter 'when': NTE-3 ") and "2027031X" not in problem.text


def test_a_rescheduling_subflow_carries_the_mapped_parameters() -> None:
    route = replace(ROUTE, reschedule="subflow", reschedule_flow_id="flow-moved")
    [command] = plan(replace(EVENT, action="reschedule"), route).commands
    assert command.parameters == {"appointment_id": "F1", "when": "2027-03-15 10:30:00", "mrn": "MRN1"}


def test_a_cancel_stays_a_cancel_on_a_route_with_a_noshow_subflow() -> None:
    [command] = plan(replace(EVENT, action="cancel"), replace(ROUTE, noshow_flow_id="flow-missed")).commands
    assert (command.kind, command.flow_id) == (CANCEL, None)
