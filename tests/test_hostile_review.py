"""Gaps found by the adversarial review of issues 16 and 22, each against the real component."""

from __future__ import annotations

import pytest

from tests.conftest import RunningService, fixture_bytes, segments, unique_control

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
