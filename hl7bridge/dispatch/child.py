"""The dispatcher's own process (``python -m hl7bridge.dispatch.child``, started by the service).

Why a process: the listener answers within milliseconds only when no other thread of its process
holds the GIL, and dispatching (outbox queries, JSON, ``requests``) held it for tens of milliseconds at a
time under load. This process reads the log itself, but writes no message or command: its writes (``OutboxWrite``)
go to the service, whose writer thread stays the log's only writer and puts messages first. (With a
writer of its own here, a transaction of this process stalled on its GIL or at its lower CPU priority
held SQLite's write lock while the service's messages waited for it.) Its only writes of its own are its
leadership's (``dispatch.leader``): the epoch it claims, and on PostgreSQL the lease renewed on its lock connection.

The channel is two pipes of lines. On stdin the parent sends the ``ChildSpec`` (first line, JSON; the
token never appears on a command line), then ``w`` (commands were committed), ``f ID`` (say when
command ID is final), ``d N`` / ``e N TEXT`` (write N is committed / failed; refused as stale: this process
is deposed and exits), ``a`` (the service is alive, every second) and ``s GRACE`` (stop). On
fd 3 this process sends JSON lines: ``ready``, ``write`` (an ``OutboxWrite`` numbered N), ``state`` (a ``DispatchState``),
``final``, ``metric`` and ``stopped``. End of stdin means the service is gone: this process exits at
once, so that a restarted service never finds an old dispatcher still sending.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select as io_select
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from sqlalchemy.exc import SQLAlchemyError

from hl7bridge.core import logs
from hl7bridge.core.logs import MonotonicClock, RefusalLog
from hl7bridge.core.observer import NullObserver
from hl7bridge.dispatch import pipe
from hl7bridge.dispatch.dispatcher import STANDBY_LOOK, Dispatcher
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient
from hl7bridge.dispatch.leader import DEFAULT_LEASE, Leadership
from hl7bridge.dispatch.pipe import LineBuffer
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.store import CommandUpdate, Job, OutboxWrite, StoreError, open_engine
from hl7bridge.store.cluster import StaleEpoch
from hl7bridge.store.outbox import final_updates

log = logging.getLogger("hl7bridge.dispatcher")

#: How often the dispatch state (held, paused) is compared with what the parent was last told.
STATE_POLL = 0.2
#: Below the service: its answers wait for CPU less while this process catches up after an outage.
NICE_INCREMENT = 10


@dataclass(frozen=True)
class ChildSpec:
    """Everything the child needs, decided by the parent (CLI overrides, the sandbox's URL and token)."""

    database: str
    api: ApiSettings
    #: ``DispatchSettings`` as JSON carries it.
    settings: dict[str, Any]
    log_level: str = "info"
    log_format: str = "text"
    log_phi: bool = False
    #: A token given by value (the in-process sandbox's); otherwise the one ``api`` names is read.
    token: str = ""
    #: The service's ``instances.id``, recorded as the leader's; and ``[service] dispatch_lease`` in seconds.
    instance: str = ""
    lease: float = DEFAULT_LEASE

    def to_line(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_line(cls, line: bytes) -> ChildSpec:
        data = json.loads(line)
        return cls(**{**data, "api": ApiSettings(**data["api"])})


@dataclass(frozen=True)
class FixedToken:
    """A token given by value: the in-process sandbox's own, when no other is configured."""

    token: str

    def read(self) -> str:
        return self.token


class EventPipe(NullObserver):
    """fd 3 towards the parent; also the dispatcher's metrics observer, so its counts reach /metrics."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def send(self, event: dict[str, Any]) -> None:
        try:
            data = orjson.dumps(event) + b"\n"
        except orjson.JSONEncodeError:
            # Text that is not UTF-8 (a lone surrogate) must not kill the thread that sends it.
            data = json.dumps(event, ensure_ascii=False).encode("utf-8", errors="replace") + b"\n"
        with self._lock:
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                _parent_gone()

    def api_call(self, operation: str, status: int | None, seconds: float) -> None:
        self.send(pipe.metric("api_call", operation, status, seconds))

    def retry(self) -> None:
        self.send(pipe.metric("retry"))

    def dead_letter(self) -> None:
        self.send(pipe.metric("dead_letter"))


class WriteFailed(Exception):
    """The service could not commit a write of this process (the reason is the service's)."""


class ServiceWrites:
    """The dispatcher's ``JobSink`` here: each write goes to the service as a numbered ``write`` event, and
    its job is done when the service answers ``d N`` (committed) or ``e N TEXT`` (failed)."""

    def __init__(self, events: EventPipe) -> None:
        self.events = events
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._pending: dict[int, Job] = {}

    def submit_job(self, job: Job) -> None:
        if not isinstance(job.work, OutboxWrite):
            raise TypeError(f"only an OutboxWrite can cross to the service, not {job.work!r}")
        number = next(self._numbers)
        with self._lock:
            self._pending[number] = job
        self.events.send({pipe.WRITE: number, **job.work.to_json()})

    def answered(self, order: pipe.Order) -> None:
        """The service committed write N (``COMMITTED``), or could not (``FAILED``, with its reason)."""
        with self._lock:
            job = self._pending.pop(int(order.number), None)
        if order.kind == pipe.FAILED and order.text.startswith(StaleEpoch.__name__):
            # Deposed: another dispatcher leads; nothing more of this one may be written or sent.
            log.warning("this dispatcher's write was refused (%s); it stops", order.text)
            os._exit(3)
        if job is not None:
            job.on_done(None, WriteFailed(order.text) if order.kind == pipe.FAILED else None)


class Child:
    """Reads the parent's lines and answers them; the dispatcher does the work in its own threads."""

    def __init__(self, spec: ChildSpec, events: EventPipe, leadership: Leadership) -> None:
        self.spec = spec
        self.events = events
        self.leadership = leadership
        self.engine = open_engine(spec.database, read_only=True)
        self.writes = ServiceWrites(events)
        tokens = FixedToken(spec.token) if spec.token else spec.api.tokens()
        client = JourneysClient(spec.api, tokens)
        self.dispatcher = Dispatcher(self.engine, self.writes, client, DispatchSettings(**spec.settings),
                                     observer=events, leadership=leadership)  # fmt: skip
        self._told: pipe.DispatchState | None = None

    def run(self, stdin: int, waiting: Standby | None = None) -> int:
        """Read the parent's lines until a stop has finished. The stop runs in a thread of its own: the calls
        it waits for need this loop to read their writes' answers. ``waiting``: what was read while a standby."""
        self.dispatcher.start()
        self.events.send({pipe.READY: True})
        lines = waiting.lines if waiting is not None else LineBuffer(pipe.MAX_LINE)
        for order in waiting.kept if waiting is not None else ():
            self.handle(order)
        parent = os.getppid()
        stopping: threading.Thread | None = None
        while stopping is None or stopping.is_alive():
            ready, _, _ = io_select.select([stdin], [], [], STATE_POLL if stopping is None else 0.05)
            self._tell_state()
            if not self.dispatcher.alive:
                raise RuntimeError("the dispatcher's thread has died")
            if not ready:
                if os.getppid() != parent:
                    _parent_gone()
                continue
            chunk = os.read(stdin, 65536)
            if not chunk:
                _parent_gone()
            self.leadership.parent_seen = time.monotonic()
            for line in lines.feed(chunk):
                order = pipe.read_order(line)
                if order.kind == pipe.STOP:
                    if stopping is None:
                        stopping = threading.Thread(target=self.stop, args=(order.number,))
                        stopping.start()
                else:
                    self.handle(order)
        return 0

    def handle(self, order: pipe.Order) -> None:
        if order.kind == pipe.WAKE:
            self.dispatcher.wake()
        elif order.kind == pipe.NOW:
            self.dispatcher.dispatch_now()
        elif order.kind in (pipe.COMMITTED, pipe.FAILED):
            self.writes.answered(order)
        elif order.kind == pipe.WAIT_FOR:
            self.wait_for(int(order.number))

    def wait_for(self, command_id: int) -> None:
        """Answer when the command is final, including when it became final before the parent asked."""
        self.dispatcher.wait_for(command_id, self._final)
        with self.engine.connect() as conn:
            final = final_updates(conn, [command_id])
        for update in final:
            self.dispatcher.forget(command_id)
            self._final(update)

    def _final(self, update: CommandUpdate) -> None:
        self.events.send(_final_event(update))

    def _tell_state(self) -> None:
        state = self.dispatcher.state()
        if state != self._told:
            self._told = state
            self.events.send({pipe.STATE: state.to_json()})

    def stop(self, grace: float) -> None:
        self.dispatcher.stop(grace)
        self.events.send({pipe.STOPPED: True})


def _final_event(update: CommandUpdate) -> dict[str, Any]:
    return {pipe.FINAL: {"command_id": update.command_id, "status": update.status, "outcome": update.outcome}}


class Standby:
    """The parent's lines while this process waits to lead: a stop (or the end of stdin) ends the wait; wakes and
    alive lines are dropped (a standby may wait for days, and nothing it would wake for is its own). A wait-for
    (``ack_mode = "dispatched"``: the message came to this instance, another dispatches it) is answered from the
    log every ``STANDBY_LOOK`` s once the command is final, and kept for the leader this process may become."""

    def __init__(self, stdin: int, events: EventPipe, database: str) -> None:
        self.stdin = stdin
        self.events = events
        self.database = database
        self.parent = os.getppid()
        self.lines = LineBuffer(pipe.MAX_LINE)
        self.kept: list[pipe.Order] = []
        self._engine: Any = None
        self._looked = 0.0
        #: A log out of reach fails every look (twice a second): a line a minute.
        self._failures = RefusalLog(log, MonotonicClock())

    def should_stop(self) -> bool:
        if os.getppid() != self.parent:
            return True
        if self.kept and time.monotonic() - self._looked >= STANDBY_LOOK:
            self._looked = time.monotonic()
            self._answer_final()
        while io_select.select([self.stdin], [], [], 0)[0]:
            chunk = os.read(self.stdin, 65536)
            if not chunk:
                return True
            for line in self.lines.feed(chunk):
                order = pipe.read_order(line)
                if order.kind == pipe.STOP:
                    return True
                if order.kind == pipe.WAIT_FOR:
                    self.kept.append(order)
        return False

    def _answer_final(self) -> None:
        try:
            if self._engine is None:
                self._engine = open_engine(self.database, read_only=True)
            with self._engine.connect() as conn:
                final = final_updates(conn, [int(o.number) for o in self.kept])
        except Exception as exc:  # noqa: BLE001 - the log may be back at the next look
            self._failures.warn(("standby",), "a standby cannot read the commands the service waits for: %s",
                                exc.__class__.__name__)  # fmt: skip
            return
        for update in final:
            self.events.send(_final_event(update))
        answered = {u.command_id for u in final}
        self.kept = [o for o in self.kept if int(o.number) not in answered]


def _parent_gone() -> None:
    """The service is gone (SIGKILL, crash): stop now, mid-call if need be, as the service itself did."""
    logging.getLogger("hl7bridge.dispatcher").warning("the service process is gone; the dispatcher stops")
    os._exit(1)


def main() -> int:
    # The service coordinates shutdown; a terminal's Ctrl-C or systemd's SIGTERM reaches the whole group.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # When both want the CPU (catching up after an outage), the service's answers come first.
    os.nice(NICE_INCREMENT)
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 1)
        if not chunk:
            return 1
        line += chunk
    spec = ChildSpec.from_line(line)
    logs.configure(spec.log_level, spec.log_format, spec.log_phi)
    events = EventPipe(pipe.EVENTS_FD)
    standby = Standby(0, events, spec.database)
    try:
        # Held, with its connection or descriptor, until the process exits.
        leadership = Leadership(spec.database, spec.instance, spec.lease)
        if not leadership.acquire(standby.should_stop):
            return 0
        child = Child(spec, events, leadership)
    except (StoreError, SQLAlchemyError, OSError) as exc:
        log.error("the dispatcher cannot start: %s", (str(exc).strip().splitlines() or [exc.__class__.__name__])[0])
        return 2
    try:
        return child.run(0, standby)
    except Exception:
        # Other threads would keep a process without its reader alive, dispatching nothing: exit, so the
        # service notices and starts a new one.
        log.exception("the dispatcher process failed; it exits to be restarted")
        os._exit(70)


if __name__ == "__main__":
    sys.exit(main())
