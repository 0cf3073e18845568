"""HL7 semantics that reach patients: explicit nulls, the legal name, truncation, coded fields, and error
text that names the field without repeating patient data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from hl7bridge.app.config import ConfigError, load, parse
from hl7bridge.app.wiring import intake_for
from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.hl7.er7 import Er7Message
from hl7bridge.hl7.er7 import Path as HL7Path
from hl7bridge.hl7.siu import Feed
from hl7bridge.ingest.intake import Intake, Received
from hl7bridge.mapping.parameters import Condition, Context, MappingError, ParameterSpec, evaluate

from .conftest import FIXTURES, MANIFEST, ROOT, RunningService, fixture_bytes, segments, start_service
from .dispatch_support import TOKEN, service_toml

CHICAGO = ZoneInfo("America/Chicago")
EXAMPLE = ROOT / "config" / "hl7bridge.example.toml"
ACCEPTED = sorted(k for k, v in MANIFEST.items() if "messages" not in v and v["ack"] in ("AA", "CA"))
NULLS = "siu/s12_athena_v251_explicit_nulls.hl7"
NICKNAME = "siu/s12_epic_v27_nickname_first_truncated_reason.hl7"
EMPTY_FIRST = "siu/s12_cerner_v231_empty_first_name.hl7"


def message(*segs: str, version: str = "2.5.1", control: str = "C1") -> bytes:
    msh = f"MSH|^~\\&|EPIC|HOSP|BRIDGE|CLINIC|20270101120000||SIU^S12^SIU_S12|{control}|P|{version}"
    return ("\r".join([msh, *segs]) + "\r").encode()


def read(raw: bytes, acks: AckBuilder | None = None) -> Received:
    return Intake(Feed(CHICAGO), acks or AckBuilder()).read_frame(raw).messages[0]


def example_intake() -> Intake:
    """The example config's intake at a fixed "now" (before every fixture's appointment)."""
    cfg = load(EXAMPLE)
    intake = intake_for(cfg, cfg.listeners[0])
    intake.clock = lambda: datetime(2026, 1, 1).timestamp()
    return intake


# --- reading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("relative", ACCEPTED)
def test_reading_matches_the_manifest(relative: str) -> None:
    """Ids, status and the patient's (legal) name as the manifest lists them; HL7 nulls read as absent."""
    expected = MANIFEST[relative]
    event = read(fixture_bytes(relative)).event
    assert event.placer_appointment_id == (expected["placer_appointment_id"] or "")
    assert event.filler_appointment_id == (expected["filler_appointment_id"] or "")
    assert event.patient_id == (expected["patient_id"] or "")
    assert (event.family_name, event.given_name) == (expected["patient_family"] or "", expected["patient_given"] or "")
    assert event.status == (expected["status"] or "")


def test_explicit_null_is_absent_in_extraction() -> None:
    event = read(fixture_bytes(NULLS)).event
    assert event.appointment_id == "ATH50103", "SCH-2 is null: the placer id serves"
    assert event.status == "" and event.action == "book"
    assert event.names[0].middle == ""
    assert event.patient_phone == "555-555-0123", "a null PID-13 gives way to PID-14"
    assert event.start_source == "AIP-6", "a null TQ1-7 falls back to the resources"
    assert '"\\"\\""' not in orjson.dumps(event.summary()).decode(), "no value is two quote marks"


def test_legal_name_wins_over_a_nickname_sent_first() -> None:
    event = read(fixture_bytes(NICKNAME)).event
    assert [n.name_type for n in event.names] == ["N", "L"]
    assert event.patient_name == "JAMES TESTPATIENT"


def test_first_name_holding_repetition_without_a_legal_one() -> None:
    event = read(message("SCH|P1|F1", "TQ1|||||||202703140930", 'PID|1||M1^^^H^MR||~""^""~ROE^RITA^^^^^A')).event
    assert (event.given_name, event.family_name) == ("RITA", "ROE")


def test_truncation_character_is_not_part_of_a_value() -> None:
    event = read(fixture_bytes(NICKNAME)).event
    assert event.reason.endswith("orthopaedic cli"), event.reason
    msg = Er7Message.parse(fixture_bytes("siu/s12_epic_v27_truncation_char.hl7").decode())
    assert msg.get("PID-11.1") == "2 TEST ST #4", "an escaped \\P\\ is a literal #"
    assert msg.get("NTE-3").endswith("mid-sen")
    assert any(leaf[-1].endswith("mid-sen#") for leaf in msg.walk()), "the leaf walk keeps hl7apy's reading"


def test_coded_fields_give_text_and_codes() -> None:
    event = read(fixture_bytes(NICKNAME)).event
    assert event.reason_code == "KNEE"
    assert (event.appointment_type, event.appointment_type_code) == ("Normal", "NORMAL")
    bare = read(message("SCH|P1|F1||||EV|ROUTINE|SHORT", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^J")).event
    assert (bare.reason, bare.reason_code) == ("ROUTINE", "ROUTINE")
    assert (bare.appointment_type, bare.appointment_type_code) == ("SHORT", "SHORT")


# --- mapping ----------------------------------------------------------------------------------------


def _ctx(raw: bytes) -> Context:
    return Context(read(raw).event, CHICAGO, CHICAGO)


def test_null_counts_as_absent_in_mapping() -> None:
    ctx = _ctx(
        message(
            'SCH|P9|""||||""^""',
            "TQ1|||||||202703140930",
            'PID|1||""^^^H^MR~M2^^^H^MR||DOE^JANE^""||""|||||""^PRN^PH',
        )
    )
    specs = (
        ParameterSpec("appointmentId", ("SCH-2.1", "SCH-1.1"), required=True),
        ParameterSpec("patientId", ("PID-3.1",), where=(Condition(HL7Path.parse("PID-3.5"), ("MR",)),)),
        ParameterSpec("name", template="{PID-5.2} {PID-5.3} {PID-5.1}"),
        ParameterSpec("reason", ("reason",), default="none given"),
        ParameterSpec("phone", ("PID-13.1",), type="phone", default="0"),
        ParameterSpec("birth", ("PID-7",), type="date"),
    )
    out = evaluate(specs, ctx)
    assert out == {
        "appointmentId": "P9",
        "patientId": "M2",
        "name": "JANE DOE",
        "reason": "none given",
        "phone": "0",
        "birth": "",
    }
    with pytest.raises(MappingError) as info:
        evaluate((ParameterSpec("phone", ("PID-13.1",), required=True),), ctx)
    assert info.value.location == "PID-13"


def test_example_config_maps_every_fixture_as_the_manifest_says() -> None:
    """Through the example mapping: the legal name, nulls skipped, never a quote mark sent."""
    intake = example_intake()
    for relative in ACCEPTED:
        received = intake.read_frame(fixture_bytes(relative)).messages[0]
        assert received.ack.code == MANIFEST[relative]["ack"], (relative, received.ack.text)
        for command in received.commands:
            params = orjson.loads(command["parameters"])
            assert '"\\"\\""' not in command["parameters"], relative
            if command["kind"] == "book":
                expected = MANIFEST[relative]
                assert params["patientName"] == f"{expected['patient_given']} {expected['patient_family']}", relative
    nulls = intake.read_frame(fixture_bytes(NULLS)).messages[0]
    params = orjson.loads(nulls.commands[0]["parameters"])
    assert params["appointmentId"] == "ATH50103" and params["phoneNumber"] == "5555550123"


# --- no patient data in error text ----------------------------------------------------------------

BROKEN_NAME = message("SCH|P1|F1", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^JANE", "Zephyrine^Q|x")


def _ack_text(received: Received) -> str:
    return received.ack.payload.decode()


@pytest.mark.parametrize(
    ("raw", "location", "secret"),
    [
        (BROKEN_NAME, "PID", "Zephyr"),
        (message("SCH|P1|F1", "TQ1|||||||20271314093000", "PID|1||M1^^^H^MR||DOE^J"), "TQ1-7", "20271314"),
        (message("SCH|P1|F1", "TQ1|||||||1979xx", "PID|1||M1^^^H^MR||DOE^J"), "TQ1-7", "1979xx"),
    ],
)
def test_errors_name_the_field_not_the_value(raw: bytes, location: str, secret: str) -> None:
    received = read(raw)
    text = _ack_text(received)
    assert received.problem.location == location
    assert secret not in text and secret not in received.problem.text
    assert location.split("-")[0] in received.problem.text
    shown = read(raw, AckBuilder(with_values=True))
    assert secret in _ack_text(shown), "ack_phi = true echoes the value"


def test_mapping_type_error_names_the_field_without_the_birth_date() -> None:
    ctx = _ctx(message("SCH|P1|F1", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^J||19801399"))
    with pytest.raises(MappingError) as info:
        evaluate((ParameterSpec("birthDate", ("birth_date", "PID-7"), type="date"),), ctx)
    assert info.value.location == "PID-7" and "PID-7 is not a valid date/time" in str(info.value)
    assert "19801399" not in str(info.value) and info.value.value == "19801399"


def test_ack_phi_is_validated_and_documented() -> None:
    with pytest.raises(ConfigError) as info:
        parse({"service": {"ack_phi": "yes"}})
    assert "service.ack_phi" in str(info.value)
    assert parse({"service": {"ack_phi": True}}).service.ack_phi is True
    assert "\nack_phi = false\n" in EXAMPLE.read_text()


# --- check answers as serve does ------------------------------------------------------------------


@pytest.fixture(scope="module")
def routed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """serve with one route whose patientName reads PID-5's first repetition (the old example mapping)."""
    running = start_service(tmp_path_factory.mktemp("routed"), service_toml("http://127.0.0.1:9"), env=TOKEN)
    yield running
    running.stop()


def _ack_lines(report: str) -> list[str]:
    """MSA and ERR of each answer `check` prints."""
    return [line.strip() for line in report.splitlines() if re.match(r"^\s+(MSA|ERR)\|", line)]


def _served_lines(answer: bytes) -> list[str]:
    return [s for s in answer.decode("latin-1").split("\r") if s.startswith(("MSA|", "ERR|"))]


@pytest.mark.parametrize(
    "relative", [EMPTY_FIRST, NICKNAME, NULLS, "siu/s12_epic_v251.hl7", "malformed/s12_start_month13_v251.hl7"]
)
def test_check_answers_as_the_running_service(routed: RunningService, tmp_path: Path, relative: str) -> None:
    raw = fixture_bytes(relative)
    served = _served_lines(routed.request(raw))
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "check", "--config", str(routed.config), str(FIXTURES / relative)],
        capture_output=True, text=True, timeout=60, cwd=routed.workdir, env={**os.environ, **TOKEN},
    )  # fmt: skip
    assert _ack_lines(result.stdout) == served, result.stdout
    assert result.returncode == (0 if served[0].startswith(("MSA|AA", "MSA|CA")) else 1)


def test_check_without_config_reads_times_as_serve_without_config(service: RunningService) -> None:
    """No --config on either side: the same feed zone (UTC) for a start without offset, the same answer."""
    relative = "siu/s12_cerner_v231_sch11_only.hl7"
    answer = service.request(fixture_bytes(relative))
    row = next(r for r in service.log() if r["control_id"] == MANIFEST[relative]["control_id"])
    shown = orjson.loads(service.cli("log", "show", str(row["id"]), "--json").stdout)
    result = service.cli("check", str(FIXTURES / relative))
    start = re.search(r"^\s+start\s+(\S+)$", result.stdout, re.M)
    assert start is not None and start[1] == shown["summary"]["start"] == "2027-02-09T14:45:00+00:00"
    assert _ack_lines(result.stdout) == _served_lines(answer)


def test_the_service_echoes_values_only_with_ack_phi(service: RunningService, tmp_path: Path) -> None:
    """Over MLLP: the default ACK and service log name TQ1-7 without the value; ack_phi = true adds it."""
    bad = message("SCH|P1|F1", "TQ1|||||||20271314093000", "PID|1||M1^^^H^MR||DOE^J", control="PHI-1")
    msa = segments(service.request(bad))["MSA"]
    assert msa[1] == "AE" and "TQ1-7 is not a valid date/time" in msa[3] and "20271314" not in msa[3]
    echoing = start_service(tmp_path, '[service]\nack_phi = true\nlog_level = "debug"\n')
    try:
        answer = segments(echoing.request(bad))
    finally:
        log = echoing.stop()
    assert "20271314093000" in answer["MSA"][3] and "20271314093000" in answer["ERR"][8]
    assert "TQ1-7 is not a valid date/time" in log and "20271314" not in log, "the service log never has it"


def test_check_applies_the_listeners_strict_validation(tmp_path: Path) -> None:
    strict = start_service(tmp_path, '[listeners.main]\nvalidation = "strict"\n')
    file = tmp_path / "no_sch6.hl7"
    file.write_bytes(message("SCH|P1^EPIC|F1^EPIC", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^J", control="S6"))
    try:
        served = _served_lines(strict.request(file.read_bytes()))
        result = strict.cli("check", "--config", str(strict.config), str(file), check=False)
    finally:
        strict.stop()
    assert served[0].startswith("MSA|AE|S6") and _ack_lines(result.stdout) == served
    assert result.returncode == 1


def test_msh2_reads_as_sent() -> None:
    msg = Er7Message.parse(fixture_bytes("siu/s12_epic_v27_truncation_char.hl7").decode())
    assert msg.get("MSH-2") == msg.msh.get(2) == "^~\\&#"


def test_strict_validation_failure_logs_no_value(caplog: pytest.LogCaptureFixture) -> None:
    """hl7apy raising on a value (here a malformed PID-7) is logged without the value unless log_phi."""
    from hl7bridge.hl7 import strict

    text = message("SCH|P1|F1", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^J||19801399xyz").decode()
    with caplog.at_level("WARNING", logger="hl7bridge.strict"):
        strict.validate(text)
    assert "19801399" not in caplog.text


def test_null_ack_types_ask_for_the_original_mode() -> None:
    raw = message("SCH|P1|F1", "TQ1|||||||202703140930", "PID|1||M1^^^H^MR||DOE^J").replace(
        b"|2.5.1\r", b'|2.5.1|||""|""\r'
    )
    received = read(raw)
    assert received.header.accept_ack_type == "" and received.ack.code == "AA"
