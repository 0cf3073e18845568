"""Reconciliation: what the log says each appointment should have at the Journeys API, against what it holds.

The log's side is the appointment memory (state, the parameters of the last trigger), which only commands
settled by the dispatcher change. The API's side is a search by the instance identifiers the dispatcher
uses (read scope only). Repairs never call the API to change anything: they are commands queued in the
outbox, which the service's dispatcher sends as it sends every other one.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from sqlalchemy.engine import Engine

from hl7bridge.dispatch.journeys import ACTIVE_STATUSES, ApiResult, TokenSource, Verdict, holds
from hl7bridge.mapping.routing import CANCEL, RESCHEDULE, Command, Route
from hl7bridge.store.audit import AuditEntry, record
from hl7bridge.store.reconcile import Expected, expected_page, queue_repair


class Drift(StrEnum):
    #: The log says active; the API has no active instance (nor one with its parameters that ran to its end).
    MISSING = "missing"
    #: More than one active instance for one appointment.
    DOUBLED = "doubled"
    #: The active instance's start time is not the log's last one.
    STALE_START = "stale_start"
    #: The active instance's other parameters are not those last triggered.
    STALE_PARAMETERS = "stale_parameters"
    #: The log says cancelled; the API still has an active instance.
    ACTIVE_CANCELLED = "active_cancelled"


#: The command that repairs each kind. The API has trigger, search and cancel-by-instance, no update; the
#: outbox's commands cancel by the instance identifiers, so a re-trigger (search, cancel every active
#: instance, trigger once with the log's parameters) fixes a missing, doubled or stale journey alike.
REPAIR = {
    Drift.MISSING: RESCHEDULE,
    Drift.DOUBLED: RESCHEDULE,
    Drift.STALE_START: RESCHEDULE,
    Drift.STALE_PARAMETERS: RESCHEDULE,
    Drift.ACTIVE_CANCELLED: CANCEL,
}


@dataclass(frozen=True)
class ReconcileSettings:
    """The ``[reconcile]`` section: which token searches, and how hard the API may be asked."""

    #: A read-scope token (read.journey_instances), looked up as [api]'s is; all empty: [api]'s token.
    token_file: str = ""
    token_env: str = ""
    token_credential: str = ""
    calls_per_second: float = 5.0
    #: Searches (retries included) in one run; past it the run stops and says what was left unchecked.
    max_calls: int = 10_000
    #: Appointments read from the log at a time.
    page_size: int = 200
    #: A 408, 429 or 503 is retried this many times, after its Retry-After; one that asks for longer than
    #: ``retry_after_max`` s ends the run (it is not asked again sooner than it said).
    retries: int = 5
    retry_after_max: float = 60.0

    def tokens(self, fallback: TokenSource) -> TokenSource:
        """The read-scope token when one is configured, else ``fallback`` (the API's own)."""
        if self.token_file or self.token_env or self.token_credential:
            return TokenSource(self.token_file, self.token_env, self.token_credential)
        return fallback


#: Answers that ask to come back later; anything else that is not a list of instances ends the run (rerun it).
RETRY_STATUSES = (408, 429, 503)


class Searcher(Protocol):
    def search(self, chat_bot_id: str, parameters: dict[str, str]) -> ApiResult: ...


@dataclass(frozen=True)
class RouteFacts:
    """What the configuration says of a route: the flow a trigger starts and which parameters hold the start."""

    flow_id: str | None = None
    start_parameters: frozenset[str] = frozenset()


def route_facts(routes: tuple[Route, ...]) -> dict[str, RouteFacts]:
    """Per configured route, the flow its trigger starts and the parameters mapped from the appointment's start."""
    return {
        r.name: RouteFacts(r.flow_id, frozenset(p.name for p in r.parameters if "start" in p.sources)) for r in routes
    }


class ReconcileError(RuntimeError):
    """The API could not be searched; the message says why (the API's own words, bounded and escaped)."""


@dataclass
class Finding:
    kind: str
    appointment: str
    route: str
    message_id: int | None
    #: Facts behind the finding: instance ids, counts, parameter names. Never parameter values.
    details: dict[str, Any] = field(default_factory=dict)
    #: The command that fixes it: ``{"command": kind, "command_id": id or None, "queued": bool, "note": ...}``.
    repair: dict[str, Any] | None = None


@dataclass
class Report:
    since: float
    route: str | None
    checked: int = 0
    calls: int = 0
    #: Appointments not judged, by why: ``busy`` (commands still open), ``started``, ``uncertain``,
    #: ``no_identifiers`` (purged by retention), ``cap`` (past ``max_calls``).
    skipped: dict[str, int] = field(default_factory=dict)
    complete: bool = True
    findings: list[Finding] = field(default_factory=list)
    #: What the log said of each finding's appointment when it was judged: a repair is queued only if
    #: the appointment is still so.
    judged: dict[str, Expected] = field(default_factory=dict, repr=False)

    @property
    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for finding in self.findings:
            out[finding.kind] = out.get(finding.kind, 0) + 1
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "route": self.route,
            "checked": self.checked,
            "calls": self.calls,
            "skipped": self.skipped,
            "complete": self.complete,
            "counts": self.counts,
            "findings": [asdict(f) for f in self.findings],
        }


class _Paced:
    """Searches at most ``calls_per_second``, a 429/503 retried after its Retry-After, all within ``max_calls``."""

    def __init__(self, client: Searcher, settings: ReconcileSettings, sleep: Callable[[float], None],
                 clock: Callable[[], float]) -> None:  # fmt: skip
        self.client, self.settings, self.sleep, self.clock = client, settings, sleep, clock
        self.calls = 0
        self._next = clock()

    @property
    def exhausted(self) -> bool:
        return self.calls >= self.settings.max_calls

    def search(self, chat_bot_id: str, identifiers: dict[str, str]) -> list[dict[str, Any]] | None:
        """The instances found; None when the call cap is reached first."""
        retried = 0
        while not self.exhausted:
            wait = self._next - self.clock()
            if wait > 0:
                self.sleep(wait)
            self._next = max(self.clock(), self._next) + 1.0 / self.settings.calls_per_second
            self.calls += 1
            result = self.client.search(chat_bot_id, identifiers)
            if result.ok:
                return list(result.data)
            if result.verdict is Verdict.AUTH and result.status is None:
                raise ReconcileError(result.reason)  # no token could be read; says where it was looked for
            if result.verdict is Verdict.AUTH:
                raise ReconcileError(f"the Journeys API refused the token ({result.status or 'no token'}): "
                                     f"{result.reason}; reconcile needs the read.journey_instances scope")  # fmt: skip
            if result.status not in RETRY_STATUSES or retried == self.settings.retries:
                raise ReconcileError(f"the Journeys API's answer to a search could not be used: {result.reason}")
            wait = 2.0**retried if result.retry_after is None else result.retry_after
            if wait > self.settings.retry_after_max:
                raise ReconcileError(f"the Journeys API asks to wait {wait:.0f} s ({result.status}), longer than "
                                     f"reconcile.retry_after_max = {self.settings.retry_after_max:g}; run it later")  # fmt: skip
            self.sleep(wait)
            retried += 1
        return None


def reconcile(
    engine: Engine,
    client: Searcher,
    since: float,
    routes: dict[str, RouteFacts],
    route: str | None = None,
    settings: ReconcileSettings = ReconcileSettings(),
    now: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Report:
    """Judge every appointment whose memory changed since ``since`` (on ``route``, when given).

    Paged through the log ``page_size`` at a time; one search per appointment, paced and capped. Raises
    ``ReconcileError`` when the API cannot be searched (refused token, garbage, a rate limit that does not
    lift)."""
    at = time.time() if now is None else now
    report = Report(since, route)
    paced = _Paced(client, settings, sleep, clock)
    after = ""
    try:
        while True:
            with engine.connect() as conn:
                page = expected_page(conn, since, route, after, settings.page_size)
            for expected in page:
                why = _not_judged(expected, at)
                found = None if why else paced.search(expected.chat_bot_id, expected.identifiers)
                if found is None:
                    why = why or "cap"
                    report.complete = report.complete and why != "cap"
                    report.skipped[why] = report.skipped.get(why, 0) + 1
                    continue
                report.checked += 1
                finding = _judge(expected, found, routes.get(expected.route, RouteFacts()))
                if finding is not None:
                    report.findings.append(finding)
                    report.judged[expected.appointment_key] = expected
            if len(page) < settings.page_size:
                return report
            after = page[-1].appointment_key
    finally:
        report.calls = paced.calls


def _not_judged(expected: Expected, now: float) -> str | None:
    if expected.busy:
        return "busy"
    if expected.state not in ("active", "cancelled", "annihilated"):
        return expected.state
    if not expected.identifiers or expected.message_id is None:
        return "no_identifiers"
    # A started appointment's journey may have ended on its own, and a trigger for it would be refused.
    if expected.state == "active" and expected.start_at is not None and expected.start_at <= now:
        return "started"
    return None


def _judge(expected: Expected, found: list[dict[str, Any]], facts: RouteFacts) -> Finding | None:
    active = [i for i in found if i.get("status") in ACTIVE_STATUSES and holds(i, expected.identifiers)]
    instance_ids = [str(i.get("id", "")) for i in active]

    def finding(kind: Drift, **details: Any) -> Finding:
        return Finding(kind, expected.appointment_key, expected.route, expected.message_id, details)

    if expected.state != "active":
        if active:
            return finding(Drift.ACTIVE_CANCELLED, state=expected.state, active_instances=len(active),
                           instance_ids=instance_ids)  # fmt: skip
        return None
    if not active:
        ended = [i for i in found if _ended_on_its_own(i, expected)]
        return None if ended else finding(Drift.MISSING, active_instances=0)
    if len(active) > 1:
        return finding(Drift.DOUBLED, active_instances=len(active), instance_ids=instance_ids)
    if expected.parameters is None:
        return None  # purged by retention: nothing to compare
    held = active[0].get("parameters") or {}
    differ = sorted(k for k in expected.parameters.keys() | held.keys() if expected.parameters.get(k) != held.get(k))
    if not differ:
        return None
    kind = Drift.STALE_START if facts.start_parameters & set(differ) else Drift.STALE_PARAMETERS
    return finding(kind, parameters=differ, instance_ids=instance_ids)


def _ended_on_its_own(instance: dict[str, Any], expected: Expected) -> bool:
    """An instance with the log's parameters that is no longer active and was not cancelled: its journey
    ran to its end (a reminder flow may finish before the appointment), so triggering it again would repeat it."""
    status = str(instance.get("status", ""))
    mine = holds(instance, expected.parameters or expected.identifiers)
    return mine and status not in ACTIVE_STATUSES and "cancel" not in status.lower()


def repair(
    engine: Engine,
    report: Report,
    routes: dict[str, RouteFacts],
    actor: str,
    dry_run: bool = False,
    channel: str = "cli",
    now: float | None = None,
) -> Report:
    """Queue the command that fixes each finding (``finding.repair`` says which, and its id).

    Each queued repair commits with its audit entry (action ``repair``) and the appointment's memory set
    ``uncertain``, so the dispatcher searches before it acts. An appointment that changed since it was
    judged (a new message, a command under way) is left alone; ``dry_run`` writes nothing."""
    at = time.time() if now is None else now
    for finding in report.findings:
        kind = REPAIR[Drift(finding.kind)]
        plan: dict[str, Any] = {"command": kind, "command_id": None, "queued": False, "note": ""}
        finding.repair = plan
        expected = report.judged.get(finding.appointment)
        facts = routes.get(finding.route)
        command, why_not = _command(expected, kind, facts)
        if command is None or expected is None:
            plan["note"] = why_not
            continue
        if dry_run:
            plan["note"] = "dry run: would be queued"
            continue
        with engine.begin() as conn:
            command_id = queue_repair(conn, expected, command, at)
            if command_id is not None:
                record(conn, AuditEntry(actor, channel, "repair", "command", (command_id,),
                                        details={"kind": finding.kind, "command": kind,
                                                 "message_id": finding.message_id}), now=at)  # fmt: skip
        if command_id is None:
            plan["note"] = "the appointment changed since it was checked; not queued"
        else:
            plan.update(command_id=command_id, queued=True)
    return report


def _command(expected: Expected | None, kind: str, facts: RouteFacts | None) -> tuple[Command | None, str]:
    if expected is None:
        return None, "the appointment changed since it was checked; not queued"
    if facts is None:
        return None, f"route {expected.route!r} is no longer configured; not queued"
    parameters = expected.parameters or {}
    if kind != CANCEL and not parameters:
        return None, "the parameters last triggered were purged by retention; replay the message instead"
    command = Command(kind, expected.route, expected.chat_bot_id, expected.time_zone,
                      None if kind == CANCEL else facts.flow_id, parameters, expected.identifiers,
                      expected.appointment_key, expected.start_at)  # fmt: skip
    return command, ""
