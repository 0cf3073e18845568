"""How the dispatcher's outcomes reach the log: in small writes, each command's outcome whole.

The service's writer runs a write whole before the next message, so a bulk call's hundred outcomes in one
write held a message back; a final status is never reopened, and an appointment's memory keeps the last
of several memos in one write. Real writer, real SQLite file, the sandbox over real HTTP.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient, TokenSource
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.mapping.routing import BOOK, Command
from hl7bridge.store import CommandUpdate, Job, OutboxWrite, Writer, apply_updates, command_values, open_engine
from hl7bridge.store.schema import appointments, commands, messages

from .conftest import RunningSandbox, wait_until
from .dispatch_support import sandbox_for_module


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


def booking(number: int, now: float) -> dict[str, Any]:
    start = now + 30 * 86400
    parameters = {
        "patientId": f"P{number}",
        "patientName": "Test Patient",
        "appointmentId": f"OUTBOX-{number}",
        "appointmentDateTime": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start)),
        "phoneNumber": "+15555550199",
    }
    command = Command(BOOK, "reminders", "reminders", "UTC", None, parameters, {"appointmentId": f"OUTBOX-{number}"},
                      f"outbox|{number}", start)  # fmt: skip
    return command_values(command, now) | {"message_id": number}


class RecordingSink:
    """The service's writer, noting each write the dispatcher hands it."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.writes: list[OutboxWrite] = []

    def submit_job(self, job: Job) -> None:
        self.writes.append(job.work)
        self.writer.submit_job(job)


def test_a_bulk_calls_outcomes_reach_the_log_in_small_writes(tmp_path: Path, sandbox: RunningSandbox) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(messages.insert(), [{"received_at": now, "listener": "t", "peer": "t", "status": "pending"}] * 40)
        conn.execute(commands.insert(), [booking(n, now) for n in range(1, 41)])
    token = tmp_path / "token"
    token.write_text("test-token")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    sink = RecordingSink(writer)
    client = JourneysClient(ApiSettings(sandbox.url, "test-org"), TokenSource(file=str(token)))
    settings = DispatchSettings(batch_size=100, batch_window=0.2, updates_per_write=16)
    dispatcher = Dispatcher(engine, sink, client, settings)
    calls_before = len(sandbox.get("/_sandbox/calls"))
    dispatcher.start()
    try:

        def all_done() -> bool:
            with engine.connect() as conn:
                return {s for (s,) in conn.execute(select(commands.c.status))} == {"done"}

        wait_until(all_done, message="the 40 bookings to be triggered")
    finally:
        dispatcher.stop()
        writer.stop()
    calls = sandbox.get("/_sandbox/calls")[calls_before:]
    assert len(calls) == 1, calls  # one bulk call for all 40
    outcome_writes = [w for w in sink.writes if w.updates]
    assert [len(w.updates) for w in outcome_writes] == [16, 16, 8]
    assert [u.command_id for w in outcome_writes for u in w.updates] == list(range(1, 41))
    with engine.connect() as conn:
        remembered = {k: s for k, s in conn.execute(select(appointments.c.appointment_key, appointments.c.state))}
        settled = {s for (s,) in conn.execute(select(messages.c.status))}
    engine.dispose()
    assert remembered == {f"outbox|{n}": "active" for n in range(1, 41)}
    assert settled == {"accepted"}


def test_a_late_retry_does_not_reopen_a_final_command(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(commands.insert(), [booking(1, now), booking(2, now)])
        apply_updates(conn, [CommandUpdate(1, "done", "triggered", count_attempt=True)], now)
    with engine.begin() as conn:
        retries = [CommandUpdate(n, "pending", "retrying in 2.0 s: internal error", next_attempt_at=now + 2,
                                 count_attempt=True, uncertain=True) for n in (1, 2)]  # fmt: skip
        apply_updates(conn, retries, now)
        rows = {r.id: (r.status, r.outcome, r.attempts) for r in conn.execute(select(commands))}
    engine.dispose()
    assert rows == {1: ("done", "triggered", 1), 2: ("pending", "retrying in 2.0 s: internal error", 1)}


def test_the_last_memo_of_an_appointment_in_one_write_wins(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(commands.insert(), [booking(n, now) for n in (1, 2, 3, 4)])
        memos = [
            CommandUpdate(1, "done", remember=("outbox|1", "reminders", "reminders", "active", {"v": "1"})),
            CommandUpdate(2, "done", remember=("outbox|1", "reminders", "reminders", "active", {"v": "2"})),
            CommandUpdate(3, "done", remember=("outbox|1", "reminders", "reminders", "cancelled", None)),
            CommandUpdate(4, "done", remember=("outbox|4", "reminders", "reminders", "active", {"v": "4"})),
        ]
        apply_updates(conn, memos, now)
        rows = {
            r.appointment_key: (r.state, r.parameters, r.last_command_id) for r in conn.execute(select(appointments))
        }
    engine.dispose()
    # A memo without parameters keeps what was last triggered: the cancel of outbox|1 follows its second trigger.
    assert rows == {"outbox|1": ("cancelled", '{"v":"2"}', 3), "outbox|4": ("active", '{"v":"4"}', 4)}
