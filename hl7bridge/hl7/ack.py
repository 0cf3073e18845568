"""Acknowledgments: original mode (AA/AE/AR) and enhanced mode (CA/CE/CR), with ERR per version."""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import lru_cache

from hl7bridge.hl7.er7 import DEFAULT_ENCODING, Encoding
from hl7bridge.hl7.problems import CODE_TEXT, Problem
from hl7bridge.hl7.siu import Header

FALLBACK_VERSION = "2.5.1"


class Outcome(Enum):
    """What happened to the message, before the acknowledgment mode turns it into a code."""

    ACCEPT = "A"
    ERROR = "E"
    REJECT = "R"


@dataclass(slots=True)
class Ack:
    code: str
    text: str
    payload: bytes


def ack_code(outcome: Outcome, header: Header | None) -> str | None:
    """AA/AE/AR, CA/CE/CR per HL7 table 0155, or None when MSH-15/16 ask for no answer."""
    if header is None or not header.enhanced:
        return "A" + outcome.value
    if _wanted(header.accept_ack_type or "AL", outcome):
        return "C" + outcome.value
    if _wanted(header.application_ack_type, outcome):
        return "A" + outcome.value
    return None


def _wanted(condition: str, outcome: Outcome) -> bool:
    """Table 0155. A value outside it (a garbled or shifted MSH) is answered like AL: silence would
    make the sender wait and resend forever."""
    if condition in ("NE", ""):
        return False
    if condition == "ER":
        return outcome is not Outcome.ACCEPT
    if condition == "SU":
        return outcome is Outcome.ACCEPT
    return True


@lru_cache(maxsize=64)
def _version_tuple(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split(".")[:3])
    except ValueError:
        return (2, 5, 1)


class AckBuilder:
    """Builds ACK messages with their own control ids (unique across restarts)."""

    def __init__(self, application: str = "HL7BRIDGE", facility: str = "", with_values: bool = False) -> None:
        self.application = application
        self.facility = facility
        self.with_values = with_values
        self._prefix = f"{os.getpid() % 1000:03d}"
        self._counter = itertools.count(1)

    def control_id(self) -> str:
        return f"{int(time.time()):010d}{self._prefix}{next(self._counter) % 10_000_000:07d}"

    def build(
        self,
        code: str,
        header: Header | None,
        encoding: Encoding = DEFAULT_ENCODING,
        text: str = "",
        problem: Problem | None = None,
        charset: str = "ascii",
    ) -> Ack:
        enc = encoding if header is not None else DEFAULT_ENCODING
        header = header.echoable() if header is not None else None
        f, c = enc.field, enc.component
        version = header.version if header is not None and header.version else FALLBACK_VERSION
        vt = _version_tuple(version)
        if header is not None:
            msg_type = f"ACK{c}{header.event}{c}ACK" if vt >= (2, 3, 1) else f"ACK{c}{header.event}"
            if not header.event:
                msg_type = "ACK"
            fields = [
                "MSH",
                enc.msh2,
                header.receiving_application or self.application,
                header.receiving_facility or self.facility,
                header.sending_application,
                header.sending_facility,
                now_stamp(),
                "",
                msg_type,
                self.control_id(),
                header.processing_id or "P",
                header.version or FALLBACK_VERSION,
            ]
            if header.enhanced or header.charset_field:
                fields += ["", "", "NE" if header.enhanced else "", "NE" if header.enhanced else ""]
            if header.charset_field:
                fields += ["", header.charset_field]
            echoed_id = enc.escape_text(header.control_id)
        else:
            fields = ["MSH", enc.msh2, self.application, self.facility, "", "", now_stamp(), "", "ACK",
                      self.control_id(), "P", FALLBACK_VERSION]  # fmt: skip
            echoed_id = ""
        if problem is not None and text == problem.text:
            text = problem.told(self.with_values)
        segments = [f.join(fields), f.join(["MSA", code, echoed_id, enc.escape_text(text)])]
        if problem is not None:
            segments.append(_err(problem, enc, vt, problem.told(self.with_values)))
        payload = "\r".join(segments) + "\r"
        return Ack(code, text, payload.encode(charset, errors="replace"))


def _err(problem: Problem, enc: Encoding, version: tuple[int, ...], text: str) -> str:
    f, c, s = enc.field, enc.component, enc.subcomponent
    code_text = CODE_TEXT.get(problem.code, "")
    field_no = str(problem.field or "")
    comp_no = str(problem.component or "")
    if version < (2, 5):
        eld = c.join([problem.segment, "1", field_no, s.join([str(problem.code), code_text, "HL70357"])])
        return f.join(["ERR", eld])
    erl = c.join([problem.segment, "1", field_no, "1" if field_no else "", comp_no]).rstrip(c)
    cwe = c.join([str(problem.code), code_text, "HL70357"])
    return f.join(["ERR", "", erl, cwe, problem.severity, "", "", "", enc.escape_text(text)])


_stamp_cache: tuple[int, str] = (0, "")


def now_stamp() -> str:
    """MSH-7 of our messages: local time with offset, formatted once per second."""
    global _stamp_cache
    second = int(time.time())
    if _stamp_cache[0] != second:
        _stamp_cache = (second, datetime.fromtimestamp(second).astimezone().strftime("%Y%m%d%H%M%S%z"))
    return _stamp_cache[1]
