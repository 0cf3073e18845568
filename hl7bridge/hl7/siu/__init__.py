"""SIU messages to ``AppointmentEvent``, one module per job: the header and its refusal rules, the records,
the classification of events, the extraction of fields."""

from hl7bridge.hl7.siu.actions import (
    BOOKING_EVENTS,
    CANCEL_EVENTS,
    CANCELLED_STATUSES,
    ENDED_STATUSES,
    IGNORED_EVENTS,
    NOSHOW_STATUSES,
    classify,
)
from hl7bridge.hl7.siu.extract import DEFAULT_START_SOURCES, Feed, read_event
from hl7bridge.hl7.siu.header import ECHO_LIMITS, Header, MessageRejected
from hl7bridge.hl7.siu.records import AppointmentEvent, PatientId, PersonName, Telecom

__all__ = [
    "BOOKING_EVENTS",
    "CANCELLED_STATUSES",
    "CANCEL_EVENTS",
    "DEFAULT_START_SOURCES",
    "ECHO_LIMITS",
    "ENDED_STATUSES",
    "IGNORED_EVENTS",
    "NOSHOW_STATUSES",
    "AppointmentEvent",
    "Feed",
    "Header",
    "MessageRejected",
    "PatientId",
    "PersonName",
    "Telecom",
    "classify",
    "read_event",
]
