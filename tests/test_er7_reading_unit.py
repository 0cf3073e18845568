"""The ER7 reader's reading, value by value: segment splitting, the shape limits and the accessors.

Written for the survivors of ``make mutation`` (docs/testing.md): ``test_er7_limits.py`` guards the limits
through the service and ``test_er7_equivalence.py`` compares whole messages with hl7apy, but neither asks
for a position that is not there, nor for a limit's exact wording; these cases do, in-process."""

from __future__ import annotations

import pytest

from hl7bridge.hl7.er7 import (
    _VALID_NAMES,
    Encoding,
    Er7Error,
    Er7Message,
    Limits,
    Path,
    Segment,
    component_of,
    value_of,
)

MSH = "MSH|^~\\&|EPIC|HOSP|BRIDGE|X|20270101||SIU^S12|C1|P|2.5.1"
PID = "PID|1|2^b|M1~M2^^^H&1.2&ISO~|x|DOE^JOHN"
TRUNCATING = Encoding(truncation="#")


def message(*lines: str, end: str = "\r") -> str:
    return end.join(lines) + end


def segments(text: str, limits: Limits | None = None) -> list[str]:
    return [s.text for s in Er7Message.parse(text, limits=limits).segments]


# --- splitting into segments -------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["\r", "\r\n", "\n"])
def test_each_line_ending_splits_segments_alike(end: str) -> None:
    assert segments(message(MSH, "SCH|P1", PID, end=end)) == [MSH, "SCH|P1", PID]


def test_mixed_line_endings_and_blank_lines_are_dropped_not_read_as_segments() -> None:
    text = MSH + "\r\nSCH|P1\n\r  \r\t\nPID|1\r"
    assert segments(text) == [MSH, "SCH|P1", "PID|1"]


def test_a_carriage_return_alone_is_the_only_separator_when_there_is_no_line_feed() -> None:
    assert segments(MSH + "\rNTE|a\x0bb") == [MSH, "NTE|a\x0bb"]


@pytest.mark.parametrize("text", ["", "\r\r", "PID|1\r" + MSH, "MSH|^~\\", "msh|^~\\&|A", " MSH|^~\\&|A|B"])
def test_a_message_must_begin_with_msh(text: str) -> None:
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse(text)
    assert str(raised.value) == "the message does not begin with an MSH segment"
    assert (raised.value.location, raised.value.code, raised.value.value) == ("MSH", 100, "")


def test_the_shortest_header_has_its_delimiters_and_nothing_else() -> None:
    msg = Er7Message.parse("MSH|^~\\&")
    assert msg.encoding == Encoding()
    assert (msg.get("MSH-1"), msg.get("MSH-2"), msg.get("MSH-3")) == ("|", "^~\\&", "")


def test_the_delimiters_are_the_ones_the_header_declares() -> None:
    msg = Er7Message.parse("MSH#$%@!#A$1#B\rPID#1#a$b%c$d!e")
    assert msg.encoding == Encoding("#", "$", "%", "@", "!", None)
    assert (msg.get("PID-2.2"), msg.get("PID-2(2).2.2"), msg.get("MSH-3.2")) == ("b", "e", "1")


def test_a_segment_without_fields_is_read() -> None:
    msg = Er7Message.parse(message(MSH, "PID", "PID"))
    assert [s.name for s in msg.segments] == ["MSH", "PID", "PID"]
    assert (msg.segment("PID", 2).fields, msg.get("PID-1")) == (["PID"], "")


@pytest.mark.parametrize("line", ["pid|1", "PI|1", "P-D|1", "1AB|1"])
def test_a_segment_id_is_a_capital_letter_then_two_capitals_or_digits(line: str) -> None:
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse(message(MSH, line))
    assert (raised.value.location, raised.value.code, raised.value.value) == ("MSH", 100, line[:8])


def test_a_known_segment_id_followed_by_another_character_is_refused_each_time() -> None:
    """The second parse finds PID among the names already seen: that path must check the separator too."""
    for _ in range(2):
        assert segments(message(MSH, "PID|1")) == [MSH, "PID|1"]
        with pytest.raises(Er7Error) as raised:
            Er7Message.parse(message(MSH, "PID^1"))
        assert (raised.value.location, raised.value.value) == ("MSH", "PID^1")


def test_the_charset_is_kept_with_the_message() -> None:
    msg = Er7Message.parse(message(MSH, "NTE|1||\\XE9\\"), "latin-1")
    assert (msg.charset, msg.get("NTE-3"), msg.unescape("\\XE9\\\\F\\")) == ("latin-1", "é", "é|")


def test_the_message_unescapes_with_its_own_delimiters() -> None:
    msg = Er7Message.parse("MSH#$%@!#A\rNTE#1")
    assert msg.unescape("a@F@b@S@c@E@d") == "a#b$c@d"
    assert msg.unescape("no escapes") == "no escapes"


# --- limits -------------------------------------------------------------------------------------------


def refused(text: str, limits: Limits) -> Er7Error:
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse(text, limits=limits)
    return raised.value


def test_segments_up_to_the_limit_are_read() -> None:
    assert segments(message(MSH, "SCH|1", "PID|1"), Limits(segments=3)) == [MSH, "SCH|1", "PID|1"]


def test_a_segment_past_the_limit_is_refused_naming_the_first_one_over() -> None:
    error = refused(message(MSH, "SCH|1", "PID|1", "AIS|1"), Limits(segments=2))
    assert str(error) == "the message has 4 segments, more than the 2 accepted"
    assert (error.location, error.code, error.value) == ("PID", 100, "")


def test_a_segment_over_the_limit_without_a_valid_id_is_named_as_msh() -> None:
    error = refused(message(MSH, "SCH|1", "a name|1"), Limits(segments=2))
    assert str(error) == "the message has 3 segments, more than the 2 accepted"
    assert error.location == "MSH"


def test_without_limits_a_large_message_is_read() -> None:
    text = message(MSH, *["NTE|" + "~".join("x" * 3 for _ in range(2000))] * 3)
    assert len(Er7Message.parse(text).segments) == 4


@pytest.mark.parametrize(
    ("line", "limits", "words", "location"),
    [
        ("PID|1||a~b~c~d", Limits(repetitions=3), "PID-3 holds 4 repetitions, more than the 3 accepted", "PID-3"),
        ("PID|1||a^b^c", Limits(components=2), "PID-3 holds 3 components in one repetition, more than the 2 accepted",
         "PID-3"),
        ("PID|1||a^b~c^d^e", Limits(components=2),
         "PID-3 holds 3 components in one repetition, more than the 2 accepted", "PID-3"),
        ("PID|1||x^a&b&c", Limits(subcomponents=2),
         "PID-3 holds 3 subcomponents in one component, more than the 2 accepted", "PID-3"),
        ("PID|1||a&b~x^a&b&c&d", Limits(subcomponents=3),
         "PID-3 holds 4 subcomponents in one component, more than the 3 accepted", "PID-3"),
        ("NTE|1|2|3|4|5|a~b", Limits(repetitions=1), "NTE-6 holds 2 repetitions, more than the 1 accepted", "NTE-6"),
    ],
)  # fmt: skip
def test_a_shape_over_a_limit_is_refused_naming_the_field(line: str, limits: Limits, words: str, location: str) -> None:
    error = refused(message(MSH, "SCH|1", line), limits)
    assert (str(error), error.location, error.code, error.value) == (words, location, 102, "")


def test_header_fields_are_numbered_as_hl7_numbers_them_in_a_limit_error() -> None:
    error = refused(message("MSH|^~\\&|A|B|C|D|20270101||SIU^S12^SIU_S12|C1|P|2.5.1"), Limits(components=2))
    assert str(error) == "MSH-9 holds 3 components in one repetition, more than the 2 accepted"
    assert error.location == "MSH-9"


@pytest.mark.parametrize(
    ("line", "limits"),
    [
        ("PID|1||a~b~c", Limits(repetitions=3)),
        ("PID|1||a^b~c^d~e^f", Limits(components=2)),  # per repetition, not per field
        ("PID|1||a&b^c&d~e&f", Limits(subcomponents=2)),  # per component, not per repetition
        ("PID|1||a&b~c&d&e", Limits(subcomponents=3)),
        ("PID|1||a~b|c~d|e~f", Limits(repetitions=2)),  # per field, not per segment
        ("PID|1||a~b\rAIS|1||c~d", Limits(repetitions=2)),  # per segment, not per message
    ],
)
def test_a_shape_at_its_limit_is_read(line: str, limits: Limits) -> None:
    assert segments(message(MSH, line), limits) == [MSH, *line.split("\r")]


def test_the_encoding_characters_in_msh2_count_toward_no_limit() -> None:
    limits = Limits(repetitions=1, components=1, subcomponents=1)
    msg = Er7Message.parse(message("MSH|^~\\&|A|B|C|D|20270101||SIU|C1|P|2.5.1", "SCH|1"), limits=limits)
    assert msg.get("MSH-2") == "^~\\&"


def test_a_repetition_over_the_limit_is_found_in_a_later_segment() -> None:
    error = refused(message(MSH, "PID|1||a~b", "AIS|1|x|y|c~d~e"), Limits(repetitions=2))
    assert (str(error), error.location) == ("AIS-4 holds 3 repetitions, more than the 2 accepted", "AIS-4")


# --- accessors ----------------------------------------------------------------------------------------


def pid(text: str = PID) -> Segment:
    return Segment(text, Encoding())


@pytest.mark.parametrize(
    ("args", "raw"),
    [
        ((1,), "1"),
        ((2,), "2^b"),
        ((2, 1, 2), "b"),
        ((2, 2), ""),
        ((3,), "M1"),
        ((3, 2), "M2^^^H&1.2&ISO"),
        ((3, 2, 4), "H&1.2&ISO"),
        ((3, 2, 4, 2), "1.2"),
        ((3, 2, 4, 4), ""),
        ((3, 2, 5), ""),
        ((3, 3), ""),
        ((3, 4), ""),
        ((4,), "x"),
        ((4, 1, 1), "x"),
        ((4, 1, 1, 1), "x"),
        ((4, 1, 2), ""),
        ((4, 1, 1, 2), ""),
        ((5, 1, 2), "JOHN"),
        ((5, 1, 3), ""),
        ((6,), ""),
        ((60, 1, 1), ""),
    ],
)
def test_segment_raw_at_each_position(args: tuple[int, ...], raw: str) -> None:
    assert pid().raw(*args) == raw


def test_an_empty_field_has_no_components() -> None:
    assert (pid("PID|1||x").raw(2, 1, 1), pid("PID|1||x").raw(2)) == ("", "")


@pytest.mark.parametrize(
    ("args", "raw"),
    [((1,), "|"), ((2,), "^~\\&"), ((2, 1, 1), "^~\\&"), ((2, 2), ""), ((2, 1, 2), ""), ((1, 1, 2), ""),
     ((3,), "A"), ((3, 2), "B"), ((9, 1, 2), "S12")],
)  # fmt: skip
def test_msh1_and_msh2_are_the_delimiters_whole(args: tuple[int, ...], raw: str) -> None:
    msh = Segment("MSH|^~\\&|A~B|F|||||SIU^S12", Encoding())
    assert msh.raw(*args) == raw


def test_fields_1_and_2_of_other_segments_are_ordinary_fields() -> None:
    seg = pid("PID|a~b^c|d^e~f")
    assert (seg.raw(1, 2, 2), seg.raw(2, 1, 2), seg.repetitions(2)) == ("c", "e", ["d^e", "f"])


@pytest.mark.parametrize(
    ("text", "number", "reps"),
    [
        ("PID|1||a~b~", 3, ["a", "b", ""]),
        ("PID|1||a", 3, ["a"]),
        ("PID|1||", 3, []),
        ("PID|1", 7, []),
        ("MSH|^~\\&|A~B", 2, ["^~\\&"]),
        ("MSH|^~\\&|A~B", 1, ["|"]),
        ("MSH|^~\\&|A~B", 3, ["A", "B"]),
        ("BHS|^~\\&|A~B", 2, ["^~\\&"]),
        ("FHS|^~\\&|A~B", 1, ["|"]),
    ],
)
def test_segment_repetitions(text: str, number: int, reps: list[str]) -> None:
    seg = Segment(text, Encoding())
    assert seg.repetitions(number) == reps
    assert seg.repetitions(number) is seg.repetitions(number)


def test_batch_headers_are_numbered_like_msh() -> None:
    seg = Segment("BHS|^~\\&|APP|FAC", Encoding())
    assert (seg.fields, seg.raw(1), seg.raw(2), seg.raw(4)) == (
        ["BHS", "|", "^~\\&", "APP", "FAC"],
        "|",
        "^~\\&",
        "FAC",
    )


@pytest.mark.parametrize(
    ("text", "args", "value"),
    [
        ("NTE|1|a\\F\\b", (2,), "a|b"),
        ('NTE|1|""', (2,), ""),
        ('NTE|1|""^x', (2, 1, 1), ""),
        ('NTE|1|""^x', (2, 1, 2), "x"),
        ('NTE|1|a"b', (2,), 'a"b'),
        ("NTE|1|x^a\\S\\b", (2, 1, 2), "a^b"),
        ("NTE|1|plain", (2,), "plain"),
    ],
)
def test_segment_get_reads_escapes_and_the_null(text: str, args: tuple[int, ...], value: str) -> None:
    assert Segment(text, Encoding()).get(*args) == value


def test_segment_get_leaves_the_delimiters_as_they_are() -> None:
    msh = Segment("MSH|^~\\&#|A#B", TRUNCATING)
    assert (msh.get(1), msh.get(2), msh.get(3)) == ("|", "^~\\&#", "AB")


def test_segment_get_drops_the_truncation_mark_only_when_declared() -> None:
    assert Segment("NTE|1|long#", TRUNCATING).get(2) == "long"
    assert Segment("NTE|1|long#", Encoding()).get(2) == "long#"


def test_a_segment_names_itself_and_its_field_count() -> None:
    assert (repr(pid()), repr(pid("PID"))) == ("<Segment PID (5 fields)>", "<Segment PID (0 fields)>")
    assert (pid().field(5), pid().field(6)) == ("DOE^JOHN", "")


@pytest.mark.parametrize(
    ("value", "component", "subcomponent", "expected"),
    [
        ("a^b^c", 1, None, "a"),
        ("a^b^c", 3, None, "c"),
        ("a^b^c", 4, None, ""),
        ("abc", 1, None, "abc"),
        ("abc", 2, None, ""),
        ("a^x&y&z", 2, 1, "x"),
        ("a^x&y&z", 2, 3, "z"),
        ("a^x&y&z", 2, 4, ""),
        ("a^x&y&z", 2, None, "x&y&z"),
        ("a^x", 2, 1, "x"),
        ("a^x", 2, 2, ""),
        ("x&y", 1, 2, "y"),
        ("", 1, None, ""),
        ("", 2, None, ""),
    ],
)
def test_component_of(value: str, component: int, subcomponent: int | None, expected: str) -> None:
    assert component_of(value, Encoding(), component, subcomponent) == expected


@pytest.mark.parametrize(
    ("raw", "encoding", "charset", "value"),
    [
        ("", Encoding(), "utf-8", ""),
        ('""', Encoding(), "utf-8", ""),
        (' "" ', Encoding(), "utf-8", ""),
        ('a""', Encoding(), "utf-8", 'a""'),
        ('""""', Encoding(), "utf-8", '""""'),
        ("a#b#", TRUNCATING, "utf-8", "ab"),
        ("a#b", Encoding(), "utf-8", "a#b"),
        ("a\\P\\b#", TRUNCATING, "utf-8", "a#b"),
        ("\\XE9\\", Encoding(), "latin-1", "é"),
        ("\\XC3A9\\", Encoding(), "utf-8", "é"),
        ("plain", Encoding(), "utf-8", "plain"),
    ],
)
def test_value_of(raw: str, encoding: Encoding, charset: str, value: str) -> None:
    assert value_of(raw, encoding, charset) == value


# --- message-level access -----------------------------------------------------------------------------


MESSAGE = Er7Message.parse(message(MSH, "SCH|P1", "AIS|1||A1", 'AIS|2||A\\T\\2~""', PID))


@pytest.mark.parametrize(
    ("path", "raw", "value"),
    [
        ("MSH-1", "|", "|"),
        ("MSH-2", "^~\\&", "^~\\&"),
        ("MSH-9.2", "S12", "S12"),
        ("AIS-3", "A1", "A1"),
        ("AIS[2]-3", "A\\T\\2", "A&2"),
        ("AIS[2]-3(2)", '""', ""),
        ("AIS[3]-3", "", ""),
        ("AIS[2]-1", "2", "2"),
        ("PID-3(2).4.3", "ISO", "ISO"),
        ("PID-3(3)", "", ""),
        ("TQ1-7", "", ""),
        ("SCH", "SCH|P1", "SCH|P1"),
        ("AIS[2]", 'AIS|2||A\\T\\2~""', 'AIS|2||A&2~""'),
    ],
)
def test_message_raw_and_get_by_path(path: str, raw: str, value: str) -> None:
    assert (MESSAGE.raw(path), MESSAGE.get(path)) == (raw, value)
    assert (MESSAGE.raw(Path.parse(path)), MESSAGE.get(Path.parse(path))) == (raw, value)


def test_message_segments_by_name_and_index() -> None:
    assert [s.text for s in MESSAGE.all("AIS")] == ["AIS|1||A1", 'AIS|2||A\\T\\2~""']
    assert (MESSAGE.all("TQ1"), MESSAGE.segment("AIS", 3), MESSAGE.segment("TQ1")) == ([], None, None)
    assert (MESSAGE.segment("AIS", 2).text, MESSAGE.msh.text) == ('AIS|2||A\\T\\2~""', MSH)
    assert (MESSAGE.has("PID"), MESSAGE.has("TQ1")) == (True, False)


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("PID", Path("PID")),
        ("PID-3", Path("PID", 1, 3)),
        ("PID-3.1", Path("PID", 1, 3, None, 1)),
        ("PID-3(2).4.1", Path("PID", 1, 3, 2, 4, 1)),
        ("AIS[2]-4", Path("AIS", 2, 4)),
        (" AIS[1]-4(1) ", Path("AIS", 1, 4, 1)),
    ],
)
def test_paths_read_and_print(text: str, path: Path) -> None:
    assert Path.parse(text) == path
    assert str(path) == text.strip().replace("[1]", "")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("PID-0", "'PID-0': positions in an HL7 path start at 1"),
        ("AIS[0]-4", "'AIS[0]-4': positions in an HL7 path start at 1"),
        ("pid-3", "'pid-3' is not an HL7 path; expected e.g. PID-3, PID-3.1, PID-3(2).4.1 or AIS[2]-4"),
        ("PID-3..1", "'PID-3..1' is not an HL7 path; expected e.g. PID-3, PID-3.1, PID-3(2).4.1 or AIS[2]-4"),
    ],
)
def test_bad_paths_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError) as raised:
        Path.parse(text)
    assert str(raised.value) == words


def test_reader_errors_default_to_msh_and_a_sequence_error() -> None:
    error = Er7Error("words")
    assert (str(error), error.location, error.code, error.value) == ("words", "MSH", 100, "")


def test_the_encoding_characters_print_as_msh2() -> None:
    assert (Encoding().msh2, TRUNCATING.msh2) == ("^~\\&", "^~\\&#")


# --- survivors of the first full run (docs/testing.md) -----------------------------------------------------


def test_the_reader_defaults_to_utf8() -> None:
    assert value_of("\\XC3A9\\", Encoding()) == "é"
    assert Er7Message.parse(message(MSH, "NTE|1|\\XC3A9\\")).get("NTE-2") == "é"
    assert Er7Message([Segment(MSH, Encoding())], Encoding()).unescape("\\XC3A9\\") == "é"


def test_a_wrong_number_of_encoding_characters_is_reported_with_them() -> None:
    with pytest.raises(Er7Error) as raised:
        Encoding.from_header("|", "^~")
    assert (str(raised.value), raised.value.value) == ("MSH-2 must hold 4 or 5 encoding characters, found 2", "^~")


def test_repeated_encoding_characters_are_reported_in_words() -> None:
    with pytest.raises(Er7Error) as raised:
        Encoding.from_header("|", "^^\\&")
    assert str(raised.value) == "MSH-1/MSH-2 encoding characters must be distinct, non-alphanumeric characters"


def test_an_empty_msh2_is_reported_as_empty() -> None:
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse("MSH||A|B|C\r")
    assert (str(raised.value), raised.value.value) == ("MSH-2 must hold 4 or 5 encoding characters, found 0", "")


def test_a_segment_id_seen_for_the_first_time_is_checked_like_a_known_one() -> None:
    """The reader caches the names it has seen; each case starts from a name it has not."""
    for name in ("ZZ1", "ZZ2"):
        _VALID_NAMES.discard(name)
    assert segments(message(MSH, "ZZ1")) == [MSH, "ZZ1"]
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse(message(MSH, "ZZ2^"))
    assert raised.value.value == "ZZ2^"
    segments(message(MSH, "PID|1"))
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse(message(MSH, "PID^"))
    assert raised.value.value == "PID^"


def test_msh3_counts_toward_the_limits_unlike_msh1_and_msh2() -> None:
    error = refused(message("MSH|^~\\&|A~B~C|F"), Limits(repetitions=2))
    assert (str(error), error.location) == ("MSH-3 holds 3 repetitions, more than the 2 accepted", "MSH-3")


def test_message_get_leaves_the_delimiters_as_they_are() -> None:
    msg = Er7Message.parse("MSH|^~\\&#|A#\rNTE|1|B#\r")
    assert (msg.get("MSH-1"), msg.get("MSH-2"), msg.get("MSH-3"), msg.get("NTE-2")) == ("|", "^~\\&#", "A", "B")


def test_walk_yields_the_header_delimiters_whole_and_splits_the_rest() -> None:
    msg = Er7Message.parse("MSH|^~\\&|A^B&C|F~G\r")
    assert list(msg.walk()) == [
        ("MSH", 1, 1, 1, 1, 1, "|"),
        ("MSH", 1, 2, 1, 1, 1, "^~\\&"),
        ("MSH", 1, 3, 1, 1, 1, "A"),
        ("MSH", 1, 3, 1, 2, 1, "B"),
        ("MSH", 1, 3, 1, 2, 2, "C"),
        ("MSH", 1, 4, 1, 1, 1, "F"),
        ("MSH", 1, 4, 2, 1, 1, "G"),
    ]
