"""Health and metrics over HTTP: ``/healthz`` says which check fails (liveness), ``/status`` whether the
service does its job (``ok``, ``degraded`` or ``failing``, judged by ``workflow.status``), ``/ready`` whether
this instance can take and commit messages (a load balancer's check), ``/metrics`` speaks Prometheus.

Nothing here blocks the reactor: the database is probed by a heartbeat write
through the writer and by a periodic read in the thread pool; the HTTP handlers
only read the cached results.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from twisted.internet import task, threads
from twisted.web import resource, server

from hl7bridge import store
from hl7bridge.core.status import ServiceState
from hl7bridge.dispatch.pipe import DispatchState
from hl7bridge.ops.metrics import Metrics
from hl7bridge.workflow.status import Facts, ListenerFacts, LogFacts, assess, log_facts

log = logging.getLogger("hl7bridge.health")


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class HealthState:
    """Cached facts the checks read; updated by the probes below."""

    listeners_up: Callable[[], tuple[bool, str]]
    #: None: no dispatcher (no routes).
    dispatch_state: Callable[[], DispatchState | None]
    stuck_after: float
    heartbeat_interval: float
    last_write_ok: float = 0.0
    last_write_error: str | None = None
    log: LogFacts = field(default_factory=LogFacts)
    outbox_read_error: str | None = None
    started: float = field(default_factory=time.time)
    descriptors: Callable[[], tuple[bool, str]] = lambda: (True, "not watched")
    listeners: Callable[[], Sequence[ListenerFacts]] = tuple
    token_expires: datetime | None = None
    #: This service's ``instances.id``.
    instance: str | None = None
    #: Why searches are incomplete now (the search index being rebuilt, or failing); None: they are not.
    search_index: Callable[[], str | None] = lambda: None

    def checks(self, now: float) -> dict[str, Check]:
        up, detail = self.listeners_up()
        out = {"listeners": Check(up, detail), "descriptors": Check(*self.descriptors())}
        fresh = now - self.last_write_ok <= 3 * self.heartbeat_interval
        if self.last_write_error:
            out["database"] = Check(False, f"the last write failed: {self.last_write_error}")
        elif not fresh and now - self.started > 3 * self.heartbeat_interval:
            out["database"] = Check(False, f"no successful write for {now - self.last_write_ok:.0f} s")
        else:
            out["database"] = Check(True, "writable")
        dispatch = self.dispatch_state()
        reason = dispatch and (dispatch.down_reason or dispatch.paused_reason)
        out["dispatch"] = Check(not reason, reason or "not paused")
        depth, oldest = self.log.outbox_depth, self.log.outbox_oldest_age
        if self.outbox_read_error:
            out["outbox"] = Check(False, f"cannot read the outbox: {self.outbox_read_error}")
        elif oldest is not None and oldest > self.stuck_after:
            out["outbox"] = Check(False, f"{depth} command(s) waiting, the oldest for "
                                         f"{oldest:.0f} s (limit {self.stuck_after:.0f} s)")  # fmt: skip
        else:
            age = f", oldest {oldest:.0f} s" if oldest is not None else ""
            out["outbox"] = Check(True, f"{depth} command(s) waiting{age}")
        return out

    def facts(self, now: float) -> Facts:
        """What ``/status`` judges: the checks' findings and the cached reads, nothing read anew."""
        checks = self.checks(now)
        database = None if checks["database"].ok else checks["database"].detail
        if database is None and self.outbox_read_error:
            database = f"cannot read the outbox: {self.outbox_read_error}"
        return Facts(
            now=now,
            log=self.log,
            dispatch=self.dispatch_state(),
            listeners=tuple(self.listeners()),
            listeners_problem=None if checks["listeners"].ok else checks["listeners"].detail,
            database_problem=database,
            descriptors_problem=None if checks["descriptors"].ok else checks["descriptors"].detail,
            outbox_limit=self.stuck_after,
            token_expires=self.token_expires,
            instance=self.instance,
            search_index_problem=self.search_index(),
        )


#: The checks that decide whether this instance may be sent messages. Dispatch and the outbox are left out: the
#: API, its token and the outbox are shared by every instance on the log, so failing them would take every
#: instance out of the balancer at once and turn an API outage into a feed outage.
READY_CHECKS = ("listeners", "database", "descriptors")


class Probes:
    """Heartbeat writes and outbox reads on a timer."""

    def __init__(self, reactor: Any, state: HealthState, writer: store.Writer, engine: Any, metrics: Metrics,
                 listeners: Sequence[str] = ()) -> None:  # fmt: skip
        self.reactor = reactor
        self.state = state
        self.writer = writer
        self.engine = engine
        self.metrics = metrics
        self.listeners = tuple(listeners)
        self._loop = task.LoopingCall(self.probe)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(self.state.heartbeat_interval, now=True)
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._read_last_messages)
        d.addCallbacks(self._last_messages, lambda f: log.warning("cannot read the last message times: %s",
                                                                  f.getErrorMessage().splitlines()[0]))  # fmt: skip

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def probe(self) -> None:
        now = time.time()
        self.writer.submit_job(store.Job(lambda conn: store.heartbeat(conn, now), self._written))
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self.read_now)
        d.addCallbacks(self.record, self._outbox_failed)

    def _written(self, _result: Any, error: BaseException | None) -> None:
        # Called in the writer thread: plain attribute writes are safe for the readers.
        if error is None:
            self.state.last_write_ok = time.time()
            self.state.last_write_error = None
        else:
            self.state.last_write_error = (
                f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )

    def read_now(self) -> LogFacts:
        """The log's facts read in the calling thread (never the reactor's): the timer's, and a status asked for
        by a person, for whom the timer's last read is up to ``heartbeat_interval`` old (a console page showed
        "ok" beside its own fresh count of open dead letters). ``record`` then makes them the state's, on the
        reactor."""
        return log_facts(self.engine)

    def record(self, result: LogFacts) -> None:
        """The facts of a read (the timer's or ``read_now``'s) become the state's and the gauges'."""
        self.state.log = result
        self.state.outbox_read_error = None
        self.metrics.outbox_depth.set(result.outbox_depth)
        self.metrics.outbox_age.set(result.outbox_oldest_age or 0.0)
        self.metrics.dead_letters_open.set(result.dead_letters_open)

    def _read_last_messages(self) -> dict[str, float | None]:
        with self.engine.connect() as conn:
            return {name: store.last_message_at(conn, name) for name in self.listeners}

    def _last_messages(self, found: dict[str, float | None]) -> None:
        for name, at in found.items():
            self.metrics.seen_before(name, at)

    def _outbox_failed(self, failure: Any) -> None:
        self.state.outbox_read_error = failure.getErrorMessage().splitlines()[0]


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, state: HealthState, metrics: Metrics, probes: Probes | None = None) -> None:
        """``probes``: read the log's facts anew for each ``/status`` (a person or a monitor asking: the timer's
        read is up to ``heartbeat_interval`` old); ``/healthz`` and ``/ready`` stay on the cached checks."""
        super().__init__()
        self.state = state
        self.metrics = metrics
        self.probes = probes

    def render_GET(self, request: server.Request) -> bytes:
        path = request.path.decode()
        if path == "/metrics":
            self._refresh_gauges()
            request.setHeader("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            return self.metrics.exposition()
        if path in ("/healthz", "/health"):
            checks = self.state.checks(time.time())
            ok = all(c.ok for c in checks.values())
            request.setResponseCode(200 if ok else 503)
            request.setHeader("Content-Type", "application/json")
            failing = [name for name, c in checks.items() if not c.ok]
            body = {
                "status": "ok" if ok else "fail",
                "failing": failing,
                "checks": {name: {"ok": c.ok, "detail": c.detail} for name, c in checks.items()},
            }
            return json.dumps(body).encode()
        if path == "/ready":
            checks = self.state.checks(time.time())
            failing = [name for name in READY_CHECKS if not checks[name].ok]
            request.setResponseCode(503 if failing else 200)
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"ready": not failing, "failing": failing}).encode()
        if path == "/status":
            if self.probes is None:
                return self._status(request)
            gone: list[bool] = []
            request.notifyFinish().addErrback(lambda _failure: gone.append(True))
            reactor = self.probes.reactor
            d = threads.deferToThreadPool(reactor, reactor.getThreadPool(), self.probes.read_now)
            d.addCallbacks(self.probes.record, lambda _failure: None)  # unread: the timer's facts and error stand
            d.addCallback(lambda _: None if gone else (request.write(self._status(request)), request.finish()))
            return server.NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found: use /healthz, /ready, /status or /metrics\n"

    def _status(self, request: server.Request) -> bytes:
        status = assess(self.state.facts(time.time()))
        # A load balancer's check reads the code: only a failing service is taken out.
        request.setResponseCode(503 if status.state is ServiceState.FAILING else 200)
        request.setHeader("Content-Type", "application/json")
        return json.dumps(status.to_json()).encode()

    def _refresh_gauges(self) -> None:
        checks = self.state.checks(time.time())
        self.metrics.healthy.set(1 if all(c.ok for c in checks.values()) else 0)
        dispatch = self.state.dispatch_state() or DispatchState()
        self.metrics.held.set(1 if dispatch.held else 0)
        self.metrics.auth_paused.set(1 if dispatch.paused else 0)
        self.metrics.paused.set(1 if dispatch.held or dispatch.paused or dispatch.down_reason else 0)


def healthy(state: HealthState) -> bool:
    return all(c.ok for c in state.checks(time.time()).values())
