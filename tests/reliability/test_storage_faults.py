"""Disk full and database locked: the service answers AR (never AA) when it cannot commit, recovers by itself
when the database can be written again, and loses nothing it acknowledged.

Database locked: another connection holds the write lock (BEGIN EXCLUSIVE) for a while.
Disk full: the database lives on a small tmpfs mounted for the test, which a filler file fills up; deleting
the filler gives the space back. Mounting needs root (CAP_SYS_ADMIN); without it the scenario is skipped and
says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hl7bridge.store.schema import BUSY_TIMEOUT_MS
from tests.conftest import RunningSandbox, free_port, segments
from tests.dispatch_support import siu

from .support import (
    Bridge,
    Engine,
    Ledger,
    Outgoing,
    Stream,
    answer_codes,
    bridge_config,
    bridge_running,
    command_statuses,
    finish_scenario,
    health_toml,
    journey_check,
    knob,
    log_check,
    loss_figures,
    pick,
    resource_figures,
    sandbox_process,
    scenario_processes,
    sending,
    wait_for,
    wrong_answers,
)

# The writer retries a locked database for busy_timeout (5 s) per group commit: 12 s makes the second group fail too.
LOCK_SECONDS = knob("lock_seconds", 12, 60)
FULL_SECONDS = knob("disk_full_seconds", 3, 60)
RATE = knob("storage_rate", 10, 10)
SEED = int(knob("seed", 20261123, 20261123))
BOOKINGS_ONLY = (("S12",),)
pytestmark = pytest.mark.timeout(pick(300, 1800))  # the module fixtures run whole scenarios


def answers_to_messages_sent_between(engines: list[Engine], start: float, end: float) -> dict[str, int]:
    return dict(Counter(a.code for e in engines for a in e.answers if start <= a.sent_at <= end))


def aa_while_unwritable(engines: list[Engine], start: float, end: float) -> int:
    """AA answers to messages sent after the database became unwritable and answered before it was writable again:
    those cannot have been committed."""
    return sum(1 for e in engines for a in e.answers if a.code == "AA" and start < a.sent_at and a.answered_at < end)


def aa_not_committed(bridge: Bridge, engines: list[Engine], start: float, end: float) -> int:
    """AA answers to messages sent while the disk was full whose message the log does not hold as accepted: an AA
    on a filling disk is right only when its write committed, so the log decides (not a clock)."""
    logged = {c for (c,) in bridge.query("SELECT control_id FROM messages WHERE status IN ('accepted', 'ignored')")}
    return sum(1 for e in engines for a in e.answers if a.code == "AA" and start <= a.sent_at <= end
               and a.control not in logged)  # fmt: skip


def storage_figures(name: str, injected: str, bridge: Bridge, sandbox: RunningSandbox | None, ledger: Ledger,
                    engines: list[Engine], before: tuple, after: tuple, extra: dict) -> dict[str, Any]:  # fmt: skip
    log = log_check(bridge, ledger.controls)
    journeys = (journey_check(ledger, sandbox.get("/_sandbox/instances"), sandbox.get("/_sandbox/calls"))
                if sandbox is not None else {k: 0 for k in ("journey_missing", "cancels_lost", "wrong_parameters",
                                                             "triggered_twice", "phantom_journeys")})  # fmt: skip
    wrong = wrong_answers(engines)
    ar_waits = [a.answered_at - a.sent_at for e in engines for a in e.answers if a.code == "AR"]
    return {
        "scenario": name,
        "injected": injected,
        **loss_figures(log, journeys),
        "wrong_acks": len(wrong) + extra.get("aa_while_unwritable", 0),
        **resource_figures(before, after),
        "answers": answer_codes(engines),
        "ar_answer_seconds_max": round(max(ar_waits, default=0.0), 2),
        "command_statuses": command_statuses(bridge),
        "log": log,
        "journeys": journeys,
        "wrong_examples": wrong[:10],
        **extra,
    }  # fmt: skip


# ---- database locked ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def locked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory, heartbeat=1.0) as (bridge, sandbox):
        bridge.start()
        engines = [Engine(bridge.port, timeout=60) for _ in range(2)]
        streams = [Stream(f"LK{i}", seed=SEED * 3 + i, plans=BOOKINGS_ONLY) for i in range(2)]
        deadline = time.monotonic() + LOCK_SECONDS + 120
        health_during: Counter = Counter()
        with sending(engines, streams, deadline, RATE) as (ledger, stop, errors):
            before = (bridge.rss_kb(), bridge.fds())
            blocker = sqlite3.connect(bridge.database, timeout=30, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            locked_at = time.time()
            end = time.monotonic() + LOCK_SECONDS
            failing = None
            while time.monotonic() < end:
                status, body = bridge.healthz()
                health_during[status] += 1
                if status == 503 and failing is None:
                    failing = body.get("failing")
                time.sleep(0.25)
            blocker.rollback()
            blocker.close()
            released_at = time.time()
            wait_for(lambda: bridge.healthz()[0] == 200, 60, "/healthz to recover")
            recovered_s = round(time.time() - released_at, 2)
            acked = len(ledger)
            wait_for(lambda: len(ledger) >= acked + 20, 60, "acknowledgments after the lock")
            stop.set()
        assert not errors, errors
        drain_s = bridge.wait_drained(60)
        after = (bridge.rss_kb(), bridge.fds())
        during = answers_to_messages_sent_between(engines, locked_at, released_at)
        figures = storage_figures(
            "database_locked", f"another connection held BEGIN EXCLUSIVE for {LOCK_SECONDS:g} s while 2 senders "
            f"sent {2 * RATE:g} msg/s (busy_timeout 5 s)", bridge, sandbox, ledger, engines, before, after,
            {"answers_to_messages_sent_during_lock": during,
             "aa_while_unwritable": aa_while_unwritable(engines, locked_at, released_at),
             "health_during_lock": dict(health_during), "health_failing": failing, "recovered_after_s": recovered_s,
             "aa_after_release": sum(1 for e in engines for a in e.answers
                                     if a.code == "AA" and a.sent_at > released_at),
             "drain_s": drain_s, "log_errors": bridge.logs().count("database is locked")})  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_locked_database_is_answered_ar_never_aa(locked: dict[str, Any]) -> None:
    during = locked["answers_to_messages_sent_during_lock"]
    assert during.get("AR", 0) >= 1, during
    assert set(during) <= {"AR", "AA"}, during  # AA only once committed, after the release
    assert locked["aa_while_unwritable"] == 0
    assert locked["wrong_acks"] == 0, locked["wrong_examples"]


def test_senders_are_not_kept_waiting_for_their_ar(locked: dict[str, Any]) -> None:
    """Once a write has failed on the lock, the next ones give up quickly instead of queueing up behind each
    other for the whole busy_timeout (a 60 s lock used to keep senders waiting 35 s for an AR)."""
    assert locked["ar_answer_seconds_max"] < 2 * BUSY_TIMEOUT_MS / 1000, locked["ar_answer_seconds_max"]


def test_health_names_the_database_while_locked(locked: dict[str, Any]) -> None:
    assert locked["health_failing"] and "database" in locked["health_failing"], locked["health_during_lock"]


def test_service_recovers_by_itself_after_the_lock(locked: dict[str, Any]) -> None:
    assert locked["aa_after_release"] >= 20
    assert set(locked["command_statuses"]) <= {"done"}, locked["command_statuses"]


def test_nothing_acknowledged_is_lost_after_the_lock(locked: dict[str, Any]) -> None:
    assert locked["log"]["lost_from_log"] == 0 and locked["log"]["logged_twice"] == 0, locked["log"]
    journeys = locked["journeys"]
    for key in ("journey_missing", "wrong_parameters", "triggered_twice", "phantom_journeys"):
        assert journeys[key] == 0, (key, journeys)


def test_a_decision_made_while_the_database_is_locked_is_not_stuck(tmp_path: Path, sandbox: RunningSandbox) -> None:
    """Found by this suite: a decision settled without an API call whose write failed left its appointment marked
    busy for good (fixed in 7e9294e)."""
    # Heartbeats every 30 s: the writer tries each queued job for busy_timeout (5 s) in turn, so no other job
    # should stand before the dispatcher's.
    with bridge_running(sandbox, tmp_path / "bridge", retry_initial=2.0, retry_max=2.0, heartbeat=30) as bridge:
        sandbox.faults(outage={"mode": "503", "seconds": 60})
        start = (time.strftime("%Y%m%d", time.localtime(time.time() + 40 * 86400))) + "093000"

        def ack(payload: bytes) -> str:
            with bridge.running.client() as client:
                return segments(client.request(payload))["MSA"][1]

        assert ack(siu("S12", "LOCKQ-1", "A-LOCKQ", start)) == "AA"
        wait_for(lambda: bridge.query("SELECT count(*) FROM attempts")[0][0] >= 1, 10, "the booking to meet a 503")
        # The booking waits 1-2 s for its retry; its cancel arrives, then the database is locked before the retry,
        # so the dispatcher decides "annihilated" (no API call) while it cannot write.
        assert ack(siu("S15", "LOCKQ-2", "A-LOCKQ", None)) == "AA"
        blocker = sqlite3.connect(bridge.database, timeout=30, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        time.sleep(9)  # the dispatcher decides 1-2 s into the lock; its write fails 5 s later
        blocker.rollback()
        blocker.close()
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        wait_for(lambda: bridge.healthz()[0] == 200, 30, "/healthz to recover")
        assert ack(siu("S12", "LOCKQ-3", "A-LOCKQ-OTHER", start)) == "AA"
        bridge.wait_drained(8)  # a second at most when nothing is stuck


# ---- disk full ---------------------------------------------------------------------------------------


class PaddedStream(Stream):
    """Bookings with a 3 KB note, so that the log's WAL grows quickly."""

    def message(self, booking: Any, event: str, control: str) -> Outgoing:
        out = super().message(booking, event, control)
        out.payload = out.payload + b"NTE|1||" + b"N" * 3000 + b"\r"
        return out


def mount_tmpfs(path: Path, size: str) -> str | None:
    """Mount a tmpfs at ``path``; None on success, else why not."""
    if os.geteuid() != 0:
        return "not running as root"
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        return f"mount failed: {exc}"
    return None if done.returncode == 0 else f"mount exited {done.returncode}: {done.stderr.strip()}"


def unmount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            if subprocess.run(args, capture_output=True, timeout=30).returncode == 0:
                return


def fill(path: Path) -> int:
    """Write ``path`` until the file system is full; the bytes written."""
    written = 0
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as out:
        for _ in range(100_000):  # bounded: 6.5 GB at most
            try:
                written += out.write(chunk)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                for size in (4096, 512, 1):
                    with contextlib.suppress(OSError):
                        for _ in range(10_000):
                            written += out.write(b"\0" * size)
                return written
    raise AssertionError("the file system never filled up")


def run_disk_full(tmp_path_factory: pytest.TempPathFactory, *, dispatch: bool) -> dict[str, Any]:
    """Fill the log's file system under load, free it again; the figures.

    ``dispatch``: the realistic service (a route, a sandbox, heartbeats every 0.2 s), so that dispatcher and health
    jobs write while the disk is full. Without it only messages are written (no route, no heartbeat during the
    run): the message path on its own.
    """
    began = time.monotonic()
    workdir = tmp_path_factory.mktemp("bridge")
    var = workdir / "var"
    var.mkdir()
    why = mount_tmpfs(var, "8m")
    if why:
        pytest.skip(f"disk full needs a small file system of its own; mounting a tmpfs failed ({why})")
    sandbox = sandbox_process(tmp_path_factory.mktemp("sandbox")) if dispatch else None
    health_port = free_port()
    if sandbox is not None:
        config = bridge_config(sandbox.url, health_port)
    else:
        config = '[service]\nlog_level = "info"\n[listeners.main]\n' + health_toml(health_port, heartbeat=3600)
    bridge = Bridge(workdir, config, health_port=health_port)
    filler = var / "filler"
    abort = threading.Event()
    try:
        bridge.start()
        engine = Engine(bridge.port, timeout=5, pause=0.1, abort=abort)
        stream = PaddedStream("DF", seed=SEED * 5, plans=BOOKINGS_ONLY)
        deadline = time.monotonic() + FULL_SECONDS + 180
        health_during: Counter = Counter()
        with sending([engine], [stream], deadline, 20, before_join=abort.set) as (ledger, stop, errors):
            before = (bridge.rss_kb(), bridge.fds())
            filled = fill(filler)
            full_at = time.time()

            def hit() -> bool:
                return any(a.code == "AR" and a.sent_at >= full_at for a in engine.answers) or (
                    "Exception in thread hl7bridge-writer" in bridge.logs()
                )

            with contextlib.suppress(AssertionError):
                wait_for(hit, 60, "an AR (or the writer's death) once the disk is full", interval=0.1)
            first_ar = next((a for a in engine.answers if a.code == "AR" and a.sent_at >= full_at), None)
            end = time.monotonic() + FULL_SECONDS
            while time.monotonic() < end:
                health_during[bridge.healthz()[0]] += 1
                time.sleep(0.25)
            filler.unlink()
            freed_at = time.time()
            acked = len(ledger)
            writer_died = "Exception in thread hl7bridge-writer" in bridge.logs()
            with contextlib.suppress(AssertionError):  # a dead writer never comes back: no need to wait long
                wait_for(
                    lambda: len(ledger) >= acked + 20, 5 if writer_died else 30, "acknowledgments once space is back"
                )
            recovered = len(ledger) >= acked + 20
            stop.set()
        assert not errors, errors
        alive = bridge.alive()
        health_after = bridge.healthz()
        drained = True
        try:
            drain_s: float | None = bridge.wait_drained(30 if recovered else 2) if dispatch else 0.0
        except AssertionError:
            drained, drain_s = False, None
        after = (bridge.rss_kb(), bridge.fds())
        logs = bridge.logs()
        name = "disk_full" if dispatch else "disk_full_messages_only"
        what = ("with dispatch and health jobs writing too" if dispatch
                else "messages only (no route, no heartbeat during the run)")  # fmt: skip
        figures = storage_figures(
            name, f"the log's file system (8 MB tmpfs) kept full for {FULL_SECONDS:g} s while a sender sent 20 msg/s "
            f"of 3.5 KB bookings, then space freed; {what}", bridge, sandbox, ledger, [engine], before, after,
            {"filler_bytes": filled,
             "answers_to_messages_sent_while_full": answers_to_messages_sent_between([engine], full_at, freed_at),
             "aa_while_unwritable": aa_not_committed(bridge, [engine], full_at, freed_at),
             "first_ar_after_fill_s": round(first_ar.answered_at - full_at, 2) if first_ar else None,
             "health_while_full": dict(health_during), "recovered": recovered,
             "aa_after_space_returned": sum(1 for a in engine.answers if a.code == "AA" and a.sent_at > freed_at),
             "unanswered_sends": engine.connection_errors, "alive_after": alive, "health_after": health_after,
             "drained": drained, "drain_s": drain_s,
             "writer_thread_died": "Exception in thread hl7bridge-writer" in logs,
             "log_excerpt": logs[logs.find("Exception in thread"):][:1500] if "Exception in thread" in logs else ""})  # fmt: skip
        return finish_scenario(figures, bridge, began, grace=20 if recovered else 3)
    finally:
        abort.set()
        bridge.stop()
        if sandbox is not None:
            sandbox.stop()
        unmount(var)


@pytest.fixture(scope="module")
def disk_full(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_disk_full(tmp_path_factory, dispatch=True)


@pytest.fixture(scope="module")
def disk_full_messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_disk_full(tmp_path_factory, dispatch=False)


def test_full_disk_is_answered_ar_and_recovers_for_messages(disk_full_messages: dict[str, Any]) -> None:
    run = disk_full_messages
    assert run["answers_to_messages_sent_while_full"].get("AR", 0) >= 1, run["answers_to_messages_sent_while_full"]
    assert set(run["answers"]) <= {"AA", "AR"} and run["wrong_acks"] == 0, (run["answers"], run["wrong_examples"])
    assert run["recovered"] and run["aa_after_space_returned"] >= 20 and run["health_after"][0] == 200, run
    assert run["alive_after"] and run["exit_status"] == 0 and not run["writer_thread_died"]
    assert run["log"]["lost_from_log"] == 0 and run["log"]["logged_twice"] == 0, run["log"]


def test_full_disk_with_dispatch_loses_nothing_acknowledged(disk_full: dict[str, Any]) -> None:
    """Whatever happens to the service, an AA given while the disk was filling is only right if the message
    really is in the log."""
    assert disk_full["alive_after"]
    assert set(disk_full["answers"]) <= {"AA", "AR"} and disk_full["wrong_acks"] == 0, disk_full["answers"]
    assert disk_full["log"]["lost_from_log"] == 0 and disk_full["log"]["logged_twice"] == 0, disk_full["log"]
    journeys = disk_full["journeys"]
    for key in ("wrong_parameters", "triggered_twice", "phantom_journeys"):
        assert journeys[key] == 0, (key, journeys)


def test_full_disk_with_dispatch_recovers_by_itself(disk_full: dict[str, Any]) -> None:
    """Found by this suite: a failed savepoint on a full disk killed the writer thread, after which nothing was
    committed or answered again (fixed in 7e9294e)."""
    assert disk_full["answers_to_messages_sent_while_full"].get("AR", 0) >= 1, disk_full[
        "answers_to_messages_sent_while_full"
    ]
    assert not disk_full["writer_thread_died"], disk_full["log_excerpt"]
    assert disk_full["recovered"] and disk_full["health_after"][0] == 200, disk_full["health_after"]
    assert disk_full["drained"] and set(disk_full["command_statuses"]) <= {"done"}, disk_full["command_statuses"]
    assert disk_full["journeys"]["journey_missing"] == 0, disk_full["journeys"]
