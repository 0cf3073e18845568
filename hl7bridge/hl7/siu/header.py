"""The SIU header (MSH as the acknowledgment needs it) and the rules that refuse a message outright (AR)."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from hl7bridge.hl7 import tables
from hl7bridge.hl7.er7 import Er7Message
from hl7bridge.hl7.problems import (
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    Problem,
)

_EVENT = re.compile(r"^S\d\d$")


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
