"""Gaps found by the adversarial review of issues 16 and 22, each against the real component."""

from __future__ import annotations

import logging
import re
import subprocess
import sys

import pytest
from twisted.internet.task import Clock

from hl7bridge.core.logs import RefusalLog
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient, TokenSource
from tests.conftest import RunningService, fixture_bytes, segments, unique_control
from tests.hostile_api import Answer, HostileApi

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
SIU = fixture_bytes("siu/s12_cerner_v23.hl7").replace(b"\n", b"\r")


def with_msh(payload: bytes, number: int, value: bytes) -> bytes:
    """``payload`` with MSH-``number`` set to ``value``."""
    head, sep, rest = payload.partition(b"\r")
    fields = head.split(b"|")
    fields += [b""] * (number - len(fields))
    fields[number - 1] = value
    return b"|".join(fields) + sep + rest


@pytest.mark.parametrize(
    ("number", "location"),
    [(10, "MSH-10"), (3, "MSH-3"), (6, "MSH-6"), (11, "MSH-11"), (18, "MSH-18")],
)
def test_an_overlong_echoed_header_field_is_refused_and_not_echoed(
    service: RunningService, number: int, location: str
) -> None:
    """A sender must not size our ACK: 500,000 characters in a field the ACK echoes would come back whole."""
    payload = with_msh(unique_control(SIU, f"LONG{number}"), number, b"C" * 500_000)
    ack = service.request(payload)
    assert len(ack) < 2_000
    seg = segments(ack)
    assert seg["MSA"][1] == "AR"
    assert seg["ERR"][1].startswith(f"MSH^1^{number}^102")
    assert location in seg["MSA"][3]


def test_a_control_id_at_the_limit_is_accepted_and_echoed(service: RunningService) -> None:
    control_id = "K" * 199
    seg = segments(service.request(unique_control(SIU, control_id)))
    assert seg["MSA"][1:3] == ["AA", control_id]


def test_an_unparseable_message_does_not_echo_an_overlong_control_id(service: RunningService) -> None:
    """The salvaged header of a message that cannot be read goes through the same bound."""
    payload = with_msh(b"MSH|^~\\&|A|B|C|D|2027||SIU^S12|X|P|2.3\rSCH|" + b"^" * 500 + b"\r", 10, b"C" * 300_000)
    ack = service.request(payload)
    assert len(ack) < 2_000
    seg = segments(ack)
    assert seg["MSA"][1:3] == ["AR", ""]
    assert "SCH-1" in seg["MSA"][3]


def test_check_writes_message_text_escaped(tmp_path) -> None:
    """A message's control characters (a terminal escape, a bell, a line break in a value) reach the
    operator's terminal as visible escapes, as in the rest of the CLI's output."""
    message = tmp_path / "ctl.hl7"
    message.write_bytes(
        b"MSH|^~\\&|A|B|C|D|20270101||SIU^S12|X1|P|2.5.1\rSCH|P1\x1b[31mRED\x07|F1||||NEW\r"
        b"PID|||9^^^H^MR||Doe\x1b]0;title\x07^John\x0c\r"
    )
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "check", str(message)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result.stderr
    assert not CONTROL.search(result.stdout.replace("\n", ""))
    assert "P1\\x1b[31mRED\\x07" in result.stdout
    assert "Doe\\x1b]0;title\\x07" in result.stdout


@pytest.mark.parametrize("echo", ["abc\\/def+ghi\\u00e9==", "abc\\u002fdef+ghi\\u00e9=="])
def test_a_token_echoed_json_escaped_is_redacted(echo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An API that echoes the request's header in a JSON error escapes it as JSON does (PHP escapes ``/``
    as ``\\/``, others write ``\\u002f``): the stored body must not carry the token in that form either."""
    token = "abc/def+ghi\u00e9=="
    monkeypatch.setenv("REVIEW_API_TOKEN", token)
    api = HostileApi()
    try:
        body = ('{"message": "Authorization: Bearer ' + echo + ' refused"}').encode()
        api.script("bulk", Answer(401, body, {"Content-Type": "application/json"}))
        client = JourneysClient(
            ApiSettings(api.url, "org", read_timeout=2, call_timeout=3), TokenSource(env="REVIEW_API_TOKEN")
        )
        result = client.trigger("bot", None, "UTC", [{"appointmentId": "A1"}])
    finally:
        api.close()
    assert result.status == 401
    for text in (result.response_body, result.reason):
        assert "def+ghi" not in text and "[token]" in text


def test_refusals_from_more_peers_than_the_table_holds_are_summed_up() -> None:
    """Past ``max_keys`` peers in one interval, refusals share one "many peers" line. Before, that
    line's own key recursed without end: a RecursionError traceback (CRITICAL) for every refused
    connection once 1,024 addresses had been refused within a minute."""
    records: list[logging.LogRecord] = []
    logger = logging.getLogger("test.refusals")
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger.addHandler(handler)
    clock = Clock()
    refusals = RefusalLog(logger, clock, interval=60.0, max_keys=4)
    try:
        for n in range(10):
            refusals.warn((f"10.0.0.{n}", "not in the allowlist"), "refused connection from %s", f"10.0.0.{n}")
        clock.advance(61)
        refusals.warn(("10.0.0.99", "not in the allowlist"), "refused connection from %s", "10.0.0.99")
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert lines[:4] == [f"refused connection from 10.0.0.{n}" for n in range(4)]
    assert lines[4] == "refusing connections from more than 4 peers"
    assert lines[5:] == ["refused connection from 10.0.0.99"]


def test_log_list_cuts_what_a_sender_chose(service: RunningService) -> None:
    """The table's cells are the sender's MSH fields: one message with a 500,000-character MSH-10 made every
    line of ``log list`` a megabyte wide. ``log show`` and ``--json`` still give the whole value."""
    service.request(with_msh(SIU, 10, b"W" * 500_000))
    service.request(with_msh(unique_control(SIU, "WIDE-SENDER"), 3, b"S" * 500_000))
    lines = service.cli("log", "list", "--status", "rejected").stdout.splitlines()
    assert len(lines) >= 3
    assert max(len(line) for line in lines) < 500
    assert any("(+" in line and "chars)" in line for line in lines)
