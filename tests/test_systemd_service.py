"""The running service speaks the sd_notify protocol to a real NOTIFY_SOCKET: READY, watchdog, STOPPING."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

from .conftest import start_service, wait_until


def test_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    received: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                return received

    try:
        service = start_service(tmp_path, env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000"})
        wait_until(lambda: any("READY=1" in m for m in drain()), message="READY=1")
        ready = next(m for m in received if "READY=1" in m)
        assert "STATUS=hl7bridge" in ready and "MLLP listening" in ready
        wait_until(lambda: sum(m == "WATCHDOG=1" for m in drain()) >= 3, timeout=10, message="three keep-alives")
        service.process.send_signal(signal.SIGTERM)
        service.process.wait(timeout=20)
        assert service.process.returncode == 0
        assert any(m.startswith("STOPPING=1") for m in drain())
    finally:
        sock.close()
