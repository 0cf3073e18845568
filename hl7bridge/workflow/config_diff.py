"""``config diff``: what a new configuration would do differently to the traffic the feed really sent.

Every logged original message of the window (duplicates and replays are left out) is judged by both
configurations with the intake the service judges it with (``app.wiring.listener_intakes``: reading, routing,
mapping; pure, nothing written or sent), routing taking the message's arrival as now, and the two verdicts
are compared: the ACK (code and the field named), the commands (kind, route, journey, flow, zone), and, when
the commands agree, each journey parameter. Messages whose raw was purged by retention are counted as skipped.

The log is read in keyset pages (bounded memory); with more than ``IN_PROCESS_UP_TO`` messages the pages are
judged in worker processes, one per CPU, each building both configurations once (``Sides``), with at most two
pages per worker in flight. Patient data (parameter values) is masked unless ``phi``; showing it is audited by
the caller (``record_unmask``) before anything is shown.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Protocol

import orjson
from sqlalchemy.engine import Engine

from hl7bridge.core.logs import masked
from hl7bridge.ingest.intake import Intake, Received
from hl7bridge.store.configs import originals_after, window

ACK, COMMAND, PARAMETER = "ack", "command", "parameter"
KINDS = (ACK, COMMAND, PARAMETER)
#: Messages per page read from the log (and per task handed to a worker).
PAGE = 500
#: Up to this many messages in the window, the diff runs in this process (a pool costs more than it saves).
IN_PROCESS_UP_TO = 4000
#: Differences kept for the report; past it they are still counted (``truncated``).
MAX_DIFFERENCES = 100_000
#: Examples of each kind in the text report.
EXAMPLES = 3

IntakeFor = Callable[[str], Intake]


class DiffRefused(ValueError):
    """The diff cannot run as asked; the message says what to change."""


class DiffBusy(DiffRefused):
    """Another diff runs in the service (it takes one at a time)."""


Row = tuple[int, float, str, bytes | None]


class Clock:
    """The time routing takes as now: the judged message's arrival, so "already started" is decided as then."""

    now = 0.0

    def __call__(self) -> float:
        return self.now


class Sides(Protocol):
    """Builds the two configurations' intakes (``before``, ``after``) on ``clock``; picklable, so that each
    worker process builds its own once."""

    def __call__(self, clock: Clock) -> tuple[IntakeFor, IntakeFor]: ...


@dataclass(frozen=True)
class ConfigRef:
    """One side of the comparison as the report names it."""

    path: str
    digest: str
    how: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest, "how": self.how}


@dataclass(frozen=True)
class Verdict:
    """What one configuration would do with one message."""

    ack: str
    field: str
    route: str | None
    commands: tuple[tuple[str, str, str, str, str], ...]
    parameters: tuple[dict[str, Any], ...]


def verdict(received: Received) -> Verdict:
    problem = received.problem if received.ack is None or received.ack.code not in ("AA", "CA") else None
    commands, parameters = [], []
    for c in received.commands:
        commands.append((c["kind"], c["route"], c["chat_bot_id"], c["flow_id"] or "", c["time_zone"]))
        parameters.append(orjson.loads(c["parameters"]))
    return Verdict(received.ack.code if received.ack else "", problem.location if problem else "", received.route,
                   tuple(commands), tuple(parameters))  # fmt: skip


@dataclass(frozen=True)
class Difference:
    message_id: int
    received_at: float
    kind: str
    route: str | None
    before: Any
    after: Any
    parameter: str = ""

    def to_json(self) -> dict[str, Any]:
        out = {"message_id": self.message_id, "received_at": self.received_at, "kind": self.kind,
               "route": self.route, "before": self.before, "after": self.after}  # fmt: skip
        if self.kind == PARAMETER:
            out["parameter"] = self.parameter
        return out

    def describe(self) -> str:
        name = f" {self.parameter}:" if self.kind == PARAMETER else ""
        return f"message {self.message_id}{name} {_shown(self.before)} -> {_shown(self.after)}"


def _shown(value: Any) -> str:
    return "(none)" if value is None else value if isinstance(value, str) else orjson.dumps(value).decode()


def _ack(v: Verdict) -> str:
    return f"{v.ack or '(no ACK)'}" + (f" naming {v.field}" if v.field else "")


def _command(c: tuple[str, str, str, str, str]) -> str:
    kind, route, bot, flow, zone = c
    return f"{kind} via route {route} (journey {bot}" + (f", flow {flow}" if flow else "") + f", {zone})"


def compare(message_id: int, received_at: float, a: Verdict, b: Verdict, phi: bool) -> list[Difference]:
    """The differences between two verdicts on one message; parameters only where the commands agree (a command
    that differs says enough)."""
    route = b.route or a.route
    out = []
    if (a.ack, a.field) != (b.ack, b.field):
        out.append(Difference(message_id, received_at, ACK, route, _ack(a), _ack(b)))
    if a.commands != b.commands:
        before = "; ".join(map(_command, a.commands)) or "none"
        after = "; ".join(map(_command, b.commands)) or "none"
        out.append(Difference(message_id, received_at, COMMAND, route, before, after))
        return out
    show = (lambda v: v) if phi else _masked
    for old, new in zip(a.parameters, b.parameters, strict=True):
        for name in dict.fromkeys([*old, *new]):
            if old.get(name) != new.get(name):
                out.append(Difference(message_id, received_at, PARAMETER, route, show(old.get(name)),
                                      show(new.get(name)), name))  # fmt: skip
    return out


def _masked(value: Any) -> Any:
    return masked(value) if isinstance(value, str) else value


@dataclass
class Page:
    """One page judged: how many compared, how many skipped (purged), and the differences, oldest first."""

    compared: int = 0
    purged: int = 0
    changed: int = 0
    differences: list[Difference] = field(default_factory=list)


def judge(rows: list[Row], before: IntakeFor, after: IntakeFor, clock: Clock, phi: bool) -> Page:
    page = Page()
    for message_id, received_at, listener, raw in rows:
        if raw is None:
            page.purged += 1
            continue
        clock.now = received_at
        a = verdict(before(listener).read_frame(raw).messages[0])
        b = verdict(after(listener).read_frame(raw).messages[0])
        page.compared += 1
        found = compare(message_id, received_at, a, b, phi) if a != b else []
        if found:
            page.changed += 1
            page.differences.extend(found)
    return page


_worker: tuple[IntakeFor, IntakeFor, Clock] | None = None


def _start_worker(sides: Sides) -> None:
    global _worker
    clock = Clock()
    _worker = (*sides(clock), clock)


def _judge_in_worker(rows: list[Row], phi: bool) -> Page:
    assert _worker is not None
    before, after, clock = _worker
    return judge(rows, before, after, clock, phi)


@dataclass
class DiffReport:
    new: ConfigRef
    against: ConfigRef
    since: float
    route: str | None
    masked: bool
    messages: int = 0
    skipped_purged: int = 0
    changed_messages: int = 0
    counts: Counter[str] = field(default_factory=Counter)
    routes: dict[str, Counter[str]] = field(default_factory=dict)
    differences: list[Difference] = field(default_factory=list)
    truncated: bool = False
    workers: int = 1

    def add(self, page: Page) -> None:
        self.messages += page.compared
        self.skipped_purged += page.purged
        changed: set[int] = set()
        for d in page.differences:
            if self.route is not None and self.route != d.route:
                continue
            changed.add(d.message_id)
            self.counts[d.kind] += 1
            self.routes.setdefault(d.route or "(no route)", Counter())[d.kind] += 1
            if len(self.differences) < MAX_DIFFERENCES:
                self.differences.append(d)
            else:
                self.truncated = True
        self.changed_messages += len(changed)

    def examples(self, kind: str, limit: int = EXAMPLES) -> list[Difference]:
        return [d for d in self.differences if d.kind == kind][:limit]

    def to_json(self) -> dict[str, Any]:
        return {
            "new": self.new.to_json(),
            "against": self.against.to_json(),
            "since": self.since,
            "route": self.route,
            "masked": self.masked,
            "messages": self.messages,
            "skipped_purged": self.skipped_purged,
            "changed_messages": self.changed_messages,
            "summary": {kind: self.counts.get(kind, 0) for kind in KINDS},
            "routes": {name: {kind: c.get(kind, 0) for kind in KINDS} for name, c in sorted(self.routes.items())},
            "differences": [d.to_json() for d in self.differences],
            "truncated": self.truncated,
        }


def diff(
    engine: Engine,
    sides: Sides,
    report: DiffReport,
    *,
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    in_process_up_to: int = IN_PROCESS_UP_TO,
) -> DiffReport:
    """Judge every original message received since ``report.since`` with both sides, adding to ``report``.
    ``progress(done, total)`` follows the ids read (``total``: the window's ids, an upper bound)."""
    with engine.connect() as conn:
        bounds = window(conn, report.since)
    if bounds is None:
        return report
    first, last = bounds
    total = last - first + 1
    workers = workers or os.cpu_count() or 1
    if workers < 2 or total <= in_process_up_to:
        clock = Clock()
        before, after = sides(clock)
        for rows in _pages(engine, first, last):
            report.add(judge(rows, before, after, clock, report.masked is False))
            if progress:
                progress(rows[-1][0] - first + 1, total)
        return report
    report.workers = workers
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_start_worker,
                             initargs=(sides,)) as pool:  # fmt: skip
        pending: deque[tuple[int, Future[Page]]] = deque()
        for rows in _pages(engine, first, last):
            pending.append((rows[-1][0], pool.submit(_judge_in_worker, rows, report.masked is False)))
            while len(pending) >= 2 * workers:
                _collect(pending, report, first, total, progress)
        while pending:
            _collect(pending, report, first, total, progress)
    return report


def _collect(pending: deque[tuple[int, Future[Page]]], report: DiffReport, first: int, total: int,
             progress: Callable[[int, int], None] | None) -> None:  # fmt: skip
    """The oldest page in flight, added in order, so the differences stay oldest first."""
    last_id, future = pending.popleft()
    report.add(future.result())
    if progress:
        progress(last_id - first + 1, total)


def _pages(engine: Engine, first: int, last: int) -> Iterator[list[Row]]:
    after = first - 1
    while True:
        with engine.connect() as conn:
            rows = originals_after(conn, after, last, PAGE)
        if not rows:
            return
        yield rows
        after = rows[-1][0]
