"""HL7 DTM values to aware datetimes, refusing impossible values instead of rolling them over."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone, tzinfo

_DTM = re.compile(
    r"^(?P<Y>\d{4})(?P<M>\d{2})?(?P<D>\d{2})?(?P<h>\d{2})?(?P<m>\d{2})?(?P<s>\d{2})?"
    r"(?:\.(?P<f>\d{1,4}))?(?P<z>[+-]\d{4})?$"
)


class TimestampError(ValueError):
    """A DTM that is malformed or names an instant that does not exist.

    The text says what is wrong without the value (a birth date or an appointment time is patient
    data), to follow the field's name: "TQ1-7 is not an HL7 date/time ..."; ``value`` holds it."""

    def __init__(self, reason: str, value: str) -> None:
        super().__init__(reason)
        self.value = value


def parse_offset(text: str) -> timezone:
    sign = -1 if text[0] == "-" else 1
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise TimestampError("has a time zone offset out of range (at most +/-1459)", text)
    return timezone(sign * timedelta(hours=hours, minutes=minutes))


def offset_of(value: str) -> timezone | None:
    """The ±ZZZZ offset a DTM carries, if any (None also for malformed values)."""
    m = _DTM.match(value.strip())
    if not m or not m["z"]:
        return None
    try:
        return parse_offset(m["z"])
    except TimestampError:
        return None


def parse_dtm(value: str, default_zone: tzinfo | None, minimum: str = "minute") -> datetime:
    """Parse an HL7 DTM (``YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]``).

    ``minimum`` is the coarsest precision accepted ("minute" for appointment
    starts, "day" for birth dates). A value without offset takes ``default_zone``.
    """
    text = value.strip()
    m = _DTM.match(text)
    if not m:
        raise TimestampError(
            f"is not an HL7 date/time ({len(text)} characters; expected YYYYMMDDHHMM[SS][.S][+/-ZZZZ])", text
        )
    needed = {"day": "D", "minute": "m"}[minimum]
    if m[needed] is None:
        raise TimestampError(f"lacks the {'day' if needed == 'D' else 'hour and minute'}", text)
    fraction = m["f"] or ""
    try:
        tz = parse_offset(m["z"]) if m["z"] else default_zone
        return datetime(
            int(m["Y"]),
            int(m["M"] or 1),
            int(m["D"] or 1),
            int(m["h"] or 0),
            int(m["m"] or 0),
            int(m["s"] or 0),
            int(fraction.ljust(6, "0")) if fraction else 0,
            tzinfo=tz,
        )
    except TimestampError as exc:
        raise TimestampError(str(exc), text) from None
    except ValueError as exc:
        raise TimestampError(f"is not a valid date/time ({exc})", text) from None


def parse_date(value: str) -> date:
    return parse_dtm(value, None, minimum="day").date()
