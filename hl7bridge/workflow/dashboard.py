"""The operator's picture at a glance, from the log: messages per minute by ACK code over the last hour, the outbox
(depth and oldest age), open dead letters, each listener's last message, and totals. One read transaction of
bounded queries (``store.dashboard``: per-minute counts kept by the search index's batches), so the console's
dashboard renders quickly however long the log and however busy the hour.

What only the running service knows (held or paused dispatch and why, connections) is ``/status``'s."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.store import open_dead_letters, outbox_depth
from hl7bridge.store.dashboard import newest, window

#: The longest window: a day of minutes.
MAX_MINUTES = 1440


@dataclass(frozen=True)
class Dashboard:
    at: float
    minutes: int
    #: One entry per minute of the window, oldest first, the current minute last: ``minute`` (its start, epoch
    #: seconds) and ``counts`` (ACK code -> messages; ``-`` for messages answered with no ACK).
    per_minute: list[dict[str, Any]]
    #: The window's messages by ACK code, and in all.
    window_counts: dict[str, int]
    window_total: int
    outbox_depth: int
    outbox_oldest_age_s: float | None
    dead_letters: int
    dead_letters_since: float | None
    #: Listeners that received messages in the window, each with its last message time.
    listeners: list[dict[str, Any]]
    #: Messages logged in all (the newest id), and when the last one came.
    messages_logged: int
    last_message_at: float | None
    #: Newer messages not yet counted (the service counts a batch a second; more than 5,000 behind are left out).
    uncounted: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at,
            "minutes": self.minutes,
            "per_minute": self.per_minute,
            "window": {"counts": self.window_counts, "total": self.window_total},
            "outbox": {"depth": self.outbox_depth, "oldest_age_s": self.outbox_oldest_age_s},
            "dead_letters": {"open": self.dead_letters, "since": self.dead_letters_since},
            "listeners": self.listeners,
            "messages_logged": self.messages_logged,
            "last_message_at": self.last_message_at,
            "uncounted": self.uncounted,
        }


def dashboard(engine: Engine, *, now: float | None = None, minutes: int = 60) -> Dashboard:
    """The dashboard at ``now`` over the last ``minutes`` whole minutes, the current one included (ValueError
    when ``minutes`` is not 1 to ``MAX_MINUTES``)."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be a whole number from 1 to {MAX_MINUTES}")
    at = time.time() if now is None else now
    current = math.floor(at / 60)
    first = current - minutes + 1
    with engine.connect() as conn:
        counted = window(conn, first, current)
        depth, oldest = outbox_depth(conn, at)
        dead, dead_since = open_dead_letters(conn)
        logged, last = newest(conn)
    buckets: dict[int, dict[str, int]] = {m: {} for m in range(first, current + 1)}
    totals: dict[str, int] = {}
    for (minute, code, _listener), count in counted.counts.items():
        key = code or "-"
        if minute in buckets and count:
            buckets[minute][key] = buckets[minute].get(key, 0) + count
            totals[key] = totals.get(key, 0) + count
    return Dashboard(
        at=at,
        minutes=minutes,
        per_minute=[{"minute": m * 60.0, "counts": dict(sorted(c.items()))} for m, c in buckets.items()],
        window_counts=dict(sorted(totals.items())),
        window_total=sum(totals.values()),
        outbox_depth=depth,
        outbox_oldest_age_s=round(oldest, 1) if oldest is not None else None,
        dead_letters=dead,
        dead_letters_since=dead_since,
        listeners=[{"name": name, "last_message_at": counted.last_at[name]} for name in sorted(counted.last_at)],
        messages_logged=logged,
        last_message_at=last,
        uncounted=counted.uncounted,
    )
