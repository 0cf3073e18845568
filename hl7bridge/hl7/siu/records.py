"""What the bridge reads from one SIU message: the event and its patient records, and their JSON summary."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

from hl7bridge.hl7.er7 import Er7Message, Path


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
        return joined(self.given_name, self.family_name)

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


def joined(first: str, second: str) -> str:
    """'Given Family' from two name parts, either of which may be empty."""
    first, second = first.strip(), second.strip()
    return f"{first} {second}" if first and second else first or second
