"""Interoperability: third-party MLLP senders against a live ``hl7bridge serve`` over loopback.

Each test starts its own bridge (fresh SQLite log, free port), has one sender deliver the same
fixtures (an S12, an S15, an S12 whose last segment lacks its CR, and two that must be refused:
AE for a missing start time, AR for a non-SIU message), and then checks

* what the sender's library reports: MSH-9 is an ACK, MSA-1 is the manifest's code, MSA-2 is
  the message's MSH-10;
* the ACK bytes themselves, as they went over the wire, with two independent parsers: python-hl7
  (``hl7.parse``) and hl7apy (``parse_message`` at STRICT level, plus ``validate()``);
* that the bridge answered each message exactly once and sent nothing else;
* that ``hl7bridge log list --json`` holds each message exactly once, with the same ACK code.

A bridge per test, not one per session: the bridge drops duplicates (same MSH-3/4/10) by resending
the first ACK, so a shared instance would only show the first sender's messages being processed.

The JavaScript senders run through small drivers in ``js/`` (``node js/send_X.mjs HOST PORT
FILE...``, one JSON report on stdout, including the exact bytes on the library's socket). Their
packages are pinned in ``package.json``/``package-lock.json`` and installed by ``make
interop-deps`` (see ``interop.mk``); the JavaScript tests skip when ``node_modules`` is missing. The
``mllp-https`` gateway is a PyPI package in ``.[test]``: its test skips only when it is not installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import inspect
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import hl7
import pytest
from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FIXTURES = ROOT / "fixtures"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text(encoding="utf-8"))
JS = HERE / "js"
NODE_MODULES = HERE / "node_modules"
BIN = Path(sys.executable).parent

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 20.0
SENDER_TIMEOUT = 60.0

needs_node_modules = pytest.mark.skipif(
    not NODE_MODULES.is_dir(),
    reason=f"{NODE_MODULES} is missing: install the interop senders with `make interop-deps` "
    "(npm ci --prefix tests/interop)",
)

needs_mllp_https = pytest.mark.skipif(
    not (BIN / "http2mllp").exists(),
    reason=f"{BIN / 'http2mllp'} is missing: pip install -e '.[test]' (it brings mllp-https)",
)


# --- fixtures and expectations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    raw: bytes
    control_id: str
    ack: str
    message_type: str

    @property
    def accepted(self) -> bool:
        return self.ack in ("AA", "CA")


def load_case(name: str) -> Case:
    path = FIXTURES / name
    raw = path.read_bytes()
    entry = MANIFEST[name]
    msh = re.split(rb"\r\n|\r|\n", raw, maxsplit=1)[0].decode("latin-1")
    control_id = msh.split(msh[3])[9]
    assert control_id == entry["control_id"], f"{name}: MSH-10 {control_id!r} differs from the manifest"
    return Case(name, path, raw, control_id, entry["ack"], entry["message_type"])


CASES = [
    load_case("siu/s12_epic_v251.hl7"),
    load_case("siu/s15_epic_v251_canceled.hl7"),
    load_case("siu/s12_athena_v25_no_final_terminator.hl7"),
    load_case("malformed/s12_no_start_v251.hl7"),
    load_case("malformed/adt_a01_v251.hl7"),
]


def test_cases_cover_what_the_interop_tests_promise() -> None:
    events = {c.message_type for c in CASES}
    assert {"SIU^S12", "SIU^S15"} <= events
    assert any(not c.raw.endswith(CR) for c in CASES), "a fixture whose last segment lacks its CR"
    assert {c.ack for c in CASES} >= {"AA", "AE", "AR"}
    # The promise holds only if every sender sends them all: each test that starts a bridge checks its log.
    senders = [
        f for name, f in globals().items() if name.startswith("test_") and "bridge" in inspect.signature(f).parameters
    ]
    assert len(senders) >= 8, senders
    unchecked = [f.__name__ for f in senders if "check_log(bridge" not in inspect.getsource(f)]
    assert unchecked == [], f"these sender tests never check that every case was logged: {unchecked}"


# --- the bridge ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def hl7bridge_command() -> list[str]:
    script = BIN / "hl7bridge"
    return [str(script)] if script.exists() else [sys.executable, "-m", "hl7bridge"]


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "HL7BRIDGE_CONFIG"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Bridge:
    port: int
    database: str
    proc: subprocess.Popen
    stderr_path: Path
    host: str = HOST

    def log(self) -> list[dict]:
        out = subprocess.run(
            [*hl7bridge_command(), "log", "list", "--json", "--limit", "500", "--database", self.database],
            capture_output=True,
            timeout=30,
            env=clean_env(),
            check=False,
        )
        assert out.returncode == 0, f"hl7bridge log list failed: {out.stderr.decode(errors='replace')}"
        return json.loads(out.stdout)["messages"]

    def wait_for_log(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.log()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.1)

    def service_log(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def assert_healthy(self) -> None:
        assert self.proc.poll() is None, f"hl7bridge exited ({self.proc.returncode}):\n{self.service_log()}"
        bad = [line for line in self.service_log().splitlines() if " ERROR " in line or "Traceback" in line]
        assert not bad, "hl7bridge logged errors:\n" + "\n".join(bad)


def _pump(stream: IO[bytes], lines: queue.Queue[bytes]) -> None:
    with stream:
        for line in iter(stream.readline, b""):
            lines.put(line)


def start_bridge(workdir: Path) -> Bridge:
    last_error = ""
    for attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        database = f"sqlite:///{workdir / f'bridge{attempt}.db'}"
        stderr_path = workdir / f"bridge{attempt}.stderr"
        cmd = [*hl7bridge_command(), "serve", "--listen", f"tcp:{port}:interface={HOST}", "--database", database]
        with stderr_path.open("wb") as stderr:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=clean_env())
        lines: queue.Queue[bytes] = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            if b"MLLP listening on" in line:
                return Bridge(port, database, proc, stderr_path)
        stop_process(proc)
        last_error = stderr_path.read_text(errors="replace")
    raise RuntimeError(f"hl7bridge did not start:\n{last_error}")


def stop_process(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds. A piped stdout is left to its reader thread,
    which sees end-of-file once the process is gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[Bridge]:
    b = start_bridge(tmp_path)
    try:
        yield b
    finally:
        stop_process(b.proc)


# --- checks ----------------------------------------------------------------------------------------


def mllp_frames(stream: bytes) -> tuple[list[bytes], bytes]:
    """The payloads of the complete ``VT payload FS CR`` frames in a byte stream, and what is left."""
    frames = []
    rest = stream
    while rest.startswith(VT):
        end = rest.find(FS + CR)
        if end < 0:
            break
        frames.append(rest[1:end])
        rest = rest[end + 2 :]
    return frames, rest


def msh_field(payload: bytes, n: int) -> str:
    msh = re.split(rb"\r\n|\r|\n", payload.lstrip(), maxsplit=1)[0].decode("latin-1")
    if not msh.startswith("MSH") or len(msh) < 4:
        return ""
    fields = ["MSH", msh[3], *msh[4:].split(msh[3])]
    return fields[n] if n < len(fields) else ""


def check_ack(payload: bytes, case: Case, where: str) -> None:
    """One ACK, checked with python-hl7 and, independently, with hl7apy at STRICT level."""
    text = payload.decode("utf-8")
    what = f"{where}: ACK for {case.name} ({text!r})"

    msg = hl7.parse(text)
    assert str(msg.segment("MSH")[9]).startswith("ACK"), f"python-hl7 MSH-9, {what}"
    msa = msg.segment("MSA")
    assert str(msa[1]) == case.ack, f"python-hl7 MSA-1 is {str(msa[1])!r}, expected {case.ack!r}: {what}"
    assert str(msa[2]) == case.control_id, f"python-hl7 MSA-2 is {str(msa[2])!r}: {what}"

    strict = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
    assert strict.name == "ACK", f"hl7apy structure {strict.name}: {what}"
    assert strict.msh.msh_9.to_er7().startswith("ACK"), f"hl7apy MSH-9: {what}"
    assert strict.msa.msa_1.to_er7() == case.ack, f"hl7apy MSA-1: {what}"
    assert strict.msa.msa_2.to_er7() == case.control_id, f"hl7apy MSA-2: {what}"
    assert strict.validate(), f"hl7apy strict validation: {what}"


def check_log(bridge: Bridge, extra: Sequence[Case] = (), client_ack_ids: Sequence[str] = ()) -> list[dict]:
    """Each of CASES (and ``extra``) logged exactly once with its ACK code; ACKs from the sender logged, unanswered.

    Always every case: a sender test that sends fewer than the promised cases fails here."""
    cases = [*CASES, *extra]
    rows = bridge.wait_for_log(len(cases) + len(client_ack_ids))
    messages = [r for r in rows if r["message_type"] != "ACK"]
    acks = [r for r in rows if r["message_type"] == "ACK"]
    summary = json.dumps(rows, indent=1)
    assert len(messages) == len(cases), f"expected {len(cases)} logged messages:\n{summary}"
    for case in cases:
        found = [r for r in messages if r["control_id"] == case.control_id]
        assert len(found) == 1, f"{case.name}: {len(found)} log rows with control id {case.control_id}:\n{summary}"
        row = found[0]
        assert row["ack_code"] == case.ack, f"{case.name}: logged ACK code {row['ack_code']}:\n{summary}"
        assert row["status"] == ("accepted" if case.accepted else "rejected"), f"{case.name}:\n{summary}"
        assert row["duplicate_of"] is None, f"{case.name}:\n{summary}"
        assert f"{row['message_type']}^{row['event']}" == case.message_type, f"{case.name}:\n{summary}"
    assert sorted(r["control_id"] for r in acks) == sorted(client_ack_ids), f"ACK rows:\n{summary}"
    for row in acks:
        assert row["status"] == "ignored" and row["ack_code"] is None, f"an ACK was answered:\n{summary}"
    return rows


@contextlib.contextmanager
def showing(dump: str) -> Iterator[None]:
    """Append the bytes that went over the wire to any assertion failure."""
    try:
        yield
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- what went over the wire ---\n{dump}") from None


@dataclass
class Wire:
    """A wire capture: chunks in order, per connection."""

    records: list[tuple[int, str, bytes]] = field(default_factory=list)

    @classmethod
    def from_json(cls, records: list[dict]) -> Wire:
        return cls([(r["conn"], r["dir"], base64.b64decode(r["b64"])) for r in records])

    def stream(self, direction: str) -> list[tuple[int, bytes]]:
        conns: dict[int, bytearray] = {}
        for conn, d, data in self.records:
            if d == direction:
                conns.setdefault(conn, bytearray()).extend(data)
        return [(c, bytes(b)) for c, b in sorted(conns.items())]

    def dump(self) -> str:
        arrow = {"out": "sender >>> bridge", "in": "sender <<< bridge"}
        return "\n".join(f"conn {c} {arrow[d]} {data!r}" for c, d, data in self.records) or "(nothing)"


def check_wire(wire: Wire, cases: Sequence[Case], where: str) -> list[bytes]:
    """Exactly one ACK frame per message from the bridge, each valid; returns the sender's own ACKs."""
    answers: list[bytes] = []
    for conn, stream in wire.stream("in"):
        frames, rest = mllp_frames(stream)
        assert rest == b"", f"{where}: bytes from the bridge outside MLLP frames on conn {conn}: {rest!r}"
        answers.extend(frames)
    sent: list[bytes] = []
    for conn, stream in wire.stream("out"):
        frames, rest = mllp_frames(stream)
        assert rest == b"", f"{where}: the sender left an unfinished frame on conn {conn}: {rest!r}"
        sent.extend(frames)
    messages = [f for f in sent if not msh_field(f, 9).startswith("ACK")]
    client_acks = [f for f in sent if msh_field(f, 9).startswith("ACK")]
    assert [msh_field(f, 10) for f in messages] == [c.control_id for c in cases], f"{where}: messages sent"
    assert len(answers) == len(cases), f"{where}: {len(answers)} frames from the bridge for {len(cases)} messages"
    for payload, case in zip(answers, cases, strict=True):
        check_ack(payload, case, f"{where} (wire)")
    return client_acks


# --- running senders -------------------------------------------------------------------------------


def node() -> str:
    exe = shutil.which("node")
    assert exe, "node is not on PATH (the interop tests need Node.js >= 20.19)"
    return exe


def run_driver(script: str, bridge: Bridge, cases: Sequence[Case]) -> dict:
    cmd = [node(), str(JS / script), bridge.host, str(bridge.port), *(str(c.path) for c in cases)]
    out = subprocess.run(cmd, cwd=HERE, capture_output=True, timeout=SENDER_TIMEOUT, check=False)
    stderr = out.stderr.decode(errors="replace")
    assert out.returncode == 0, f"{script} exited with {out.returncode}:\n{stderr}"
    try:
        return json.loads(out.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"{script} printed no JSON report:\nstdout: {out.stdout!r}\nstderr: {stderr}")


def check_driver(report: dict, bridge: Bridge, cases: Sequence[Case]) -> list[bytes]:
    """The library's own view of each ACK, then the wire, then the log; returns the sender's ACKs."""
    wire = Wire.from_json(report["wire"])
    where = report["library"]
    with showing(wire.dump()):
        assert report["errors"] == [], f"{where} reported errors: {report['errors']}"
        assert [r["file"] for r in report["results"]] == [str(c.path) for c in cases]
        for result, case in zip(report["results"], cases, strict=True):
            assert result["error"] is None, f"{where}, {case.name}: {result['error']}"
            assert result["control_id"] == case.control_id, f"{where} changed MSH-10 of {case.name}"
            ack = result["ack"]
            assert ack["lib_msh9"].startswith("ACK"), f"{where}, {case.name}: MSH-9 {ack['lib_msh9']!r}"
            assert ack["lib_msa1"] == case.ack, f"{where}, {case.name}: MSA-1 {ack['lib_msa1']!r}"
            assert ack["lib_msa2"] == case.control_id, f"{where}, {case.name}: MSA-2 {ack['lib_msa2']!r}"
            # The ACK text as the library hands it over (possibly re-serialized), checked again.
            check_ack(ack["text"].replace("\n", "\r").encode("utf-8"), case, f"{where} (as reported)")
        client_acks = check_wire(wire, cases, where)
    bridge.assert_healthy()
    return client_acks


# --- Python senders --------------------------------------------------------------------------------


def test_python_hl7_mllp_send_cli(bridge: Bridge, tmp_path: Path) -> None:
    """python-hl7's ``mllp_send``: one connection, reads each ACK with a single ``recv(4096)``."""
    mllp_send = BIN / "mllp_send"
    assert mllp_send.exists(), f"{mllp_send} is missing: install python-hl7 (pip install hl7)"
    framed = tmp_path / "messages.mllp"
    framed.write_bytes(b"".join(VT + c.raw + FS + CR for c in CASES))
    cmd = [str(mllp_send), "--port", str(bridge.port), "--file", str(framed), bridge.host]
    out = subprocess.run(cmd, capture_output=True, timeout=SENDER_TIMEOUT, check=False)
    with showing(f"sent: {framed.read_bytes()!r}\nreceived (one recv per line): {out.stdout!r}"):
        assert out.returncode == 0, f"mllp_send failed: {out.stderr.decode(errors='replace')}"
        # mllp_send prints each recv() result followed by b"\n": every one must be one whole frame.
        chunks = out.stdout.split(FS + CR + b"\n")
        assert chunks[-1] == b"", f"trailing bytes: {chunks[-1]!r}"
        assert len(chunks) - 1 == len(CASES)
        for chunk, case in zip(chunks, CASES, strict=False):
            assert chunk.startswith(VT), f"not one whole frame per recv: {chunk!r}"
            check_ack(chunk[1:], case, "mllp_send")

    # --loose: a plain .hl7 file (no MLLP framing), as one would usually call it.
    loose_case = load_case("siu/s13_epic_v251.hl7")
    cmd = [str(mllp_send), "--port", str(bridge.port), "--loose", "--file", str(loose_case.path), bridge.host]
    out = subprocess.run(cmd, capture_output=True, timeout=SENDER_TIMEOUT, check=False)
    with showing(f"received: {out.stdout!r}"):
        assert out.returncode == 0, f"mllp_send --loose failed: {out.stderr.decode(errors='replace')}"
        assert out.stdout.startswith(VT) and out.stdout.endswith(FS + CR + b"\n")
        check_ack(out.stdout[1:-3], loose_case, "mllp_send --loose")
    check_log(bridge, extra=[loose_case])
    bridge.assert_healthy()


def test_python_hl7_asyncio_client(bridge: Bridge) -> None:
    """python-hl7's asyncio client: ``open_hl7_connection``, ``writeblock``/``readblock`` on one connection.

    The fixture bytes go out unchanged (``writeblock``), so the S12 without its final CR really
    arrives without it; ``writemessage(hl7.parse(...))`` would add the CR back.
    """
    sent: list[bytes] = []
    received: list[bytes] = []

    async def exchange() -> None:
        reader, writer = await asyncio.wait_for(open_hl7_connection(bridge.host, bridge.port, encoding="utf-8"), 5)
        try:
            for case in CASES:
                writer.writeblock(case.raw)
                sent.append(case.raw)
                await writer.drain()
                received.append(await asyncio.wait_for(reader.readblock(), 10))
            # Nothing more may come: the bridge answers each message once.
            with contextlib.suppress(asyncio.TimeoutError):
                extra = await asyncio.wait_for(reader.read(1), 0.3)
                received.append(b"UNEXPECTED:" + extra)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    with showing(f"sent: {sent!r}\nreceived: {received!r}"):
        asyncio.run(exchange())
        assert len(received) == len(CASES)
        for payload, case in zip(received, CASES, strict=True):
            check_ack(payload, case, "hl7.mllp asyncio client")
            # python-hl7's own reading of the same bytes, as HL7StreamReader.readmessage() does it.
            msg = hl7.parse(payload.decode("utf-8"))
            assert str(msg["MSA.F1"]) == case.ack and str(msg["MSA.F2"]) == case.control_id
    check_log(bridge)
    bridge.assert_healthy()


@needs_mllp_https
def test_mllp_https_http2mllp_gateway(bridge: Bridge, tmp_path: Path) -> None:
    """PyPI ``mllp-https``: its ``http2mllp`` gateway takes each message by HTTP POST, forwards it over
    MLLP (one kept-alive connection) to the bridge and returns the ACK as the HTTP response body."""
    http2mllp = BIN / "http2mllp"
    http_port = free_port()
    cmd = [str(http2mllp), "--host", HOST, "--port", str(http_port), "--mllp_port", str(bridge.port),
           "--timeout", "10000", "--mllp-keep-alive", "60000", "--log-level", "warn", bridge.host]  # fmt: skip
    gw_out, gw_err = tmp_path / "http2mllp.stdout", tmp_path / "http2mllp.stderr"
    with gw_out.open("wb") as out, gw_err.open("wb") as err:
        gateway = subprocess.Popen(cmd, stdout=out, stderr=err, env=clean_env())
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert gateway.poll() is None, f"http2mllp exited: {gw_err.read_text(errors='replace')}"
            with contextlib.suppress(OSError), socket.create_connection((HOST, http_port), timeout=1):
                break
            assert time.monotonic() < deadline, "http2mllp did not start listening"
            time.sleep(0.1)
        answers: list[tuple[int, bytes]] = []
        with showing(f"HTTP answers: {answers!r}\ngateway log: {gw_err.read_text(errors='replace')[-2000:]}"):
            for case in CASES:
                conn = http.client.HTTPConnection(HOST, http_port, timeout=15)
                try:
                    conn.request("POST", "/", body=case.raw, headers={"Content-Type": "application/hl7-v2"})
                    response = conn.getresponse()
                    answers.append((response.status, response.read()))
                finally:
                    conn.close()
                status, body = answers[-1]
                assert status == 200, f"{case.name}: HTTP {status}"
                check_ack(body, case, "mllp-https http2mllp")
    finally:
        stop_process(gateway, grace=5)
    check_log(bridge)
    bridge.assert_healthy()


# --- JavaScript senders ----------------------------------------------------------------------------


@needs_node_modules
def test_node_hl7_client(bridge: Bridge) -> None:
    """node-hl7-client 3.x: ``Client.createConnection(...).sendMessage(new Message({text}))``."""
    report = run_driver("send_node_hl7_client.mjs", bridge, CASES)
    assert report["library"].startswith("node-hl7-client@3.")
    assert check_driver(report, bridge, CASES) == []
    check_log(bridge)


@needs_node_modules
def test_simple_hl7(bridge: Bridge) -> None:
    """simple-hl7: ``Server.createTcpClient({keepalive: true}).send(parser.parse(text), cb)``."""
    report = run_driver("send_simple_hl7.mjs", bridge, CASES)
    assert check_driver(report, bridge, CASES) == []
    check_log(bridge)


@needs_node_modules
def test_medplum_hl7_client(bridge: Bridge) -> None:
    """@medplum/hl7: ``new Hl7Client({host, port}).sendAndWait(Hl7Message.parse(text))``."""
    report = run_driver("send_medplum_hl7.mjs", bridge, CASES)
    assert check_driver(report, bridge, CASES) == []
    check_log(bridge)


@needs_node_modules
def test_medplum_cli_hl7_send(bridge: Bridge, tmp_path: Path) -> None:
    """@medplum/cli: ``medplum hl7 send HOST PORT --file F``, one process (and connection) per message.

    The CLI prints the ACK re-serialized with LF between segments; the bytes it really received are
    recorded by ``js/wiretap.mjs`` (loaded with ``node --import``, it only observes the socket).
    """
    package = json.loads((NODE_MODULES / "@medplum/cli/package.json").read_text())
    entry = NODE_MODULES / "@medplum/cli" / package["bin"]["medplum"]
    wire_records: list[dict] = []
    for i, case in enumerate(CASES):
        wire_file = tmp_path / f"wire{i}.json"
        env = {**clean_env(), "HL7_INTEROP_WIRE": str(wire_file)}
        cmd = [node(), "--import", (JS / "wiretap.mjs").as_uri(), str(entry),
               "hl7", "send", bridge.host, str(bridge.port), "--file", str(case.path)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, timeout=SENDER_TIMEOUT, env=env, cwd=HERE, check=False)
        records = json.loads(wire_file.read_text()) if wire_file.exists() else []
        wire_records.extend({**r, "conn": i} for r in records)
        with showing(Wire.from_json(records).dump()):
            assert out.returncode == 0, f"medplum hl7 send {case.name}: {out.stderr.decode(errors='replace')}"
            check_ack(out.stdout.decode("utf-8").strip().replace("\n", "\r").encode(), case, "medplum CLI (stdout)")
    wire = Wire.from_json(wire_records)
    with showing(wire.dump()):
        assert check_wire(wire, CASES, "medplum CLI") == []
    bridge.assert_healthy()
    check_log(bridge)


@needs_node_modules
def test_hl7v2_net_acks_are_logged_never_answered(bridge: Bridge) -> None:
    """hl7v2-net: ``Hl7Client.sendMessageWaitAck(message)``.

    This client answers every message it receives, ACKs included, with an ACK of its own. The
    bridge must log those ACKs (status "ignored") and never answer them, or the two would
    ping-pong ACKs forever.
    """
    report = run_driver("send_hl7v2_net.mjs", bridge, CASES)
    client_acks = check_driver(report, bridge, CASES)
    wire = Wire.from_json(report["wire"])
    with showing(wire.dump()):
        # The habit is real (otherwise this test proves nothing): one ACK back per ACK received...
        assert len(client_acks) == len(CASES), "hl7v2-net did not answer the bridge's ACKs"
        # ...and the bridge said nothing more: the library saw only our five ACKs.
        assert len(report["received"]) == len(CASES)
        assert all(msh_field(a, 9).startswith("ACK") for a in client_acks)
    check_log(bridge, client_ack_ids=[msh_field(a, 10) for a in client_acks])
