"""Descriptors and the health port: a capped health listener, and fd exhaustion that shows in /healthz and
the log (once, not per connection) and passes when the descriptors come back."""

from __future__ import annotations

import contextlib
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from twisted.logger import Logger

from hl7bridge.core.logs import twisted_observer
from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningService, fixture_bytes, free_port, segments, start_service, unique_control

BASE = fixture_bytes("siu/s12_epic_v251.hl7")
FD_LIMIT = 100


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    response = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    return response.status_code, response.json()


def wait_for(check: Callable[[], Any], seconds: float, what: str) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, OSError):
            if result := check():
                return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def closed_by_server(sock: socket.socket, wait: float = 5.0) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def start(
    tmp_path: Path, health_extra: str = "", listener_extra: str = "", **kwargs: Any
) -> tuple[RunningService, int]:
    port, health = free_port(), free_port()
    config = (
        f'[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n{health_extra}\n'
        f'[listeners.main]\nendpoint = "tcp:{port}:interface=127.0.0.1"\n{listener_extra}\n'
    )
    return start_service(tmp_path, config, listen=[], port=port, **kwargs), health


def test_health_port_connections_are_capped(tmp_path: Path) -> None:
    running, health = start(tmp_path, "max_connections = 2")
    try:
        held = [socket.create_connection(("127.0.0.1", health), timeout=10) for _ in range(2)]
        extra = socket.create_connection(("127.0.0.1", health), timeout=10)
        assert closed_by_server(extra), "a third idle connection to the health port was kept open"
        extra.close()
        for sock in held:
            sock.close()
        status, _body = wait_for(lambda: healthz(health), 10, "/healthz once the held connections closed")
        assert status == 200
    finally:
        stderr = running.stop()
    assert "refused connection from 127.0.0.1 on health: 2 connections open (limit)" in stderr


def _low_descriptor_limit() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def test_descriptor_exhaustion_fails_healthz_and_is_logged_once_then_recovers(tmp_path: Path) -> None:
    running, health = start(
        tmp_path, listener_extra="max_connections_per_peer = 1000", preexec_fn=_low_descriptor_limit
    )
    #: None: the connection was reset while connecting (the service, out of descriptors, refused it already).
    crowd: list[socket.socket | None] = []
    try:
        assert healthz(health)[0] == 200
        with BlockingClient("127.0.0.1", running.port, timeout=10) as first:
            for _ in range(FD_LIMIT + 20):  # more than the service has descriptors for
                try:
                    crowd.append(socket.create_connection(("127.0.0.1", running.port), timeout=10))
                except ConnectionResetError:
                    crowd.append(None)
            _status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(healthz(health)), 10, "503")
            assert "descriptors" in body["failing"], body
            assert "descriptors" in body["checks"]["descriptors"]["detail"]
            # What was accepted before still works.
            payload = unique_control(BASE, f"FD{time.monotonic_ns()}"[:20])
            assert segments(first.request(payload))["MSA"][1] == "AA"
        refused = sum(1 for sock in crowd[-20:] if sock is None or closed_by_server(sock, 2.0))
        assert refused == 20, f"only {refused} of the last 20 connections were refused"
        for sock in filter(None, crowd):
            sock.close()
        crowd.clear()
        wait_for(lambda: healthz(health)[0] == 200, 30, "/healthz to pass once the connections closed")
        with BlockingClient("127.0.0.1", running.port, timeout=10) as again:
            payload = unique_control(BASE, f"FD{time.monotonic_ns()}"[:20])
            assert segments(again.request(payload))["MSA"][1] == "AA"
        time.sleep(1.5)  # the watch checks once a second and logs the recovery then
    finally:
        for sock in filter(None, crowd):
            sock.close()
        stderr = running.stop()
    assert "Traceback" not in stderr
    assert stderr.count("out of file descriptors:") == 1, stderr
    assert stderr.count("file descriptors available again") == 1, stderr
    assert stderr.count("refused connection from 127.0.0.1 on main: out of file descriptors") == 1, stderr


def test_twisted_out_of_descriptors_failure_is_one_warning_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Twisted's accept, out of descriptors, logs a failure when it cannot re-reserve its spare descriptor (CI saw
    its traceback once in the exhaustion test above): the service's bridge makes it one warning line naming the
    error; any other failure keeps its traceback."""
    twisted = Logger(namespace="twisted.internet.tcp", observer=twisted_observer())
    with caplog.at_level(logging.INFO, logger="twisted"):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError:
            twisted.failure("Could not re-reserve EMFILE recovery file descriptor.")
        try:
            raise ValueError("a bug")
        except ValueError:
            twisted.failure("Unhandled error")
    out_of, bug = caplog.records
    assert out_of.levelno == logging.WARNING and out_of.exc_info is None
    assert (
        out_of.getMessage() == "Could not re-reserve EMFILE recovery file descriptor. ([Errno 24] Too many open files)"
    )
    assert bug.exc_info is not None and bug.levelno == logging.CRITICAL
