"""Socket activation: the service adopts a listening socket passed the way systemd passes it (fd 3, LISTEN_*)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningService, fixture_bytes, segments, unique_control

SYSTEMD_ENDPOINT = "systemd:domain=INET:index=0"

# systemd hands the sockets over from fd 3 on and sets LISTEN_PID to the service's own pid, which is only
# known once the process exists: this wrapper moves the socket to fd 3, sets the variables, then execs
# (same pid) ``python -m hl7bridge ARGS``.
WRAPPER = """
import os, sys
fd = int(sys.argv[1])
if fd != 3:
    os.dup2(fd, 3)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.environ["LISTEN_FDNAMES"] = "hl7bridge.socket"
os.execv(sys.executable, [sys.executable, "-m", "hl7bridge", *sys.argv[2:]])
"""


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")}


def socket_activated(workdir: Path, listening: socket.socket) -> tuple[RunningService, str]:
    """Start ``serve`` on the systemd endpoint with ``listening`` passed in; returns it and its first stdout line."""
    database = workdir / "var" / "log.db"
    fd = listening.fileno()
    args = ["serve", "--database", f"sqlite:///{database}", "--listen", SYSTEMD_ENDPOINT]
    process = subprocess.Popen(
        [sys.executable, "-c", WRAPPER, str(fd), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
        env=clean_env(),
        pass_fds=(fd,),
    )
    line = process.stdout.readline()
    if "listening" not in line:
        process.kill()
        process.wait(timeout=10)
        raise AssertionError(f"service did not start: {line}{process.stderr.read()}")
    return RunningService(process, listening.getsockname()[1], database, None, workdir), line


@pytest.fixture(scope="module")
def activated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, str]]:
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    try:
        running, line = socket_activated(tmp_path_factory.mktemp("systemd"), listening)
    finally:
        listening.close()  # the service holds its own copy now
    yield running, line
    running.stop()


def test_service_adopts_the_socket_passed_by_systemd(activated: tuple[RunningService, str]) -> None:
    running, _ = activated
    ctrl = f"SD{uuid.uuid4().hex[:12].upper()}"
    payload = unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), ctrl)
    # The test created the socket and closed its copy: only the service can be answering on it.
    with BlockingClient("127.0.0.1", running.port, timeout=10) as c:
        ack = c.request(payload)
    assert segments(ack)["MSA"][1:3] == ["AA", ctrl]
    rows = [r for r in running.log() if r["control_id"] == ctrl]
    assert [(r["status"], r["listener"]) for r in rows] == [("accepted", "main")]


def test_service_reports_the_adopted_address(activated: tuple[RunningService, str]) -> None:
    running, line = activated
    assert f"MLLP listening on 127.0.0.1:{running.port};" in line


def _serve_without_listen_fds(tmp_path: Path) -> subprocess.CompletedProcess:
    database = f"sqlite:///{tmp_path}/log.db"
    return subprocess.run(
        [sys.executable, "-m", "hl7bridge", "serve", "--database", database, "--listen", SYSTEMD_ENDPOINT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(),
    )


def test_systemd_endpoint_without_listen_fds_exits_with_one_line(tmp_path: Path) -> None:
    result = _serve_without_listen_fds(tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("hl7bridge: ")
    assert SYSTEMD_ENDPOINT in lines[0]
    assert "listening" not in result.stdout


def test_systemd_endpoint_without_listen_fds_says_no_socket_was_passed(tmp_path: Path) -> None:
    result = _serve_without_listen_fds(tmp_path)
    line = result.stderr.strip().splitlines()[-1]
    assert "index out of range" not in line
    assert "systemd" in line.replace(SYSTEMD_ENDPOINT, "")
