"""The ER7 reader's small parts, value by value: escaping both ways, encoding characters, bad segment IDs.

Written for the survivors of ``make mutation`` (docs/testing.md): each case pins one behaviour that the
message-level tests pass through without looking at."""

from __future__ import annotations

import pytest

from hl7bridge.hl7.er7 import Encoding, Er7Error, Er7Message, unescape

TRUNCATING = Encoding(truncation="#")


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("a|b^c&d~e\\f", "a\\F\\b\\S\\c\\T\\d\\R\\e\\E\\f"),
        ("line\rbreak\nhere", "line break here"),
        ("plain", "plain"),
    ],
)
def test_escape_text(text: str, escaped: str) -> None:
    assert Encoding().escape_text(text) == escaped


def test_escape_text_escapes_the_truncation_character_only_when_declared() -> None:
    assert TRUNCATING.escape_text("x#y|z") == "x\\P\\y\\F\\z"
    assert Encoding().escape_text("x#y") == "x#y"


@pytest.mark.parametrize(
    ("value", "charset", "text"),
    [
        ("\\F\\\\S\\\\T\\\\R\\\\E\\", "utf-8", "|^&~\\"),
        ("A\\X42\\C", "utf-8", "ABC"),
        ("\\XE9\\", "latin-1", "é"),
        ("\\XE9\\", "utf-8", "\ufffd"),  # not UTF-8: replaced, never raised
        ("\\X4\\", "utf-8", "\\X4\\"),  # an odd number of hex digits: left as written
        ("\\X\\", "utf-8", "\\X\\"),
        ("\\XZZ\\", "utf-8", "\\XZZ\\"),  # not hex
        ("\\x41\\", "utf-8", "\\x41\\"),  # codes are upper case
        ("a\\C2842\\b\\M2442\\c", "utf-8", "abc"),  # character set switches are dropped
        ("\\c2842\\", "utf-8", "\\c2842\\"),
        ("\\.in+4\\\\.ti-2\\\\.sk3\\\\.ce\\x", "utf-8", "x"),  # formatting without a text form is dropped
        ("\\.IN+4\\", "utf-8", "\\.IN+4\\"),
        ("one\\.br\\two\\H\\bold\\N\\", "utf-8", "one\ntwobold"),
        ("\\Q\\", "utf-8", "\\Q\\"),  # unknown: as written
        ("a\\b", "utf-8", "a\\b"),  # an escape without its partner stays
        ("\\X41\\\\X41\\", "utf-8", "AA"),  # the same code twice (the second from the per-call cache)
    ],
)
def test_unescape(value: str, charset: str, text: str) -> None:
    assert unescape(value, Encoding(), charset) == text


def test_unescape_knows_the_truncation_character_only_when_declared() -> None:
    assert unescape("x\\P\\y", TRUNCATING) == "x#y"
    assert unescape("x\\P\\y", Encoding()) == "x\\P\\y"


@pytest.mark.parametrize(
    ("msh1", "msh2", "expected"),
    [
        ("|", "^~\\&", Encoding()),
        ("#", "$%@!", Encoding("#", "$", "%", "@", "!", None)),
        ("|", "^~\\&#", TRUNCATING),
    ],
)
def test_encoding_from_the_header(msh1: str, msh2: str, expected: Encoding) -> None:
    assert Encoding.from_header(msh1, msh2) == expected


@pytest.mark.parametrize(
    ("msh1", "msh2", "words"),
    [
        ("|", "^~\\", "4 or 5 encoding characters, found 3"),
        ("|", "^~\\&#!", "4 or 5 encoding characters, found 6"),
        ("|", "^~\\^", "distinct"),
        ("|", "^~|&", "distinct"),
        ("|", "^~A&", "non-alphanumeric"),
        ("|", "^~ &", "non-alphanumeric"),
    ],
)
def test_bad_encoding_characters_name_msh2(msh1: str, msh2: str, words: str) -> None:
    with pytest.raises(Er7Error) as raised:
        Encoding.from_header(msh1, msh2)
    assert (raised.value.location, raised.value.code) == ("MSH-2", 102)
    assert words in str(raised.value)


@pytest.mark.parametrize(
    ("lines", "position", "after"),
    [
        (["MSH|^~\\&|A|B|C|D|20270101||SIU^S12|C1|P|2.5.1", "SCH|1", "ALICE SMITH"], 3, "SCH"),
        (["MSH|^~\\&|A|B|C|D|20270101||SIU^S12|C1|P|2.5.1", "PID^1"], 2, "MSH"),
        (["MSH|^~\\&|A|B|C|D|20270101||SIU^S12|C1|P|2.5.1", "SCH|1", "PID#1"], 3, "SCH"),
    ],
)
def test_a_line_without_a_segment_id_is_named_by_the_segment_before_it(
    lines: list[str], position: int, after: str
) -> None:
    with pytest.raises(Er7Error) as raised:
        Er7Message.parse("\r".join(lines) + "\r")
    error = raised.value
    assert str(error) == (
        f"segment {position} (after {after}) has no valid segment ID (3 letters or digits, then the field separator)"
    )
    assert (error.location, error.code, error.value) == (after, 100, lines[position - 1][:8])
