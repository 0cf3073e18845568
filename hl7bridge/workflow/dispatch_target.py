"""Where the running service dispatches: the one answer for every command that reaches the Journeys API
outside the service (``replay`` sends through it, ``reconcile`` searches it).

``serve --sandbox`` and ``serve --api-url`` replace the config's ``api.base_url``, so the service records the
URL it really uses in the log's meta table at start; a separate CLI process reads it back from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge import store
from hl7bridge.core.logs import local_time


@dataclass(frozen=True)
class DispatchTarget:
    """The base URL the service dispatches to, and why that one."""

    base_url: str
    #: When the service recorded it at its start (epoch seconds); None: the config's ``api.base_url``.
    recorded_at: float | None = None

    def describe(self) -> str:
        if self.recorded_at is None:
            return f"{self.base_url} (api.base_url; no service has recorded where it dispatches)"
        return f"{self.base_url} (where the service started at {local_time(self.recorded_at)} dispatches)"

    def to_json(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "recorded_at": self.recorded_at}


def record_dispatch_target(conn: Any, base_url: str, at: float) -> None:
    """The service's start: run in the writer, like every write of the service."""
    store.set_meta(conn, store.DISPATCH_URL_KEY, base_url)
    store.set_meta(conn, store.DISPATCH_URL_AT_KEY, repr(at))


def dispatch_target(engine: Engine, configured_url: str) -> DispatchTarget:
    """The URL the service recorded at its start; ``configured_url`` (``api.base_url``) when none has."""
    with engine.connect() as conn:
        url, at = store.get_meta(conn, store.DISPATCH_URL_KEY), store.get_meta(conn, store.DISPATCH_URL_AT_KEY)
    if not url:
        return DispatchTarget(configured_url)
    try:
        return DispatchTarget(url, float(at or 0.0))
    except ValueError:
        return DispatchTarget(url, 0.0)
