"""Journey parameters from an appointment event: sources with fallbacks, repetition choice, templates, types.

Pure functions of the event and the route's declared parameters. A required
parameter that ends up empty raises ``MappingError`` naming the HL7 field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, tzinfo
from typing import Any

from hl7bridge.hl7.er7 import Path
from hl7bridge.hl7.problems import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING
from hl7bridge.hl7.siu import AppointmentEvent
from hl7bridge.hl7.timestamps import TimestampError, offset_of, parse_dtm

TYPES = ("text", "datetime", "date", "phone", "digits")
_PLACEHOLDER = re.compile(r"\{([^{}]+)\}")

#: Values read from the parsed event, and the HL7 field each comes from (for error messages).
NAMED_VALUES: dict[str, str] = {
    "start": "TQ1-7",
    "appointment_id": "SCH-2",
    "placer_appointment_id": "SCH-1",
    "filler_appointment_id": "SCH-2",
    "appointment_key": "SCH-2",
    "duration_minutes": "SCH-9",
    "status": "SCH-25",
    "reason": "SCH-7",
    "reason_code": "SCH-7",
    "appointment_type": "SCH-8",
    "appointment_type_code": "SCH-8",
    "patient_id": "PID-3",
    "family_name": "PID-5",
    "given_name": "PID-5",
    "patient_name": "PID-5",
    "patient_phone": "PID-13",
    "patient_email": "PID-13",
    "birth_date": "PID-7",
    "provider_id": "AIP-3",
    "provider_name": "AIP-3",
    "location": "AIL-3",
    "location_facility": "AIL-3",
    "department": "AIL-5",
    "sending_application": "MSH-3",
    "sending_facility": "MSH-4",
    "control_id": "MSH-10",
    "event": "MSH-9",
}


class MappingError(ValueError):
    """A parameter could not be filled; ``location`` is the HL7 field to fix, ``code`` the table 0357
    condition, ``value`` what was sent (patient data: never part of the text)."""

    def __init__(
        self, parameter: str, location: str, reason: str, code: int = REQUIRED_FIELD_MISSING, value: str = ""
    ) -> None:
        super().__init__(f"journey parameter {parameter!r}: {reason}")
        self.parameter = parameter
        self.location = location
        self.code = code
        self.value = value


@dataclass(frozen=True)
class Condition:
    """``PID-3.5 = MR``: a repetition qualifies when that component equals one of the values."""

    path: Path
    values: tuple[str, ...]


@dataclass(frozen=True)
class ParameterSpec:
    name: str
    sources: tuple[str, ...] = ()
    where: tuple[Condition, ...] = ()
    template: str = ""
    constant: str | None = None
    type: str = "text"
    required: bool = False
    default: str = ""

    @property
    def location(self) -> str:
        """The HL7 field an error about this parameter should name."""
        for source in self.sources:
            return _field_of(source)
        for placeholder in _PLACEHOLDER.findall(self.template):
            return _field_of(placeholder)
        return "MSH"


def _field_of(source: str) -> str:
    """The field a source reads: ``PID-3(2).1`` -> ``PID-3``, ``start`` -> ``TQ1-7``."""
    source = source.strip()
    return NAMED_VALUES.get(source) or source.split(".", 1)[0].split("(", 1)[0]


def is_named(source: str) -> bool:
    return source in NAMED_VALUES


@dataclass(frozen=True)
class Context:
    """What values are converted with: the naive-timestamp zone and the route's output zone."""

    event: AppointmentEvent
    source_zone: tzinfo
    target_zone: tzinfo


def evaluate(specs: tuple[ParameterSpec, ...], ctx: Context) -> dict[str, str]:
    """All parameters as strings (the API wants strings); raises ``MappingError``."""
    out: dict[str, str] = {}
    for spec in specs:
        value = _value(spec, ctx)
        if not value and spec.default:
            value = (
                _convert(spec.default, spec, ctx, "default")
                if spec.type in ("text", "phone", "digits")
                else spec.default
            )
        if not value and spec.required:
            tried = ", ".join(spec.sources) or spec.template or "(constant)"
            raise MappingError(spec.name, spec.location, f"required, but empty (looked in {tried})")
        out[spec.name] = value
    return out


def _value(spec: ParameterSpec, ctx: Context) -> str:
    if spec.constant is not None:
        return spec.constant
    if spec.template:
        return _render(spec, ctx)
    for source in spec.sources:
        raw = _read(source, spec, ctx)
        value = _convert(raw, spec, ctx, source)
        if value:
            return value
    return ""


def _render(spec: ParameterSpec, ctx: Context) -> str:
    def sub(match: re.Match[str]) -> str:
        return _convert(_read(match.group(1).strip(), spec, ctx), spec, ctx, match.group(1), in_template=True)

    return " ".join(_PLACEHOLDER.sub(sub, spec.template).split())


def _read(source: str, spec: ParameterSpec, ctx: Context) -> Any:
    event = ctx.event
    if source in NAMED_VALUES:
        return getattr(event, source)
    path = Path.parse(source)
    msg = event.message
    if msg is None:
        return ""
    conditions = [c for c in spec.where if (c.path.segment, c.path.field) == (path.segment, path.field)]
    if not conditions or path.repetition is not None:
        return msg.get(path)
    segment = msg.segment(path.segment, path.segment_index)
    if segment is None:
        return ""
    for repetition in range(1, len(segment.repetitions(path.field or 1)) + 1):
        if all(
            segment.get(path.field or 1, repetition, c.path.component, c.path.subcomponent).strip().upper() in c.values
            for c in conditions
        ):
            value = segment.get(path.field or 1, repetition, path.component, path.subcomponent)
            if value.strip():
                return value
    return ""


def _convert(raw: Any, spec: ParameterSpec, ctx: Context, source: str, in_template: bool = False) -> str:
    if raw is None or raw == "":
        return ""
    kind = "text" if in_template and spec.type in ("phone", "digits") else spec.type
    if kind in ("datetime", "date"):
        if isinstance(raw, datetime):
            when = raw
        elif isinstance(raw, date):
            return raw.isoformat() if kind == "date" else raw.strftime("%Y-%m-%d 00:00:00")
        else:
            when = _timestamp(str(raw), ctx, spec, source)
        return when.astimezone(ctx.target_zone).strftime("%Y-%m-%d %H:%M:%S" if kind == "datetime" else "%Y-%m-%d")
    text = " ".join(str(raw).split())
    if kind in ("phone", "digits"):
        return "".join(ch for ch in text if ch.isdigit())
    return text


def _timestamp(value: str, ctx: Context, spec: ParameterSpec, source: str) -> datetime:
    msh7 = ctx.event.get("MSH-7.1")
    zone = offset_of(msh7) or ctx.source_zone
    try:
        return parse_dtm(value, zone, minimum="day")
    except TimestampError as exc:
        where = _field_of(source)
        raise MappingError(spec.name, where, f"{where} {exc}", DATA_TYPE_ERROR, exc.value) from None
