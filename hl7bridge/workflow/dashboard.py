"""The operator's picture at a glance, from the log: messages per minute by ACK code over the last hour, the outbox
(depth and oldest age), open dead letters, each listener's last message, and totals. One read transaction of
bounded queries (``store.dashboard``), so the console's dashboard renders quickly however long the log.

What only the running service knows (held or paused dispatch and why, connections) is ``/status``'s."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.store import open_dead_letters, outbox_depth
from hl7bridge.store.dashboard import listeners_seen, newest, per_minute

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
        }


def dashboard(engine: Engine, *, now: float | None = None, minutes: int = 60) -> Dashboard:
    """The dashboard at ``now`` over the last ``minutes`` whole minutes, the current one included (ValueError
    when ``minutes`` is not 1 to ``MAX_MINUTES``)."""
    if isinstance(minutes, bool) or not isinstance(minutes, int) or not 1 <= minutes <= MAX_MINUTES:
        raise ValueError(f"minutes must be a whole number from 1 to {MAX_MINUTES}")
    at = time.time() if now is None else now
    current = math.floor(at / 60)
    first = current - minutes + 1
    since, until = first * 60.0, (current + 1) * 60.0
    with engine.connect() as conn:
        counted = per_minute(conn, since, until)
        seen = listeners_seen(conn, since, until)
        depth, oldest = outbox_depth(conn, at)
        dead, dead_since = open_dead_letters(conn)
        logged, last = newest(conn)
    buckets: dict[int, dict[str, int]] = {m: {} for m in range(first, current + 1)}
    window: dict[str, int] = {}
    for minute, code, count in counted:
        key = code or "-"
        if minute in buckets:
            buckets[minute][key] = buckets[minute].get(key, 0) + count
        window[key] = window.get(key, 0) + count
    return Dashboard(
        at=at,
        minutes=minutes,
        per_minute=[{"minute": m * 60.0, "counts": counts} for m, counts in buckets.items()],
        window_counts=dict(sorted(window.items())),
        window_total=sum(window.values()),
        outbox_depth=depth,
        outbox_oldest_age_s=round(oldest, 1) if oldest is not None else None,
        dead_letters=dead,
        dead_letters_since=dead_since,
        listeners=[{"name": name, "last_message_at": seen[name]} for name in sorted(seen)],
        messages_logged=logged,
        last_message_at=last,
    )
