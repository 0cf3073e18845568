"""Shared test fixtures: the real service in a subprocess, on loopback, with a real SQLite file."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from hl7bridge.testing.client import BlockingClient

from .pg import any_service, database_url, own_postgres, postgres, postgres_url  # noqa: F401 - fixtures for every module

ROOT = Path(__file__).resolve().parent.parent
#: The example configuration as a test service runs it: its fixed health and console ports are off, so that
#: tests (and a `make run` beside them) never compete for them.
EXAMPLE_SERVED = (
    (ROOT / "config" / "hl7bridge.example.toml")
    .read_text(encoding="utf-8")
    .replace('listen = "tcp:9102:interface=127.0.0.1"', 'listen = ""')
    .replace('listen = "tcp:8081:interface=127.0.0.1"', 'listen = ""')
)
FIXTURES = ROOT / "fixtures"
MANIFEST: dict = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningService:
    """A ``hl7bridge serve`` subprocess and where to reach it."""

    process: subprocess.Popen
    port: int
    database: Path
    config: Path | None
    workdir: Path
    #: The start-up line on stdout (where it listens, logs, and dispatches).
    banner: str = ""
    #: The log's URL when it is not the SQLite file ``database`` (PostgreSQL).
    database_url: str | None = None

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{self.database}"

    def client(self, timeout: float = 10.0) -> BlockingClient:
        return BlockingClient("127.0.0.1", self.port, timeout=timeout)

    def request(self, payload: bytes) -> bytes:
        with self.client() as c:
            return c.request(payload)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hl7bridge", *args]
        if args and args[0] in ("log", "purge", "stats", "replay"):
            cmd += ["--database", self.url]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=self.workdir)
        if check and result.returncode != 0:
            raise AssertionError(f"{cmd} exited {result.returncode}: {result.stderr}")
        return result

    def log(self, *args: str) -> list[dict]:
        return json.loads(self.cli("log", "list", "--json", "--limit", "100000", *args).stdout)["messages"]

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.stderr.read() if self.process.stderr else ""


def start_service(
    workdir: Path,
    config_text: str | None = None,
    listen: list[str] | None = None,
    env: dict[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
    port: int | None = None,
    extra: list[str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
    log_url: str | None = None,
) -> RunningService:
    """``log_url``: the log elsewhere than ``workdir/var/log.db`` (a PostgreSQL database)."""
    port = port or free_port()
    database = workdir / "var" / "log.db"
    if log_url and log_url.startswith("sqlite:"):
        database, log_url = Path(log_url.removeprefix("sqlite:///")), None
    cmd = [sys.executable, "-m", "hl7bridge", "serve", "--database", log_url or f"sqlite:///{database}"]
    config = None
    if config_text is not None:
        config = workdir / "hl7bridge.toml"
        config.write_text(config_text, encoding="utf-8")
        cmd += ["--config", str(config)]
    for endpoint in listen if listen is not None else [f"tcp:{port}:interface=127.0.0.1"]:
        cmd += ["--listen", endpoint]
    cmd += extra or []
    process = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        pass_fds=pass_fds,
        preexec_fn=preexec_fn,
    )
    line = process.stdout.readline()
    if "listening" not in line:
        process.wait(timeout=10)
        raise AssertionError(f"service did not start: {line}{process.stderr.read()}")
    return RunningService(process, port, database, config, workdir, line, database_url=log_url)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    """One service per test module (default settings, UTC feed zone)."""
    running = start_service(tmp_path_factory.mktemp("svc"))
    yield running
    running.stop()


@pytest.fixture
def fresh_service(tmp_path: Path) -> Iterator[RunningService]:
    running = start_service(tmp_path)
    yield running
    running.stop()


def fixture_bytes(relative: str) -> bytes:
    return (FIXTURES / relative).read_bytes()


def segments(payload: bytes, charset: str = "utf-8") -> dict[str, list[str]]:
    """ACK segments by name, split on the field separator."""
    text = payload.decode(charset, errors="replace")
    out: dict[str, list[str]] = {}
    for line in filter(None, text.replace("\n", "\r").split("\r")):
        sep = line[3] if len(line) > 3 else "|"
        fields = line.split(sep)
        if fields[0] in ("MSH", "BHS", "FHS"):
            fields.insert(1, sep)
        out.setdefault(fields[0], fields)
    return out


def with_msh(payload: bytes, **fields: str) -> bytes:
    """The same message with MSH fields replaced, by number (``msh4="OTHER"`` sets MSH-4)."""
    text = payload.decode("latin-1")
    head, sep, rest = text.partition("\r")
    sep_char = head[3]
    parts = head.split(sep_char)
    for name, value in fields.items():
        parts[int(name.removeprefix("msh")) - 1] = value
    return (sep_char.join(parts) + sep + rest).encode("latin-1")


def unique_control(payload: bytes, control_id: str) -> bytes:
    """The same message under another MSH-10."""
    return with_msh(payload, msh10=control_id)


@dataclass
class RunningSandbox:
    """A ``hl7bridge sandbox`` subprocess: the Journeys API emulator, reached over real HTTP.

    ``get`` and ``post`` reach its ``/_sandbox/`` controls with the control token it wrote at start."""

    process: subprocess.Popen
    port: int
    control_token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.control_token}"}

    def get(self, path: str) -> object:
        return requests.get(self.url + path, headers=self.control, timeout=10).json()

    def post(self, path: str, body: object) -> object:
        return requests.post(self.url + path, json=body, headers=self.control, timeout=10).json()

    def instances(self, **criteria: str) -> list[dict]:
        found = self.get("/_sandbox/instances")
        return [i for i in found if all(i["parameters"].get(k) == v for k, v in criteria.items())]

    def calls(self, kind: str | None = None) -> list[dict]:
        calls = self.get("/_sandbox/calls")
        if kind is None:
            return calls
        return [c for c in calls if c["path"].endswith("/" + kind) or (kind == "execution" and c["method"] == "DELETE")]

    def faults(self, **faults: object) -> object:
        return self.post("/_sandbox/faults", faults)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_sandbox(workdir: Path, config_text: str, port: int | None = None) -> RunningSandbox:
    port = port or free_port()
    config = workdir / "sandbox.toml"
    config.write_text(config_text, encoding="utf-8")
    cmd = [sys.executable, "-m", "hl7bridge", "sandbox", "--config", str(config),
           "--listen", f"tcp:{port}:interface=127.0.0.1"]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir)
    line = process.stdout.readline()
    if "sandbox" not in line:
        process.wait(timeout=10)
        raise AssertionError(f"sandbox did not start: {line}{process.stderr.read()}")
    return RunningSandbox(process, port, control_token(workdir))


def control_token(workdir: Path) -> str:
    """The sandbox control token that a sandbox started in ``workdir`` wrote (``sandbox.control_token_file``)."""
    return (workdir / "var" / "sandbox-control.token").read_text(encoding="utf-8").strip()


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, message: str = "condition"):
    """Poll until ``predicate()`` is truthy; return its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)
