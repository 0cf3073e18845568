"""The dashboard's data (``workflow.dashboard``) against a real SQLite log filled with known ACK codes and times."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest
from sqlalchemy import select

from hl7bridge.hl7.ack import Ack
from hl7bridge.store import commands, messages, open_engine, record_ack
from hl7bridge.store.search import TAIL_MAX
from hl7bridge.store.search_index import catch_up, index_path
from hl7bridge.workflow.dashboard import dashboard

from .conftest import fixture_bytes, start_service, unique_control, wait_until

#: A minute boundary, so the expected buckets are plain arithmetic.
NOW = 1_800_000_000.0 + 30.0
CURRENT = (NOW // 60) * 60


def _message(at: float, code: str | None, listener: str = "main") -> dict:
    return {"received_at": at, "listener": listener, "peer": "p", "ack_code": code,
            "status": "accepted" if code == "AA" else "rejected"}  # fmt: skip


def _command(status: str, created: float) -> dict:
    return {"message_id": 1, "appointment_key": f"K{created}", "kind": "book", "route": "r", "chat_bot_id": "b",
            "time_zone": "UTC", "parameters": "{}", "identifiers": "{}", "status": status, "next_attempt_at": created,
            "created_at": created, "updated_at": created}  # fmt: skip


@pytest.fixture
def filled(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    rng = random.Random(19)
    expected: dict[float, dict[str, int]] = {}
    rows = []
    for back in range(70):  # 70 minutes: 10 of them before the window
        minute = CURRENT - back * 60
        for _ in range(rng.randrange(0, 6)):
            code = rng.choice(["AA", "AA", "AA", "AE", "AR", None])
            rows.append(_message(minute + rng.uniform(0, 59.999), code, rng.choice(["main", "east"])))
            if back < 60:
                bucket = expected.setdefault(minute, {})
                bucket[code or "-"] = bucket.get(code or "-", 0) + 1
    rows.append(_message(CURRENT + 60.0, "AA", "later"))  # after now's minute: outside the window
    rows.append(_message(CURRENT - 60 * 60 - 0.001, "AE", "older"))  # just before the window
    rng.shuffle(rows)
    with engine.begin() as conn:
        conn.execute(messages.insert(), rows)
        conn.execute(commands.insert(), [_command("pending", NOW - 120), _command("in_flight", NOW - 30),
                                         _command("dead", NOW - 500), _command("done", NOW - 900)])  # fmt: skip
    # The service's indexer has counted the older half by id; the rest is read directly.
    assert catch_up(engine, len(rows) // 2, once=True) == len(rows) // 2
    return engine, expected, rows


def test_per_minute_counts_match_the_log(filled) -> None:  # type: ignore[no-untyped-def]
    engine, expected, rows = filled
    shown = dashboard(engine, now=NOW, minutes=60)
    assert len(shown.per_minute) == 60
    assert shown.per_minute[-1]["minute"] == CURRENT and shown.per_minute[0]["minute"] == CURRENT - 59 * 60
    assert {b["minute"]: b["counts"] for b in shown.per_minute} == {
        CURRENT - back * 60: expected.get(CURRENT - back * 60, {}) for back in range(60)
    }
    totals: dict[str, int] = {}
    for bucket in expected.values():
        for code, count in bucket.items():
            totals[code] = totals.get(code, 0) + count
    assert shown.window_counts == dict(sorted(totals.items())) and shown.window_total == sum(totals.values())
    assert (shown.outbox_depth, shown.outbox_oldest_age_s) == (2, 120.0)
    assert (shown.dead_letters, shown.dead_letters_since) == (1, NOW - 500)
    window = [r for r in rows if CURRENT - 59 * 60 <= r["received_at"] < CURRENT + 60]
    assert shown.listeners == [
        {"name": name, "last_message_at": max(r["received_at"] for r in window if r["listener"] == name)}
        for name in sorted({r["listener"] for r in window})
    ]
    assert shown.messages_logged == len(rows) and shown.last_message_at == CURRENT + 60.0
    assert set(shown.to_json()) >= {"per_minute", "window", "outbox", "dead_letters", "listeners"}


def test_a_shorter_window_and_bad_windows(filled) -> None:  # type: ignore[no-untyped-def]
    engine, expected, _rows = filled
    shown = dashboard(engine, now=NOW, minutes=5)
    assert [b["counts"] for b in shown.per_minute] == [
        expected.get(CURRENT - back * 60, {}) for back in range(4, -1, -1)
    ]
    for bad in (0, -1, 1441, True, 2.5):
        with pytest.raises(ValueError, match="minutes must be"):
            dashboard(engine, now=NOW, minutes=bad)  # type: ignore[arg-type]


def test_counts_follow_the_index_and_an_ack_decided_later(filled) -> None:  # type: ignore[no-untyped-def]
    engine, expected, _rows = filled
    before = dashboard(engine, now=NOW, minutes=60)
    catch_up(engine, 7)
    after = dashboard(engine, now=NOW, minutes=60)
    assert after.per_minute == before.per_minute and after.listeners == before.listeners
    # A dispatched message counted as AA gets its AE when the API refused it: it moves.
    with engine.connect() as conn:
        moved, at = conn.execute(
            select(messages.c.id, messages.c.received_at).where(messages.c.ack_code == "AA")
            .where(messages.c.received_at >= CURRENT - 59 * 60).where(messages.c.received_at < CURRENT + 60).limit(1)
        ).one()  # fmt: skip
    with engine.begin() as conn:
        record_ack(conn, moved, Ack("AE", "refused", b"MSA|AE"), "accepted", None)
    changed = {b["minute"]: b["counts"] for b in dashboard(engine, now=NOW, minutes=60).per_minute}
    bucket = dict(expected[(at // 60) * 60])
    bucket["AA"] -= 1
    bucket["AE"] = bucket.get("AE", 0) + 1
    assert changed[(at // 60) * 60] == {k: v for k, v in sorted(bucket.items()) if v}
    catch_up(engine)  # the indexer applies the change to its counts: the same picture, no longer read from the log
    applied = {b["minute"]: b["counts"] for b in dashboard(engine, now=NOW, minutes=60).per_minute}
    assert applied == changed


def test_a_tail_past_the_bound_is_reported_not_counted(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    with engine.begin() as conn:
        conn.execute(messages.insert(), [_message(NOW - 1, "AA") for _ in range(TAIL_MAX + 10)])
    shown = dashboard(engine, now=NOW, minutes=1)
    assert (shown.window_total, shown.uncounted, shown.messages_logged) == (TAIL_MAX, 10, TAIL_MAX + 10)
    catch_up(engine, 100_000)
    shown = dashboard(engine, now=NOW, minutes=1)
    assert (shown.window_total, shown.uncounted) == (TAIL_MAX + 10, 0)


def test_the_running_service_counts_its_messages_into_the_dashboard(tmp_path: Path) -> None:
    """The service's own indexer (a thread, a batch a second) fills the counts the dashboard reads."""
    service = start_service(tmp_path)
    try:
        for control in ("D-1", "D-2"):
            service.request(unique_control(fixture_bytes("siu/s12_epic_v251.hl7"), control))
        service.request(fixture_bytes("malformed/s12_no_pid_v251.hl7"))
        engine = open_engine(service.url, create=False)

        def counted() -> int:
            path = index_path(engine)
            if path is None or not path.exists():
                return 0
            with sqlite3.connect(path) as conn:
                return conn.execute("SELECT sum(count) FROM message_minutes").fetchone()[0] or 0

        wait_until(lambda: counted() == 3, message="the index job counting all three")
        shown = dashboard(engine)
    finally:
        service.stop()
    assert shown.uncounted == 0 and shown.window_counts == {"AA": 2, "AE": 1}
    assert [listener["name"] for listener in shown.listeners] == ["main"]


def test_a_message_counts_in_the_minute_it_came_in(database_url: str) -> None:
    """Late in a minute too (PostgreSQL rounds a cast to integer where SQLite truncates)."""
    engine = open_engine(database_url)
    with engine.begin() as conn:
        conn.execute(messages.insert(), [_message(CURRENT - 0.5, "AR"), _message(CURRENT + 0.5, "AA"),
                                         _message(CURRENT + 59.5, "AE")])  # fmt: skip
    shown = dashboard(engine, now=CURRENT + 59.9, minutes=2)
    assert [b["counts"] for b in shown.per_minute] == [{"AR": 1}, {"AA": 1, "AE": 1}]
    assert shown.listeners == [{"name": "main", "last_message_at": CURRENT + 59.5}]
