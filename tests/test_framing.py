"""MLLP framing against the real service: a subprocess on loopback, real sockets, a real SQLite log."""

from __future__ import annotations

import itertools
import socket
import uuid
from collections.abc import Iterator

import pytest

from hl7bridge.mllp.framing import frame
from hl7bridge.testing.client import BlockingClient
from tests.conftest import MANIFEST, RunningService, fixture_bytes, segments, start_service, unique_control

BASE = fixture_bytes("siu/s12_epic_v251.hl7")
RUN = uuid.uuid4().hex[:8].upper()
_counter = itertools.count(1)


def control() -> str:
    """A control id no other test (or earlier run against the same log) uses."""
    return f"FR{RUN}{next(_counter):05d}"


def message(control_id: str, payload: bytes = BASE) -> bytes:
    return unique_control(payload, control_id)


def msa(ack: bytes) -> list[str]:
    return segments(ack)["MSA"]


def read_all_until_eof(sock: socket.socket) -> bytes:
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


@pytest.fixture(scope="module")
def small_limit_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    running = start_service(tmp_path_factory.mktemp("small"), "[listeners.main]\nmax_message_bytes = 2048\n")
    yield running
    running.stop()


def test_several_messages_in_one_write_are_acked_in_order(service: RunningService) -> None:
    ids = [control() for _ in range(5)]
    with service.client() as c:
        c.sock.sendall(b"".join(frame(message(i)) for i in ids))
        acks = [c.receive() for _ in ids]
    assert [msa(a)[2] for a in acks] == ids
    assert {msa(a)[1] for a in acks} == {"AA"}


def test_message_dribbled_byte_by_byte_is_acked(service: RunningService) -> None:
    ctrl = control()
    data = frame(message(ctrl))
    with service.client() as c:
        for i in range(len(data)):
            c.sock.send(data[i : i + 1])
        ack = c.receive()
    assert msa(ack)[1:3] == ["AA", ctrl]


def test_junk_before_the_start_block_is_ignored(service: RunningService) -> None:
    ctrl = control()
    with service.client() as c:
        c.sock.sendall(b"\r\n  junk\x1c\x0d" + frame(message(ctrl)))
        ack = c.receive()
    assert msa(ack)[1:3] == ["AA", ctrl]


def test_missing_final_cr_after_end_block_is_acked_in_lenient_mode(service: RunningService) -> None:
    first, second = control(), control()
    with service.client() as c:
        c.sock.sendall(b"\x0b" + message(first) + b"\x1c")
        ack = c.receive()
        assert msa(ack)[1:3] == ["AA", first]
        # The connection is still in step: the next (well-framed) message is answered too.
        assert msa(c.request(message(second)))[1:3] == ["AA", second]


def test_last_segment_without_its_cr_is_acked(service: RunningService) -> None:
    ctrl = control()
    payload = message(ctrl).rstrip(b"\r")
    assert not payload.endswith(b"\r")
    with service.client() as c:
        ack = c.request(payload)
    assert msa(ack)[1:3] == ["AA", ctrl]


def test_fixture_without_final_terminator_is_acked(service: RunningService) -> None:
    name = "siu/s12_athena_v25_no_final_terminator.hl7"
    ctrl = control()
    with service.client() as c:
        ack = c.request(message(ctrl, fixture_bytes(name)))
    assert MANIFEST[name]["ack"] == "AA"
    assert msa(ack)[1:3] == ["AA", ctrl]


def test_framed_garbage_gets_ar_and_the_connection_stays_usable(service: RunningService) -> None:
    ctrl = control()
    with service.client() as c:
        ack = c.request(fixture_bytes("malformed/not_hl7_text.hl7"))
        assert msa(ack)[1] == "AR"
        assert msa(ack)[2] == ""
        assert segments(ack)["MSH"][9] == "ACK"
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]


def test_incoming_ack_is_never_answered_but_the_next_message_is(service: RunningService) -> None:
    name = "malformed/ack_s12_v251.hl7"
    assert MANIFEST[name]["ack"] is None
    ack_ctrl, first, second = control(), control(), control()
    with service.client() as c:
        c.sock.sendall(frame(message(ack_ctrl, fixture_bytes(name))) + frame(message(first)))
        # Answers go out in arrival order: had the ACK been answered, its answer would come first.
        assert msa(c.receive())[1:3] == ["AA", first]
        c.sock.sendall(frame(message(ack_ctrl, fixture_bytes(name))) + frame(message(second)))
        assert msa(c.receive())[1:3] == ["AA", second]
    rows = [r for r in service.log() if r["control_id"] == ack_ctrl]
    assert len(rows) == 2
    assert all(r["ack_code"] is None and r["status"] == "ignored" for r in rows)


def test_oversized_frame_gets_ar_and_the_next_message_gets_aa(small_limit_service: RunningService) -> None:
    big_ctrl, next_ctrl = control(), control()
    big = message(big_ctrl) + b"NTE|9|P|" + b"z" * 10_000 + b"\r"
    assert len(big) > 10_000
    with small_limit_service.client() as c:
        ack = c.request(big)
        assert msa(ack)[1] == "AR"
        assert msa(ack)[2] == big_ctrl  # answered from the kept head, which holds the MSH
        assert msa(c.request(message(next_ctrl)))[1:3] == ["AA", next_ctrl]
    rows = {r["control_id"]: r for r in small_limit_service.log()}
    assert rows[big_ctrl]["status"] == "rejected"
    assert rows[big_ctrl]["ack_code"] == "AR"
    assert rows[next_ctrl]["status"] == "accepted"


def test_each_ack_frame_arrives_in_one_recv(service: RunningService) -> None:
    # Like python-hl7's mllp_send: one recv() after sending must hold the whole frame.
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        for _ in range(5):
            ctrl = control()
            sock.sendall(frame(message(ctrl)))
            data = sock.recv(65536)
            assert data.startswith(b"\x0b")
            assert data.endswith(b"\x1c\x0d")
            assert data.count(b"\x1c") == 1
            assert msa(data[1:-2])[1:3] == ["AA", ctrl]


def test_half_closed_sender_still_gets_its_ack_then_eof(service: RunningService) -> None:
    ctrl = control()
    with socket.create_connection(("127.0.0.1", service.port), timeout=10) as sock:
        sock.sendall(frame(message(ctrl)))
        sock.shutdown(socket.SHUT_WR)
        data = read_all_until_eof(sock)
    assert data.startswith(b"\x0b") and data.endswith(b"\x1c\x0d")
    assert data.count(b"\x0b") == 1
    assert msa(data[1:-2])[1:3] == ["AA", ctrl]


def test_fifty_pipelined_messages_come_back_in_order(service: RunningService) -> None:
    ids = [control() for _ in range(50)]
    with service.client() as c:
        for i in ids:
            c.send(message(i))
        acks = [c.receive() for _ in ids]
    assert [msa(a)[2] for a in acks] == ids
    assert all(msa(a)[1] == "AA" for a in acks)


def test_every_aa_message_is_logged_as_accepted(service: RunningService) -> None:
    names = [n for n, m in MANIFEST.items() if n.startswith("siu/") and m.get("ack") == "AA"]
    assert len(names) > 20
    sent: dict[str, tuple[str, str]] = {}
    with BlockingClient("127.0.0.1", service.port, timeout=10) as c:
        for name in names:
            ctrl = control()
            ack = c.request(message(ctrl, fixture_bytes(name)))
            code = msa(ack)[1]
            assert code == "AA", name
            sent[ctrl] = (MANIFEST[name]["sending_application"], name)
    rows = {r["control_id"]: r for r in service.log() if r["control_id"] in sent}
    assert set(rows) == set(sent)
    assert sum(r["status"] == "accepted" for r in rows.values()) >= len(sent) - 5
    for ctrl, (app, name) in sent.items():
        row = rows[ctrl]
        # Events the bridge has no use for (e.g. S23 slot blocked) are answered AA and logged "ignored".
        assert row["status"] == ("ignored" if row["action"] == "ignore" else "accepted"), name
        assert row["ack_code"] == "AA", name
        assert row["sending_application"] == app, name
        assert row["duplicate_of"] is None


def test_oversized_fixture_within_default_limit_is_acked(service: RunningService) -> None:
    name = "malformed/huge_nte_200kb_v251.hl7"
    ctrl = control()
    with service.client() as c:
        ack = c.request(message(ctrl, fixture_bytes(name)))
    assert MANIFEST[name]["ack"] == "AA"
    assert msa(ack)[1:3] == ["AA", ctrl]
