"""SIU messages to ``AppointmentEvent``: what the bridge needs, read with the ER7 reader.

Which field holds what, and of which datatype, comes from hl7apy's tables
(``hl7.tables``); requirements depend on the event: a booking needs a start and
a patient, a cancellation only the appointment id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import date, datetime, tzinfo
from functools import lru_cache
from typing import Any

from hl7bridge.hl7 import tables
from hl7bridge.hl7.er7 import DEFAULT_LIMITS, Er7Message, Limits, Path, Segment
from hl7bridge.hl7.problems import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    Problem,
)
from hl7bridge.hl7.timestamps import TimestampError, offset_of, parse_date, parse_dtm

DEFAULT_START_SOURCES: tuple[tuple[str, ...], ...] = (
    ("TQ1-7",),
    ("SCH-11.4",),
    ("AIS-4", "AIL-6", "AIP-6", "AIG-8"),
)
BOOKING_EVENTS = frozenset({"S12", "S13", "S14", "S18", "S19", "S20", "S21", "S22"})
CANCEL_EVENTS = frozenset({"S15", "S16", "S17"})
IGNORED_EVENTS = frozenset({"S23", "S24"})
_EVENT = re.compile(r"^S\d\d$")
CANCELLED_STATUSES = frozenset({"CANCELLED", "CANCELED", "DELETED"})
NOSHOW_STATUSES = frozenset({"NOSHOW", "NO SHOW", "NO-SHOW"})
ENDED_STATUSES = frozenset({"STARTED", "ARRIVED", "CHECKED IN", "CHECKED-IN", "CHECKEDIN", "COMPLETE", "COMPLETED"})


class MessageRejected(Exception):
    """The message cannot be acted on; ``problem`` says where and why."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.describe())
        self.problem = problem


#: The longest value of each MSH field an ACK echoes: HD's 227 characters, and 199 for MSH-10 (v2.7 on;
#: no version allows more). A longer one is refused and never echoed, so no sender sizes our answers.
ECHO_LIMITS: tuple[tuple[str, str, int], ...] = (
    ("sending_application", "MSH-3", 227),
    ("sending_facility", "MSH-4", 227),
    ("receiving_application", "MSH-5", 227),
    ("receiving_facility", "MSH-6", 227),
    ("message_type", "MSH-9.1", 227),
    ("event", "MSH-9.2", 227),
    ("control_id", "MSH-10", 199),
    ("processing_id", "MSH-11", 227),
    ("version", "MSH-12", 227),
    ("charset_field", "MSH-18", 227),
)


@dataclass(slots=True)
class Header:
    """MSH as the acknowledgment needs it: raw (still escaped) values, echoed as received.

    Not frozen, like the other records built per message: a frozen dataclass's ``__init__`` sets each
    field through ``object.__setattr__``, several times the cost (docs/performance.md)."""

    sending_application: str
    sending_facility: str
    receiving_application: str
    receiving_facility: str
    sent_at: str
    message_type: str
    event: str
    control_id: str
    processing_id: str
    version: str
    accept_ack_type: str
    application_ack_type: str
    charset_field: str
    sender: tuple[str, str]

    @classmethod
    def of(cls, msg: Er7Message) -> Header:
        """Read straight from MSH's fields: this runs for every message, and position-by-position
        lookups cost several times as much."""
        enc = msg.encoding
        fields = msg.msh.fields
        if len(fields) < 19:
            fields = fields + [""] * (19 - len(fields))
        rep, comp = enc.repetition, enc.component
        first = {n: fields[n].split(rep, 1)[0] for n in (3, 4, 5, 6, 7, 9, 10, 11, 12, 15, 16, 18)}

        def text(value: str) -> str:
            return msg.value(value) if enc.escape in value or '"' in value or enc.truncation else value

        message_type = [*first[9].split(comp, 2), ""]
        return cls(
            sending_application=first[3],
            sending_facility=first[4],
            receiving_application=first[5],
            receiving_facility=first[6],
            sent_at=first[7].split(comp, 1)[0],
            message_type=text(message_type[0]).strip().upper(),
            event=text(message_type[1]).strip().upper(),
            control_id=text(first[10]).strip(),
            processing_id=first[11].split(comp, 1)[0],
            version=text(first[12].split(comp, 1)[0]).strip(),
            accept_ack_type=text(first[15]).strip().upper(),
            application_ack_type=text(first[16]).strip().upper(),
            charset_field=first[18],
            sender=(text(first[3].split(comp, 1)[0]).strip(), text(first[4].split(comp, 1)[0]).strip()),
        )

    @property
    def enhanced(self) -> bool:
        return bool(self.accept_ack_type or self.application_ack_type)

    def overlong(self) -> list[tuple[str, str, int]]:
        """The echoed fields (attribute, location, limit) longer than ``ECHO_LIMITS`` allows."""
        return [item for item in ECHO_LIMITS if len(getattr(self, item[0])) > item[2]]

    def echoable(self) -> Header:
        """This header with each overlong field blanked: what an ACK may echo."""
        over = self.overlong()
        return replace(self, **{name: "" for name, _, _ in over}) if over else self

    def check(self) -> None:
        """Reject what the bridge cannot handle at all (AR)."""
        if over := self.overlong():
            _, location, limit = over[0]
            raise MessageRejected(Problem(location, DATA_TYPE_ERROR, f"{location} is longer than {limit} characters"))
        if not self.control_id:
            raise MessageRejected(Problem("MSH-10", REQUIRED_FIELD_MISSING, "MSH-10 message control id is empty"))
        if not self.version:
            raise MessageRejected(Problem("MSH-12", REQUIRED_FIELD_MISSING, "MSH-12 version id is empty"))
        if not tables.supported(self.version):
            raise MessageRejected(
                Problem("MSH-12", UNSUPPORTED_VERSION_ID, f"version {self.version} is not supported (2.3 to 2.8)")
            )
        if not self.message_type:
            raise MessageRejected(Problem("MSH-9", REQUIRED_FIELD_MISSING, "MSH-9 message type is empty"))
        if self.message_type != "SIU":
            raise MessageRejected(
                Problem(
                    "MSH-9",
                    UNSUPPORTED_MESSAGE_TYPE,
                    f"message type {self.message_type} is not accepted here (SIU only)",
                )
            )
        if not _EVENT.match(self.event):
            raise MessageRejected(
                Problem("MSH-9.2", UNSUPPORTED_EVENT_CODE, f"SIU event {self.event or '(empty)'} is not an S-event")
            )


@dataclass(slots=True)
class PatientId:
    value: str
    type_code: str = ""
    authority: str = ""


@dataclass(slots=True)
class Telecom:
    number: str
    use: str = ""
    equipment: str = ""
    email: str = ""
    source: str = ""


@dataclass(slots=True)
class PersonName:
    family: str
    given: str
    middle: str = ""
    name_type: str = ""


@dataclass(slots=True)
class AppointmentEvent:
    """Everything the mapping step needs from one SIU message, plus raw field access."""

    event: str
    control_id: str
    version: str
    sending_application: str
    sending_facility: str
    action: str
    placer_appointment_id: str = ""
    filler_appointment_id: str = ""
    start: datetime | None = None
    start_source: str = ""
    duration_minutes: int | None = None
    status: str = ""
    reason: str = ""
    reason_code: str = ""
    appointment_type: str = ""
    appointment_type_code: str = ""
    patient_ids: tuple[PatientId, ...] = ()
    names: tuple[PersonName, ...] = ()
    telecoms: tuple[Telecom, ...] = ()
    birth_date: date | None = None
    provider_id: str = ""
    provider_name: str = ""
    location: str = ""
    location_facility: str = ""
    department: str = ""
    message: Er7Message | None = field(default=None, repr=False, compare=False)

    @property
    def appointment_id(self) -> str:
        """The filler's id when sent (the scheduling system's own key), else the placer's."""
        return self.filler_appointment_id or self.placer_appointment_id

    @property
    def appointment_key(self) -> str:
        return f"{self.sending_facility}|{self.appointment_id}" if self.appointment_id else ""

    @property
    def patient_id(self) -> str:
        return self.patient_ids[0].value if self.patient_ids else ""

    @property
    def legal_name(self) -> PersonName | None:
        """The name to address the patient by: the legal one (XPN-7 = L), else the first repetition holding a
        name. Feeds put aliases, nicknames (N) or empty repetitions first."""
        return next((n for n in self.names if n.name_type == "L"), self.names[0] if self.names else None)

    @property
    def family_name(self) -> str:
        name = self.legal_name
        return name.family if name else ""

    @property
    def given_name(self) -> str:
        name = self.legal_name
        return name.given if name else ""

    @property
    def patient_name(self) -> str:
        return _joined(self.given_name, self.family_name)

    @property
    def patient_phone(self) -> str:
        """Mobile first (it can take texts), then the home number, then any number."""
        phones = [t for t in self.telecoms if t.number]
        for test in (
            lambda t: t.equipment == "CP",
            lambda t: t.use == "PRN" and t.equipment in ("PH", ""),
            lambda t: t.use != "NET",
        ):
            for t in phones:
                if test(t):
                    return t.number
        return ""

    @property
    def patient_email(self) -> str:
        for t in self.telecoms:
            if t.email:
                return t.email
        return ""

    def get(self, path: str | Path) -> str:
        return self.message.get(path) if self.message else ""

    def summary(self) -> dict[str, Any]:
        """JSON-ready description for the message log (contains PHI)."""
        return {
            "event": self.event,
            "control_id": self.control_id,
            "version": self.version,
            "sending_application": self.sending_application,
            "sending_facility": self.sending_facility,
            "action": self.action,
            "placer_appointment_id": self.placer_appointment_id,
            "filler_appointment_id": self.filler_appointment_id,
            "appointment_key": self.appointment_key,
            "start": self.start.isoformat() if self.start else None,
            "start_source": self.start_source,
            "duration_minutes": self.duration_minutes,
            "status": self.status,
            "reason": self.reason,
            "reason_code": self.reason_code,
            "appointment_type": self.appointment_type,
            "appointment_type_code": self.appointment_type_code,
            "patient_ids": [
                {"value": p.value, "type_code": p.type_code, "authority": p.authority} for p in self.patient_ids
            ],
            "names": [
                {"family": n.family, "given": n.given, "middle": n.middle, "name_type": n.name_type} for n in self.names
            ],
            "telecoms": [
                {"number": t.number, "use": t.use, "equipment": t.equipment, "email": t.email, "source": t.source}
                for t in self.telecoms
            ],
            "birth_date": self.birth_date.isoformat() if self.birth_date else None,
            "patient_phone": self.patient_phone,
            "patient_email": self.patient_email,
            "provider_id": self.provider_id,
            "provider_name": self.provider_name,
            "location": self.location,
            "location_facility": self.location_facility,
            "department": self.department,
        }


@dataclass(frozen=True, slots=True)
class Feed:
    """Per-listener reading rules."""

    time_zone: tzinfo
    start_sources: tuple[tuple[str, ...], ...] = DEFAULT_START_SOURCES
    limits: Limits = DEFAULT_LIMITS


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


def read_event(msg: Er7Message, header: Header, feed: Feed) -> AppointmentEvent:
    """Build the event; raises ``MessageRejected`` (AE) when the event lacks what it needs."""
    sch = msg.segment("SCH")
    status = sch.get(25, 1, 1).strip() if sch else ""
    if not status and sch:
        status = sch.get(25, 1, 2).strip()
    action = classify(header.event, status)
    event = AppointmentEvent(
        event=header.event,
        control_id=header.control_id,
        version=header.version,
        sending_application=header.sender[0],
        sending_facility=header.sender[1],
        action=action,
        status=status,
        message=msg,
    )
    if sch is not None:
        _read_schedule(event, sch)
    _read_patient(event, msg)
    _read_resources(event, msg)
    needs_details = action in ("book", "reschedule", "modify")
    if action != "ignore":
        if sch is None:
            raise MessageRejected(Problem("SCH", REQUIRED_FIELD_MISSING, "the SCH segment is missing"))
        if not event.appointment_id:
            raise MessageRejected(
                Problem("SCH-1", REQUIRED_FIELD_MISSING, "no appointment id: SCH-1 and SCH-2 are both empty")
            )
    if needs_details and not msg.has("PID"):
        raise MessageRejected(Problem("PID", REQUIRED_FIELD_MISSING, "the PID segment (patient) is missing"))
    if needs_details and not event.patient_ids:
        raise MessageRejected(Problem("PID-3", REQUIRED_FIELD_MISSING, "PID-3 patient identifier is empty"))
    zone = _message_zone(header, feed)
    try:
        event.start, event.start_source = _read_start(msg, header.version, feed.start_sources, zone)
    except MessageRejected:
        if needs_details:
            raise
    if needs_details and event.start is None:
        where = next(
            (p for group in feed.start_sources for p in group if _path_in_version(p, header.version)),
            "TQ1-7",
        )
        raise MessageRejected(
            Problem(
                _field_only(where),
                REQUIRED_FIELD_MISSING,
                "no appointment start time (looked in " + ", ".join("/".join(g) for g in feed.start_sources) + ")",
            )
        )
    return event


def _message_zone(header: Header, feed: Feed) -> tzinfo:
    """A start without offset takes MSH-7's offset when it has one, else the feed's zone."""
    return offset_of(header.sent_at) or feed.time_zone


def _read_schedule(event: AppointmentEvent, sch: Segment) -> None:
    event.placer_appointment_id = sch.get(1, 1, 1).strip()
    event.filler_appointment_id = sch.get(2, 1, 1).strip()
    reason = 7 if sch.get(7, 1, 1).strip() or sch.get(7, 1, 2).strip() else 6
    event.reason_code, event.reason = _coded(sch, reason)
    event.appointment_type_code, event.appointment_type = _coded(sch, 8)
    duration = sch.get(9).strip()
    units = sch.get(10, 1, 1).strip().lower()
    if duration.isdigit():
        minutes = int(duration)
        if units.startswith("h"):
            minutes *= 60
        elif units.startswith("s"):
            minutes //= 60
        event.duration_minutes = minutes


def _read_patient(event: AppointmentEvent, msg: Er7Message) -> None:
    pid = msg.segment("PID")
    if pid is None:
        return
    enc = msg.encoding
    read = msg.value

    def parts(rep: str, *positions: int) -> list[str]:
        """First subcomponents, split before escapes are resolved (``TESTSMITH\\T\\JONES`` is one name)."""
        comps = rep.split(enc.component)
        count = len(comps)
        sub = enc.subcomponent
        if sub in rep:
            comps = [c.partition(sub)[0] for c in comps]
        if enc.escape in rep or '"' in rep or enc.truncation:
            comps = [read(c) for c in comps]
        return [comps[p - 1].strip() if p <= count else "" for p in positions]

    ids = []
    for rep in pid.repetitions(3):
        value, type_code, authority = parts(rep, 1, 5, 4)
        if value:
            ids.append(PatientId(value, type_code, authority))
    event.patient_ids = tuple(ids)
    names = []
    for rep in pid.repetitions(5):
        family, given, middle, name_type = parts(rep, 1, 2, 3, 7)
        name_type = name_type.upper()
        if family or given:
            names.append(PersonName(family, given, middle, name_type))
    event.names = tuple(names)
    telecoms = []
    for number in (13, 14, 40):
        for rep in pid.repetitions(number):
            telecom = _telecom(parts(rep, 1, 2, 3, 4, 5, 6, 7, 8), f"PID-{number}")
            if telecom.number or telecom.email:
                telecoms.append(telecom)
    event.telecoms = tuple(telecoms)
    birth = pid.get(7, 1, 1).strip()
    if birth:
        try:
            event.birth_date = parse_date(birth)
        except TimestampError:
            event.birth_date = None


def _coded(segment: Segment, number: int) -> tuple[str, str]:
    """(code, text) of a CE/CWE field: the text is component 2, or the code when no text is sent."""
    code = segment.get(number, 1, 1).strip()
    return code, segment.get(number, 1, 2).strip() or code


def _telecom(parts: list[str], source: str) -> Telecom:
    """An XTN (formatted number, use, equipment, e-mail, country, area, local, extension)."""
    number, use, equipment, email, country, area, local, extension = parts
    use, equipment = use.upper(), equipment.upper()
    if not number:
        number = "".join(p for p in (country, area, local) if p)
        if number and extension:
            number += " x" + extension
    if "@" in number and not email:
        email, number = number, ""
    if use == "NET" or equipment in ("INTERNET", "X.400"):
        email = email or number
        number = ""
    return Telecom(number, use, equipment, email, source)


def _read_resources(event: AppointmentEvent, msg: Er7Message) -> None:
    aip = msg.segment("AIP")
    if aip:
        event.provider_id = aip.get(3, 1, 1).strip()
        event.provider_name = _joined(aip.get(3, 1, 3), aip.get(3, 1, 2))
    else:
        pv1 = msg.segment("PV1")
        if pv1:
            event.provider_id = pv1.get(7, 1, 1).strip()
            event.provider_name = _joined(pv1.get(7, 1, 3), pv1.get(7, 1, 2))
    ail = msg.segment("AIL")
    pv1 = msg.segment("PV1")
    if ail:
        event.location = (ail.get(3, 1, 1) or ail.get(3, 1, 9)).strip()
        event.location_facility = ail.get(3, 1, 4, 1).strip()
        event.department = ail.get(5, 1, 1).strip()
    if pv1 and not event.location:
        event.location = pv1.get(3, 1, 1).strip()
        event.location_facility = pv1.get(3, 1, 4, 1).strip()
    if pv1 and not event.department:
        event.department = pv1.get(10, 1, 1).strip()
    if event.duration_minutes is None:
        tq1 = msg.segment("TQ1")
        ais = msg.segment("AIS")
        for seg, fno, unit_comp in ((tq1, 13, 2), (ais, 7, None)):
            if seg is None:
                continue
            value = seg.get(fno, 1, 1).strip()
            if value.isdigit():
                units = seg.get(fno, 1, unit_comp).lower() if unit_comp else seg.get(8, 1, 1).lower()
                minutes = int(value) * (60 if units.startswith("h") else 1)
                event.duration_minutes = minutes
                break


def _joined(first: str, second: str) -> str:
    """'Given Family' from two name parts, either of which may be empty."""
    first, second = first.strip(), second.strip()
    return f"{first} {second}" if first and second else first or second


def _path_in_version(path: str, version: str) -> bool:
    return tables.element(version, Path.parse(path)) is not None


def _field_only(path: str) -> str:
    """ERR names the field: ``SCH-11.4`` -> ``SCH-11``."""
    return path.split(".", 1)[0]


def _read_start(
    msg: Er7Message, version: str, sources: tuple[tuple[str, ...], ...], zone: tzinfo
) -> tuple[datetime | None, str]:
    """The first source group that holds a value decides; within a group the earliest wins."""
    for group in _start_plan(version, sources):
        found: list[tuple[datetime, str]] = []
        for text, target in group:
            for index, segment in enumerate(msg.all(target.segment), 1):
                value = segment.get(target.field, target.repetition or 1, target.component, target.subcomponent).strip()
                if not value:
                    continue
                try:
                    found.append(
                        (parse_dtm(value, zone), text if index == 1 else str(replace(target, segment_index=index)))
                    )
                except TimestampError as exc:
                    where = _field_only(text)
                    raise MessageRejected(Problem(where, DATA_TYPE_ERROR, f"{where} {exc}", value=exc.value)) from None
        if found:
            return min(found, key=lambda item: item[0])
    return None, ""


@lru_cache(maxsize=256)
def _start_plan(version: str, sources: tuple[tuple[str, ...], ...]) -> tuple[tuple[tuple[str, Path], ...], ...]:
    """Per version, the start sources that exist in it and the timestamp component each one reads."""
    return tuple(
        tuple(
            (text, tables.timestamp_component(version, Path.parse(text)))
            for text in group
            if tables.element(version, Path.parse(text)) is not None
        )
        for group in sources
    )
