"""Jobs through the single writer: a failed job leaves nothing behind, alone or among others.

A lone job runs without a savepoint (its transaction is its boundary), a batch gives each job its own
savepoint; both must keep a failed job's partial writes out of the log. Real writer, real SQLite file.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from hl7bridge.store import Job, Writer, WriteRequest, open_engine
from hl7bridge.store.schema import appointments, messages

from .conftest import wait_until


def remember(key: str, fail: bool = False, takes: float = 0.0):
    def work(conn: Any) -> str:
        time.sleep(takes)
        conn.execute(appointments.insert().values(appointment_key=key, route="r", chat_bot_id="b", state="active",
                                                  updated_at=0.0))  # fmt: skip
        if fail:
            raise ValueError(f"{key} failed after its insert")
        return key

    return work


def run(
    tmp_path: Path, jobs: list[tuple[str, bool]], job_slice: float = 0.0, takes: float = 0.0
) -> tuple[list[tuple[Any, str | None]], set[str], int]:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args), job_slice=job_slice)
    outcomes: list[tuple[Any, str | None]] = [None] * len(jobs)  # type: ignore[list-item]
    done = threading.Semaphore(0)

    def collect(index: int):
        def on_done(result: Any, error: BaseException | None) -> None:
            outcomes[index] = (result, str(error) if error else None)
            done.release()

        return on_done

    for index, (key, fail) in enumerate(jobs):
        writer.submit_job(Job(remember(key, fail, takes), collect(index)))  # queued before the thread starts: one batch
    writer.start()
    for _ in jobs:
        assert done.acquire(timeout=10)
    writer.stop()
    with engine.connect() as conn:
        keys = {k for (k,) in conn.execute(select(appointments.c.appointment_key))}
        assert conn.execute(select(func.count()).select_from(appointments)).scalar() == len(keys)
    engine.dispose()
    return outcomes, keys, writer.commits


def test_a_lone_failed_job_commits_nothing(tmp_path: Path) -> None:
    outcomes, keys, _ = run(tmp_path, [("A-1", True)])
    assert outcomes == [(None, "A-1 failed after its insert")]
    assert keys == set()


def test_a_lone_job_commits(tmp_path: Path) -> None:
    outcomes, keys, _ = run(tmp_path, [("A-1", False)])
    assert outcomes == [("A-1", None)]
    assert keys == {"A-1"}


def test_in_a_batch_only_the_failed_job_is_undone(tmp_path: Path) -> None:
    outcomes, keys, _ = run(tmp_path, [("A-1", False), ("A-2", True), ("A-3", False)])
    assert outcomes == [("A-1", None), (None, "A-2 failed after its insert"), ("A-3", None)]
    assert keys == {"A-1", "A-3"}


def test_a_job_slice_splits_a_batch_into_several_transactions(tmp_path: Path) -> None:
    jobs = [("A-1", False), ("A-2", True), ("A-3", False), ("A-4", False)]
    outcomes, keys, commits = run(tmp_path, jobs, job_slice=0.002, takes=0.003)
    assert outcomes == [("A-1", None), (None, "A-2 failed after its insert"), ("A-3", None), ("A-4", None)]
    assert keys == {"A-1", "A-3", "A-4"}
    assert commits == 4  # each job outlasts the slice: one transaction each


def message_values(control_id: str) -> dict[str, Any]:
    """A message row as the pipeline would hand it to the writer (every column, most of them empty)."""
    row: dict[str, Any] = dict.fromkeys(c.name for c in messages.columns if c.name != "id")
    return row | {"received_at": time.time(), "listener": "main", "peer": "127.0.0.1", "raw": b"MSH|",
                  "control_id": control_id, "status": "accepted"}  # fmt: skip


def test_a_message_that_comes_during_a_job_slice_is_written_before_the_next_slice(tmp_path: Path) -> None:
    """The dispatcher's results queue up after an outage; a message that arrives meanwhile waits one slice of
    them (its sender waits for the ACK), not all of them."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args), job_slice=0.002)
    order: list[str] = []
    done = threading.Semaphore(0)

    def job(key: str, then: Any = None):
        def work(conn: Any) -> str:
            order.append(key)
            remember(key, takes=0.003)(conn)
            if then is not None:
                then()
            return key

        return work

    message = WriteRequest(message_values("W-MSG-1"), None, lambda result: (order.append("message"), done.release()))
    for i in range(4):
        then = (lambda: writer.submit(message)) if i == 0 else None
        writer.submit_job(Job(job(f"W-J{i}", then), lambda _r, _e: done.release()))
    writer.start()
    for _ in range(5):
        assert done.acquire(timeout=10)
    writer.stop()
    assert order == ["W-J0", "message", "W-J1", "W-J2", "W-J3"]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(messages)).scalar() == 1
    engine.dispose()


def test_a_job_that_need_not_be_durable_commits_alone_without_waiting_for_fsync(tmp_path: Path) -> None:
    """The search index's job (``durable=False``) commits with ``synchronous=NORMAL``, in a transaction of its
    own; the jobs around it, queued in the same batch, still commit durably (FULL) and apart from it."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args), job_slice=0.0)
    seen: list[tuple[str, int]] = []
    done = threading.Semaphore(0)

    def job(key: str):
        def work(conn: Any) -> str:
            seen.append((key, conn.exec_driver_sql("PRAGMA synchronous").scalar()))
            return remember(key)(conn)

        return work

    for key, durable in (("D-1", True), ("N-1", False), ("D-2", True), ("D-3", True)):
        writer.submit_job(Job(job(key), lambda _r, _e: done.release(), durable=durable))
    writer.start()
    for _ in range(4):
        assert done.acquire(timeout=10)
    writer.stop()
    full, normal = 2, 1
    assert seen == [("D-1", full), ("N-1", normal), ("D-2", full), ("D-3", full)]
    assert writer.commits == 3  # D-1 | N-1 | D-2 and D-3 together
    with engine.connect() as conn:
        assert {k for (k,) in conn.execute(select(appointments.c.appointment_key))} == {"D-1", "N-1", "D-2", "D-3"}
    engine.dispose()


def test_a_job_commit_runs_no_automatic_checkpoint(tmp_path: Path) -> None:
    """The writer schedules checkpoints between groups; a job's commit past SQLite's 1,000-page threshold must not
    copy the WAL into the database itself (the messages queued behind the job would wait for it), and the pooled
    connection keeps its own threshold afterwards. Copied pages would grow the database file."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    done = threading.Event()
    results: list[Any] = []

    def big(conn: Any) -> None:
        conn.execute(appointments.insert(), [{"appointment_key": f"k{n}", "route": "r" * 4000, "chat_bot_id": "b",
                                              "state": "active", "updated_at": 0.0} for n in range(1500)])  # fmt: skip

    writer.start()
    writer.submit_job(Job(big, lambda result, error: (results.append(error), done.set())))
    assert done.wait(10) and results == [None]
    size, wal = (tmp_path / "log.db").stat().st_size, (tmp_path / "log.db-wal").stat().st_size
    assert wal > 1000 * 4096 and size < 1_000_000, (size, wal)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 1000
    writer.stop()
    engine.dispose()


def test_jobs_alone_are_checkpointed(tmp_path: Path) -> None:
    """Before any message (a restart on a quiet feed), the jobs' WAL is still copied into the database by the
    writer's own checkpoint: a job's commit runs none, and nothing else would bound the WAL."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    done = threading.Event()

    def big(conn: Any) -> None:
        conn.execute(appointments.insert(), [{"appointment_key": f"k{n}", "route": "r" * 4000, "chat_bot_id": "b",
                                              "state": "active", "updated_at": 0.0} for n in range(1500)])  # fmt: skip

    writer.start()
    # Not durable: it counts as CHECKPOINT_ROWS, so the writer's checkpoint is due once it is idle.
    writer.submit_job(Job(big, lambda result, error: done.set(), durable=False))
    assert done.wait(10)
    wait_until(lambda: (tmp_path / "log.db").stat().st_size > 1_000_000, message="the WAL copied into the database")
    writer.stop()
    engine.dispose()
