"""Acknowledgment codes (table 0155) and ERR segments per version."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest
from hl7apy.parser import parse_message

from hl7bridge.hl7.ack import FALLBACK_VERSION, AckBuilder, Outcome, ack_code, now_stamp
from hl7bridge.hl7.er7 import Encoding
from hl7bridge.hl7.problems import Problem
from hl7bridge.hl7.siu import Feed
from hl7bridge.ingest.intake import Intake


def header_for(msh15: str, msh16: str):
    raw = f"MSH|^~\\&|A|B|C|D|20270101||SIU^S12|X1|P|2.5.1|||{msh15}|{msh16}\rSCH|P1\r".encode()
    return Intake(Feed(ZoneInfo("UTC")), AckBuilder()).read_frame(raw).messages[0].header


@pytest.mark.parametrize(
    ("msh15", "msh16", "outcome", "code"),
    [
        ("", "", Outcome.ACCEPT, "AA"),
        ("", "", Outcome.ERROR, "AE"),
        ("", "", Outcome.REJECT, "AR"),
        ("AL", "NE", Outcome.ACCEPT, "CA"),
        ("AL", "NE", Outcome.ERROR, "CE"),
        ("AL", "AL", Outcome.REJECT, "CR"),
        ("ER", "NE", Outcome.ACCEPT, None),
        ("ER", "NE", Outcome.ERROR, "CE"),
        ("SU", "NE", Outcome.REJECT, None),
        ("NE", "AL", Outcome.ACCEPT, "AA"),
        ("NE", "ER", Outcome.ACCEPT, None),
        ("NE", "ER", Outcome.ERROR, "AE"),
        ("NE", "NE", Outcome.ACCEPT, None),
        ("NE", "", Outcome.ERROR, None),  # MSH-16 left empty in enhanced mode: no application ACK
    ],
)
def test_enhanced_mode_table(msh15: str, msh16: str, outcome: Outcome, code: str | None) -> None:
    assert ack_code(outcome, header_for(msh15, msh16)) == code


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.8"])
def test_err_segment_per_version_parses_with_hl7apy(version: str) -> None:
    raw = f"MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU^S12|C7|P|{version}\rSCH|P1|F1\rPID|1||M1||DOE^J\r".encode()
    received = Intake(Feed(ZoneInfo("UTC")), AckBuilder()).read_frame(raw).messages[0]
    text = received.ack.payload.decode()
    ack = parse_message(text.replace("2.7", "2.8"), find_groups=False)
    assert ack.msa.msa_1.value == "AE"
    assert ack.msa.msa_2.value == "C7"
    err = text.split("\r")[2].split("|")
    location = "TQ1" if version >= "2.5" else "SCH"
    if version >= "2.5":
        assert err[1] == ""
        assert err[2].split("^")[:3] == [location, "1", "7" if location == "TQ1" else "11"]
        assert err[3] == "101^Required field missing^HL70357"
        assert err[4] == "E"
        assert "start" in err[8]
    else:
        assert err[1].split("^")[:3] == [location, "1", "11"]
        assert err[1].split("^")[3] == "101&Required field missing&HL70357"


def test_ack_escapes_our_text_and_keeps_custom_delimiters() -> None:
    raw = b"MSH#$~\\@#EPIC#HOSP#BR#X#20270101##SIU$S12#C8#P#2.5.1\rSCH#P1#F1\r"
    received = Intake(Feed(ZoneInfo("UTC")), AckBuilder()).read_frame(raw).messages[0]
    text = received.ack.payload.decode()
    assert text.startswith("MSH#$~\\@#BR#X#EPIC#HOSP#")
    assert "#ACK$S12$ACK#" in text
    assert "MSA#AE#C8#" in text


def test_ack_control_ids_are_unique() -> None:
    builder = AckBuilder()
    ids = {builder.control_id() for _ in range(10000)}
    assert len(ids) == 10000
    assert all(len(i) <= 20 for i in ids)


def built(raw: bytes | None, code: str = "AA", text: str = "", problem: Problem | None = None,
          builder: AckBuilder | None = None) -> list[list[str]]:  # fmt: skip
    """An ACK for ``raw`` (None: a message without a readable header), as segments split into fields."""
    builder = builder or AckBuilder("HL7BRIDGE", "BRIDGEFAC")
    header, encoding = None, None
    if raw is not None:
        received = Intake(Feed(ZoneInfo("UTC")), AckBuilder()).read_frame(raw).messages[0]
        header, encoding = received.header, received.encoding
    ack = builder.build(code, header, encoding, text=text, problem=problem) if encoding else builder.build(
        code, header, text=text, problem=problem)  # fmt: skip
    assert ack.text == text and ack.payload.endswith(b"\r")
    return [segment.split(ack.payload.decode("ascii")[3]) for segment in ack.payload.decode("ascii").split("\r")[:-1]]


def stamp_and_id(msh: list[str]) -> tuple[str, str]:
    """MSH-7 and MSH-10 checked for form (local time with offset, now; 20 digits), then masked."""
    stamp, control = msh[6], msh[9]
    assert re.fullmatch(r"\d{14}[+-]\d{4}", stamp), stamp
    assert abs(datetime.strptime(stamp, "%Y%m%d%H%M%S%z").timestamp() - time.time()) < 120, stamp
    assert re.fullmatch(r"\d{20}", control), control
    return "<stamp>", "<id>"


@pytest.mark.parametrize(
    ("msh", "expected"),
    [
        # v2.3: MSH-9 without its structure; MSH-11 echoed; sender and receiver swapped.
        ("MSH|^~\\&|EPIC|HOSP|BR|RFAC|20270101||SIU^S12|C1|T|2.3",
         ["MSH", "^~\\&", "BR", "RFAC", "EPIC", "HOSP", "<stamp>", "", "ACK^S12", "<id>", "T", "2.3"]),
        # v2.3.1 on: ACK^event^ACK; no MSH-11 -> P; no receiver -> ours.
        ("MSH|^~\\&|EPIC|HOSP|||20270101||SIU^S12|C2||2.3.1",
         ["MSH", "^~\\&", "HL7BRIDGE", "BRIDGEFAC", "EPIC", "HOSP", "<stamp>", "", "ACK^S12^ACK", "<id>", "P", "2.3.1"]),
        # Enhanced mode: our ACK asks for no ACK back (MSH-15/16 NE).
        ("MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU^S12|C3|P|2.5.1|||AL|NE",
         ["MSH", "^~\\&", "BR", "X", "EPIC", "HOSP", "<stamp>", "", "ACK^S12^ACK", "<id>", "P", "2.5.1",
          "", "", "NE", "NE"]),
        # A character set is echoed in MSH-18; original mode leaves MSH-15/16 empty.
        ("MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU^S12|C4|P|2.5.1||||||8859/1",
         ["MSH", "^~\\&", "BR", "X", "EPIC", "HOSP", "<stamp>", "", "ACK^S12^ACK", "<id>", "P", "2.5.1",
          "", "", "", "", "", "8859/1"]),
        # No event: plain ACK.
        ("MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU|C5|P|2.5.1",
         ["MSH", "^~\\&", "BR", "X", "EPIC", "HOSP", "<stamp>", "", "ACK", "<id>", "P", "2.5.1"]),
        # No readable header at all: our names, P, the fallback version.
        (None, ["MSH", "^~\\&", "HL7BRIDGE", "BRIDGEFAC", "", "", "<stamp>", "", "ACK", "<id>", "P", FALLBACK_VERSION]),
    ],
)  # fmt: skip
def test_ack_msh_field_by_field(msh: str | None, expected: list[str]) -> None:
    raw = None if msh is None else f"{msh}\rSCH|P1|F1\r".encode()
    segments = built(raw)
    msh_fields = segments[0]
    msh_fields[6], msh_fields[9] = stamp_and_id(msh_fields)
    assert msh_fields == expected
    assert segments[1] == ["MSA", "AA", "" if msh is None else msh.split("|")[9], ""]
    assert len(segments) == 2


@pytest.mark.parametrize(
    ("version", "location", "code", "err"),
    [
        ("2.4", "SCH-11", 101, ["ERR", "SCH^1^11^101&Required field missing&HL70357"]),
        ("2.4", "PID", 101, ["ERR", "PID^1^^101&Required field missing&HL70357"]),
        ("2.5.1", "TQ1-7.1", 101, ["ERR", "", "TQ1^1^7^1^1", "101^Required field missing^HL70357", "E", "", "", "",
                              "start is missing"]),
        ("2.5.1", "TQ1-7", 101, ["ERR", "", "TQ1^1^7^1", "101^Required field missing^HL70357", "E", "", "", "",
                            "start is missing"]),
        ("2.5.1", "PID", 101, ["ERR", "", "PID^1", "101^Required field missing^HL70357", "E", "", "", "",
                          "start is missing"]),
        ("2.5.1", "PID-3", 999, ["ERR", "", "PID^1^3^1", "999^^HL70357", "E", "", "", "", "start is missing"]),
    ],
)  # fmt: skip
def test_err_segment_field_by_field(version: str, location: str, code: int, err: list[str]) -> None:
    problem = Problem(location, code, "start is missing", value="20270101")
    raw = f"MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU^S12|C9|P|{version}\rSCH|P1|F1\r".encode()
    segments = built(raw, "AE", "start is missing", problem)
    assert segments[1] == ["MSA", "AE", "C9", "start is missing"]
    assert segments[2] == err


def test_the_offending_value_reaches_the_sender_only_when_allowed() -> None:
    problem = Problem("TQ1-7", 102, "start is not a date")
    raw = b"MSH|^~\\&|EPIC|HOSP|BR|X|20270101||SIU^S12|C10|P|2.5.1\rSCH|P1|F1\r"
    shown = Problem("TQ1-7", 102, "start is not a date", value="2027-13-45")
    assert built(raw, "AE", problem.text, shown)[1][3] == "start is not a date"
    told = AckBuilder(with_values=True)
    received = Intake(Feed(ZoneInfo("UTC")), AckBuilder()).read_frame(raw).messages[0]
    ack = told.build("AE", received.header, received.encoding, text=shown.text, problem=shown)
    assert ack.text == "start is not a date (sent: '2027-13-45')"
    assert ack.payload.split(b"\r")[2].endswith(b"|start is not a date (sent: '2027-13-45')")


def test_ack_text_outside_its_charset_is_replaced_not_raised() -> None:
    ack = AckBuilder().build("AE", None, text="Zoë")
    assert ack.payload.split(b"\r")[1] == b"MSA|AE||Zo?"
    assert AckBuilder().build("AE", None, text="Zoë", charset="latin-1").payload.split(b"\r")[1] == b"MSA|AE||Zo\xeb"


def test_ack_control_ids_count_from_one_after_the_process_prefix() -> None:
    builder = AckBuilder()
    first, second = builder.control_id(), builder.control_id()
    assert first[10:] == f"{os.getpid() % 1000:03d}0000001" and second[10:] == f"{os.getpid() % 1000:03d}0000002"
    assert abs(int(first[:10]) - time.time()) < 120


def test_ack_defaults_name_us_and_say_nothing_more() -> None:
    """The defaults of ``AckBuilder`` and ``build``; a message without a header is answered in the default
    delimiters even when the caller passes others (there is no header to have declared them)."""
    ack = AckBuilder().build("AR", None, Encoding(field="#", component="$"))
    msh, msa = (s.split("|") for s in ack.payload.decode("ascii").split("\r")[:2])
    assert (msh[1], msh[2], msh[3]) == ("^~\\&", "HL7BRIDGE", "")
    assert msa == ["MSA", "AR", "", ""] and ack.text == ""


def test_the_ack_timestamp_follows_the_clock_across_seconds() -> None:
    """MSH-7 is formatted once per second: the cache must notice the next second."""
    first = now_stamp()
    time.sleep(1.1)
    second, now = now_stamp(), int(time.time())
    assert second != first
    assert second in {datetime.fromtimestamp(t).astimezone().strftime("%Y%m%d%H%M%S%z") for t in (now - 1, now)}
