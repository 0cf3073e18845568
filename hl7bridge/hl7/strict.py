"""Strict validation with hl7apy: the full object tree and its checks, run off the reactor thread."""

from __future__ import annotations

import logging
import re

from hl7bridge.core.logs import phi
from hl7bridge.hl7.problems import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING, SEGMENT_SEQUENCE_ERROR, Problem

log = logging.getLogger("hl7bridge.strict")
_CHILD = re.compile(r"\b([A-Z][A-Z0-9]{2})_(\d+)(?:_(\d+))?\b")
_SEGMENT = re.compile(r"\b([A-Z][A-Z0-9]{2})\b")
#: hl7apy's texts that name elements only; others ("The value ... exceed the max length") carry what was sent.
_VALUE_FREE = re.compile(
    r"^(Missing required child|Child limit exceeded|Datatype \S+ is not correct|No child named|Unknown element found"
    r"|\S+ is not a valid child for)"
)


def validate(text: str) -> Problem | None:
    """The first problem hl7apy's strict validation finds, or None when the message passes."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    try:
        message = parse_message(text.replace("\r\n", "\r").replace("\n", "\r"), VALIDATION_LEVEL.STRICT)
        message.validate()
    except HL7apyException as exc:
        return to_problem(str(exc))
    except Exception as exc:  # noqa: BLE001 - a validator bug must not reject a valid message
        log.warning("strict validation could not run (%s: %s); message judged by the fast checks only",
                    exc.__class__.__name__, phi(exc))  # fmt: skip
    return None


def to_problem(text: str) -> Problem:
    """Turn hl7apy's error text into an HL7 location and table 0357 code."""
    match = _CHILD.search(text)
    if match:
        location = f"{match[1]}-{match[2]}" + (f".{match[3]}" if match[3] else "")
    else:
        seg = _SEGMENT.search(text)
        location = seg[1] if seg else "MSH"
    lowered = text.lower()
    if "missing required" in lowered:
        code = REQUIRED_FIELD_MISSING
    elif "not valid" in lowered and "child" in lowered:
        code = SEGMENT_SEQUENCE_ERROR
    else:
        code = DATA_TYPE_ERROR
    if _VALUE_FREE.match(text):
        return Problem(location, code, f"strict validation: {text}")
    return Problem(location, code, f"strict validation: {location} is not valid (value, format or length)", value=text)
