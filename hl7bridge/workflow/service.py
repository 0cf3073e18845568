"""Operator actions on the running service: dispatch now, reload. Each is audited in its own transaction.

Reaching the service (a signal, or the JSON API's own process) is the caller's part; these record the action
and do its database half, so the CLI and the JSON API act alike."""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from hl7bridge.store import AuditEntry, audit, due_now
from hl7bridge.store.cluster import ask_dispatch_now, leader_name


@dataclass(frozen=True)
class DispatchNow:
    #: Open commands whose backoff was ended (they are due at once).
    commands_due: int
    at: float
    #: The name of the instance whose dispatcher leads (and sends them); None: none leads yet.
    leader: str | None = None


def dispatch_now(engine: Engine, actor: str, channel: str, now: float | None = None) -> DispatchNow:
    """End every open command's backoff so the dispatcher sends what waits on its next pass (per-appointment
    order and the appointment memory still apply, so nothing doubles), and ask the leader, on whichever instance
    it runs, to end its hold and pause at once (``cluster.ask_dispatch_now``)."""
    at = time.time() if now is None else now
    with engine.begin() as conn:
        due = due_now(conn, at)
        audit.record(conn, AuditEntry(actor, channel, action="dispatch-now", target="command",
                                      details={"commands_due": due}), now=at)  # fmt: skip
        ask_dispatch_now(conn, at)
        leader = leader_name(conn)
    return DispatchNow(due, at, leader)


def record_reload(engine: Engine, actor: str, channel: str, pid: int, config: str) -> None:
    """A reload asked of the service (process ``pid``) with the configuration file ``config``."""
    with engine.begin() as conn:
        audit.record(conn, AuditEntry(actor, channel, action="reload", target="service", ids=(pid,),
                                      details={"config": config}))  # fmt: skip
