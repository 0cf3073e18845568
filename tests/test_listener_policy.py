"""Connection policy of the real service: timeouts, connection limit, allowlist, fairness, duplicates.

One service runs several listeners, each with the one non-default setting its tests need.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hl7bridge.mllp.framing import frame
from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningService, fixture_bytes, free_port, segments, start_service, unique_control

BASE = fixture_bytes("siu/s12_epic_v251.hl7")
RUN = uuid.uuid4().hex[:8].upper()
_counter = itertools.count(1)
LISTENERS = {
    "main": "",
    "timeouts": "idle_timeout = 1\nframe_timeout = 1\n",
    "limited": "max_connections = 2\n",
    "denied": 'allow = ["10.0.0.0/8"]\n',
    "allowed": 'allow = ["127.0.0.0/8"]\n',
    "strict": "lenient_framing = false\nframe_timeout = 1\nidle_timeout = 0\n",
    "frames": "frame_timeout = 1\nidle_timeout = 0\n",
    "per_peer": "max_connections_per_peer = 2\n",
}


def control() -> str:
    return f"LP{RUN}{next(_counter):05d}"


def message(control_id: str) -> bytes:
    return unique_control(BASE, control_id)


def msa(ack: bytes) -> list[str]:
    return segments(ack)["MSA"]


@dataclass
class Policy:
    service: RunningService
    ports: dict[str, int]

    def connect(self, listener: str, timeout: float = 10.0) -> BlockingClient:
        return BlockingClient("127.0.0.1", self.ports[listener], timeout=timeout)


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Policy]:
    ports = {name: free_port() for name in LISTENERS}
    text = "".join(
        f'[listeners.{name}]\nendpoint = "tcp:{ports[name]}:interface=127.0.0.1"\n{extra}\n'
        for name, extra in LISTENERS.items()
    )
    running = start_service(tmp_path_factory.mktemp("policy"), text, listen=[])
    yield Policy(running, ports)
    running.stop()


def closed_by_server(sock: socket.socket) -> bool:
    """True when the peer closed (EOF or reset) before sending anything."""
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True


def test_idle_connection_is_closed_after_idle_timeout(policy: Policy) -> None:
    ctrl = control()
    with policy.connect("timeouts") as c:
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
        # Now send nothing: the server must close within a few seconds (idle_timeout = 1).
        c.sock.settimeout(8)
        assert c.sock.recv(65536) == b""


def test_started_but_unended_frame_is_closed_after_frame_timeout(policy: Policy) -> None:
    data = frame(message(control()))[:-2]  # never sends the end block
    with policy.connect("timeouts") as c:
        # Keep the connection busy (well inside idle_timeout) so only the frame timeout can fire.
        c.sock.settimeout(0.2)
        deadline = time.monotonic() + 8
        closed = False
        for i in range(len(data)):
            if time.monotonic() > deadline:
                break
            try:
                c.sock.send(data[i : i + 1])
                chunk = c.sock.recv(65536)
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            assert chunk == b"", f"unexpected answer to an unfinished frame: {chunk!r}"
            closed = True
            break
        assert closed, "the server kept a never-ending frame open past frame_timeout"
        # It was closed before the whole (slowly dribbled) frame could have been sent.
        assert i < len(data) - 1


def test_third_connection_is_refused_while_two_are_open(policy: Policy) -> None:
    first, second = policy.connect("limited"), policy.connect("limited")
    try:
        for c in (first, second):
            ctrl = control()
            assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
        with policy.connect("limited") as third:
            try:
                third.send(message(control()))
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert closed_by_server(third.sock)
        for c in (first, second):
            ctrl = control()
            assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
    finally:
        first.close()
        second.close()
    # Once a slot is free again, a new connection is served (the server may need a moment to notice).
    for _ in range(50):
        with policy.connect("limited") as again:
            ctrl = control()
            try:
                ack = again.request(message(ctrl))
            except (ConnectionError, OSError):
                time.sleep(0.05)
                continue
        assert msa(ack)[1:3] == ["AA", ctrl]
        break
    else:
        pytest.fail("no connection accepted after the two open ones were closed")


def test_allowlist_without_the_peer_closes_without_an_answer(policy: Policy) -> None:
    ctrl = control()
    with policy.connect("denied") as c:
        try:
            c.send(message(ctrl))
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_server(c.sock)
    assert ctrl not in {r["control_id"] for r in policy.service.log()}


def test_allowlist_with_the_peer_accepts(policy: Policy) -> None:
    ctrl = control()
    with policy.connect("allowed") as c:
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
    rows = [r for r in policy.service.log() if r["control_id"] == ctrl]
    assert [(r["listener"], r["status"]) for r in rows] == [("allowed", "accepted")]


def test_endless_dribbled_frame_does_not_stall_other_connections(policy: Policy) -> None:
    with policy.connect("main") as hostile, policy.connect("main") as good:
        hostile.sock.sendall(b"\x0bMSH|^~\\&|HOSTILE|X|||20270101||SIU^S12|H1|P|2.5.1\rNTE|1||")
        for _ in range(20):
            hostile.sock.sendall(b"x" * 512)
            ctrl = control()
            assert msa(good.request(message(ctrl)))[1:3] == ["AA", ctrl]
        # The hostile frame is still open and unanswered.
        hostile.sock.settimeout(0.05)
        with pytest.raises(TimeoutError):
            hostile.sock.recv(1)


def test_duplicate_gets_the_identical_ack_and_is_logged_once_as_duplicate(policy: Policy) -> None:
    ctrl = control()
    payload = message(ctrl)
    with policy.connect("main") as c:
        first = c.request(payload)
    with policy.connect("main") as c:
        second = c.request(payload)
    assert msa(first)[1:3] == ["AA", ctrl]
    assert second == first
    rows = sorted((r for r in policy.service.log() if r["control_id"] == ctrl), key=lambda r: r["id"])
    assert [r["status"] for r in rows] == ["accepted", "duplicate"]
    assert rows[1]["duplicate_of"] == rows[0]["id"]
    assert rows[1]["ack_code"] == "AA"


def test_strict_framing_drop_does_not_leave_the_frame_timer_running(policy: Policy) -> None:
    with policy.connect("strict") as c:
        c.sock.sendall(b"\x0b" + message(control()) + b"\x1cX")  # dropped: no 0x0D after 0x1C
        c.sock.settimeout(1.6)  # frame_timeout = 1, idle_timeout = 0 (never)
        try:
            data = c.sock.recv(65536)
        except TimeoutError:
            data = None
        assert data is None, "the connection was closed (or answered) after a dropped frame"
        c.sock.settimeout(10)
        ctrl = control()
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]


def test_strict_framing_answers_a_well_framed_message(policy: Policy) -> None:
    ctrl = control()
    with policy.connect("strict") as c:
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]


def test_duplicates_pipelined_in_one_write_get_the_original_ack(policy: Policy) -> None:
    ctrl = control()
    with policy.connect("main") as c:
        c.sock.sendall(frame(message(ctrl)) * 3)
        acks = [c.receive() for _ in range(3)]
    assert msa(acks[0])[1:3] == ["AA", ctrl]
    assert acks[1] == acks[0] and acks[2] == acks[0]
    rows = sorted((r for r in policy.service.log() if r["control_id"] == ctrl), key=lambda r: r["id"])
    assert [r["status"] for r in rows] == ["accepted", "duplicate", "duplicate"]
    assert {r["duplicate_of"] for r in rows[1:]} == {rows[0]["id"]}


def test_strict_framing_does_not_answer_before_seeing_the_cr(policy: Policy) -> None:
    bad, good = control(), control()
    with policy.connect("strict") as c:
        c.sock.sendall(b"\x0b" + message(bad) + b"\x1c")
        c.sock.settimeout(0.5)
        try:
            early = c.receive()
        except TimeoutError:
            early = None
        assert early is None, f"answered {msa(early)[1:3]} before the byte after 0x1C arrived"
        c.sock.settimeout(10)
        c.sock.sendall(b"X" + frame(message(good)))
        assert msa(c.receive())[1:3] == ["AA", good]


def _closed_within(sock: socket.socket, seconds: float, keep_sending: bytes, every: float = 0.3) -> bool:
    """Send ``keep_sending`` every ``every`` s until the server closes (True) or ``seconds`` pass (False)."""
    deadline = time.monotonic() + seconds
    sock.settimeout(every)
    while time.monotonic() < deadline:
        try:
            sock.send(keep_sending)
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return True
    return False


def test_junk_bytes_outside_a_frame_do_not_hold_the_idle_timer(policy: Policy) -> None:
    with policy.connect("timeouts") as c:  # idle_timeout = 1
        # 30 s for a 1 s timeout: a timer that the bytes restart keeps it open the whole time, however loaded.
        assert _closed_within(c.sock, 30, b"\r"), "a CR every 0.3 s kept the connection open past idle_timeout"


def test_abandoned_starts_do_not_restart_the_frame_clock(policy: Policy) -> None:
    with policy.connect("frames") as c:  # frame_timeout = 1, idle_timeout = 0 (never)
        assert _closed_within(c.sock, 30, b"\x0bMSH|"), "a fresh start block every 0.3 s defeated frame_timeout"


def test_an_answered_sender_is_not_idle_while_it_sends_messages(policy: Policy) -> None:
    with policy.connect("timeouts") as c:  # idle_timeout = 1: messages 0.5 s apart keep it open
        for _ in range(6):
            ctrl = control()
            assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
            time.sleep(0.5)


def _from(address: str, port: int) -> BlockingClient:
    """A client whose source address is another loopback address: another peer, as the listener sees it."""
    client = BlockingClient.__new__(BlockingClient)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(address, 0))
    client.sock, client._buffer = sock, bytearray()
    return client


def test_one_peer_cannot_take_every_connection(policy: Policy) -> None:
    port = policy.ports["per_peer"]  # max_connections_per_peer = 2
    held = [policy.connect("per_peer") for _ in range(2)]
    try:
        for c in held:
            ctrl = control()
            assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
        for _ in range(5):
            with policy.connect("per_peer") as extra:
                assert closed_by_server(extra.sock)
        with _from("127.0.0.2", port) as other:  # another peer still gets in
            ctrl = control()
            assert msa(other.request(message(ctrl)))[1:3] == ["AA", ctrl]
    finally:
        for c in held:
            c.close()


def _tcp_timer(local_port: int, remote_port: int) -> tuple[int, float] | None:
    """The kernel's timer on the server's side of a loopback connection: (kind, seconds left)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, timer = fields[1], fields[2], fields[5]
            if int(local.split(":")[1], 16) == local_port and int(remote.split(":")[1], 16) == remote_port:
                kind, when = timer.split(":")
                return int(kind, 16), int(when, 16) / os.sysconf("SC_CLK_TCK")
    return None


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp")
def test_accepted_connections_use_tcp_keepalive(policy: Policy) -> None:
    with policy.connect("main") as c:
        ctrl = control()
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
        time.sleep(0.3)  # let the ACK's delayed-ack timer pass
        timer = _tcp_timer(policy.ports["main"], c.sock.getsockname()[1])
    assert timer is not None
    kind, left = timer
    assert kind == 2 and 0 < left <= 60, f"no keep-alive timer on the server's socket: {timer}"


def test_refusals_are_logged_once_per_peer_not_per_connection(tmp_path: Path) -> None:
    port = free_port()
    config = f'[listeners.main]\nendpoint = "tcp:{port}:interface=127.0.0.1"\nmax_connections_per_peer = 1\n'
    running = start_service(tmp_path, config, listen=[], port=port)
    try:
        with running.client() as held:
            ctrl = control()
            assert msa(held.request(message(ctrl)))[1:3] == ["AA", ctrl]
            for _ in range(50):
                with running.client() as extra:
                    assert closed_by_server(extra.sock)
    finally:
        stderr = running.stop()
    lines = [line for line in stderr.splitlines() if "refused connection" in line]
    assert len(lines) == 1, lines
    assert "from 127.0.0.1 on main" in lines[0] and "max_connections_per_peer" in lines[0]
