"""The service's status: from the facts it knows to ``ok``, ``degraded`` or ``failing``, with plain reasons.

``assess`` is pure, so ``GET /status``, ``hl7bridge status`` and the JSON API judge alike, and each rule is
tested on its own. What decides:

- **failing** (it is not doing its job; someone must act now): the dispatcher is not running, the API refused
  the token (dispatching paused), the log cannot be written or read, or a listener is not bound.
- **degraded** (it works, but needs attention soon): the API does not answer (dispatching holds), dead
  letters wait for an operator, an instance on the log has no heartbeat for 3 leases (down), the outbox's oldest command waits longer than ``health.outbox_stuck_after``,
  descriptors run short, the search index is being rebuilt or cannot be written, or the API token expires
  within ``TOKEN_WARNING_DAYS`` (``api.token_expires``).
- **ok** otherwise.

Reasons are sentences without patient data: they go to monitoring and terminals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge import store
from hl7bridge.core.status import ServiceState
from hl7bridge.dispatch.pipe import DispatchState
from hl7bridge.store.cluster import InstanceRow, current_leader, in_flight, instance_rows

#: The token's expiry turns the state ``degraded`` this many days ahead.
TOKEN_WARNING_DAYS = 14
#: An instance without a heartbeat for this many of its leases (``service.dispatch_lease``) is down.
DOWN_AFTER_LEASES = 3


def _is_down(instance: InstanceRow) -> bool:
    return instance.age > DOWN_AFTER_LEASES * instance.lease


@dataclass(frozen=True)
class ListenerFacts:
    name: str
    connections: int
    #: Epoch seconds of the last message received (from the log at start-up, then live); None: never.
    last_message_at: float | None


@dataclass(frozen=True)
class LogFacts:
    """What the log alone tells: also all ``hl7bridge status`` can say when the service is not running."""

    outbox_depth: int = 0
    #: Seconds the oldest open command has waited.
    outbox_oldest_age: float | None = None
    dead_letters_open: int = 0
    #: Epoch seconds since when the oldest open dead letter waits.
    dead_letters_since: float | None = None
    #: The service instances on this log (heartbeat ages as of the read), and the leading one's id.
    instances: tuple[InstanceRow, ...] = ()
    leader: str | None = None
    #: Commands in flight (the leader's).
    in_flight: int = 0
    #: The leader's lease (s), and seconds since it renewed it by the database's clock (None: SQLite, where
    #: nothing is renewed: nobody else can take the file's lock).
    lease: float | None = None
    renewed_age: float | None = None

    def down(self) -> list[InstanceRow]:
        """Instances whose heartbeat is older than ``DOWN_AFTER_LEASES`` of their leases."""
        return [i for i in self.instances if _is_down(i)]

    def role(self, instance: InstanceRow) -> str:
        if _is_down(instance):
            return "down"
        if self.leader is None:
            return "no leader yet"  # a dispatcher starting, or none configured: nobody stands by for anyone
        return "leader" if instance.id == self.leader else "standby"

    def _lease(self) -> dict[str, Any]:
        """The leader's lease: renewed this long ago, against a lease the standbys wait out before taking over."""
        return {"seconds": self.lease, "renewed_age_s": _round(self.renewed_age)}

    def to_json(self, this: str | None = None) -> dict[str, Any]:
        """``this``: the answering service's instance id, marked ``"this"`` (behind a balancer, which one answered)."""
        return {
            "outbox": {"depth": self.outbox_depth, "oldest_age_s": _round(self.outbox_oldest_age)},
            "dead_letters": {"open": self.dead_letters_open, "oldest_since": iso(self.dead_letters_since)},
            "instances": [
                {"id": i.id, "name": i.name, "host": i.host, "pid": i.pid, "version": i.version, "role": self.role(i),
                 "heartbeat_age_s": _round(i.age), "started_at": iso(i.started_at),
                 "last_message_at": iso(i.last_message_at),
                 "in_flight": self.in_flight if i.id == self.leader else None, "this": i.id == this,
                 "lease": self._lease() if i.id == self.leader else None}
                for i in self.instances
            ],
        }  # fmt: skip


@dataclass(frozen=True)
class Facts:
    """What the running service knows at ``now``."""

    now: float
    log: LogFacts = field(default_factory=LogFacts)
    #: None: no routes, so nothing is dispatched.
    dispatch: DispatchState | None = None
    listeners: tuple[ListenerFacts, ...] = ()
    #: Why the listeners are not all bound (None: they are).
    listeners_problem: str | None = None
    #: Why the log is not taking writes, or cannot be read (None: it is fine).
    database_problem: str | None = None
    descriptors_problem: str | None = None
    #: ``health.outbox_stuck_after``: an older open command turns the state degraded.
    outbox_limit: float = 900.0
    #: ``api.token_expires``.
    token_expires: datetime | None = None
    #: This service's ``instances.id``.
    instance: str | None = None
    #: Why searches are incomplete (the search index rebuilt from the log, or failing); None: they are not.
    search_index_problem: str | None = None

    @property
    def role(self) -> str | None:
        """This instance's dispatcher: "leader", "standby" (another leads: nothing wrong), None (none leads yet)."""
        if self.log.leader is None or self.instance is None:
            return None
        return "leader" if self.log.leader == self.instance else "standby"


@dataclass(frozen=True)
class Status:
    state: ServiceState
    reasons: tuple[str, ...]
    facts: Facts

    def to_json(self) -> dict[str, Any]:
        facts = self.facts
        dispatch = facts.dispatch
        token = facts.token_expires
        return {
            "state": self.state.value,
            "reasons": list(self.reasons),
            "at": iso(facts.now),
            "dispatch": None
            if dispatch is None
            else {
                "role": facts.role,
                "running": dispatch.down_reason is None,
                "down_reason": dispatch.down_reason,
                "held": dispatch.held,
                "held_since": iso(dispatch.held_since),
                "held_reason": dispatch.held_reason,
                "auth_paused": dispatch.paused,
                "paused_since": iso(dispatch.paused_since),
                "paused_until": iso(dispatch.paused_until),
                "paused_reason": dispatch.paused_reason,
            },
            **facts.log.to_json(facts.instance),
            "listeners": [
                {"name": lst.name, "connections": lst.connections, "last_message_at": iso(lst.last_message_at)}
                for lst in facts.listeners
            ],
            "database": {"ok": facts.database_problem is None, "problem": facts.database_problem},
            "search_index": {"ok": facts.search_index_problem is None, "problem": facts.search_index_problem},
            "api_token": {
                "expires": token.isoformat() if token else None,
                "days_left": None if token is None else _round((token.timestamp() - facts.now) / 86400),
            },
        }


def assess(facts: Facts) -> Status:
    """The state and its reasons, the worst first."""
    failing: list[str] = []
    degraded: list[str] = []
    dispatch = facts.dispatch
    if dispatch is not None and dispatch.down_reason:
        failing.append(f"The dispatcher is not running: {dispatch.down_reason}.")
    elif dispatch is not None and dispatch.paused:
        until = f"; the next try is at {_when(dispatch.paused_until)}" if dispatch.paused_until else ""
        failing.append(f"Dispatching is paused since {_when(dispatch.paused_since)}: {dispatch.paused_reason}{until}.")
    if facts.database_problem:
        failing.append(f"The message log: {facts.database_problem}.")
    if facts.listeners_problem:
        failing.append(f"Listeners: {facts.listeners_problem}.")
    if dispatch is not None and dispatch.held and not dispatch.down_reason:
        degraded.append(f"Dispatching holds since {_when(dispatch.held_since)}: {dispatch.held_reason}; one command "
                        "at a time is tried until the Journeys API answers.")  # fmt: skip
    log = facts.log
    if log.dead_letters_open:
        degraded.append(f"{log.dead_letters_open} dead letter(s) wait for an operator, the oldest since "
                        f"{_when(log.dead_letters_since)} (hl7bridge dead-letters list).")  # fmt: skip
    if log.outbox_oldest_age is not None and log.outbox_oldest_age > facts.outbox_limit:
        degraded.append(f"{log.outbox_depth} command(s) wait to be dispatched, the oldest for "
                        f"{log.outbox_oldest_age:.0f} s (health.outbox_stuck_after is {facts.outbox_limit:.0f} s).")  # fmt: skip
    for instance in log.down():
        degraded.append(f"Instance {instance.name} ({instance.host}, pid {instance.pid}) is down: no heartbeat for "
                        f"{instance.age:.0f} s.")  # fmt: skip
    if facts.descriptors_problem:
        degraded.append(f"File descriptors: {facts.descriptors_problem}.")
    if facts.search_index_problem:
        degraded.append(f"The search index: {facts.search_index_problem}.")
    token = token_reason(facts.token_expires, facts.now)
    if token:
        degraded.append(token)
    state = ServiceState.FAILING if failing else ServiceState.DEGRADED if degraded else ServiceState.OK
    return Status(state, tuple(failing + degraded), facts)


def token_reason(expires: datetime | None, now: float) -> str | None:
    """A reason when the API token expires within ``TOKEN_WARNING_DAYS`` (or has expired), naming the date."""
    if expires is None:
        return None
    left = expires.timestamp() - now
    if left > TOKEN_WARNING_DAYS * 86400:
        return None
    day = expires.date().isoformat()
    if left <= 0:
        return f"The API token expired on {day} (api.token_expires): renew it, or the API will refuse it."
    return (f"The API token expires on {day}, in {left / 86400:.0f} day(s) (api.token_expires): renew it "
            "and update api.token_expires.")  # fmt: skip


def log_facts(engine: Engine, now: float | None = None) -> LogFacts:
    """Outbox depth and age, the open dead letters and the instances, in one read of the log (off the reactor
    thread)."""
    at = time.time() if now is None else now
    with engine.connect() as conn:
        depth, oldest = store.outbox_depth(conn, at)
        dead, since = store.open_dead_letters(conn)
        leader = current_leader(conn)
        renews = leader is not None and leader.backend_pid is not None
        return LogFacts(depth, oldest, dead, since, tuple(instance_rows(conn)), leader and leader.instance,
                        in_flight(conn), leader and leader.lease, leader.age if renews else None)  # fmt: skip


def iso(ts: float | None) -> str | None:
    """Epoch seconds as ISO 8601 in UTC, the form ``/status`` gives every time in."""
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _when(ts: float | None) -> str:
    return iso(ts) or "an unknown time"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
