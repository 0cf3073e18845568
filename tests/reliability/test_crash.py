"""Crash: the service is killed with SIGKILL at random moments under steady load from several connections,
restarted on the same database, and the senders resend whatever was not acknowledged, as engines do.

One run per module (short: 5 kills, long: 20); each check below reads its figures:
every message ever answered AA is in the log; every appointment ends in the right state in the sandbox
(a separate process that outlives the kills); no journey is triggered twice; no cancel is lost.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from .support import (
    PLANS,
    Engine,
    Stream,
    answer_codes,
    command_statuses,
    finish_scenario,
    journey_check,
    knob,
    log_check,
    loss_figures,
    pick,
    resource_figures,
    scenario_processes,
    sending,
    trigger_under_way,
    wait_for,
    wrong_answers,
)

CYCLES = int(knob("crash_cycles", 5, 20))
SENDERS = int(knob("crash_senders", 4, 4))
SEED = int(knob("seed", 20261123, 20261123))
# Bookings that are moved and then cancelled are the sequences most at risk across a crash: weigh them up.
CRASH_PLANS = (*PLANS, ("S12", "S13", "S15"), ("S12", "S13", "S15"))
pytestmark = pytest.mark.timeout(pick(300, 2400))  # the module fixture runs the whole scenario


@pytest.fixture(scope="module")
def crash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    rng = random.Random(SEED)
    with scenario_processes(tmp_path_factory) as (bridge, sandbox):
        # Calls take a moment, so that kills land while calls are under way (the sandbox acts at once and
        # answers 30 ms later).
        sandbox.faults(latency_ms=30)
        bridge.start()
        engines = [Engine(bridge.port) for _ in range(SENDERS)]
        streams = [Stream(f"CR{i}", seed=SEED * 100 + i, plans=CRASH_PLANS) for i in range(SENDERS)]
        deadline = time.monotonic() + pick(200, 1700)
        kills: list[dict] = []
        with sending(engines, streams, deadline, None) as (ledger, stop, errors):
            before = (bridge.rss_kb(), bridge.fds())
            for cycle in range(CYCLES):
                acked = len(ledger)
                if cycle == 0:
                    kill_during_a_trigger(bridge, sandbox)
                else:
                    time.sleep(rng.uniform(0.2, 2.5))
                    acked = len(ledger)
                    bridge.kill()
                down = rng.choice([0.0, 0.05, 0.3, 1.0])
                time.sleep(down)
                bridge.start()
                kills.append({"cycle": cycle + 1, "acked_before_kill": acked, "down_s": down})
            restarted_with = len(ledger)
            wait_for(lambda: len(ledger) >= restarted_with + 40, 60, "acknowledgments after the last restart")
            stop.set()
        assert not errors, errors
        drain_s = bridge.wait_drained(pick(90, 300))
        after = (bridge.rss_kb(), bridge.fds())
        instances = sandbox.get("/_sandbox/instances")
        calls = sandbox.get("/_sandbox/calls")
        log = log_check(bridge, ledger.controls)
        journeys = journey_check(ledger, instances, calls)
        outcomes = Counter()
        for outcome, count in bridge.query("SELECT outcome, count(*) FROM commands GROUP BY outcome"):
            outcomes[(outcome or "").split(" command ")[0].split(" by command ")[0]] += count
        wrong = wrong_answers(engines)
        figures = {
            "scenario": "crash",
            "injected": f"SIGKILL x{CYCLES} (one while a bulk trigger is under way, the rest at random moments 0.2-2.5 s apart) under load from {SENDERS} "
                        "connections; senders resend what was not answered AA",
            **loss_figures(log, journeys),
            "wrong_acks": len(wrong),
            **resource_figures(before, after),
            "kills": len(kills),
            "kill_log": kills,
            "sends_including_resends": sum(e.sends for e in engines),
            "connection_errors": sum(e.connection_errors for e in engines),
            "answers": answer_codes(engines),
            "wrong_examples": wrong[:10],
            "drain_s": drain_s,
            "command_statuses": command_statuses(bridge),
            "command_outcomes": dict(outcomes),
            "api_calls": len(calls),
            "log": log,
            "journeys": journeys,
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began, exit_key="final_exit_status")


def kill_during_a_trigger(bridge: Any, sandbox: Any) -> None:
    """One kill certainly lands while a bulk trigger is under way: the sandbox holds its answers back.

    (Random kills alone hit a 30 ms call too rarely for the check below to pass on every run.)"""
    trigger_under_way(sandbox, 10_000)
    bridge.kill()
    sandbox.faults(latency_ms=30)


def test_the_service_was_killed_under_load(crash: dict[str, Any]) -> None:
    assert crash["kills"] >= CYCLES
    assert crash["command_outcomes"].get("found after restart; not sent again", 0) >= 1, (
        "the kill during a bulk trigger did not lead to a search after restart"
    )


def test_every_message_answered_aa_is_in_the_log_once(crash: dict[str, Any]) -> None:
    assert crash["log"]["lost_from_log"] == 0, crash["log"]
    assert crash["log"]["logged_twice"] == 0, crash["log"]


def test_every_answer_was_aa_for_the_message_sent(crash: dict[str, Any]) -> None:
    assert crash["wrong_acks"] == 0, crash["wrong_examples"]


def test_no_journey_was_triggered_twice(crash: dict[str, Any]) -> None:
    journeys = crash["journeys"]
    assert journeys["triggered_twice"] == 0, journeys["triggered_twice_examples"]
    assert journeys["phantom_journeys"] == 0, journeys["phantom_examples"]


def test_every_booked_appointment_runs_its_latest_journey(crash: dict[str, Any]) -> None:
    journeys = crash["journeys"]
    assert journeys["journey_missing"] == 0, journeys["journey_missing_examples"]
    assert journeys["wrong_parameters"] == 0, journeys["wrong_parameters_examples"]


def test_no_cancel_was_lost(crash: dict[str, Any]) -> None:
    """Found by this suite: a trigger in flight at the kill, superseded by a cancel after an unsent reschedule,
    left its journey running (fixed in 7e9294e: the superseded trigger makes the cancel search)."""
    journeys = crash["journeys"]
    assert journeys["cancels_lost"] == 0, journeys["cancels_lost_examples"]


def test_nothing_was_dead_lettered(crash: dict[str, Any]) -> None:
    statuses = crash["command_statuses"]
    assert statuses.get("dead", 0) == 0 and statuses.get("failed", 0) == 0, statuses
    assert statuses.get("pending", 0) == 0 and statuses.get("in_flight", 0) == 0, statuses
