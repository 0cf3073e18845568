"""What the reliability scenarios share: the service as a restartable subprocess, an engine-like sender,
a ledger of what was acknowledged, and the checks that turn the log and the sandbox into figures.

Every loop here is bounded in count and in time; only loopback addresses are used.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from hl7bridge.testing.client import BlockingClient
from tests.conftest import RunningSandbox, RunningService, free_port, segments, start_sandbox, start_service
from tests.dispatch_support import SANDBOX_TOML, TOKEN, iso, pg_rows, service_toml, siu

LONG = os.environ.get("HL7BRIDGE_RELIABILITY", "short").strip().lower() == "long"
MODE = "long" if LONG else "short"
SCOPES = ["create.journey_instances", "read.journey_instances"]


def pick(short: Any, long: Any) -> Any:
    """The short (CI) or the long (HL7BRIDGE_RELIABILITY=long) value of a knob."""
    return long if LONG else short


def knob(name: str, short: float, long: float) -> float:
    """A number from the environment (``HL7BRIDGE_<NAME>``), else the mode's default."""
    raw = os.environ.get(f"HL7BRIDGE_{name.upper()}")
    return float(raw) if raw else float(pick(short, long))


# ---- the process under test ---------------------------------------------------------------------


def rss_kb(pid: int) -> int | None:
    """VmRSS of a process in KiB (from /proc/PID/status); None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def child_pids(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def fd_kinds(pid: int) -> dict[str, int]:
    """Open descriptors by what they point at: socket, pipe, anon_inode, or the file's name."""
    kinds: Counter = Counter()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                kinds[target.split(":", 1)[0] if ":[" in target else Path(target).name] += 1
    except OSError:
        return {}
    return dict(kinds)


POOL_LIMIT = 15  # SQLAlchemy's QueuePool for a SQLite file: 5 connections + 10 overflow, each holding db + wal
API_SOCKETS = 4  # the Journeys client's kept-alive connections (one per dispatch worker)


def descriptor_problems(before: dict[str, int], after: dict[str, int], slack_sockets: int = API_SOCKETS) -> list[str]:
    """What grew beyond its bound between two fd_kinds() pictures taken with no MLLP connection difference."""
    problems = []
    for kind in set(before) | set(after):
        b, a = before.get(kind, 0), after.get(kind, 0)
        if kind in ("log.db", "log.db-wal"):
            if a > POOL_LIMIT:
                problems.append(f"{kind}: {a} open (the pool allows {POOL_LIMIT})")
        elif kind == "socket":
            if a > b + slack_sockets:
                problems.append(f"sockets: {b} -> {a}")
        elif a != b:
            problems.append(f"{kind}: {b} -> {a}")
    return problems


def _drain(stream: Any, sink: Path) -> None:
    """Copy a child's pipe to a file so that a chatty child never blocks on a full pipe."""
    with contextlib.suppress(ValueError, OSError), sink.open("a", encoding="utf-8", errors="replace") as out:
        for line in stream:
            out.write(line)
            out.flush()


def health_toml(port: int, heartbeat: float = 0.2, stuck_after: float = 3600) -> str:
    return (
        f'\n[health]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
        f"outbox_stuck_after = {stuck_after}\nheartbeat_interval = {heartbeat}\n"
    )


def bridge_config(
    api_url: str,
    health_port: int,
    *,
    listener_extra: str = "",
    retry_initial: float = 0.2,
    retry_max: float = 1.0,
    log_level: str = "info",
    heartbeat: float = 0.2,
    dispatch_lease: float | None = None,
) -> str:
    """The dispatch tests' configuration (one "reminders" route) with a health listener; ``dispatch_lease``:
    ``[service] dispatch_lease`` (its default when None)."""
    text = service_toml(api_url, listener_extra=listener_extra)
    assert "retry_initial = 0.2" in text and "retry_max = 1.0" in text
    text = text.replace("retry_initial = 0.2", f"retry_initial = {retry_initial}")
    text = text.replace("retry_max = 1.0", f"retry_max = {retry_max}")
    lease = "" if dispatch_lease is None else f"dispatch_lease = {dispatch_lease}\n"
    text = f'[service]\nlog_level = "{log_level}"\n{lease}\n' + text
    return text + health_toml(health_port, heartbeat=heartbeat)


@dataclass
class Bridge:
    """``hl7bridge serve`` on a fixed port and database, which can be killed and started again."""

    workdir: Path
    config: str
    port: int = field(default_factory=free_port)
    health_port: int | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(TOKEN))
    #: The log's URL when it is not ``workdir/var/log.db`` (a PostgreSQL database shared by several bridges).
    log_url: str | None = None
    running: RunningService | None = None
    starts: int = 0
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> RunningService:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.running = start_service(self.workdir, self.config, env=self.env, port=self.port,
                                             log_url=self.log_url)  # fmt: skip
                break
            except AssertionError:
                # The port may still be held for a moment by the process just killed.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.starts += 1
        sink = self.workdir / f"service-{self.starts}.log"
        for stream in (self.running.process.stdout, self.running.process.stderr):
            thread = threading.Thread(target=_drain, args=(stream, sink), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.running

    @property
    def pid(self) -> int:
        assert self.running is not None
        return self.running.process.pid

    @property
    def database(self) -> Path:
        return self.workdir / "var" / "log.db"

    @property
    def url(self) -> str:
        return self.log_url or f"sqlite:///{self.database}"

    def alive(self) -> bool:
        return self.running is not None and self.running.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no goodbye, no flush."""
        if self.running is not None and self.running.process.poll() is None:
            self.running.process.kill()
            self.running.process.wait(timeout=30)

    def pause(self) -> list[int]:
        """SIGSTOP the service and its dispatcher process, as a machine that hangs: no exit, no closed socket;
        the pids stopped, for ``resume``."""
        stopped = [self.pid, *child_pids(self.pid)]
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        return stopped

    def resume(self, stopped: list[int]) -> None:
        """SIGCONT what ``pause`` stopped, children first (the service finds its dispatcher running)."""
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def status(self) -> dict[str, Any]:
        """The service's ``/status`` (its dispatcher's role among them)."""
        assert self.health_port is not None
        return requests.get(f"http://127.0.0.1:{self.health_port}/status", timeout=5).json()

    def stop(self, grace: float = 20) -> int | None:
        """SIGTERM (SIGKILL after ``grace`` seconds); the exit status."""
        if self.running is None:
            return None
        process = self.running.process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        return process.returncode

    def rss_kb(self) -> int | None:
        """The service's memory together with its dispatcher process's."""
        own = rss_kb(self.pid)
        if own is None:
            return None
        return own + sum(rss_kb(child) or 0 for child in child_pids(self.pid))

    def fds(self) -> int | None:
        return fd_count(self.pid)

    def fd_kinds(self) -> dict[str, int]:
        return fd_kinds(self.pid)

    def logs(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.workdir.glob("service-*.log")))

    def query(self, sql: str, *args: Any) -> list[tuple]:
        """Rows of one read (``?`` placeholders), on the SQLite file or the PostgreSQL log."""
        if self.log_url:
            return pg_query(self.log_url, sql, *args)
        with contextlib.closing(sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=30)) as conn:
            return conn.execute(sql, args).fetchall()

    def healthz(self) -> tuple[int, dict]:
        assert self.health_port is not None
        try:
            response = requests.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=5)
        except requests.RequestException as exc:
            return 0, {"error": str(exc)}
        return response.status_code, response.json()

    def ack_histogram(self) -> dict[str, int]:
        """The service's own ACK latency (frame complete to ACK written): cumulative counts per bucket bound."""
        assert self.health_port is not None
        text = requests.get(f"http://127.0.0.1:{self.health_port}/metrics", timeout=10).text
        found: dict[str, int] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "hl7bridge_ack_latency_seconds_bucket":
                    bound = sample.labels["le"]
                    found[bound] = found.get(bound, 0) + int(sample.value)
        return found

    def open_commands(self) -> int:
        return self.query("SELECT count(*) FROM commands WHERE status IN ('pending', 'in_flight')")[0][0]

    def wait_drained(self, timeout: float) -> float:
        """Wait until no command is open; the seconds it took."""
        began = time.monotonic()
        wait_for(lambda: self.open_commands() == 0, timeout, "the outbox to drain", interval=0.2)
        return round(time.monotonic() - began, 2)


def pg_query(url: str, sql: str, *args: Any) -> list[tuple]:
    """Rows of one statement on a PostgreSQL log as tuples (``?`` placeholders), as ``Bridge.query`` gives them."""
    return [tuple(row.values()) for row in pg_rows(url, sql, *args)]


def sandbox_process(workdir: Path) -> RunningSandbox:
    running = start_sandbox(workdir, SANDBOX_TOML)
    for stream in (running.process.stdout, running.process.stderr):
        threading.Thread(target=_drain, args=(stream, workdir / "sandbox.log"), daemon=True).start()
    return running


def trigger_under_way(sandbox: RunningSandbox, latency_ms: int) -> None:
    """Make the sandbox answer ``latency_ms`` late and wait until a bulk trigger is under way: a kill now
    certainly lands during a call (random kills alone hit a 30 ms call too rarely)."""
    sandbox.faults(latency_ms=latency_ms)
    seen = len(sandbox.calls("bulk"))
    wait_for(lambda: len(sandbox.calls("bulk")) > seen, 60, "a bulk trigger under way")


def sandbox_reachable(sandbox: RunningSandbox) -> bool:
    try:
        requests.get(sandbox.url + "/_sandbox/faults", headers=sandbox.control, timeout=2)
    except requests.RequestException:
        return False
    return True


def bridge_for(sandbox: RunningSandbox, workdir: Path, **config: Any) -> Bridge:
    """A bridge (not started) configured for ``sandbox``, with a health listener on a port of its own."""
    health_port = free_port()
    return Bridge(workdir, bridge_config(sandbox.url, health_port, **config), health_port=health_port)


@contextlib.contextmanager
def scenario_processes(
    tmp_path_factory: pytest.TempPathFactory, **config: Any
) -> Iterator[tuple[Bridge, RunningSandbox]]:
    """A sandbox and a bridge for it, which the scenario starts when it is ready; both stopped however it ends."""
    sandbox = sandbox_process(tmp_path_factory.mktemp("sandbox"))
    bridge = bridge_for(sandbox, tmp_path_factory.mktemp("bridge"), **config)
    try:
        yield bridge, sandbox
    finally:
        bridge.stop()
        sandbox.stop()


@contextlib.contextmanager
def bridge_running(sandbox: RunningSandbox, workdir: Path, **config: Any) -> Iterator[Bridge]:
    """A started bridge for ``sandbox`` in the new folder ``workdir``, stopped however the block ends."""
    bridge = bridge_for(sandbox, workdir, **config)
    workdir.mkdir()
    bridge.start()
    try:
        yield bridge
    finally:
        bridge.stop()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy (bounded by ``timeout`` seconds); its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# ---- an interface engine ---------------------------------------------------------------------------


@dataclass
class Answer:
    control: str
    code: str
    echoed: str
    sent_at: float
    answered_at: float


class Aborted(Exception):
    """The sender was told to give up on the message under way."""


class Engine:
    """One connection of an interface engine: one message in flight, resent until it is answered AA.

    A refused or dropped connection, a timeout, or an AR/CR is followed by a resend of the same message
    (same MSH-10), as engines do. Any other answer (AE, a wrong MSA-2) is recorded as a wrong ACK.
    """

    def __init__(self, port: int, timeout: float = 15.0, pause: float = 0.05,
                 abort: threading.Event | None = None, reconnect_after_nak: bool = False) -> None:  # fmt: skip
        self.port = port
        #: Behind a load balancer: resend an AR/CR'd message over a new connection (perhaps to another instance).
        self.reconnect_after_nak = reconnect_after_nak
        self.abort = abort or threading.Event()
        self.timeout = timeout
        self.pause = pause
        self.client: BlockingClient | None = None
        self.answers: list[Answer] = []
        self.wrong: list[Answer] = []
        self.sends = 0
        self.connection_errors = 0

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def deliver(self, control: str, payload: bytes, deadline: float) -> Answer:
        """Send until AA (or a wrong answer); raises TimeoutError at ``deadline`` (time.monotonic()) and
        Aborted once ``abort`` is set."""
        while time.monotonic() < deadline:
            if self.abort.is_set():
                self.close()
                raise Aborted(control)
            try:
                if self.client is None:
                    self.client = BlockingClient("127.0.0.1", self.port, timeout=self.timeout)
                self.sends += 1
                sent = time.time()
                self.client.send(payload)
                raw = self.client.receive()
            except (OSError, ConnectionError):
                self.close()
                self.connection_errors += 1
                time.sleep(self.pause)
                continue
            msa = segments(raw).get("MSA", [])
            answer = Answer(control, msa[1] if len(msa) > 1 else "", msa[2] if len(msa) > 2 else "", sent, time.time())
            self.answers.append(answer)
            if answer.echoed != control:
                self.wrong.append(answer)
                self.close()  # out of step with the service: start afresh
                continue
            if answer.code == "AA":
                return answer
            if answer.code in ("AR", "CR"):
                if self.reconnect_after_nak:
                    self.close()
                time.sleep(self.pause)
                continue
            self.wrong.append(answer)
            return answer
        self.close()
        raise TimeoutError(f"{control} was not answered AA before the deadline")

    def codes(self) -> Counter:
        return Counter(a.code for a in self.answers)


# ---- appointments and what was acknowledged ---------------------------------------------------------

PLANS = (
    ("S12",),
    ("S12", "S13"),
    ("S12", "S15"),
    ("S12", "S13", "S15"),
    ("S12", "S13", "S13"),
    ("S12", "S12"),  # the same booking again under a new control id: starts nothing new
)


@dataclass
class Booking:
    """One appointment of one sender and the versions of it sent so far."""

    appointment: str
    number: int
    plan: tuple[str, ...]
    patient: str
    given: str
    step: int = 0
    version: int = 0
    start_at: str = ""

    @property
    def finished(self) -> bool:
        return self.step >= len(self.plan)


@dataclass
class Outgoing:
    appointment: str
    event: str
    control: str
    payload: bytes
    parameters: dict[str, str] | None  # None: a cancellation


class Stream:
    """A sender's seeded stream of SIU messages over its own appointments, interleaved.

    ``open_count`` appointments are in progress at once; each follows one of ``PLANS`` and is replaced by a
    new one when its plan is done. Every booking version has its own start time, so each (appointment,
    parameters) pair is meant to be triggered exactly once.
    """

    def __init__(self, prefix: str, seed: int, open_count: int = 8, plans: tuple = PLANS,
                 base: datetime | None = None) -> None:  # fmt: skip
        self.prefix = prefix
        self.rng = random.Random(seed)
        self.plans = plans
        self.base = (base or datetime.now()).replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=30)
        self.sequence = 0
        self.appointments = 0
        self.open: list[Booking] = [self._new() for _ in range(open_count)]
        self.closed: list[str] = []

    def _new(self) -> Booking:
        self.appointments += 1
        n = self.appointments
        return Booking(f"{self.prefix}-A{n}", n, self.rng.choice(self.plans), f"MRN{self.prefix}{n}",
                       self.rng.choice(["ALICE", "BOB", "CAROL", "DAVE"]))  # fmt: skip

    def start(self, booking: Booking) -> str:
        when = self.base + timedelta(days=(booking.number % 200) + booking.version * 3,
                                     hours=8 + booking.version % 9, minutes=15 * (self.sequence % 4))  # fmt: skip
        return when.strftime("%Y%m%d%H%M%S")

    def next(self) -> Outgoing:
        booking = self.rng.choice(self.open)
        event = booking.plan[booking.step]
        if event == "S13" or (event == "S12" and booking.step == 0):
            booking.version += 1
            booking.start_at = self.start(booking)
        self.sequence += 1
        control = f"{self.prefix}-{self.sequence}"
        outgoing = self.message(booking, event, control)
        booking.step += 1
        if booking.finished:
            self.open.remove(booking)
            self.closed.append(booking.appointment)
            self.open.append(self._new())
        return outgoing

    def message(self, booking: Booking, event: str, control: str) -> Outgoing:
        if event in ("S15", "S16", "S17"):
            return Outgoing(booking.appointment, event, control, siu(event, control, booking.appointment, None), None)
        start = booking.start_at
        payload = siu(event, control, booking.appointment, start, patient=booking.patient, given=booking.given)
        parameters = {
            "patientId": booking.patient,
            "patientName": f"{booking.given} TESTPATIENT",
            "appointmentId": booking.appointment,
            "appointmentDateTime": iso(start),
            "phoneNumber": "5550101",
        }
        return Outgoing(booking.appointment, event, control, payload, parameters)


class Ledger:
    """What the senders were told AA, per appointment, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.acked: dict[str, list[Outgoing]] = defaultdict(list)
        self.controls: list[str] = []

    def record(self, outgoing: Outgoing) -> None:
        with self._lock:
            self.acked[outgoing.appointment].append(outgoing)
            self.controls.append(outgoing.control)

    def record_control(self, control: str) -> None:
        """A message answered AA that concerns no appointment (it must be in the log all the same)."""
        with self._lock:
            self.controls.append(control)

    def expected(self) -> dict[str, dict[str, str] | None]:
        """Each appointment's final journey parameters (None: no journey may be running)."""
        out: dict[str, dict[str, str] | None] = {}
        with self._lock:
            for appointment, sent in self.acked.items():
                state: dict[str, str] | None = None
                for message in sent:
                    state = message.parameters if message.parameters is not None else None
                out[appointment] = state
        return out

    def sequence(self, appointment: str) -> list[dict[str, str]]:
        """The distinct parameter versions acknowledged for an appointment, in order."""
        out: list[dict[str, str]] = []
        for message in self.acked.get(appointment, []):
            if message.parameters is not None and (not out or out[-1] != message.parameters):
                out.append(message.parameters)
        return out

    def __len__(self) -> int:
        return len(self.controls)


def run_engine(engine: Engine, stream: Stream, ledger: Ledger, stop: threading.Event, deadline: float,
               rate: float | None = None, errors: list | None = None) -> None:  # fmt: skip
    """A sender thread: deliver the stream's messages in order until ``stop`` (finishing the one under way)."""
    interval = 1.0 / rate if rate else 0.0
    due = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            outgoing = stream.next()
            answer = engine.deliver(outgoing.control, outgoing.payload, deadline)
            if answer.code == "AA":
                ledger.record(outgoing)
            if interval:
                due += interval
                delay = due - time.monotonic()
                if delay > 0:
                    stop.wait(delay)
                else:
                    due = time.monotonic()
    except Aborted:
        pass
    except Exception as exc:  # noqa: BLE001 - reported by the test
        if errors is not None:
            errors.append(f"{exc.__class__.__name__}: {exc}")
    finally:
        engine.close()


class Load(NamedTuple):
    """What the sender threads share: the ledger of what was answered AA, the event that stops them, their errors."""

    ledger: Ledger
    stop: threading.Event
    errors: list[str]


@contextlib.contextmanager
def sending(engines: list[Engine], streams: list[Stream], deadline: float, rate: float | None,
            first_acks: int = 20, before_join: Callable[[], None] | None = None) -> Iterator[Load]:  # fmt: skip
    """One sender thread per engine and stream for the block, which begins once ``first_acks`` messages were
    answered AA, so that the service is known to be up and busy."""
    load = Load(Ledger(), threading.Event(), [])
    senders = [functools.partial(run_engine, e, s, load.ledger, load.stop, deadline, rate, load.errors)
               for e, s in zip(engines, streams, strict=True)]  # fmt: skip
    with threads_running(senders, before_join):
        wait_for(lambda: len(load.ledger) >= first_acks, 30, "the first acknowledgments")
        yield load


# ---- checks -----------------------------------------------------------------------------------------


def log_check(bridge: Bridge, acked_controls: list[str]) -> dict[str, Any]:
    """Every control id answered AA is logged as accepted (or ignored, for events that need no action), once:
    resends are logged as 'duplicate', replays as rows of their own (replay_of), neither counts here."""
    rows = bridge.query("SELECT control_id, status FROM messages WHERE sending_application = 'EPIC' "
                        "AND replay_of IS NULL")  # fmt: skip
    accepted = Counter(c for c, s in rows if s in ("accepted", "ignored"))
    missing = sorted(set(acked_controls) - set(accepted))
    doubled = sorted(c for c, n in accepted.items() if n > 1)
    return {
        "acked_messages": len(set(acked_controls)),
        "lost_from_log": len(missing),
        "lost_examples": missing[:10],
        "logged_twice": len(doubled),
        "logged_twice_examples": doubled[:10],
        "log_rows": len(rows),
        "log_statuses": dict(Counter(s for _c, s in rows)),
    }


def journey_check(ledger: Ledger, instances: list[dict], calls: list[dict] | None = None) -> dict[str, Any]:
    """The sandbox against the ledger: every appointment in its expected state, nothing triggered twice."""
    by_appointment: dict[str, list[dict]] = defaultdict(list)
    for instance in instances:
        by_appointment[instance["parameters"].get("appointmentId", "")].append(instance)
    expected = ledger.expected()
    missing, wrong, cancels_lost, twice, phantom = [], [], [], [], []
    for appointment, params in expected.items():
        found = by_appointment.get(appointment, [])
        running = [i for i in found if i["status"] == "InProgress"]
        per_params = Counter(json.dumps(i["parameters"], sort_keys=True) for i in found)
        twice += [(appointment, p, n) for p, n in per_params.items() if n > 1]
        known = {json.dumps(p, sort_keys=True) for p in ledger.sequence(appointment)}
        phantom += [(appointment, p) for p in per_params if p not in known]
        if params is None:
            if running:
                cancels_lost.append(appointment)
        elif not running:
            missing.append(appointment)
        elif len(running) > 1:
            twice.append((appointment, "InProgress", len(running)))
        elif running[0]["parameters"] != params:
            wrong.append((appointment, running[0]["parameters"].get("appointmentDateTime"),
                          params["appointmentDateTime"]))  # fmt: skip
    delivered_twice = []
    if calls is not None:
        delivered = Counter()
        for call in calls:
            if call["status"] == 204 and call["path"].endswith("/bulk") and call["body"]:
                for instance in call["body"].get("instances", []):
                    delivered[json.dumps(instance.get("parameters"), sort_keys=True)] += 1
        delivered_twice = [p for p, n in delivered.items() if n > 1]
    return {
        "appointments": len(expected),
        "appointments_active": sum(1 for p in expected.values() if p is not None),
        "appointments_cancelled": sum(1 for p in expected.values() if p is None),
        "instances": len(instances),
        "journey_missing": len(missing),
        "journey_missing_examples": missing[:10],
        "wrong_parameters": len(wrong),
        "wrong_parameters_examples": wrong[:10],
        "cancels_lost": len(cancels_lost),
        "cancels_lost_examples": cancels_lost[:10],
        "cancels_lost_appointments": cancels_lost,
        "triggered_twice": len(twice) + len(delivered_twice),
        "triggered_twice_examples": (twice + delivered_twice)[:10],
        "phantom_journeys": len(phantom),
        "phantom_examples": phantom[:10],
    }


def delivered_order(calls: list[dict]) -> dict[str, list[dict]]:
    """Per appointment, the parameters of each accepted (204) bulk trigger, in the order the API got them."""
    out: dict[str, list[dict]] = defaultdict(list)
    for call in calls:
        if call["status"] == 204 and call["path"].endswith("/bulk") and call["body"] and not call["body"].get("flowId"):
            for instance in call["body"].get("instances", []):
                params = instance.get("parameters", {})
                out[params.get("appointmentId", "")].append(params)
    return out


def is_subsequence(items: list, of: list) -> bool:
    it = iter(of)
    return all(any(x == y for y in it) for x in items)


def command_statuses(bridge: Bridge) -> dict[str, int]:
    return dict(bridge.query("SELECT status, count(*) FROM commands GROUP BY status"))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def mb(kib: int | None) -> float | None:
    return round(kib / 1024, 1) if kib is not None else None


def answer_codes(engines: list[Engine]) -> dict[str, int]:
    """How often each ACK code was received over all senders, for the figures."""
    return dict(sum((e.codes() for e in engines), start=Counter()))


def wrong_answers(engines: list[Engine]) -> list[dict[str, Any]]:
    """Every wrong answer of every sender, as the figures record them."""
    return [a.__dict__ for e in engines for a in e.wrong]


def loss_figures(log: dict[str, Any], journeys: dict[str, Any]) -> dict[str, int]:
    """The table's first columns: the messages acknowledged, and what of them was lost or doubled on the way."""
    return {
        "messages": log["acked_messages"],
        "lost": log["lost_from_log"] + journeys["journey_missing"] + journeys["cancels_lost"]
                + journeys["wrong_parameters"],
        "duplicated": log["logged_twice"] + journeys["triggered_twice"] + journeys["phantom_journeys"],
    }  # fmt: skip


def resource_figures(before: tuple[int | None, int | None], after: tuple[int | None, int | None]) -> dict[str, Any]:
    """The table's memory and descriptor columns, from two (RSS in KiB, open descriptors) pictures."""
    return {"rss_before_kb": before[0], "rss_after_kb": after[0], "fds_before": before[1], "fds_after": after[1]}


# ---- results ----------------------------------------------------------------------------------------

RESULTS: list[dict[str, Any]] = []


def results_dir() -> Path:
    configured = os.environ.get("HL7BRIDGE_RELIABILITY_RESULTS")
    path = Path(configured) if configured else Path(os.environ.get("TMPDIR", "/tmp")) / "hl7bridge-reliability"
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_results(figures: dict[str, Any]) -> Path:
    """One JSON file per scenario and mode; also kept for the end-of-run table."""
    figures = {"mode": MODE, "finished_at": datetime.now().isoformat(timespec="seconds"), **figures}
    path = results_dir() / f"{figures['scenario']}-{MODE}.json"
    path.write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")
    RESULTS.append(dict(figures, results_file=str(path)))
    print(f"\n[{figures['scenario']}] results in {path}\n{json.dumps(figures, indent=2, default=str)}")
    return path


def finish_scenario(figures: dict[str, Any], bridge: Bridge, began: float, exit_key: str = "exit_status",
                    grace: float = 20) -> dict[str, Any]:  # fmt: skip
    """Stop the service, add how it exited and how long the scenario took, and write the figures out."""
    figures[exit_key] = bridge.stop(grace)
    figures["duration_s"] = round(time.monotonic() - began, 1)
    write_results(figures)
    return figures


@contextlib.contextmanager
def threads_running(targets: list[Callable[[], None]],
                    before_join: Callable[[], None] | None = None) -> Iterator[list[threading.Thread]]:  # fmt: skip
    """Run each target in a daemon thread for the block; on the way out (even on error) call ``before_join``,
    then wait for the threads (two minutes at most)."""
    started = [threading.Thread(target=t, daemon=True) for t in targets]
    for thread in started:
        thread.start()
    try:
        yield started
    finally:
        if before_join is not None:
            before_join()
        for thread in started:
            thread.join(timeout=120)


def raw_socket(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock
