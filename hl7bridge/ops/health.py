"""Health and metrics over HTTP: ``/healthz`` says which check fails, ``/metrics`` speaks Prometheus.

Nothing here blocks the reactor: the database is probed by a heartbeat write
through the writer and by a periodic read in the thread pool; the HTTP handlers
only read the cached results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import task, threads
from twisted.web import resource, server

from hl7bridge import store
from hl7bridge.ops.metrics import Metrics


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class HealthState:
    """Cached facts the checks read; updated by the probes below."""

    listeners_up: Callable[[], tuple[bool, str]]
    paused_reason: Callable[[], str | None]
    stuck_after: float
    heartbeat_interval: float
    last_write_ok: float = 0.0
    last_write_error: str | None = None
    outbox_depth: int = 0
    outbox_oldest: float | None = None
    outbox_read_error: str | None = None
    started: float = field(default_factory=time.time)
    descriptors: Callable[[], tuple[bool, str]] = lambda: (True, "not watched")

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
        reason = self.paused_reason()
        out["dispatch"] = Check(reason is None, reason or "not paused")
        if self.outbox_read_error:
            out["outbox"] = Check(False, f"cannot read the outbox: {self.outbox_read_error}")
        elif self.outbox_oldest is not None and self.outbox_oldest > self.stuck_after:
            out["outbox"] = Check(False, f"{self.outbox_depth} command(s) waiting, the oldest for "
                                         f"{self.outbox_oldest:.0f} s (limit {self.stuck_after:.0f} s)")  # fmt: skip
        else:
            age = f", oldest {self.outbox_oldest:.0f} s" if self.outbox_oldest is not None else ""
            out["outbox"] = Check(True, f"{self.outbox_depth} command(s) waiting{age}")
        return out


class Probes:
    """Heartbeat writes and outbox reads on a timer."""

    def __init__(self, reactor: Any, state: HealthState, writer: store.Writer, engine: Any, metrics: Metrics) -> None:
        self.reactor = reactor
        self.state = state
        self.writer = writer
        self.engine = engine
        self.metrics = metrics
        self._loop = task.LoopingCall(self.probe)
        self._loop.clock = reactor

    def start(self) -> None:
        self._loop.start(self.state.heartbeat_interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def probe(self) -> None:
        now = time.time()
        self.writer.submit_job(store.Job(lambda conn: store.heartbeat(conn, now), self._written))
        d = threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), self._read_outbox)
        d.addCallbacks(self._outbox, self._outbox_failed)

    def _written(self, _result: Any, error: BaseException | None) -> None:
        # Called in the writer thread: plain attribute writes are safe for the readers.
        if error is None:
            self.state.last_write_ok = time.time()
            self.state.last_write_error = None
        else:
            self.state.last_write_error = (
                f"{error.__class__.__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            )

    def _read_outbox(self) -> tuple[int, float | None]:
        with self.engine.connect() as conn:
            return store.outbox_depth(conn, time.time())

    def _outbox(self, result: tuple[int, float | None]) -> None:
        self.state.outbox_depth, self.state.outbox_oldest = result
        self.state.outbox_read_error = None
        self.metrics.outbox_depth.set(result[0])
        self.metrics.outbox_age.set(result[1] or 0.0)

    def _outbox_failed(self, failure: Any) -> None:
        self.state.outbox_read_error = failure.getErrorMessage().splitlines()[0]


class HealthResource(resource.Resource):
    isLeaf = True

    def __init__(self, state: HealthState, metrics: Metrics) -> None:
        super().__init__()
        self.state = state
        self.metrics = metrics

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
        request.setResponseCode(404)
        return b"not found: use /healthz or /metrics\n"

    def _refresh_gauges(self) -> None:
        checks = self.state.checks(time.time())
        self.metrics.healthy.set(1 if all(c.ok for c in checks.values()) else 0)
        self.metrics.paused.set(0 if checks["dispatch"].ok else 1)


def healthy(state: HealthState) -> bool:
    return all(c.ok for c in state.checks(time.time()).values())
