"""validation = "strict": hl7apy's full parse and checks, off the reactor thread, answering AE."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RunningService, fixture_bytes, segments, start_service, unique_control


@pytest.fixture(scope="module")
def strict_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("strict"), '[listeners.main]\nvalidation = "strict"\n')
    yield running
    running.stop()


def test_strict_rejects_what_fast_checks_accept(strict_service: RunningService, service: RunningService) -> None:
    # SCH-6 (event reason) is required by the standard but the bridge itself does not need it.
    raw = (
        b"MSH|^~\\&|EPIC|HOSP|BR|X|20270101120000||SIU^S12^SIU_S12|STRICT-1|P|2.5.1\r"
        b"SCH|P1^EPIC|F1^EPIC\rTQ1|||||||202703140930\rPID|1||M1^^^H^MR||DOE^J\r"
    )
    assert segments(service.request(raw))["MSA"][1] == "AA"
    ack = segments(strict_service.request(raw))
    assert ack["MSA"][1] == "AE"
    assert ack["ERR"][2].split("^")[:3] == ["SCH", "1", "6"]
    assert ack["ERR"][3].startswith("101^")
    assert "strict validation" in ack["ERR"][8]
    row = strict_service.log()[0]
    assert row["status"] == "rejected" and row["error_location"] == "SCH-6"


def test_strict_accepts_a_standard_message(strict_service: RunningService) -> None:
    raw = unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), "STRICT-OK")
    ack = segments(strict_service.request(raw))
    assert ack["MSA"][1:3] == ["AA", "STRICT-OK"], ack


def test_strict_keeps_answers_in_order(strict_service: RunningService, tmp_path: Path) -> None:
    good = unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), "ORDER-1")
    bad = fixture_bytes("malformed/s12_no_pid_v251.hl7")
    later = unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), "ORDER-3")
    with strict_service.client() as client:
        client.sock.sendall(b"".join(b"\x0b" + m + b"\x1c\x0d" for m in (good, bad, later)))
        answers = [segments(client.receive())["MSA"] for _ in range(3)]
    assert [a[2] for a in answers] == ["ORDER-1", segments(bad)["MSH"][10], "ORDER-3"]
    assert [a[1] for a in answers] == ["AA", "AE", "AA"]
