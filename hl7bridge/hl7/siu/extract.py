"""SIU message to ``AppointmentEvent``: the fields read per event, and what each event requires.

Which field holds what, and of which datatype, comes from hl7apy's tables
(``hl7.tables``); requirements depend on the event: a booking needs a start and
a patient, a cancellation only the appointment id.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, tzinfo
from functools import lru_cache

from hl7bridge.hl7 import tables
from hl7bridge.hl7.er7 import DEFAULT_LIMITS, Er7Message, Limits, Path, Segment
from hl7bridge.hl7.problems import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, Problem
from hl7bridge.hl7.siu.actions import classify
from hl7bridge.hl7.siu.header import Header, MessageRejected
from hl7bridge.hl7.siu.records import AppointmentEvent, PatientId, PersonName, Telecom, joined
from hl7bridge.hl7.timestamps import TimestampError, offset_of, parse_date, parse_dtm

DEFAULT_START_SOURCES: tuple[tuple[str, ...], ...] = (
    ("TQ1-7",),
    ("SCH-11.4",),
    ("AIS-4", "AIL-6", "AIP-6", "AIG-8"),
)


@dataclass(frozen=True, slots=True)
class Feed:
    """Per-listener reading rules."""

    time_zone: tzinfo
    start_sources: tuple[tuple[str, ...], ...] = DEFAULT_START_SOURCES
    limits: Limits = DEFAULT_LIMITS


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
        event.provider_name = joined(aip.get(3, 1, 3), aip.get(3, 1, 2))
    else:
        pv1 = msg.segment("PV1")
        if pv1:
            event.provider_id = pv1.get(7, 1, 1).strip()
            event.provider_name = joined(pv1.get(7, 1, 3), pv1.get(7, 1, 2))
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
