"""API outage: the Journeys API refuses connections, then answers 503, then does not answer at all, while
messages keep coming (short: a few seconds each; long: several minutes in total).

Checks: the feed keeps being answered AA; after recovery every appointment is in its expected state, its
triggers delivered in order, nothing lost or doubled; backoff is visible in the attempts log.
Two deterministic companions guard the lost-cancel bug this suite found, without any crash (a trigger whose answer
came late).
"""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningSandbox, segments
from tests.dispatch_support import future, siu

from .support import (
    Bridge,
    Engine,
    Stream,
    answer_codes,
    bridge_running,
    command_statuses,
    delivered_order,
    finish_scenario,
    is_subsequence,
    journey_check,
    knob,
    log_check,
    loss_figures,
    percentile,
    pick,
    resource_figures,
    sandbox_reachable,
    scenario_processes,
    sending,
    wait_for,
    wrong_answers,
)

PHASE = knob("outage_phase_seconds", 3, 90)  # each of refuse, 503, timeout
RATE = knob("outage_rate", 10, 10)  # messages per second per sender
SENDERS = 2
SEED = int(knob("seed", 20261123, 20261123))
RETRY_MAX = pick(4.0, 30.0)
pytestmark = pytest.mark.timeout(pick(300, 3 * PHASE + 1200))  # the module fixture runs the whole scenario


def gaps(times: list[float]) -> list[float]:
    return [round(b - a, 3) for a, b in itertools.pairwise(times)]


FAULTS = {"refuse": "error LIKE 'connection error%'", "503": "status_code = 503", "timeout": "error LIKE 'timeout%'"}


def met(bridge: Bridge, mode: str, since: float) -> bool:
    """Whether a dispatcher call met this kind of outage since ``since`` (epoch seconds)."""
    return bool(bridge.query(f"SELECT 1 FROM attempts WHERE at >= ? AND {FAULTS[mode]} LIMIT 1", since))


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory, retry_initial=0.25, retry_max=RETRY_MAX) as (bridge, sandbox):
        bridge.start()
        engines = [Engine(bridge.port, timeout=10) for _ in range(SENDERS)]
        streams = [Stream(f"OUT{i}", seed=SEED * 10 + i) for i in range(SENDERS)]
        deadline = time.monotonic() + 3 * PHASE + pick(120, 600)
        phases: list[dict] = []
        with sending(engines, streams, deadline, RATE, first_acks=10) as (ledger, stop, errors):
            before = (bridge.rss_kb(), bridge.fds())
            for mode in ("refuse", "503", "timeout"):
                acked = len(ledger)
                started = time.time()
                # Dispatching holds after three failed calls: only the oldest command is tried, on its own
                # backoff, which may outlast a short phase. The phase is repeated (3 times at most) until
                # a call met this fault.
                for _ in range(3):
                    sandbox.faults(outage={"mode": mode, "seconds": PHASE})
                    time.sleep(PHASE)
                    if mode == "refuse":
                        wait_for(lambda: sandbox_reachable(sandbox), 30, "the sandbox to listen again")
                    if met(bridge, mode, started):
                        break
                phases.append({"mode": mode, "from": started, "to": time.time(), "acked": len(ledger) - acked})
            time.sleep(2)
            stop.set()
        assert not errors, errors
        drain_s = bridge.wait_drained(RETRY_MAX * 2 + 60)
        after = (bridge.rss_kb(), bridge.fds())
        instances = sandbox.get("/_sandbox/instances")
        calls = sandbox.get("/_sandbox/calls")
        log = log_check(bridge, ledger.controls)
        journeys = journey_check(ledger, instances, calls)
        order = delivered_order(calls)
        out_of_order = [a for a in ledger.acked if not is_subsequence(order.get(a, []), ledger.sequence(a))]
        attempts: dict[int, list[tuple]] = defaultdict(list)
        for row in bridge.query("SELECT command_id, at, operation, status_code, error FROM attempts ORDER BY id"):
            attempts[row[0]].append(row[1:])
        seen = Counter()
        for rows in attempts.values():
            for _at, _op, status, error in rows:
                if status == 503:
                    seen["503"] += 1
                elif error and error.startswith("timeout"):
                    seen["timeout"] += 1
                elif error and error.startswith("connection error"):
                    seen["connection error"] += 1
        # Retries are the failed attempts (a success may be followed at once by the next step's call).
        failures = {cid: [r for r in rows if r[2] is None or r[2] >= 300] for cid, rows in attempts.items()}
        longest = max(failures.items(), key=lambda kv: len(kv[1]), default=(None, []))
        retried = {cid: gaps([r[0] for r in rows]) for cid, rows in failures.items() if len(rows) >= 4}
        growing = {cid: g for cid, g in retried.items() if g[-1] >= 2 * g[0]}
        latencies = [(a.answered_at - a.sent_at) * 1000 for e in engines for a in e.answers]
        wrong = wrong_answers(engines)
        figures = {
            "scenario": "api_outage",
            "injected": f"Journeys API: connection refused {PHASE:g} s, then 503 {PHASE:g} s, then no answer "
                        f"{PHASE:g} s, while {SENDERS} senders send {RATE * SENDERS:g} msg/s",
            **loss_figures(log, journeys),
            "wrong_acks": len(wrong),
            **resource_figures(before, after),
            "phases": phases,
            "answers": answer_codes(engines),
            "ack_latency_ms": {"p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                               "max": max(latencies, default=None)},
            "faults_met_by_dispatch": dict(seen),
            "drain_s": drain_s,
            "out_of_order": out_of_order,
            "command_statuses": command_statuses(bridge),
            "commands_retried_4_times_or_more": len(retried),
            "commands_with_growing_gaps": len(growing),
            "longest_retry": {"command_id": longest[0], "attempts": len(longest[1]),
                              "gaps_s": gaps([r[0] for r in longest[1]]),
                              "results": [r[2] or (r[3] or "")[:40] for r in longest[1]]},
            "log": log,
            "journeys": journeys,
            "wrong_examples": wrong[:10],
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_every_kind_of_outage_reached_the_dispatcher(outage: dict[str, Any]) -> None:
    assert set(outage["faults_met_by_dispatch"]) == {"503", "timeout", "connection error"}, outage


def test_the_feed_was_answered_aa_throughout(outage: dict[str, Any]) -> None:
    assert outage["answers"].keys() == {"AA"}, outage["answers"]
    assert outage["wrong_acks"] == 0, outage["wrong_examples"]
    assert all(p["acked"] > 0 for p in outage["phases"]), outage["phases"]


def test_nothing_acknowledged_was_lost_or_logged_twice(outage: dict[str, Any]) -> None:
    assert outage["log"]["lost_from_log"] == 0 and outage["log"]["logged_twice"] == 0, outage["log"]


def test_after_recovery_every_appointment_is_in_its_state_once(outage: dict[str, Any]) -> None:
    journeys = outage["journeys"]
    for key in ("journey_missing", "wrong_parameters", "cancels_lost", "triggered_twice", "phantom_journeys"):
        assert journeys[key] == 0, (key, journeys)
    statuses = outage["command_statuses"]
    assert set(statuses) <= {"done", "annihilated"}, statuses


def test_triggers_were_delivered_in_order_per_appointment(outage: dict[str, Any]) -> None:
    assert outage["out_of_order"] == []


def test_backoff_is_visible_in_the_attempts_log(outage: dict[str, Any]) -> None:
    assert outage["commands_retried_4_times_or_more"] >= 1, outage["longest_retry"]
    assert outage["commands_with_growing_gaps"] >= 1, outage["longest_retry"]
    longest = outage["longest_retry"]["gaps_s"]
    assert max(longest) >= 4 * min(longest), outage["longest_retry"]


# ---- deterministic companions: a trigger whose answer came too late -----------------------------------


@pytest.fixture
def slow_api(tmp_path: Path, sandbox: RunningSandbox) -> Iterator[tuple[Bridge, RunningSandbox]]:
    """The service with read_timeout 2 s; the sandbox answers after 2.5 s (having already acted)."""
    with bridge_running(sandbox, tmp_path / "bridge") as bridge:
        yield bridge, sandbox


def ack(bridge: Bridge, payload: bytes) -> str:
    with bridge.running.client() as client:
        return segments(client.request(payload))["MSA"][1]


def running_journeys(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    return [i for i in sandbox.instances(appointmentId=appointment) if i["status"] == "InProgress"]


def bulk_calls_for(sandbox: RunningSandbox, appointment: str, when: str) -> list[dict]:
    return [c for c in sandbox.calls("bulk") if appointment in json.dumps(c["body"]) and when in json.dumps(c["body"])]


def test_cancel_after_a_late_booking_and_a_reschedule_still_cancels(slow_api: tuple[Bridge, RunningSandbox]) -> None:
    """Found by this suite: the timed-out booking was superseded without a trace, the unsent reschedule marked the
    appointment 'annihilated' and the cancel did not search (fixed in 7e9294e)."""
    bridge, sandbox = slow_api
    first, second = future(days=33, hour=9), future(days=34, hour=15)
    sandbox.faults(latency_ms=2500)
    assert ack(bridge, siu("S12", "LATE-B-1", "A-LATE-B", first)) == "AA"
    wait_for(lambda: bulk_calls_for(sandbox, "A-LATE-B", "LATE") or sandbox.calls("bulk"), 10, "the booking's call")
    assert ack(bridge, siu("S13", "LATE-B-2", "A-LATE-B", second)) == "AA"
    assert ack(bridge, siu("S15", "LATE-B-3", "A-LATE-B", None)) == "AA"
    sandbox.faults(latency_ms=0)
    bridge.wait_drained(30)
    assert len(sandbox.instances(appointmentId="A-LATE-B")) == 1  # the API did start the first journey
    assert running_journeys(sandbox, "A-LATE-B") == [], bridge.query(
        "SELECT kind, status, outcome FROM commands WHERE appointment_key = 'MAIN|A-LATE-B' ORDER BY id"
    )


def test_cancel_after_a_late_reschedule_still_cancels(slow_api: tuple[Bridge, RunningSandbox]) -> None:
    """Found by this suite: the reschedule's cancel step left the appointment 'cancelled', its timed-out trigger
    was superseded, and the cancel settled 'already cancelled' without a search (fixed in 7e9294e)."""
    bridge, sandbox = slow_api
    first, second = future(days=35, hour=9), future(days=36, hour=15)
    assert ack(bridge, siu("S12", "LATE-R-1", "A-LATE-R", first)) == "AA"
    wait_for(lambda: running_journeys(sandbox, "A-LATE-R"), 10, "the first journey")
    bridge.wait_drained(10)
    # The reschedule searches, cancels, then triggers: only that third call is answered late (after 2.5 s).
    seen = len(sandbox.calls())
    sandbox.faults(slow_every=seen + 3, slow_seconds=2.5)
    assert ack(bridge, siu("S13", "LATE-R-2", "A-LATE-R", second)) == "AA"
    wait_for(lambda: len(sandbox.calls("bulk")) >= 2, 15, "the reschedule's trigger to reach the API")
    assert ack(bridge, siu("S15", "LATE-R-3", "A-LATE-R", None)) == "AA"
    bridge.wait_drained(30)
    sandbox.faults(slow_every=0, slow_seconds=0)
    assert len(sandbox.instances(appointmentId="A-LATE-R")) == 2  # the API did start the moved journey
    assert running_journeys(sandbox, "A-LATE-R") == [], bridge.query(
        "SELECT kind, status, outcome FROM commands WHERE appointment_key = 'MAIN|A-LATE-R' ORDER BY id"
    )
