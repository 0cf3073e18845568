"""Journey parameters in-process: sources, fallbacks, repetition choice, templates, defaults and types."""

from __future__ import annotations

from dataclasses import replace
from zoneinfo import ZoneInfo

import pytest

from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.hl7.er7 import Path
from hl7bridge.hl7.problems import DATA_TYPE_ERROR, REQUIRED_FIELD_MISSING
from hl7bridge.hl7.siu import Feed
from hl7bridge.ingest.intake import Intake
from hl7bridge.mapping.parameters import Condition, Context, MappingError, ParameterSpec, evaluate

CHICAGO = ZoneInfo("America/Chicago")
NEW_YORK = ZoneInfo("America/New_York")
MSH = "MSH|^~\\&|EPIC|HOSP|BRIDGE|CLINIC|20270101120000||SIU^S12^SIU_S12|C1|P|2.5.1"
SCH = "SCH|P1^EPIC|F1^EPIC|||||||30|min"
TQ1 = "TQ1|||||||20270315093000"
PID = (
    "PID|1||ALIAS9^^^OLD^PI~MRN1^^^HOSP^MR~  ^^^HOSP^SS||DOE^JANE^Q^^^^L||19850412|F|||"
    "||(555) 555-0123^PRN^PH~^NET^Internet^jane@example.com"
)


def ctx(*segments: str, msh: str = MSH) -> Context:
    raw = ("\r".join([msh, *segments]) + "\r").encode()
    event = Intake(Feed(CHICAGO), AckBuilder()).read_frame(raw).messages[0].event
    return Context(event, CHICAGO, NEW_YORK)


CTX = ctx(SCH, TQ1, PID)


def one(spec: ParameterSpec, context: Context = CTX) -> str:
    return evaluate((spec,), context)[spec.name]


def test_named_values_and_paths() -> None:
    assert one(ParameterSpec("id", ("appointment_id",))) == "F1"
    assert one(ParameterSpec("placer", ("SCH-1.1",))) == "P1"
    assert one(ParameterSpec("family", ("family_name",))) == "DOE"
    assert one(ParameterSpec("first_rep", ("PID-3.1",))) == "ALIAS9"
    assert one(ParameterSpec("second_rep", ("PID-3(2).1",))) == "MRN1"


def test_sources_fall_back_in_order_until_one_has_a_value() -> None:
    assert one(ParameterSpec("x", ("PID-19", "SCH-1.1", "SCH-2.1"))) == "P1"
    assert one(ParameterSpec("x", ("PID-19", "PV1-1"))) == ""


def test_where_picks_the_repetition_whose_component_matches() -> None:
    mr = Condition(Path.parse("PID-3.5"), ("MR",))
    assert one(ParameterSpec("mrn", ("PID-3.1",), where=(mr,))) == "MRN1"
    ss = Condition(Path.parse("PID-3.5"), ("SS",))
    assert one(ParameterSpec("ssn", ("PID-3.1", "SCH-1.1"), where=(ss,))) == "P1", "blank matching repetition skipped"
    both = (mr, Condition(Path.parse("PID-3.4"), ("OLD",)))
    assert one(ParameterSpec("none", ("PID-3.1",), where=both)) == ""
    explicit = ParameterSpec("explicit", ("PID-3(1).1",), where=(mr,))
    assert one(explicit) == "ALIAS9", "an explicit repetition ignores the where table"


def test_where_skips_a_blank_matching_repetition_for_a_later_one() -> None:
    two = ctx(SCH, TQ1, "PID|1||  ^^^HOSP^MR~MRN2^^^HOSP^MR||DOE^JANE")
    mr = Condition(Path.parse("PID-3.5"), ("MR",))
    assert one(ParameterSpec("mrn", ("PID-3.1",), where=(mr,)), two) == "MRN2"


def test_where_on_another_field_does_not_filter() -> None:
    other = Condition(Path.parse("PID-13.2"), ("NET",))
    assert one(ParameterSpec("mrn", ("PID-3.1",), where=(other,))) == "ALIAS9"


def test_template_fills_placeholders_and_squeezes_spaces() -> None:
    assert one(ParameterSpec("greeting", template="Dear {given_name}  {PID-19} {family_name}")) == "Dear JANE DOE"


def test_a_constant_wins_over_everything() -> None:
    assert one(ParameterSpec("c", ("SCH-1.1",), constant="fixed")) == "fixed"


def test_a_default_fills_an_empty_value_and_is_converted_like_one() -> None:
    assert one(ParameterSpec("d", ("PID-19",), default="none given")) == "none given"
    assert one(ParameterSpec("d", ("PID-19",), type="digits", default="+1 (800) 555")) == "1800555"
    assert one(ParameterSpec("d", ("SCH-1.1",), default="unused")) == "P1"


def test_types_convert_values() -> None:
    assert one(ParameterSpec("phone", ("PID-13.1",), type="phone")) == "5555550123"
    assert one(ParameterSpec("born", ("birth_date",), type="date")) == "1985-04-12"
    assert one(ParameterSpec("born", ("birth_date",), type="datetime")) == "1985-04-12 00:00:00"
    assert one(ParameterSpec("start", ("start",), type="datetime")) == "2027-03-15 10:30:00"
    assert one(ParameterSpec("start", ("TQ1-7",), type="datetime")) == "2027-03-15 10:30:00"
    assert one(ParameterSpec("day", ("TQ1-7",), type="date")) == "2027-03-15"
    assert one(ParameterSpec("start", ("start",))) == "2027-03-15 09:30:00-05:00"


def test_phone_and_digits_stay_text_inside_a_template() -> None:
    assert one(ParameterSpec("t", template="call {PID-13.1}", type="phone")) == "call (555) 555-0123"


def test_a_timestamp_takes_the_msh7_offset_before_the_feed_zone() -> None:
    offset = ctx(SCH, TQ1, PID, msh=MSH.replace("20270101120000", "20270101120000+0100"))
    assert one(ParameterSpec("start", ("TQ1-7",), type="datetime"), offset) == "2027-03-15 04:30:00"


def test_a_required_parameter_left_empty_names_its_field_and_what_was_tried() -> None:
    with pytest.raises(MappingError) as caught:
        evaluate((ParameterSpec("ok", ("SCH-1.1",)), ParameterSpec("mail", ("PID-19", "PID-20"), required=True)), CTX)
    exc = caught.value
    assert (exc.parameter, exc.location, exc.code) == ("mail", "PID-19", REQUIRED_FIELD_MISSING)
    assert "looked in PID-19, PID-20" in str(exc)


def test_a_bad_timestamp_is_a_data_type_error_naming_the_field_without_the_value_in_the_text() -> None:
    bad = ctx(SCH, TQ1, PID, "NTE|1|P|2027031X")
    with pytest.raises(MappingError) as caught:
        evaluate((ParameterSpec("start", ("NTE-3",), type="datetime"),), bad)
    exc = caught.value
    assert (exc.location, exc.code, exc.value) == ("NTE-3", DATA_TYPE_ERROR, "2027031X")
    assert "2027031X" not in str(exc)


def test_every_parameter_is_a_string_and_order_is_kept() -> None:
    specs = (ParameterSpec("b", ("SCH-1.1",)), ParameterSpec("a", ("PID-19",)), ParameterSpec("c", constant="3"))
    assert list(evaluate(specs, CTX).items()) == [("b", "P1"), ("a", ""), ("c", "3")]


@pytest.mark.parametrize(
    ("spec", "location"),
    [
        (ParameterSpec("x", ("PID-3(2).1",)), "PID-3"),
        (ParameterSpec("x", ("start",)), "TQ1-7"),
        (ParameterSpec("x", template="{SCH-2.1} at {start}"), "SCH-2"),
        (ParameterSpec("x", constant="k"), "MSH"),
    ],
)
def test_an_error_names_the_first_field_a_parameter_reads(spec: ParameterSpec, location: str) -> None:
    assert spec.location == location


# Survivors of `make mutation` (docs/testing.md): each case below fails under one of them.


def test_an_error_names_the_field_even_for_a_subcomponent_source() -> None:
    assert ParameterSpec("x", ("PID-3.4.1",)).location == "PID-3"


def test_a_default_is_converted_for_text_and_phone_and_kept_as_written_for_dates() -> None:
    assert one(ParameterSpec("d", ("PID-19",), default="  none   given ")) == "none given"
    assert one(ParameterSpec("d", ("PID-19",), type="phone", default="+1 (800) 555")) == "1800555"
    assert one(ParameterSpec("d", ("PID-19",), type="datetime", default="not yet known")) == "not yet known"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (ParameterSpec("c", constant="", required=True), "journey parameter 'c': required, but empty (looked in (constant))"),
        (ParameterSpec("t", template="{PID-19}", required=True), "journey parameter 't': required, but empty (looked in {PID-19})"),
    ],
)  # fmt: skip
def test_a_required_parameter_without_sources_says_what_it_looked_in(spec: ParameterSpec, words: str) -> None:
    with pytest.raises(MappingError) as caught:
        evaluate((spec,), CTX)
    assert (str(caught.value), caught.value.value, caught.value.code) == (words, "", REQUIRED_FIELD_MISSING)


def test_a_template_converts_timestamps_and_names_a_bad_one() -> None:
    assert one(ParameterSpec("t", template="at {TQ1-7}", type="datetime")) == "at 2027-03-15 10:30:00"
    with pytest.raises(MappingError) as caught:
        evaluate((ParameterSpec("t", template="at {NTE-3}", type="datetime"),), ctx(SCH, TQ1, PID, "NTE|1|P|2027031X"))
    assert (caught.value.parameter, caught.value.location, caught.value.code) == ("t", "NTE-3", DATA_TYPE_ERROR)
    assert str(caught.value).startswith("journey parameter 't': NTE-3 ")


def test_digits_stay_text_inside_a_template() -> None:
    assert one(ParameterSpec("t", template="call {PID-13.1}", type="digits")) == "call (555) 555-0123"


def test_an_event_without_its_message_reads_no_path() -> None:
    bare = Context(replace(CTX.event, message=None), CHICAGO, NEW_YORK)
    assert one(ParameterSpec("x", ("PID-3.1",)), bare) == ""
    assert one(ParameterSpec("x", ("PID-3.1",), where=(Condition(Path.parse("PID-3.5"), ("MR",)),)), bare) == ""


def test_where_reads_the_indexed_segment_and_nothing_from_a_missing_one() -> None:
    two = ctx(SCH, TQ1, PID, "AIS|1||A1^^^X", "AIS|2||A2^^^X")
    x = Condition(Path.parse("AIS-3.4"), ("X",))
    assert one(ParameterSpec("ais", ("AIS[2]-3.1",), where=(x,)), two) == "A2"
    assert one(ParameterSpec("ail", ("AIL-3.1",), where=(Condition(Path.parse("AIL-3.4"), ("X",)),))) == ""


def test_where_takes_the_first_matching_repetition_of_several() -> None:
    two = ctx(SCH, TQ1, "PID|1||FIRST^^^HOSP^MR~SECOND^^^HOSP^MR||DOE^JANE")
    assert one(ParameterSpec("mrn", ("PID-3.1",), where=(Condition(Path.parse("PID-3.5"), ("MR",)),)), two) == "FIRST"


def test_where_and_source_reach_subcomponents() -> None:
    hd = ctx(SCH, TQ1, "PID|1||A^^^OLD&1.1&ISO^MR~B^^^HOSP&1.2&ISO^MR||DOE^JANE")
    hosp = Condition(Path.parse("PID-3.4.1"), ("HOSP",))
    assert one(ParameterSpec("mrn", ("PID-3.1",), where=(hosp,)), hd) == "B"
    mr = Condition(Path.parse("PID-3.5"), ("MR",))
    assert one(ParameterSpec("oid", ("PID-3.4.2",), where=(mr,)), hd) == "1.1"


def test_an_empty_or_absent_value_falls_back_before_conversion() -> None:
    assert one(ParameterSpec("s", ("PID-19", "TQ1-7"), type="datetime")) == "2027-03-15 10:30:00"
    untimed = ctx("SCH|P1^EPIC|F1^EPIC", TQ1, PID)
    assert one(ParameterSpec("d", ("duration_minutes", "SCH-1.1")), untimed) == "P1"


def test_a_timestamp_parameter_accepts_a_day() -> None:
    day = ctx(SCH, TQ1, PID, "NTE|1|P|20270315")
    assert one(ParameterSpec("d", ("NTE-3",), type="datetime"), day) == "2027-03-15 01:00:00"
