"""Find messages by appointment, patient, control id, sender or words, newest first, a page at a time.

Every filter is answered from the search index (``search_keys`` and the words: a SQLite log's in a file of its
own, filled in batches about a second behind intake; PostgreSQL's written with each message; ``store.search``
holds the queries), never by
reading raw messages, so a search costs the same on a log of a million messages as on a small one. Messages
the index has not reached yet are searched directly while they are few; past that the page says how many
were not searched (``unindexed``), so an incomplete result is never silent. Pages are keyset pages:
``before`` is the last id of the page seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.store import search as store_search
from hl7bridge.store.search import Filters, SearchError

__all__ = ["MAX_LIMIT", "Filters", "Page", "SearchError", "check", "explain", "search", "unindexed_note"]

MAX_LIMIT = 100_000


@dataclass
class Page:
    rows: list[dict[str, Any]]
    #: More messages match beyond this page: ask again with ``before=next_before``.
    more: bool
    next_before: int | None
    #: Messages newer than the search index that were not searched (too many to read directly): they may match.
    unindexed: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"messages": self.rows, "more": self.more, "next_before": self.next_before,
                "unindexed": self.unindexed}  # fmt: skip


def search(engine: Engine, filters: Filters, before: int | None = None, limit: int = 50) -> Page:
    """One page of the messages matching every filter, newest first."""
    if not 1 <= limit <= MAX_LIMIT:
        raise SearchError(f"--limit must be from 1 to {MAX_LIMIT}")
    check(filters)
    with engine.connect() as conn:
        found = store_search.page(conn, filters, before, limit + 1)
    rows = found.rows
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(rows, more, rows[-1]["id"] if more else None, found.unindexed)


def unindexed_note(unindexed: int) -> str | None:
    """One line for the operator when a result may be incomplete: how many messages were not searched."""
    if not unindexed:
        return None
    return (f"note: the {unindexed} newest message(s) are not in the search index yet and were not searched; "
            "the running service indexes them, or is rebuilding the index from the log ('hl7bridge status' says "
            "which, and its log if this persists)")  # fmt: skip


def explain(engine: Engine, filters: Filters, before: int | None = None) -> list[str]:
    """SQLite's query plan for a search (what the tests and the benchmark check: an index, not a scan)."""
    check(filters)
    with engine.connect() as conn:
        return store_search.explain(conn, filters, before)


def check(filters: Filters) -> None:
    """Refuse a search that cannot be answered from the index, saying what to change."""
    if filters.text is not None and filters.since is None:
        raise SearchError(
            "--text searches a time window: add --since (e.g. --since 7d), or find the message by "
            "--patient, --appointment or --control-id"
        )
    for name in ("appointment", "patient", "control_id", "sender"):
        value = getattr(filters, name)
        if value is not None and not value.strip():
            raise SearchError(f"--{name.replace('_', '-')} needs a value")
