"""Intake in-process: one frame to its judgement, status, ACK and log row, one MSH problem at a time.

The service tests send these through a socket, which ``make mutation`` cannot follow; here each header
check, the AR-versus-AE choice, the answer's text and the frame's decoding are pinned value by value."""

from __future__ import annotations

import re
from zoneinfo import ZoneInfo

import orjson
import pytest

from hl7bridge.core.status import MessageStatus
from hl7bridge.hl7.ack import AckBuilder, Outcome
from hl7bridge.hl7.er7 import Encoding, Limits
from hl7bridge.hl7.problems import (
    APPLICATION_INTERNAL_ERROR,
    DATA_TYPE_ERROR,
    REQUIRED_FIELD_MISSING,
    SEGMENT_SEQUENCE_ERROR,
    UNSUPPORTED_EVENT_CODE,
    UNSUPPORTED_MESSAGE_TYPE,
    UNSUPPORTED_VERSION_ID,
    Problem,
)
from hl7bridge.hl7.siu import Feed, Header
from hl7bridge.ingest.intake import Frame, Intake, Received
from hl7bridge.mapping.parameters import ParameterSpec
from hl7bridge.mapping.routing import Criteria, Route, Router

UTC = ZoneInfo("UTC")
SCH = "SCH|P1^EPIC|F1^EPIC"
TQ1 = "TQ1|||||||20270315093000"
PID = "PID|1||MRN1^^^HOSP^MR||DOE^JANE"
BODY = (SCH, TQ1, PID)


def msh(
    type_: str = "SIU^S12^SIU_S12", control: str = "C1", version: str = "2.5.1", msh15: str = "", msh16: str = ""
) -> str:
    return f"MSH|^~\\&|EPIC^1|HOSP^2|BRIDGE|CLINIC|20270101120000||{type_}|{control}|P|{version}|||{msh15}|{msh16}"


def frame(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode()


def intake(router: Router | None = None, sync: bool = False, limits: Limits | None = None) -> Intake:
    feed = Feed(UTC) if limits is None else Feed(UTC, limits=limits)
    return Intake(feed, AckBuilder(), router=router, sync=sync, clock=lambda: 1_800_000_000.0)


def read(raw: bytes, **kwargs) -> Received:
    [received] = intake(**kwargs).read_frame(raw).messages
    return received


def answer_lines(received: Received) -> list[str]:
    """The ACK after its MSH (whose MSH-7 and MSH-10 change per call)."""
    return received.ack.payload.decode().split("\r")[1:]


def ack_msh(received: Received) -> list[str]:
    return received.ack.payload.decode().split("\r")[0].split("|")


# --- the header checks: AR ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "location", "code", "text"),
    [
        (msh(control=""), "MSH-10", REQUIRED_FIELD_MISSING, "MSH-10 message control id is empty"),
        (msh(control="  "), "MSH-10", REQUIRED_FIELD_MISSING, "MSH-10 message control id is empty"),
        (msh(control="C" * 200), "MSH-10", DATA_TYPE_ERROR, "MSH-10 is longer than 199 characters"),
        (msh(version=""), "MSH-12", REQUIRED_FIELD_MISSING, "MSH-12 version id is empty"),
        (msh(version="2.1"), "MSH-12", UNSUPPORTED_VERSION_ID, "version 2.1 is not supported (2.3 to 2.8)"),
        (msh(type_=""), "MSH-9", REQUIRED_FIELD_MISSING, "MSH-9 message type is empty"),
        (msh(type_="ADT^A01"), "MSH-9", UNSUPPORTED_MESSAGE_TYPE, "message type ADT is not accepted here (SIU only)"),
        (msh(type_="SIU^X12"), "MSH-9.2", UNSUPPORTED_EVENT_CODE, "SIU event X12 is not an S-event"),
        (msh(type_="SIU"), "MSH-9.2", UNSUPPORTED_EVENT_CODE, "SIU event (empty) is not an S-event"),
        (msh(control="", version=""), "MSH-10", REQUIRED_FIELD_MISSING, "MSH-10 message control id is empty"),
    ],
)  # fmt: skip
def test_a_header_the_bridge_cannot_answer_as_asked_is_refused_with_ar(
    header: str, location: str, code: int, text: str
) -> None:
    received = read(frame(header, *BODY))
    assert (received.outcome, received.status, received.event) == (Outcome.REJECT, MessageStatus.REJECTED, None)
    assert received.problem == Problem(location, code, text)
    assert (received.ack.code, received.ack.text) == ("AR", text)
    assert answer_lines(received)[0] == f"MSA|AR|{received.header.echoable().control_id}|{text}"
    assert received.header.sender == ("EPIC", "HOSP")
    assert received.encoding == Encoding() and received.route is None and received.commands == []


def test_a_header_problem_is_answered_with_ar_even_when_the_event_is_also_bad() -> None:
    received = read(frame(msh(version="2.1"), "NTE|1"))
    assert (received.ack.code, received.problem.location) == ("AR", "MSH-12")


# --- the event checks: AE -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "location", "text"),
    [
        ((TQ1, PID), "SCH", "the SCH segment is missing"),
        (("SCH|", TQ1, PID), "SCH-1", "no appointment id: SCH-1 and SCH-2 are both empty"),
        ((SCH, TQ1), "PID", "the PID segment (patient) is missing"),
        ((SCH, TQ1, "PID|1||^^^HOSP"), "PID-3", "PID-3 patient identifier is empty"),
        ((SCH, PID), "TQ1-7", "no appointment start time (looked in TQ1-7, SCH-11.4, AIS-4/AIL-6/AIP-6/AIG-8)"),
    ],
)
def test_an_event_the_bridge_cannot_take_is_answered_with_ae(
    segments: tuple[str, ...], location: str, text: str
) -> None:
    received = read(frame(msh(), *segments))
    assert (received.outcome, received.status, received.event) == (Outcome.ERROR, MessageStatus.REJECTED, None)
    assert received.problem == Problem(location, REQUIRED_FIELD_MISSING, text)
    assert (received.ack.code, received.ack.text) == ("AE", text)
    assert answer_lines(received)[0] == f"MSA|AE|C1|{text}"


# --- what cannot be read: AR, header salvaged -----------------------------------------------------------


def test_text_without_an_msh_is_refused_with_a_headerless_ar() -> None:
    received = read(b"PID|1\r")
    assert (received.outcome, received.status, received.header) == (Outcome.REJECT, MessageStatus.REJECTED, None)
    assert received.problem == Problem("MSH", SEGMENT_SEQUENCE_ERROR, "the message does not begin with an MSH segment")
    assert received.ack.code == "AR" and received.encoding == Encoding()
    assert ack_msh(received)[2:6] == ["HL7BRIDGE", "", "", ""]
    assert answer_lines(received)[0] == "MSA|AR||the message does not begin with an MSH segment"


def test_an_unreadable_message_is_answered_from_its_salvaged_header() -> None:
    received = read(frame(msh(control="C9"), "pid|1"))
    assert received.problem == Problem(
        "MSH",
        SEGMENT_SEQUENCE_ERROR,
        "segment 2 (after MSH) has no valid segment ID (3 letters or digits, then the field separator)",
        value="pid|1",
    )
    assert (received.outcome, received.ack.code, received.header.control_id) == (Outcome.REJECT, "AR", "C9")
    assert received.header.sender == ("EPIC", "HOSP")
    assert ack_msh(received)[2:6] == ["BRIDGE", "CLINIC", "EPIC^1", "HOSP^2"]
    assert answer_lines(received)[0].startswith("MSA|AR|C9|segment 2 (after MSH)")


def test_a_message_over_a_limit_is_refused_with_ar_naming_the_field() -> None:
    received = read(frame(msh(), SCH, TQ1, "PID|1||A~B~C"), limits=Limits(repetitions=2))
    assert received.problem == Problem("PID-3", DATA_TYPE_ERROR, "PID-3 holds 3 repetitions, more than the 2 accepted")
    assert (received.outcome, received.ack.code) == (Outcome.REJECT, "AR")


# --- accepted, ignored, acknowledgments -------------------------------------------------------------------


def test_a_booking_is_accepted_with_aa_and_its_event() -> None:
    received = read(frame(msh(), *BODY))
    assert (received.outcome, received.status, received.problem) == (Outcome.ACCEPT, MessageStatus.ACCEPTED, None)
    assert (received.event.action, received.event.filler_appointment_id, received.event.control_id) == (
        "book",
        "F1",
        "C1",
    )
    assert (received.ack.code, received.ack.text) == ("AA", "Message accepted")
    assert answer_lines(received) == ["MSA|AA|C1|Message accepted", ""]
    assert received.dedupe_key == ("EPIC", "HOSP", "C1")
    assert (received.note, received.route, received.commands) == (None, None, [])


def test_an_event_that_needs_no_action_is_ignored_but_answered_aa() -> None:
    received = read(frame(msh(type_="SIU^S24"), "SCH|P1"))
    assert (received.outcome, received.status, received.ack.code) == (Outcome.ACCEPT, MessageStatus.IGNORED, "AA")
    assert received.event.action == "ignore"


def test_an_acknowledgment_received_is_logged_and_never_answered() -> None:
    raw = frame(msh(type_="ACK^S12"), "MSA|AA|X1")
    received = read(raw)
    assert (received.outcome, received.status, received.ack) == (Outcome.ACCEPT, MessageStatus.IGNORED, None)
    assert received.note == "an acknowledgment was received; it is logged, never answered"
    assert (received.header.control_id, received.text, received.raw) == ("C1", raw.decode(), raw)
    assert (received.event, received.problem, received.charset) == (None, None, "utf-8")


@pytest.mark.parametrize(
    ("msh15", "msh16", "segments", "code"),
    [
        ("NE", "NE", BODY, None),
        ("AL", "NE", BODY, "CA"),
        ("NE", "AL", BODY, "AA"),
        ("NE", "ER", BODY, None),
        ("NE", "ER", (SCH,), "AE"),
        ("SU", "NE", (SCH,), None),
    ],
)
def test_the_enhanced_mode_decides_whether_and_how_to_answer(
    msh15: str, msh16: str, segments: tuple[str, ...], code: str | None
) -> None:
    received = read(frame(msh(msh15=msh15, msh16=msh16), *segments))
    assert (received.ack.code if received.ack else None) == code


def test_a_header_problem_in_enhanced_mode_asking_for_no_answer_is_logged_unanswered() -> None:
    received = read(frame(msh(version="2.1", msh15="NE", msh16="NE"), *BODY))
    assert (received.ack, received.status, received.problem.location) == (None, MessageStatus.REJECTED, "MSH-12")


# --- answer ---------------------------------------------------------------------------------------------


def test_answer_says_accepted_the_problem_or_the_given_text() -> None:
    it = intake()
    received = read(frame(msh(), *BODY))
    problem = Problem("PID-3", REQUIRED_FIELD_MISSING, "PID-3 patient identifier is empty")
    assert (it.answer(received, Outcome.ACCEPT, None).code, it.answer(received, Outcome.ACCEPT, None).text) == (
        "AA",
        "Message accepted",
    )
    assert (it.answer(received, Outcome.ERROR, problem).code, it.answer(received, Outcome.ERROR, problem).text) == (
        "AE",
        "PID-3 patient identifier is empty",
    )
    given = it.answer(received, Outcome.REJECT, problem, "try later")
    assert (given.code, given.text) == ("AR", "try later")
    assert given.payload.decode().split("\r")[1] == "MSA|AR|C1|try later"


def test_answer_is_none_when_the_sender_asks_for_none() -> None:
    received = read(frame(msh(msh15="NE", msh16="NE"), *BODY))
    assert intake().answer(received, Outcome.ERROR, None) is None


def test_failed_to_store_asks_for_a_resend() -> None:
    received = read(frame(msh(), *BODY))
    ack = intake().failed_to_store(received, "disk full")
    assert (ack.code, ack.text, received.outcome) == (
        "AR",
        "message not stored (disk full); please resend",
        Outcome.REJECT,
    )


def test_too_long_is_answered_from_the_first_bytes() -> None:
    received = intake().too_long(frame(msh(control="C5"))[:90], 4096)
    assert received.problem == Problem(
        "MSH", APPLICATION_INTERNAL_ERROR, "message exceeds the 4096-byte limit; discarded"
    )
    assert (received.ack.code, received.header.control_id, received.note) == (
        "AR",
        "C5",
        "only the first bytes were kept",
    )


def test_a_reader_failure_is_answered_and_logged() -> None:
    received = intake().failed_to_read(frame(msh(control="C6"), "SCH|\xe9".encode().decode("latin-1")), KeyError("x"))
    text = "internal error while reading the message (KeyError); please report it"
    assert received.problem == Problem("MSH", APPLICATION_INTERNAL_ERROR, text)
    assert (received.ack.code, received.header.control_id, received.charset) == ("AR", "C6", "iso-8859-1")


# --- read_frame -----------------------------------------------------------------------------------------


def test_leading_line_breaks_and_spaces_before_msh_are_skipped_but_kept_in_the_row() -> None:
    raw = b"\r\n\t " + frame(msh(), *BODY)
    received = read(raw)
    assert (received.status, received.raw, received.text) == (MessageStatus.ACCEPTED, raw, raw.decode())


def test_the_frame_is_decoded_as_msh18_declares() -> None:
    raw = (msh() + "||8859/1\r" + "\r".join(BODY).replace("DOE", "DÖE") + "\r").encode("latin-1")
    received = read(raw)
    assert (received.charset, received.note, received.event.names[0].family) == ("iso-8859-1", None, "DÖE")


def test_a_charset_that_does_not_fit_is_noted() -> None:
    raw = (msh() + "||UNICODE UTF-8\r" + "\r".join(BODY).replace("DOE", "DÖE") + "\r").encode("latin-1")
    received = read(raw)
    assert (received.charset, received.status) == ("iso-8859-1", MessageStatus.ACCEPTED)
    assert received.note == "no configured charset fits (utf-8); decoded as iso-8859-1"
    assert received.row("main", "peer", 1.0)["note"] == received.note


@pytest.mark.parametrize("envelope", [("BHS|^~\\&|EPIC",), ("FHS|^~\\&|EPIC", "BHS|^~\\&|EPIC")])
def test_a_batch_is_read_message_by_message(envelope: tuple[str, ...]) -> None:
    raw = b"\r\n" + frame(*envelope, msh(control="B1"), *BODY, msh(control="B2"), "PID|1", "BTS|2")
    result = intake().read_frame(raw)
    assert [m.header.control_id for m in result.messages] == ["B1", "B2"]
    assert [m.ack.code for m in result.messages] == ["AA", "AE"]
    assert (result.batch_header, result.batch_charset) == ([*envelope, "BTS|2"], "utf-8")


def test_a_single_message_frame_has_no_batch_envelope() -> None:
    result = intake().read_frame(frame(msh(), *BODY))
    assert (len(result.messages), result.batch_header, result.batch_charset) == (1, [], "ascii")


# --- the log row ----------------------------------------------------------------------------------------


def test_the_row_of_an_accepted_message() -> None:
    received = read(frame(msh(), *BODY))
    row = received.row("main", "127.0.0.1:5000", 12.5)
    assert orjson.loads(row.pop("summary"))["appointment_key"] == "HOSP|F1"
    assert row.pop("ack_raw") == received.ack.payload
    assert row == {
        "received_at": 12.5, "listener": "main", "peer": "127.0.0.1:5000", "raw": received.raw, "charset": "utf-8",
        "sending_application": "EPIC", "sending_facility": "HOSP", "control_id": "C1", "message_type": "SIU",
        "event": "S12", "version": "2.5.1", "appointment_key": "HOSP|F1", "action": "book", "route": None,
        "note": None, "replay_of": None, "ack_code": "AA", "ack_text": "Message accepted",
        "status": MessageStatus.ACCEPTED, "error": None, "error_location": None, "duplicate_of": None,
        "search_terms": '["c:C1","s:EPIC","s:EPIC^HOSP","a:P1","a:F1","p:MRN1"]', "search_text": "DOE JANE",
    }  # fmt: skip


def test_the_row_of_a_headerless_refusal() -> None:
    received = read(b"NTE|1\r")
    row = received.row("east", "peer", 0.0)
    assert {
        k: row[k] for k in ("sending_application", "control_id", "message_type", "event", "version")
    } == dict.fromkeys(("sending_application", "control_id", "message_type", "event", "version"))
    assert (row["summary"], row["appointment_key"], row["action"], row["ack_code"]) == (None, None, None, "AR")
    assert (row["error"], row["error_location"], row["status"]) == (
        "the message does not begin with an MSH segment",
        "MSH",
        MessageStatus.REJECTED,
    )
    assert received.dedupe_key is None


def test_an_unanswered_row_has_no_ack() -> None:
    row = read(frame(msh(msh15="NE", msh16="NE"), *BODY)).row("main", "peer", 0.0)
    assert (row["ack_code"], row["ack_text"], row["ack_raw"]) == (None, None, None)


def test_a_refused_message_has_no_dedupe_key() -> None:
    assert read(frame(msh(), SCH)).dedupe_key is None


# --- routed -------------------------------------------------------------------------------------------


ROUTE = Route("clinic", "bot-1", "America/New_York", (ParameterSpec("appointment_id", ("appointment_id",)),),
              ("appointment_id",), flow_id="flow-main")  # fmt: skip
ELSEWHERE = Route("other", "bot-2", "UTC", (), (), match=Criteria(sending_facility=("OTHER",)))


def test_a_routed_booking_carries_its_commands() -> None:
    received = read(frame(msh(), *BODY), router=Router((ROUTE,)))
    assert (received.status, received.route, received.note, received.ack.code) == (
        MessageStatus.ACCEPTED, "clinic", "book via route clinic", "AA",
    )  # fmt: skip
    [command] = received.commands
    assert (command["kind"], command["route"], command["parameters"], command["sync"]) == (
        "book", "clinic", '{"appointment_id":"F1"}', 0,
    )  # fmt: skip
    assert (command["next_attempt_at"], command["created_at"]) == (1_800_000_000.0, 1_800_000_000.0)


def test_a_routed_booking_waits_for_the_api_when_acks_follow_dispatch() -> None:
    received = read(frame(msh(), *BODY), router=Router((ROUTE,)), sync=True)
    assert (received.status, received.commands[0]["sync"], received.ack.code) == (MessageStatus.PENDING, 1, "AA")


def test_an_unrouted_event_is_refused_with_ae_when_configured() -> None:
    received = read(frame(msh(), *BODY), router=Router((ELSEWHERE,), "reject"))
    assert (received.outcome, received.status, received.ack.code, received.commands) == (
        Outcome.ERROR, MessageStatus.REJECTED, "AE", [],
    )  # fmt: skip
    assert (received.problem.location, received.note, received.route) == (
        "MSH-4",
        "no route matches this appointment",
        None,
    )


def test_an_unrouted_event_is_ignored_with_aa_by_default() -> None:
    received = read(frame(msh(), *BODY), router=Router((ELSEWHERE,)))
    assert (received.outcome, received.status, received.ack.code, received.problem) == (
        Outcome.ACCEPT, MessageStatus.IGNORED, "AA", None,
    )  # fmt: skip


def test_a_routed_message_keeps_the_decoding_note_beside_the_plan_note() -> None:
    raw = (msh() + "||UNICODE UTF-8\r" + "\r".join(BODY).replace("DOE", "DÖE") + "\r").encode("latin-1")
    received = read(raw, router=Router((ROUTE,)))
    assert received.note == "no configured charset fits (utf-8); decoded as iso-8859-1; book via route clinic"


# --- the header salvaged from what cannot be read --------------------------------------------------------


def salvaged(text: str) -> Header | None:
    return intake().read_message(text.encode("latin-1"), text, "iso-8859-1").header


def test_the_salvaged_header_reads_each_field_with_the_declared_delimiters() -> None:
    header = salvaged("\r\nMSH#$~\\&#APP$1#FAC$2#RA#RF#2027##siu$s12# C7 #P$T#2.5.1$X###al #ne\rpid#1\r")
    assert header == Header(
        sending_application="APP$1", sending_facility="FAC$2", receiving_application="RA", receiving_facility="RF",
        sent_at="", message_type="SIU", event="", control_id="C7", processing_id="P", version="2.5.1",
        accept_ack_type="AL", application_ack_type="NE", charset_field="", sender=("APP", "FAC"),
    )  # fmt: skip


def test_a_short_salvaged_header_leaves_the_missing_fields_empty() -> None:
    header = salvaged("MSH|^~\\&|APP\rpid|1\r")
    assert (header.sending_application, header.sending_facility, header.control_id, header.version) == (
        "APP",
        "",
        "",
        "",
    )
    assert (header.message_type, header.accept_ack_type, header.sender) == ("", "", ("APP", ""))


def test_an_empty_msh2_salvages_with_the_standard_component_separator() -> None:
    header = salvaged("MSH||A^1|B^2|||||SIU^S12|C1|P|2.5^x\r")
    assert (header.sender, header.message_type, header.version) == (("A", "B"), "SIU", "2.5")


@pytest.mark.parametrize(
    ("version", "kept"), [("2.8", "2.8"), ("2.5.1", "2.5.1"), ("2.5.10", ""), ("3.0", ""), (" 2.4 ", "2.4")]
)
def test_a_salvaged_version_is_kept_only_when_it_looks_like_one(version: str, kept: str) -> None:
    assert salvaged(f"MSH|^~\\&|A|B|C|D|2027||SIU^S12|C1|P|{version}\rpid|1\r").version == kept


@pytest.mark.parametrize(
    "text", ["MSH|^~\\", "PID|1|2|3|4\rMSH|^~\\&|A", "\r\n", "\x0bMSH|^~\\&|A|B\rpid|1\r", "XMSH|^~\\&|A|B\rpid|1\r"]
)
def test_nothing_is_salvaged_without_an_msh_line_first(text: str) -> None:
    assert salvaged(text) is None


# --- batches --------------------------------------------------------------------------------------------


def test_a_batch_over_the_limit_is_refused_whole_as_one_row() -> None:
    text = "BHS|^~\\&\r" + "".join(f"{msh(control=f'B{n}')}\r{SCH}\r" for n in range(3)) + "BTS|3\r"
    result = intake(limits=Limits(batch_messages=2)).read_frame(text.encode())
    [refused] = result.messages
    words = "the batch holds 3 messages, more than the 2 accepted; send smaller batches"
    assert refused.problem == Problem("BHS", SEGMENT_SEQUENCE_ERROR, words)
    assert (refused.header, refused.outcome, refused.ack.code, refused.raw) == (
        None,
        Outcome.REJECT,
        "AR",
        text.encode(),
    )
    assert result.batch_header == ["BHS|^~\\&", "BTS|3"]


def test_a_batch_at_the_limit_is_read() -> None:
    text = "BHS|^~\\&\r" + "".join(f"{msh(control=f'B{n}')}\r{SCH}\r" for n in range(2))
    result = intake(limits=Limits(batch_messages=2)).read_frame(text.encode())
    assert [m.header.control_id for m in result.messages] == ["B0", "B1"]


def test_each_message_of_a_batch_keeps_its_own_text() -> None:
    result = intake().read_frame(f"BHS|^~\\&\n{msh(control='B1')}\n{SCH}\n\n{msh(control='B2')}\nBTS|2\n".encode())
    assert [m.raw for m in result.messages] == [
        f"{msh(control='B1')}\r{SCH}\r".encode(),
        f"{msh(control='B2')}\r".encode(),
    ]
    assert [m.text for m in result.messages] == [m.raw.decode() for m in result.messages]


def test_segments_before_the_first_msh_of_a_batch_are_a_message_of_their_own() -> None:
    result = intake().read_frame(f"BHS|^~\\&\rNTE|1\r{msh(control='B1')}\r{SCH}\r".encode())
    assert [(m.header and m.header.control_id, m.ack.code) for m in result.messages] == [(None, "AR"), ("B1", "AE")]
    assert result.messages[0].problem.text == "the message does not begin with an MSH segment"


def test_an_empty_batch_is_refused() -> None:
    text = "FHS|^~\\&\rBHS|^~\\&\rBTS|0\rFTS|1\r"
    [refused] = intake().read_frame(text.encode()).messages
    assert refused.problem == Problem("BHS", REQUIRED_FIELD_MISSING, "the batch holds no message")
    assert (refused.ack.code, refused.raw, refused.status) == ("AR", text.encode(), MessageStatus.REJECTED)


def test_a_batch_in_latin1_keeps_its_charset() -> None:
    text = f"BHS|^~\\&\r{msh()}||8859/1\r{SCH}\r{TQ1}\rPID|1||M1^^^H^MR||DÖE^JANE\r"
    result = intake().read_frame(text.encode("latin-1"))
    assert (result.batch_charset, result.messages[0].charset) == ("iso-8859-1", "iso-8859-1")
    assert result.messages[0].event.names[0].family == "DÖE"


STAMP = re.compile(r"^\d{14}[+-]\d{4}$")


def batch_answer(envelope: list[str], acks: list[bytes], charset: str = "utf-8") -> list[list[str]]:
    frame = Frame([], envelope, charset)
    out = Intake(Feed(UTC), AckBuilder("BRIDGE", "FAC")).batch_answer(frame, acks).decode(charset)
    assert out.endswith("\r")
    lines = out[:-1].split("\r")
    sep = lines[0][3]
    return [line.split(sep) for line in lines]


def test_a_batch_answer_wraps_the_acks_in_a_batch_envelope_of_our_own() -> None:
    [bhs, msa1, msa2, bts] = batch_answer(["BHS|^~\\&|EPIC", "BTS|2"], [b"MSA|AA|B1\r", b"MSA|AE|B2\r"])
    assert bhs[:6] + bhs[7:10] == ["BHS", "^~\\&", "BRIDGE", "FAC", "", "", "", "", ""]
    assert STAMP.match(bhs[6]) and re.fullmatch(r"\d{20}", bhs[10]) and len(bhs) == 11
    assert (msa1, msa2, bts) == (["MSA", "AA", "B1"], ["MSA", "AE", "B2"], ["BTS", "2"])


def test_a_file_batch_answer_has_a_file_envelope_too() -> None:
    lines = batch_answer(["FHS|^~\\&", "BHS|^~\\&", "BTS|1", "FTS|1"], [b"MSA|AA|B1\r"])
    assert [line[0] for line in lines] == ["FHS", "BHS", "MSA", "BTS", "FTS"]
    assert (lines[0][1:6], lines[1][1:6], lines[3:]) == (
        ["^~\\&", "BRIDGE", "FAC", "", ""], ["^~\\&", "BRIDGE", "FAC", "", ""], [["BTS", "1"], ["FTS", "1"]],
    )  # fmt: skip
    assert lines[0][10] == lines[1][10]


def test_a_batch_answer_uses_the_senders_delimiters_or_the_standard_ones() -> None:
    assert batch_answer(["BHS#$~\\&#EPIC"], [])[0][:4] == ["BHS", "$~\\&", "BRIDGE", "FAC"]
    assert batch_answer(["BHS#$~\\&"], [])[1] == ["BTS", "0"]
    assert batch_answer([], [])[0][:2] == ["BHS", "^~\\&"]
    assert batch_answer(["BHS"], [])[0][:2] == ["BHS", "^~\\&"]
    assert batch_answer(["BHS|"], [])[0][:2] == ["BHS", "^~\\&"]


def test_a_batch_answer_is_encoded_in_the_batch_charset() -> None:
    frame = Frame([], ["BHS|^~\\&"], "iso-8859-1")
    out = Intake(Feed(UTC), AckBuilder()).batch_answer(frame, ["MSA|AE|B1|DÖE\r".encode("latin-1")])
    assert out.split(b"\r")[1:] == ["MSA|AE|B1|DÖE".encode("latin-1"), b"BTS|1", b""]


# --- what each path keeps for the log -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "router", "note"),
    [
        (("NTE|1",), None, "n"),  # unreadable
        ((msh(version="2.1"), *BODY), None, "n"),  # header refused
        ((msh(), SCH), None, "n"),  # event refused
        ((msh(), *BODY), None, "n"),  # accepted
        ((msh(type_="ACK^S12"), "MSA|AA|X"), None, "an acknowledgment was received; it is logged, never answered"),
        ((msh(), *BODY), Router((ROUTE,)), "n; book via route clinic"),
        ((msh(), *BODY), Router((ELSEWHERE,), "reject"), "n; no route matches this appointment"),
    ],
)
def test_every_path_keeps_the_raw_bytes_the_text_and_the_note(
    segments: tuple[str, ...], router: Router | None, note: str
) -> None:
    text = "\r".join(segments) + "\r"
    received = intake(router).read_message(b"raw bytes", text, "utf-8", "n")
    assert (received.raw, received.text, received.note, received.charset) == (b"raw bytes", text, note, "utf-8")


HASH = Encoding("#", "$", "%", "@", "!")


@pytest.mark.parametrize(
    ("segments", "router", "code"),
    [
        (("MSH#$%@!#A#B#C#D#2027##ACK$S12#C1#P#2.5.1",), None, None),
        (("MSH#$%@!#A#B#C#D#2027##SIU$S12#C1#P#2.5.1", "SCH#P1"), None, "AE"),
        (("MSH#$%@!#A#B#C#D#2027##SIU$S12#C1#P#2.5.1", "SCH#P1$X#F1", "TQ1#######20270315093000", "PID#1##M1"), None, "AA"),
        (("MSH#$%@!#A#B#C#D#2027##SIU$S12#C1#P#2.5.1", "SCH#P1$X#F1", "TQ1#######20270315093000", "PID#1##M1"),
         Router((ROUTE,)), "AA"),
    ],
)  # fmt: skip
def test_every_path_keeps_the_messages_delimiters(
    segments: tuple[str, ...], router: Router | None, code: str | None
) -> None:
    received = read(("\r".join(segments) + "\r").encode(), router=router)
    assert received.encoding == HASH
    assert (received.ack.code if received.ack else None) == code
    if received.ack:
        assert received.ack.payload.decode().split("\r")[1].startswith(f"MSA#{code}#C1#")


def test_escapes_are_read_in_the_messages_charset() -> None:
    raw = (msh() + "||8859/1\r" + "\r".join(BODY).replace("DOE", "D\\XD6\\E") + "\r").encode("latin-1")
    assert read(raw).event.names[0].family == "DÖE"


@pytest.mark.parametrize("raw", [b"\x0b" + frame(msh(), *BODY), b"X" + frame(msh(), *BODY)])
def test_only_line_breaks_tabs_and_spaces_before_msh_are_skipped(raw: bytes) -> None:
    received = read(raw)
    assert (received.ack.code, received.problem.text) == ("AR", "the message does not begin with an MSH segment")


@pytest.mark.parametrize("prefix", [b"\x0b", b"X"])
def test_a_batch_header_after_other_characters_is_no_batch(prefix: bytes) -> None:
    result = intake().read_frame(prefix + frame("BHS|^~\\&", msh(), *BODY))
    assert (len(result.messages), result.batch_header, result.messages[0].ack.code) == (1, [], "AR")


def test_the_configured_charsets_are_tried_before_the_last_resort() -> None:
    raw = frame(msh(), SCH, TQ1, "PID|1||M1||DÖE^J").decode().encode("latin-1")
    it = Intake(Feed(UTC), AckBuilder(), charset_fallback=("utf-8", "cp1252"))
    [received] = it.read_frame(raw).messages
    assert (received.charset, received.note, received.event.names[0].family) == ("cp1252", None, "DÖE")
    too_long = it.too_long(raw, 80)
    assert (too_long.charset, too_long.note, too_long.raw, too_long.text) == (
        "cp1252", "only the first bytes were kept", raw, raw.decode("cp1252"),
    )  # fmt: skip


def test_a_reader_failure_keeps_the_bytes_and_their_text() -> None:
    raw = frame(msh(control="C6"), "SCH|\xe9".encode().decode("latin-1"))
    received = intake().failed_to_read(raw, KeyError("x"))
    assert (received.raw, received.text) == (raw, raw.decode("latin-1"))


# --- routing from intake --------------------------------------------------------------------------------


def test_an_intake_listens_as_main_and_answers_on_receipt_by_default() -> None:
    bound = Route("clinic", "bot-1", "UTC", ROUTE.parameters, ROUTE.instance_identifiers, listeners=("main",))
    [received] = Intake(Feed(UTC), AckBuilder(), router=Router((bound,))).read_frame(frame(msh(), *BODY)).messages
    assert (received.route, received.status, received.commands[0]["sync"]) == ("clinic", MessageStatus.ACCEPTED, 0)


def test_an_intake_routes_as_its_listener() -> None:
    bound = Route("clinic", "bot-1", "UTC", ROUTE.parameters, ROUTE.instance_identifiers, listeners=("east",))
    it = Intake(Feed(UTC), AckBuilder(), router=Router((bound,)), listener="east")
    assert it.read_frame(frame(msh(), *BODY)).messages[0].route == "clinic"


def test_routing_reads_naive_times_in_the_feed_zone_and_judges_start_by_the_clock() -> None:
    when = Route("clinic", "bot-1", "UTC", (ParameterSpec("when", ("TQ1-7",), type="datetime"),), ())
    chicago = Intake(Feed(ZoneInfo("America/Chicago")), AckBuilder(), router=Router((when,)), clock=lambda: 0.0)
    [received] = chicago.read_frame(frame(msh(), *BODY)).messages
    assert orjson.loads(received.commands[0]["parameters"]) == {"when": "2027-03-15 14:30:00"}
    later = Intake(Feed(UTC), AckBuilder(), router=Router((when,)), clock=lambda: 4_000_000_000.0)
    [received] = later.read_frame(frame(msh(), *BODY)).messages
    assert (received.status, received.note, received.commands) == (
        MessageStatus.IGNORED, "the appointment has already started", [],
    )  # fmt: skip


def test_a_content_error_accepted_anyway_is_answered_aa_plainly_and_kept_as_rejected() -> None:
    route = Route("clinic", "bot-1", "UTC", (ParameterSpec("mail", ("PID-19",), required=True),), (),
                  content_errors="accept")  # fmt: skip
    received = read(frame(msh(), *BODY), router=Router((route,)))
    assert (received.ack.code, received.ack.text, received.outcome) == ("AA", "Message accepted", Outcome.ACCEPT)
    assert answer_lines(received) == ["MSA|AA|C1|Message accepted", ""]
    assert (received.status, received.problem.location, received.commands) == (MessageStatus.REJECTED, "PID-19", [])


# --- answers in the message's charset -------------------------------------------------------------------


def test_an_answer_is_encoded_in_the_messages_charset() -> None:
    raw = (msh() + "||8859/1\r" + "\r".join(BODY) + "\r").encode("latin-1")
    received = read(raw)
    ack = intake().answer(received, Outcome.ERROR, None, "DÖE")
    assert ack.payload.split(b"\r")[1] == "MSA|AE|C1|DÖE".encode("latin-1")


def test_a_failure_to_store_is_an_application_error_of_the_header() -> None:
    received = read(frame(msh(), *BODY))
    intake().failed_to_store(received, "disk full")
    ack = intake().failed_to_store(received, "disk full")
    assert ack.payload.decode().split("\r")[2] == (
        "ERR||MSH^1|207^Application internal error^HL70357|E||||message not stored (disk full); please resend"
    )


def test_a_strict_check_failure_turns_an_accepted_message_into_ae() -> None:
    received = read(frame(msh(), *BODY))
    problem = Problem("PID-7", DATA_TYPE_ERROR, "PID-7 is not a date")
    intake().strict_failed(received, problem)
    assert (received.outcome, received.status, received.problem) == (Outcome.ERROR, MessageStatus.REJECTED, problem)
    assert (received.ack.code, received.ack.text) == ("AE", "PID-7 is not a date")
    assert answer_lines(received)[0] == "MSA|AE|C1|PID-7 is not a date"


def test_the_shortest_header_is_salvaged_empty() -> None:
    header = salvaged("MSH|^~\\&\rpid|1\r")
    assert (header.sender, header.control_id, header.message_type) == (("", ""), "", "")


def test_a_refused_batch_keeps_its_charset_text_and_bytes() -> None:
    text = "BHS|^~\\&|DÖE\r" + "".join(f"{msh(control=f'B{n}')}||8859/1\r{SCH}\r" for n in range(2))
    result = intake(limits=Limits(batch_messages=1)).read_frame(text.encode("latin-1"))
    [refused] = result.messages
    assert (result.batch_charset, refused.charset) == ("iso-8859-1", "iso-8859-1")
    assert (refused.raw, refused.text) == (text.encode("latin-1"), text)


def test_a_message_of_a_latin1_batch_is_logged_in_latin1() -> None:
    text = f"BHS|^~\\&\r{msh()}||8859/1\r{SCH}\rNTE|1|DÖE\r"
    [received] = intake().read_frame(text.encode("latin-1")).messages
    assert received.raw == f"{msh()}||8859/1\r{SCH}\rNTE|1|DÖE\r".encode("latin-1")


def test_a_batch_answer_replaces_what_its_charset_cannot_hold() -> None:
    frame = Frame([], ["BHS|^~\\&"], "ascii")
    out = Intake(Feed(UTC), AckBuilder()).batch_answer(frame, [b"MSA|AE|B1|D\xe9E\r"])
    assert out.split(b"\r")[1] == b"MSA|AE|B1|D?E"


def test_a_batch_answer_takes_msh2_up_to_the_next_separator_only() -> None:
    assert batch_answer(["BHS#$~\\&#EPIC#FAC"], [])[0][:4] == ["BHS", "$~\\&", "BRIDGE", "FAC"]
    short = Intake(Feed(UTC), AckBuilder("BRIDGE")).batch_answer(Frame([], ["BHS#"], "utf-8"), [])
    assert short.startswith(b"BHS#^~\\&#BRIDGE#")
    assert batch_answer(["BHS#$"], [])[0][:2] == ["BHS", "$"]
