"""The in-memory Journeys fake shipped in ``hl7bridge.testing`` drives the real dispatcher as the API would.

Real writer, real SQLite file, the real ``Dispatcher``; only the HTTP client is the fake.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine

from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import Verdict
from hl7bridge.dispatch.rules import STRANGE_LIMIT, DispatchSettings
from hl7bridge.mapping.routing import BOOK, CANCEL, Command
from hl7bridge.store import Job, OutboxWrite, Writer, command_values, open_engine
from hl7bridge.store.schema import attempts, commands, messages
from hl7bridge.testing.journeys import FakeJourneys

from .conftest import wait_until


def _command(kind: str, message: int, appointment: int, now: float) -> dict[str, Any]:
    key = {"appointmentId": f"T-{appointment}"}
    parameters = {**key, "patientName": "Test Patient"} if kind == BOOK else {}
    command = Command(kind, "reminders", "reminders", "UTC", None, parameters, key, f"t|{appointment}", now + 86400)
    return command_values(command, now) | {"message_id": message}


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[Engine, FakeJourneys, Dispatcher]]:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    api = FakeJourneys()
    dispatcher = Dispatcher(engine, writer, api, DispatchSettings(batch_window=0.05, retry_initial=0.05, retry_max=0.1))
    dispatcher.start()
    yield engine, api, dispatcher
    dispatcher.stop()
    writer.stop()
    engine.dispose()


def _queue(engine: Engine, dispatcher: Dispatcher, rows: list[dict[str, Any]]) -> None:
    with engine.begin() as conn:
        for row in rows:
            conn.execute(messages.insert(), {"id": row["message_id"], "received_at": time.time(), "listener": "t",
                                             "peer": "t", "status": "pending"})  # fmt: skip
        conn.execute(commands.insert(), rows)
    dispatcher.wake()


def _statuses(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return [s for (s,) in conn.execute(select(commands.c.status).order_by(commands.c.id))]


def test_bookings_then_a_cancel_reach_the_fake_as_calls_and_instances(bridge) -> None:
    engine, api, dispatcher = bridge
    now = time.time()
    _queue(engine, dispatcher, [_command(BOOK, n, n, now) for n in (1, 2, 3)])
    wait_until(lambda: _statuses(engine) == ["done"] * 3, message="three bookings triggered")
    assert [c.operation for c in api.calls] == ["trigger"]
    assert sorted(i["parameters"]["appointmentId"] for i in api.active("reminders")) == ["T-1", "T-2", "T-3"]

    _queue(
        engine,
        dispatcher,
        [_command(CANCEL, 4, 1, now)],
    )
    wait_until(lambda: _statuses(engine) == ["done"] * 4, message="the cancel done")
    assert [c.operation for c in api.calls[1:]] == ["search", "cancel"]
    assert sorted(i["parameters"]["appointmentId"] for i in api.active("reminders")) == ["T-2", "T-3"]


def test_an_injected_503_is_retried_and_then_succeeds(bridge) -> None:
    engine, api, dispatcher = bridge
    api.fail_next(Verdict.RETRYABLE, 503)
    _queue(engine, dispatcher, [_command(BOOK, 1, 1, time.time())])
    wait_until(lambda: _statuses(engine) == ["done"], message="the booking triggered after a retry")
    # A 503 did nothing at the API, so the trigger is simply sent again (no search first).
    assert [c.operation for c in api.calls] == ["trigger", "trigger"]
    assert len(api.active("reminders")) == 1


class RefusingLog:
    """The service's writer, but the log refuses the first ``refusals`` outcome writes (as when another
    process holds it locked): in-flight marks go through, so each refusal comes after a real API call."""

    def __init__(self, writer: Writer, refusals: int) -> None:
        self.writer, self.refusals = writer, refusals

    def submit_job(self, job: Job) -> None:
        if isinstance(job.work, OutboxWrite) and job.work.updates and self.refusals > 0:
            self.refusals -= 1
            job.on_done(None, sqlite3.OperationalError("database is locked"))
            return
        self.writer.submit_job(job)


def test_a_log_that_refuses_writes_never_dead_letters_a_command(tmp_path: Path) -> None:
    """The log's trouble is not the command's: more refusals than a command's strange-answer limit still end
    in one journey, sent once, with no 'internal error' attempt and no dead letter."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    api = FakeJourneys()
    settings = DispatchSettings(batch_window=0.01, retry_initial=0.01, retry_max=0.05, poll_interval=0.05)
    dispatcher = Dispatcher(engine, RefusingLog(writer, 2 * STRANGE_LIMIT + 1), api, settings)
    dispatcher.start()
    try:
        _queue(engine, dispatcher, [_command(BOOK, 1, 1, time.time())])
        wait_until(lambda: _statuses(engine) == ["done"], timeout=30, message="the booking done once the log writes")
        assert [c.operation for c in api.calls].count("trigger") == 1
        assert len(api.active("reminders")) == 1
        with engine.connect() as conn:
            verdicts = [v for (v,) in conn.execute(select(attempts.c.verdict))]
        assert "internal" not in verdicts, verdicts
    finally:
        dispatcher.stop()
        writer.stop()
        engine.dispose()
