"""Reading SIU: start-time rules, statuses, requirements per event, escapes and charsets."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest

from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.hl7.er7 import Encoding, Er7Message, Path, unescape
from hl7bridge.hl7.siu import Feed, classify
from hl7bridge.ingest.intake import Intake

CHICAGO = ZoneInfo("America/Chicago")


def message(*segments: str, msh7: str = "20270101120000", version: str = "2.5.1", event: str = "S12") -> bytes:
    msh = f"MSH|^~\\&|EPIC|HOSP|BRIDGE|CLINIC|{msh7}||SIU^{event}^SIU_S12|C1|P|{version}"
    return ("\r".join([msh, *segments]) + "\r").encode()


SCH = "SCH|P1^EPIC|F1^EPIC|||||||30|min"
PID = "PID|1||MRN1^^^HOSP^MR||DOE^JANE"


def read(raw: bytes, zone=CHICAGO, sources=None):
    feed = Feed(zone) if sources is None else Feed(zone, sources)
    return Intake(feed, AckBuilder()).read_frame(raw).messages[0]


def test_tq1_start_with_offset_wins() -> None:
    r = read(message(SCH, "TQ1|||||||202703140930-0500", PID))
    assert r.event.start == datetime(2027, 3, 14, 9, 30, tzinfo=timezone(timedelta(hours=-5)))
    assert r.event.start_source == "TQ1-7"


def test_start_without_offset_takes_msh7_offset() -> None:
    r = read(message(SCH, "TQ1|||||||20270314093000", PID, msh7="20270101120000+0100"))
    assert r.event.start.utcoffset() == timedelta(hours=1)


def test_start_without_any_offset_takes_feed_zone() -> None:
    r = read(message(SCH, "TQ1|||||||20270714093000", PID))
    assert r.event.start == datetime(2027, 7, 14, 9, 30, tzinfo=CHICAGO)
    assert r.event.start.utcoffset() == timedelta(hours=-5)  # CDT


def test_fractional_seconds() -> None:
    r = read(message(SCH, "TQ1|||||||20270314093015.25", PID))
    assert r.event.start.microsecond == 250000


def test_sch11_before_resources_and_resources_earliest() -> None:
    sch = "SCH|P1|F1|||||||30|min|^^^202703150800"
    r = read(message(sch, PID, "AIS|1||X|202703150700", version="2.4"))
    assert r.event.start_source == "SCH-11.4" and r.event.start.hour == 8
    r = read(message(SCH, PID, "AIS|1||X|202703150900", "AIL|1||ROOM|||202703150845", "AIP|1||DOC|||202703151000"))
    assert (r.event.start.hour, r.event.start.minute) == (8, 45)


def test_configured_order_changes_the_source() -> None:
    sources = (("AIS-4",), ("TQ1-7",))
    r = read(message(SCH, "TQ1|||||||202703140930", PID, "AIS|1||X|202703141100"), sources=sources)
    assert r.event.start.hour == 11 and r.event.start_source == "AIS-4"


@pytest.mark.parametrize("value", ["20271314093000", "20270230093000", "20270314253000", "2027031409"])
def test_impossible_start_is_ae_never_rolled_over(value: str) -> None:
    r = read(message(SCH, f"TQ1|||||||{value}", PID))
    assert r.ack.code == "AE"
    assert r.problem.location == "TQ1-7"
    assert r.status == "rejected"


def test_missing_start_names_the_field_of_the_version() -> None:
    assert read(message(SCH, PID)).problem.location == "TQ1-7"
    assert read(message(SCH, PID, version="2.3")).problem.location == "SCH-11"


def test_missing_pid_is_ae_for_booking_but_not_for_cancel() -> None:
    assert read(message(SCH, "TQ1|||||||202703140930")).problem.location == "PID"
    cancel = read(message("SCH|P1", event="S15"))
    assert cancel.ack.code == "AA" and cancel.event.action == "cancel"


def test_cancel_without_any_appointment_id() -> None:
    r = read(message("SCH|||||", event="S15"))
    assert r.ack.code == "AE" and r.problem.location == "SCH-1"


@pytest.mark.parametrize(
    ("event", "status", "action"),
    [
        ("S12", "Booked", "book"),
        ("S14", "Cancelled", "cancel"),
        ("S12", "Canceled", "cancel"),
        ("S13", "Deleted", "cancel"),
        ("S14", "Noshow", "noshow"),
        ("S14", "Complete", "end"),
        ("S14", "Arrived", "end"),
        ("S13", "", "reschedule"),
        ("S14", "", "modify"),
        ("S20", "", "modify"),
        ("S15", "", "cancel"),
        ("S16", "", "cancel"),
        ("S26", "", "noshow"),
        ("S23", "", "ignore"),
        ("S24", "", "ignore"),
    ],
)
def test_status_overrides_event(event: str, status: str, action: str) -> None:
    assert classify(event, status) == action


def test_cancelled_status_needs_no_start() -> None:
    sch = "|".join(["SCH", "P1", "F1", *[""] * 22, "Cancelled"])
    r = read(message(sch, PID, event="S14"))
    assert r.ack.code == "AA" and r.event.action == "cancel"


def test_patient_details() -> None:
    pid = (
        "PID|1||MRN1^^^HOSP&1.2.3&ISO^MR~E77^^^EPIC^EPI||DOE\\S\\X^JANE^Q^^^^L||19800102|F|||||"
        "^PRN^PH^^1^555^0100~^PRN^CP^^1^555^0101~^NET^Internet^jane@example.com"
    )
    r = read(message(SCH, "TQ1|||||||202703140930", pid))
    e = r.event
    assert [(p.value, p.type_code, p.authority) for p in e.patient_ids] == [
        ("MRN1", "MR", "HOSP"),
        ("E77", "EPI", "EPIC"),
    ]
    assert e.family_name == "DOE^X" and e.given_name == "JANE"
    assert e.patient_phone == "15550101"
    assert e.patient_email == "jane@example.com"
    assert e.birth_date.isoformat() == "1980-01-02"
    assert e.appointment_key == "HOSP|F1"


def test_escape_sequences() -> None:
    enc = Encoding()
    assert unescape(r"A\F\B\S\C\T\D\R\E\E\F", enc) == "A|B^C&D~E\\F"
    assert unescape("\\X41\\\\X4243\\", enc) == "ABC"
    assert unescape(r"\H\bold\N\ line\.br\two", enc) == "bold line\ntwo"
    assert unescape(r"dangling \F", enc) == r"dangling \F"


def test_custom_delimiters_and_truncation() -> None:
    text = "MSH#$~\\@%#EPIC#HOSP#B#C#20270101##SIU$S12#C9#P#2.7\rPID#1##ID1\\T\\X\\P\\Y$$$A\r"
    msg = Er7Message.parse(text)
    assert msg.encoding.truncation == "%"
    assert msg.get("PID-3.1") == "ID1@X%Y"
    assert msg.get("PID-3.4") == "A"
    assert msg.get("MSH-9.2") == "S12"


def test_paths() -> None:
    assert str(Path.parse("PID-3(2).4.1")) == "PID-3(2).4.1"
    assert Path.parse("AIS[2]-4").segment_index == 2
    with pytest.raises(ValueError):
        Path.parse("PID.3")


def test_charsets_msh18_and_fallback() -> None:
    latin = message(SCH, "TQ1|||||||202703140930", "PID|1||M1||M\xdcLLER^J\xc9").replace(
        b"|2.5.1", b"|2.5.1||||||8859/1"
    )
    latin = latin.replace("\xdc".encode(), b"\xdc").replace("\xc9".encode(), b"\xc9")
    r = read(latin)
    assert r.charset == "iso-8859-1" and r.event.family_name == "MÜLLER"
    wrong = latin.replace(b"8859/1", b"UNICODE UTF-8")
    r = read(wrong)
    assert r.charset == "iso-8859-1" and r.event.family_name == "MÜLLER"
    assert "no configured charset fits" in r.note
