"""Acknowledgment codes (table 0155) and ERR segments per version."""

from __future__ import annotations

from zoneinfo import ZoneInfo

import pytest
from hl7apy.parser import parse_message

from hl7bridge.hl7.ack import AckBuilder, Outcome, ack_code
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
