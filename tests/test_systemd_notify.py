"""sd_notify and the watchdog against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet.task import Clock

from hl7bridge.ops import systemd

WATCHDOG_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in WATCHDOG_VARS:
        monkeypatch.delenv(name, raising=False)


def _short_dir(tmp_path: Path) -> Path:
    # sun_path holds 108 bytes; pytest's tmp_path can be longer for long test names.
    if len(str(tmp_path / "notify")) < 100:
        return tmp_path
    return Path(tempfile.mkdtemp(prefix="sdn-"))


@pytest.fixture
def systemd_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, named by NOTIFY_SOCKET, as systemd's would be."""
    path = _short_dir(tmp_path) / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def received(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on the socket (sends are synchronous, so all are there already)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return out


# --- notify and its helpers -----------------------------------------------------------------------


def test_notify_sends_the_state_as_one_datagram(systemd_socket: socket.socket) -> None:
    assert systemd.notify("READY=1\nSTATUS=up") is True
    assert systemd_socket.recv(4096) == b"READY=1\nSTATUS=up"


def test_ready_stopping_status_and_watchdog_send_the_exact_datagrams(systemd_socket: socket.socket) -> None:
    assert systemd.ready()
    assert systemd.ready("MLLP on 127.0.0.1:2575")
    assert systemd.stopping()
    assert systemd.stopping("Stopping: answering what was received")
    assert systemd.status("Dispatching to https://api.example")
    assert systemd.watchdog_ping()
    assert received(systemd_socket) == [
        b"READY=1",
        b"READY=1\nSTATUS=MLLP on 127.0.0.1:2575",
        b"STOPPING=1",
        b"STOPPING=1\nSTATUS=Stopping: answering what was received",
        b"STATUS=Dispatching to https://api.example",
        b"WATCHDOG=1",
    ]


def test_status_is_kept_on_one_line(systemd_socket: socket.socket) -> None:
    # A newline in the text must not smuggle in another assignment such as READY=1.
    assert systemd.status("database:\n  locked\nREADY=1")
    assert systemd_socket.recv(4096) == b"STATUS=database: locked READY=1"


def test_status_is_capped_below_systemds_buffer(systemd_socket: socket.socket) -> None:
    assert systemd.status("x" * 10_000)
    datagram = systemd_socket.recv(65536)
    assert datagram.startswith(b"STATUS=xxx")
    assert len(datagram) < 4096


def test_abstract_namespace_address(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"hl7bridge-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_unset_or_empty_notify_socket_is_a_no_op() -> None:
    assert systemd.notify("READY=1") is False
    assert systemd.ready() is False
    assert systemd.stopping() is False
    assert systemd.status("x") is False
    assert systemd.watchdog_ping() is False


def test_empty_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert systemd.notify("READY=1") is False


def test_nobody_listening_returns_false_without_raising(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(_short_dir(tmp_path) / "gone"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@hl7bridge-nobody-" + uuid.uuid4().hex)
    assert systemd.watchdog_ping() is False


def test_unsupported_address_kinds_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # systemd >= 254 in VMs; not supported here
    assert systemd.notify("READY=1") is False


# --- watchdog_interval --------------------------------------------------------------------------


def test_watchdog_interval_is_none_when_unset() -> None:
    assert systemd.watchdog_interval() is None


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_USEC", "1500")
    assert systemd.watchdog_interval() == pytest.approx(0.00075)


def test_watchdog_interval_with_our_own_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0


def test_watchdog_interval_meant_for_another_process_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_PID", "not-a-pid")
    assert systemd.watchdog_interval() is None


@pytest.mark.parametrize("value", ["", "0", "-30000000", "30s", "3.5e7"])
def test_watchdog_interval_rejects_bad_values(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", value)
    assert systemd.watchdog_interval() is None


# --- Watchdog -------------------------------------------------------------------------------------


class Health:
    def __init__(self) -> None:
        self.ok = True
        self.calls = 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.ok


def test_watchdog_pings_while_healthy(systemd_socket: socket.socket) -> None:
    clock, health = Clock(), Health()
    dog = systemd.Watchdog(clock, health, 15.0)
    assert dog.start() is True
    assert received(systemd_socket) == [b"WATCHDOG=1"]  # at once, not only after the first interval
    clock.advance(15)
    clock.advance(15)
    assert received(systemd_socket) == [b"WATCHDOG=1", b"WATCHDOG=1"]
    assert health.calls == 3
    dog.stop()


def test_watchdog_stops_pinging_when_unhealthy_says_why_and_resumes(systemd_socket: socket.socket) -> None:
    clock, health = Clock(), Health()
    dog = systemd.Watchdog(clock, health, 15.0, describe=lambda: "database: no successful write for 40 s")
    dog.start()
    received(systemd_socket)
    health.ok = False
    clock.advance(15)
    assert received(systemd_socket) == [
        b"STATUS=Unhealthy: database: no successful write for 40 s; watchdog keep-alives stopped"
    ]
    assert dog.pinging is False
    clock.advance(15)
    clock.advance(15)
    assert received(systemd_socket) == []  # silence: systemd's WatchdogSec runs out and it restarts us
    health.ok = True
    clock.advance(15)
    assert received(systemd_socket) == [b"WATCHDOG=1\nSTATUS=Healthy again; watchdog keep-alives resumed"]
    clock.advance(15)
    assert received(systemd_socket) == [b"WATCHDOG=1"]
    dog.stop()


def test_watchdog_without_describe_gives_a_generic_reason(systemd_socket: socket.socket) -> None:
    clock, health = Clock(), Health()
    health.ok = False
    dog = systemd.Watchdog(clock, health, 10.0)
    dog.start()
    assert received(systemd_socket) == [b"STATUS=Unhealthy: health check failed; watchdog keep-alives stopped"]
    dog.stop()


def test_a_health_check_that_raises_counts_as_unhealthy(systemd_socket: socket.socket) -> None:
    def broken() -> bool:
        raise RuntimeError("probe exploded")

    clock = Clock()
    dog = systemd.Watchdog(clock, broken, 10.0)
    dog.start()
    assert received(systemd_socket) == [
        b"STATUS=Unhealthy: the health check raised RuntimeError: probe exploded; watchdog keep-alives stopped"
    ]
    clock.advance(10)
    assert received(systemd_socket) == []
    assert dog.running  # the timer survives the exception
    dog.stop()


def test_watchdog_stop_ends_the_pings(systemd_socket: socket.socket) -> None:
    clock = Clock()
    dog = systemd.Watchdog(clock, Health(), 15.0)
    dog.start()
    dog.stop()
    dog.stop()  # twice is fine
    assert not dog.running
    received(systemd_socket)
    clock.advance(60)
    assert received(systemd_socket) == []
    assert clock.getDelayedCalls() == []


def test_watchdog_interval_defaults_to_systemds(systemd_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    clock = Clock()
    dog = systemd.Watchdog(clock, Health())
    assert dog.interval == 15.0
    assert dog.start()
    clock.advance(14.9)
    assert received(systemd_socket) == [b"WATCHDOG=1"]
    clock.advance(0.1)
    assert received(systemd_socket) == [b"WATCHDOG=1"]
    dog.stop()


def test_watchdog_does_nothing_when_systemd_set_no_watchdog() -> None:
    clock = Clock()
    dog = systemd.Watchdog(clock, Health())
    assert dog.interval is None
    assert dog.start() is False
    assert not dog.running
    assert clock.getDelayedCalls() == []
    dog.stop()


# --- MemoryDenyWriteExecute ---------------------------------------------------------------------

PR_SET_MDWE_CHILD = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN (Linux >= 6.3)
    print("unsupported")
    sys.exit(0)
from hl7bridge.ops import systemd
print(systemd.write_execute_memory_allowed())
"""


def test_write_execute_memory_is_allowed_here() -> None:
    assert systemd.write_execute_memory_allowed() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_MDWE is Linux-only")
def test_write_execute_memory_refused_under_mdwe() -> None:
    # The kernel's own form of MemoryDenyWriteExecute=yes, in a child so this process keeps W+X.
    out = subprocess.run([sys.executable, "-c", PR_SET_MDWE_CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "unsupported":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
    assert out.stdout.strip() == "False"
