"""`--text` finds the same messages on a SQLite log (FTS5, unicode61) and on PostgreSQL (``message_words``, a
tsvector of ``store.text_tokens``): whole words and ``word*`` prefixes, case and a Latin letter's diacritic folded
as FTS5 folds them, every word required. The messages go in through the writer, as intake writes them; on
SQLite they are searched both past the index (read directly) and from it, on PostgreSQL they are indexed as they
are written."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from hl7bridge.store import Writer, WriteRequest, WriteResult, open_engine, search_terms
from hl7bridge.store.schema import text_tokens
from hl7bridge.store.search_index import catch_up
from hl7bridge.workflow.search import Filters, search

#: control id -> the words of the message (its patient's family name and the visit's reason).
WORDS = {
    "W-1": ("José", "Müller follow-up"),
    "W-2": ("JOSE", "Mueller"),
    "W-3": ("Straße", "Øster"),
    "W-4": ("Strasse", "Oster"),
    "W-5": ("O'Brien", "post-op check"),
    "W-6": ("İstanbul", "Йосиф"),
    "W-7": ("Dvořák", "c1d Nguyễn"),
}
#: what the operator types -> the messages found, newest first.
CASES = {
    "jose": ["W-2", "W-1"],
    "JOSÉ": ["W-2", "W-1"],
    "jos": [],
    "jos*": ["W-2", "W-1"],
    "mü*": ["W-2", "W-1"],
    "müller": ["W-1"],
    "mueller": ["W-2"],
    "straße": ["W-3"],
    "strasse": ["W-4"],
    "øster": ["W-3"],
    "oster": ["W-4"],
    "o'brien": ["W-5"],
    "brien": ["W-5"],
    "post-op": ["W-5"],
    "op": ["W-5"],
    "po*": ["W-5"],
    "follow*": ["W-1"],
    "istanbul": ["W-6"],
    "йосиф": ["W-6"],
    "иосиф": [],
    "dvorak": ["W-7"],
    "DVOŘÁK": ["W-7"],
    "C1D": ["W-7"],
    "nguyễn": ["W-7"],
    "nguyen": [],
    "jose müller": ["W-1"],
    "jose dvorak": [],
}


def _write(engine, rows: list[dict]) -> None:
    """The rows through the service's writer (SQLite's fast path, PostgreSQL's generic path)."""
    done = threading.Semaphore(0)
    results: list[WriteResult] = []

    def direct(fn, *args):
        fn(*args)

    writer = Writer(engine, direct)
    writer.start()
    for row in rows:
        writer.submit(WriteRequest(row, None, lambda r: (results.append(r), done.release())))
    for _ in rows:
        assert done.acquire(timeout=30)
    writer.stop()
    assert not [r.error for r in results if r.error]


def _row(control: str, family: str, reason: str) -> dict:
    summary = {"names": [{"family": family}], "reason": reason, "patient_ids": [{"value": f"MRN-{control}"}]}
    terms, words = search_terms(control, "EPIC", "MAIN", summary)
    return {"received_at": time.time(), "listener": "main", "peer": "p", "status": "ignored", "control_id": control,
            "sending_application": "EPIC", "sending_facility": "MAIN", "search_terms": terms, "search_text": words}  # fmt: skip


def test_text_tokens_are_fts5s_tokens() -> None:
    assert text_tokens("José MÜLLER, post-op: c1d Straße Ø İstanbul Nguyễn ǅ ﬁ") == [
        "jose", "muller", "post", "op", "c1d", "straße", "ø", "istanbul", "nguyễn", "ǆ", "ﬁ"
    ]  # fmt: skip


def test_text_search_finds_the_same_words_on_both_logs(database_url: str, tmp_path: Path) -> None:
    engine = open_engine(database_url)
    _write(engine, [_row(control, *words) for control, words in WORDS.items()])

    def found() -> dict[str, list[str]]:
        return {words: [r["control_id"] for r in search(engine, Filters(text=words, since=0.0), limit=20).rows]
                for words in CASES}  # fmt: skip

    if engine.dialect.name == "sqlite":
        assert found() == CASES  # past the index, read directly
        assert catch_up(engine) == len(WORDS)
    assert found() == CASES
    assert [r["control_id"] for r in search(engine, Filters(text="jose", patient="MRN-W-1", since=0.0)).rows] == ["W-1"]


@pytest.mark.parametrize("words", ["", "*", "-- ++"])
def test_words_without_a_letter_or_digit_are_refused(database_url: str, words: str) -> None:
    from hl7bridge.workflow.search import SearchError

    engine = open_engine(database_url)
    with pytest.raises(SearchError, match="needs a word"):
        search(engine, Filters(text=words or " ", since=0.0))
