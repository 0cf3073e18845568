"""Raw ER7 text with its patient data masked, for operators who may see a message but not whose it is.

What stays readable is what carries no patient data and tells an analyst what happened: segment ids, the
separators (so the shape of every field shows), the header and acknowledgement segments, the scheduling
segments' ids, codes and timing, and the resources (TQ1, AIS, AIG, AIL, AIP, RGS). Every other value, free text
included (NTE, SCH-7's reason), is masked leaf by leaf with ``core.logs.masked``. Unknown and Z segments are
masked whole: a segment is kept only because it is known to be harmless, never because it is unknown.
Pure, linear in the text's size, and it never raises: it must show odd and malformed input too.
"""

from __future__ import annotations

import re
from functools import lru_cache

from hl7bridge.core.logs import masked
from hl7bridge.hl7.problems import without_told_value

#: Segments shown as sent: headers, acknowledgements and the appointment's resources and timing.
KEPT_SEGMENTS = frozenset({"MSH", "BHS", "FHS", "EVN", "TQ1", "AIS", "AIG", "AIL", "AIP", "RGS", "MSA", "ERR"})
#: The acknowledgement's segments, whose text may echo an offending value (``Problem.told``).
ACK_SEGMENTS = frozenset({"MSA", "ERR"})
#: Segments whose encoding characters follow the field separator (MSH-1/MSH-2 and their batch twins).
HEADERS = ("MSH", "BHS", "FHS")
#: SCH fields kept: ids (1-5, 23, 24, 26, 27), codes (6, 8, 25) and timing (9-11). SCH-7 (the reason, often
#: free text) and the contacts (12-22) are masked.
SCH_KEPT = frozenset({1, 2, 3, 4, 5, 6, 8, 9, 10, 11, 23, 24, 25, 26, 27})
#: HL7's default field, component, repetition and subcomponent separators.
DEFAULT_SEPARATORS = "|^~&"
_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")
_SEGMENT_ID = re.compile(r"[A-Z][A-Z0-9]{2}")
#: HL7's explicit null: no value, so nothing to mask.
EXPLICIT_NULL = '""'


def mask_segments(text: str) -> str:
    """``text`` (one or more ER7 messages, segments separated by CR, LF or CRLF, kept as they are) with every
    value that may carry patient data masked."""
    separators = DEFAULT_SEPARATORS
    out: list[str] = []
    for part in _LINE_BREAK.split(text):
        if not part or part in ("\r", "\n", "\r\n"):
            out.append(part)
            continue
        declared = _declared_separators(part)
        if declared is not None:
            separators = declared
            out.append(part)
            continue
        out.append(_mask_segment(part, separators))
    return "".join(out)


def _declared_separators(segment: str) -> str | None:
    """The separators a header segment declares (field separator, then MSH-2 but its escape character), or None
    when ``segment`` is no header or declares something unusable: a letter or digit as a separator would leave
    patient data's own characters standing between masked runs."""
    if not segment.startswith(HEADERS) or len(segment) < 4:
        return None
    field = segment[3]
    if not _usable(field):
        return None
    encoding = segment[4:].split(field, 1)[0][:4]
    chosen = field + "".join(c for i, c in enumerate(encoding) if i != 2 and c != field and _usable(c))
    return chosen


def _usable(char: str) -> bool:
    return char.isascii() and char.isprintable() and not char.isalnum() and not char.isspace()


def _mask_segment(segment: str, separators: str) -> str:
    field = separators[0]
    head = segment[:3]
    if not (_SEGMENT_ID.fullmatch(head) and (len(segment) == 3 or segment[3] == field)):
        return _mask_values(segment, separators)
    if head in ACK_SEGMENTS:
        # Kept, but for the offending value an ACK echoes under ``ack_phi = true``.
        return without_told_value(segment, masked)
    if head in KEPT_SEGMENTS:
        return segment
    if head == "SCH":
        fields = segment[3:].split(field)
        kept = [f if i in SCH_KEPT or i == 0 else _mask_values(f, separators) for i, f in enumerate(fields)]
        return head + field.join(kept)
    return head + _mask_values(segment[3:], separators)


def _mask_values(text: str, separators: str) -> str:
    return _values(separators).sub(_mask_run, text)


@lru_cache(maxsize=64)
def _values(separators: str) -> re.Pattern[str]:
    """A run of characters between separators: one value (a leaf of the field's tree)."""
    return re.compile(f"[^{re.escape(separators)}]+")


def _mask_run(match: re.Match[str]) -> str:
    value = match.group()
    return value if value == EXPLICIT_NULL else masked(value)
