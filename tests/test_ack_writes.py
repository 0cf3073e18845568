"""ACKs go straight to the socket while nothing is queued; when the kernel takes only part of one (a sender
that does not read), the rest and every later ACK of that connection queue in Twisted, whole and in order.

The service gets its listening socket as systemd passes it, with a small send buffer that the accepted
connection inherits, so the kernel surely takes only part of the ACKs.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hl7bridge.mllp.framing import frame
from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningService, fixture_bytes, segments, unique_control
from tests.test_systemd_socket import socket_activated

BASE = fixture_bytes("siu/s12_epic_v251.hl7")
COUNT = 3000


@pytest.fixture
def small_send_buffer(tmp_path: Path) -> Iterator[RunningService]:
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    try:
        running, _line = socket_activated(tmp_path, listening)
    finally:
        listening.close()
    yield running
    running.stop()


def test_acks_that_fill_the_socket_arrive_whole_and_in_order(small_send_buffer: RunningService) -> None:
    service = small_send_buffer
    with socket.socket() as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window: the service's sends fill up
        raw.settimeout(20)
        raw.connect(("127.0.0.1", service.port))
        ids = [f"PART{n:05d}" for n in range(COUNT)]
        payload = b"".join(frame(unique_control(BASE, control)) for control in ids)
        sender = threading.Thread(target=raw.sendall, args=(payload,))
        sender.start()
        time.sleep(2.0)  # ACKs pile up unread, beyond what the kernel buffers take
        client = BlockingClient.__new__(BlockingClient)
        client.sock, client._buffer = raw, bytearray()
        answers = [segments(ack)["MSA"] for _, ack in zip(ids, client.frames(), strict=False)]
        sender.join(timeout=30)
    assert [(a[1], a[2]) for a in answers] == [("AA", control) for control in ids]
