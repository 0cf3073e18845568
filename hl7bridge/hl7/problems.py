"""Why a message is refused: the HL7 location, the table 0357 code, and words for a person."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# HL7 table 0357, message error condition codes.
SEGMENT_SEQUENCE_ERROR = 100
REQUIRED_FIELD_MISSING = 101
DATA_TYPE_ERROR = 102
TABLE_VALUE_NOT_FOUND = 103
UNSUPPORTED_MESSAGE_TYPE = 200
UNSUPPORTED_EVENT_CODE = 201
UNSUPPORTED_PROCESSING_ID = 202
UNSUPPORTED_VERSION_ID = 203
UNKNOWN_KEY_IDENTIFIER = 204
DUPLICATE_KEY_IDENTIFIER = 205
APPLICATION_RECORD_LOCKED = 206
APPLICATION_INTERNAL_ERROR = 207

#: Characters of an offending value an ACK may echo (with ``ack_phi``).
VALUE_SHOWN = 40
#: The offending value as ``Problem.told`` appends it, within one ER7 field (a ``|`` in a value is escaped).
_TOLD_VALUE = re.compile(r"(?P<head> \(sent: (?P<quote>['\"]))(?P<value>[^|\r\n]*)(?P<tail>(?P=quote)\))")


def without_told_value(text: str, mask: Callable[[str], str]) -> str:
    """An ACK's text (or segment) with the value ``told`` echoed (``ack_phi = true``) replaced by ``mask(value)``:
    the rest of the text names the field and the error, which a view without patient data keeps."""
    return _TOLD_VALUE.sub(lambda m: m["head"] + mask(m["value"]) + m["tail"], text)


CODE_TEXT = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason to answer AE/AR. ``location`` is ``SEG``, ``SEG-n`` or ``SEG-n.c``.

    ``text`` names the field and what is wrong without repeating what was sent: it reaches ACKs, the
    service log and the message list. ``value`` is the offending value (patient data, often), shown to
    the sender only where the operator allows it (``ack_phi``)."""

    location: str
    code: int
    text: str
    severity: str = "E"
    value: str = ""

    @property
    def segment(self) -> str:
        return self.location.split("-", 1)[0]

    @property
    def field(self) -> int | None:
        _, _, rest = self.location.partition("-")
        head = rest.split(".", 1)[0].split("(", 1)[0]
        return int(head) if head.isdigit() else None

    @property
    def component(self) -> int | None:
        _, _, rest = self.location.partition("-")
        parts = rest.split(".")
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None

    def told(self, with_value: bool) -> str:
        """The text for the sender: with the offending value (capped) only when ``with_value``."""
        if not with_value or not self.value:
            return self.text
        shown = self.value if len(self.value) <= VALUE_SHOWN else self.value[:VALUE_SHOWN] + "..."
        return f"{self.text} (sent: {shown!r})"

    def describe(self) -> str:
        return f"{self.location}: {self.text}"
