"""Which action an SIU event asks for: the event code, overridden by the appointment status (SCH-25)."""

from __future__ import annotations

BOOKING_EVENTS = frozenset({"S12", "S13", "S14", "S18", "S19", "S20", "S21", "S22"})
CANCEL_EVENTS = frozenset({"S15", "S16", "S17"})
IGNORED_EVENTS = frozenset({"S23", "S24"})
CANCELLED_STATUSES = frozenset({"CANCELLED", "CANCELED", "DELETED"})
NOSHOW_STATUSES = frozenset({"NOSHOW", "NO SHOW", "NO-SHOW"})
ENDED_STATUSES = frozenset({"STARTED", "ARRIVED", "CHECKED IN", "CHECKED-IN", "CHECKEDIN", "COMPLETE", "COMPLETED"})


def classify(event: str, status: str) -> str:
    """The action an event asks for; SCH-25 overrides the event code."""
    key = status.upper().strip()
    if key in CANCELLED_STATUSES:
        return "cancel"
    if key in NOSHOW_STATUSES:
        return "noshow"
    if key in ENDED_STATUSES:
        return "end"
    if event == "S12":
        return "book"
    if event == "S13":
        return "reschedule"
    if event in BOOKING_EVENTS:
        return "modify"
    if event in CANCEL_EVENTS:
        return "cancel"
    if event == "S26":
        return "noshow"
    return "ignore"
