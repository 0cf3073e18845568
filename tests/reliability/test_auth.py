"""Auth failure: the API token is revoked mid-stream, then restored.

Checks: dispatching pauses (only the periodic probe reaches the API), /healthz answers 503 naming
"dispatch", no command is dead-lettered for it, the feed keeps being answered AA, and once the token is
valid again everything is delivered: every appointment in its expected state, nothing lost or doubled.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from .support import (
    SCOPES,
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
    wait_for,
    wrong_answers,
)

PAUSE = knob("auth_pause_seconds", 4, 120)
RATE = knob("auth_rate", 10, 10)
SENDERS = 2
SEED = int(knob("seed", 20261123, 20261123))
PROBE_INTERVAL = 0.5  # auth_probe_interval in the dispatch tests' configuration
pytestmark = pytest.mark.timeout(pick(300, PAUSE + 900))  # the module fixture runs the whole scenario


def call_time(call: dict) -> float:
    return datetime.fromisoformat(call["at"]).timestamp()


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory) as (bridge, sandbox):
        assert f"auth_probe_interval = {PROBE_INTERVAL}" in bridge.config
        bridge.start()
        engines = [Engine(bridge.port) for _ in range(SENDERS)]
        streams = [Stream(f"AU{i}", seed=SEED * 7 + i) for i in range(SENDERS)]
        deadline = time.monotonic() + PAUSE + pick(120, 600)
        dead_seen, open_max, health_seen = 0, 0, Counter()
        with sending(engines, streams, deadline, RATE) as (ledger, stop, errors):
            before = (bridge.rss_kb(), bridge.fds())
            sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
            revoked_at = time.time()  # calls logged before this may have been taken with the token still valid
            _status, body = wait_for(lambda: (lambda r: r if r[0] == 503 else None)(bridge.healthz()), 20,
                                    "/healthz to report the paused dispatch")  # fmt: skip
            paused_health = body
            acked_at_pause = len(ledger)
            end = time.monotonic() + PAUSE
            while time.monotonic() < end:
                dead_seen = max(dead_seen, bridge.query("SELECT count(*) FROM commands WHERE status = 'dead'")[0][0])
                open_max = max(open_max, bridge.open_commands())
                health_seen[bridge.healthz()[0]] += 1
                time.sleep(0.5)
            acked_during_pause = len(ledger) - acked_at_pause
            restored_at = time.time()
            sandbox.post("/_sandbox/tokens", {"add": {"test-token": SCOPES}})
            wait_for(lambda: bridge.healthz()[0] == 200, 30, "/healthz to recover")
            resumed_s = round(time.time() - restored_at, 2)
            time.sleep(2)
            stop.set()
        assert not errors, errors
        drain_s = bridge.wait_drained(60)
        after = (bridge.rss_kb(), bridge.fds())
        instances = sandbox.get("/_sandbox/instances")
        calls = sandbox.get("/_sandbox/calls")
        during = [c for c in calls if revoked_at <= call_time(c) <= restored_at]
        log = log_check(bridge, ledger.controls)
        journeys = journey_check(ledger, instances, calls)
        paused_commands = bridge.query(
            "SELECT DISTINCT c.id, c.status FROM commands c JOIN attempts a ON a.command_id = c.id "
            "WHERE a.verdict = 'auth'")  # fmt: skip
        wrong = wrong_answers(engines)
        figures = {
            "scenario": "auth_failure",
            "injected": f"token revoked for {PAUSE:g} s mid-stream ({SENDERS * RATE:g} msg/s), then added back",
            **loss_figures(log, journeys),
            "wrong_acks": len(wrong),
            **resource_figures(before, after),
            "paused_health": paused_health,
            "health_codes_during_pause": dict(health_seen),
            "acked_during_pause": acked_during_pause,
            "api_calls_during_pause": dict(Counter(c["status"] for c in during)),
            "open_commands_max_during_pause": open_max,
            "dead_during_pause": dead_seen,
            "commands_refused_then": dict(Counter(s for _i, s in paused_commands)),
            "resumed_after_s": resumed_s,
            "drain_s": drain_s,
            "answers": answer_codes(engines),
            "command_statuses": command_statuses(bridge),
            "log": log,
            "journeys": journeys,
            "wrong_examples": wrong[:10],
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_health_names_the_paused_dispatch(auth: dict[str, Any]) -> None:
    body = auth["paused_health"]
    assert body["failing"] == ["dispatch"], body
    assert "401" in body["checks"]["dispatch"]["detail"], body
    assert set(auth["health_codes_during_pause"]) == {503}, auth["health_codes_during_pause"]


def test_dispatching_paused_to_a_probe(auth: dict[str, Any]) -> None:
    calls = auth["api_calls_during_pause"]
    assert set(calls) <= {401}, calls
    # One probe per interval, plus the calls that were under way when the token went.
    assert sum(calls.values()) <= PAUSE / PROBE_INTERVAL * 1.5 + 20, calls
    assert auth["open_commands_max_during_pause"] > 0


def test_nothing_was_dead_lettered(auth: dict[str, Any]) -> None:
    assert auth["dead_during_pause"] == 0
    assert auth["command_statuses"].get("dead", 0) == 0, auth["command_statuses"]
    assert set(auth["commands_refused_then"]) <= {"done", "annihilated"}, auth["commands_refused_then"]
    assert set(auth["command_statuses"]) <= {"done", "annihilated"}, auth["command_statuses"]


def test_the_feed_was_answered_aa_throughout(auth: dict[str, Any]) -> None:
    assert auth["answers"].keys() == {"AA"} and auth["wrong_acks"] == 0, auth["answers"]
    assert auth["acked_during_pause"] > 0


def test_after_the_new_token_everything_is_delivered_once(auth: dict[str, Any]) -> None:
    assert auth["log"]["lost_from_log"] == 0 and auth["log"]["logged_twice"] == 0, auth["log"]
    journeys = auth["journeys"]
    for key in ("journey_missing", "wrong_parameters", "cancels_lost", "triggered_twice", "phantom_journeys"):
        assert journeys[key] == 0, (key, journeys)
