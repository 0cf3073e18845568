"""Several instances on one PostgreSQL log behind a real HAProxy (``tests/cluster.py``): the instances are killed
with SIGKILL under load and restarted, the leading one is stopped with SIGSTOP past its lease and continued,
PostgreSQL is stopped with ``pg_ctl -m immediate`` and started again, and the same messages reach two instances at
once. Senders are engines that resend until AA, over a new connection through HAProxy after a close, a NAK or a
timeout.

After each run: every message answered AA is in the log once; every AA'd booking has exactly one journey with its
last parameters, no journey doubled, every cancel applied, each appointment's triggers in the order sent; no AA
while the database was down; the dead or stopped instance's open commands settled by the others (takeover time
recorded).

Short (CI): 3 kills each with two and with three instances, 1 stop, 200 simultaneous pairs; long
(``HL7BRIDGE_RELIABILITY=long``): 20 kills, 5 stops, 1,000 pairs.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from hl7bridge.testing.client import BlockingClient
from tests.cluster import Cluster, cluster, haproxy_binary
from tests.conftest import segments
from tests.dispatch_support import future, siu
from tests.pg import PostgresServer

from .support import (
    PLANS,
    Engine,
    Stream,
    answer_codes,
    child_pids,
    knob,
    loss_figures,
    pick,
    sending,
    trigger_under_way,
    wait_for,
    write_results,
    wrong_answers,
)

CYCLES = int(knob("cluster_kill_cycles", 3, 20))
STOPS = int(knob("cluster_stop_cycles", 1, 5))
#: ``[service] dispatch_lease`` of the SIGSTOP scenario's instances: how long a stopped leader holds the log.
STOP_LEASE = 3.0
PAIRS = int(knob("cluster_pairs", 200, 1000))
SENDERS = 4
#: Each sender's messages a second: a busy feed that the one dispatcher keeps up with, so that the time to settle
#: a dead instance's commands measures the takeover, not a backlog of the senders' making.
RATE = knob("cluster_rate", 15, 15)
SEED = int(knob("seed", 20261205, 20261205))
TAKEOVER_LIMIT = 20.0
CRASH_PLANS = (*PLANS, ("S12", "S13", "S15"))
pytestmark = pytest.mark.timeout(pick(600, 3600))


@pytest.fixture(scope="module")
def haproxy() -> None:
    if haproxy_binary() is None:
        if os.environ.get("CI"):
            pytest.fail("HAProxy is missing under CI: .ci/run installs Debian's haproxy package")
        pytest.skip("HAProxy is not installed (Debian/Ubuntu package: haproxy)")


def feed(running: Cluster, prefix: str, seed: int) -> tuple[list[Engine], list[Stream]]:
    """The scenarios' senders through HAProxy and their streams (control ids ``prefix``N-...), the sandbox
    answering 30 ms late as a real API does."""
    running.sandbox.faults(latency_ms=30)
    streams = [Stream(f"{prefix}{i}", seed=seed + i, plans=CRASH_PLANS) for i in range(SENDERS)]
    return [Engine(running.port, timeout=5.0, reconnect_after_nak=True) for _ in range(SENDERS)], streams


def summary(running: Cluster, ledger: Any, engines: list[Engine], scenario: str, **extra: Any) -> dict[str, Any]:
    found = running.checks(ledger)
    wrong = wrong_answers(engines)
    statuses = dict(running.query("SELECT status, count(*) FROM commands GROUP BY status"))
    figures = {
        "scenario": scenario,
        **loss_figures(found["log"], found["journeys"]),
        "wrong_acks": len(wrong),
        "wrong_examples": wrong[:10],
        "answers": answer_codes(engines),
        "sends_including_resends": sum(e.sends for e in engines),
        "connection_errors": sum(e.connection_errors for e in engines),
        "command_statuses": statuses,
        **found,
        **extra,
    }
    write_results(figures)
    return figures


# ---- SIGKILL an instance mid-feed -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=[2, 3], ids=["2-instances", "3-instances"])
def kills(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
          haproxy: None) -> Iterator[dict[str, Any]]:  # fmt: skip
    instances: int = request.param
    began = time.monotonic()
    rng = random.Random(SEED + instances)
    with cluster(tmp_path_factory.mktemp(f"cluster{instances}"), postgres, instances) as running:
        sandbox = running.sandbox
        engines, streams = feed(running, f"K{instances}S", SEED * 10)
        deadline = time.monotonic() + pick(300, 2400)
        cycles: list[dict[str, Any]] = []
        with sending(engines, streams, deadline, RATE) as (ledger, stop, errors):
            for cycle in range(CYCLES):
                time.sleep(rng.uniform(0.5, 2.0))
                dispatching = running.dispatching()
                alive = [b for b in running.bridges if b.alive()]
                victim = dispatching if dispatching is not None and cycle % 2 == 0 else rng.choice(alive)
                number = running.bridges.index(victim) + 1
                # With one dispatcher at a time, only its death leaves dispatching to be taken over.
                takes_over = victim is dispatching or not running.one_dispatcher
                if takes_over:
                    # Its commands are certainly open at its death (answered later than that, but within the read
                    # timeout of 2 s).
                    trigger_under_way(sandbox, 1_500)
                took = running.takeover_after_kill(victim, TAKEOVER_LIMIT * 2,
                                                   after_kill=lambda: sandbox.faults(latency_ms=30))  # fmt: skip
                cycles.append({"cycle": cycle + 1, "killed": f"bridge{number}",
                               "was_dispatching": takes_over, "acked": len(ledger), **took})  # fmt: skip
                victim.start()
                running.proxy.wait_up([f"bridge{number}"])
            restarted_with = len(ledger)
            wait_for(lambda: len(ledger) >= restarted_with + 40, 60, "acknowledgments after the last restart")
            stop.set()
        assert not errors, errors
        drain_s = running.wait_drained(pick(90, 300))
        takeovers = [c["takeover_s"] for c in cycles if c["was_dispatching"]]
        figures = summary(running, ledger, engines, f"cluster-kill-{instances}",
                          injected=f"SIGKILL x{CYCLES} of one of {instances} instances behind HAProxy (the "
                                   f"dispatching one at least every other time), restarted; {SENDERS} senders",
                          cycles=cycles, takeover_s=takeovers, drain_s=drain_s,
                          duration_s=round(time.monotonic() - began, 1))  # fmt: skip
        yield figures


def logged_once(figures: dict[str, Any]) -> None:
    assert figures["log"]["lost_from_log"] == 0, figures["log"]
    assert figures["log"]["logged_twice"] == 0, figures["log"]
    assert figures["wrong_acks"] == 0, figures["wrong_examples"]


def one_journey_each(figures: dict[str, Any]) -> None:
    journeys = figures["journeys"]
    assert journeys["journey_missing"] == 0 and journeys["wrong_parameters"] == 0, journeys
    assert journeys["triggered_twice"] == 0 and journeys["phantom_journeys"] == 0, journeys
    assert journeys["cancels_lost"] == 0, journeys["cancels_lost_examples"]


def in_order(figures: dict[str, Any]) -> None:
    assert figures["out_of_order"] == 0, figures["out_of_order_examples"]


def taken_over_in_time(figures: dict[str, Any]) -> None:
    assert figures["takeover_s"], "no failure hit the dispatching instance"
    # The cycles as text: pytest shortens any other object in an assertion's message.
    cycles = json.dumps(figures["cycles"], indent=1)
    assert None not in figures["takeover_s"], cycles
    assert max(figures["takeover_s"]) <= TAKEOVER_LIMIT, cycles
    statuses = figures["command_statuses"]
    assert not statuses.get("pending") and not statuses.get("in_flight") and not statuses.get("dead"), statuses


def test_every_aa_is_logged_once_and_answered_for_its_message(kills: dict[str, Any]) -> None:
    logged_once(kills)


def test_every_booking_has_one_journey_no_double_every_cancel_applied(kills: dict[str, Any]) -> None:
    one_journey_each(kills)


def test_each_appointment_was_triggered_in_the_order_sent(kills: dict[str, Any]) -> None:
    in_order(kills)


def test_the_dead_instances_work_was_taken_over_within_the_limit(kills: dict[str, Any]) -> None:
    taken_over_in_time(kills)


# ---- SIGSTOP of the leading instance past its lease, then SIGCONT ---------------------------------------------------


@pytest.fixture(scope="module")
def stops(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
          haproxy: None) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The leading instance (service and dispatcher) stopped while a bulk trigger of its is under way, kept stopped
    until the other has settled every command open at the stop and HAProxy shows it DOWN, then continued."""
    began = time.monotonic()
    rng = random.Random(SEED + 7)
    with cluster(tmp_path_factory.mktemp("sigstop"), postgres, 2, dispatch_lease=STOP_LEASE) as running:
        sandbox = running.sandbox
        engines, streams = feed(running, "T", SEED * 30)
        deadline = time.monotonic() + pick(300, 1200)
        cycles: list[dict[str, Any]] = []
        stopped: list[int] = []
        with sending(engines, streams, deadline, RATE) as (ledger, stop, errors):
            try:
                for cycle in range(STOPS):
                    time.sleep(rng.uniform(0.5, 2.0))
                    victim = wait_for(running.dispatching, 30, "an instance leading the dispatch")
                    name = f"bridge{running.bridges.index(victim) + 1}"
                    pid, dispatcher = victim.pid, child_pids(victim.pid)
                    trigger_under_way(sandbox, 1_500)
                    stopped_at = time.monotonic()
                    try:
                        took = running.takeover_after(lambda v=victim: stopped.extend(v.pause()), TAKEOVER_LIMIT * 2,
                                                      after=lambda: sandbox.faults(latency_ms=30))  # fmt: skip
                    except AssertionError as exc:
                        # Recorded for the takeover test; the other checks still run on what follows the SIGCONT.
                        took = {"takeover_s": None, "not_taken_over": str(exc)[:3000]}
                    running.proxy.wait_down([name])
                    other = running.dispatching()
                    victim.resume(stopped)
                    stopped.clear()
                    stopped_s = round(time.monotonic() - stopped_at, 2)
                    running.proxy.wait_up([name])
                    wait_for(lambda v=victim: v.status()["dispatch"]["role"] == "standby", 30,
                             "the continued instance to wait as a standby")  # fmt: skip
                    cycles.append({"cycle": cycle + 1, "stopped": name, "stopped_s": stopped_s, "acked": len(ledger),
                                   "taken_over_by_other": other is not None and other is not victim,
                                   "same_process": victim.alive() and victim.pid == pid,
                                   "new_dispatcher_process": not set(dispatcher) & set(child_pids(pid)),
                                   **took})  # fmt: skip
            finally:
                if stopped:
                    victim.resume(stopped)
            continued_with = len(ledger)
            wait_for(lambda: len(ledger) >= continued_with + 40, 60, "acknowledgments after the last SIGCONT")
            stop.set()
        assert not errors, errors
        drain_s = running.wait_drained(pick(90, 300))
        figures = summary(running, ledger, engines, "cluster-sigstop",
                          injected=f"SIGSTOP x{STOPS} of the leading one of 2 instances behind HAProxy (service and "
                                   f"dispatcher, dispatch_lease {STOP_LEASE:g} s) during a bulk trigger, until the "
                                   f"other settled its open commands and HAProxy saw it DOWN, then SIGCONT; "
                                   f"{SENDERS} senders",
                          cycles=cycles, takeover_s=[c["takeover_s"] for c in cycles], drain_s=drain_s,
                          duration_s=round(time.monotonic() - began, 1))  # fmt: skip
        yield figures


def test_a_stopped_leader_loses_doubles_and_reorders_nothing(stops: dict[str, Any]) -> None:
    logged_once(stops)
    one_journey_each(stops)
    in_order(stops)


def test_a_stopped_leaders_work_is_taken_over_within_the_limit(stops: dict[str, Any]) -> None:
    taken_over_in_time(stops)
    assert all(c["taken_over_by_other"] for c in stops["cycles"]), stops["cycles"]


def test_a_continued_leader_rejoins_as_a_standby_without_a_restart(stops: dict[str, Any]) -> None:
    """HAProxy saw it DOWN while stopped and UP after SIGCONT (the fixture waits for both); its service process
    ran on, its deposed dispatcher exited and a new one waits as a standby."""
    assert all(c["stopped_s"] > STOP_LEASE for c in stops["cycles"]), stops["cycles"]
    assert all(c["same_process"] and c["new_dispatcher_process"] for c in stops["cycles"]), stops["cycles"]


# ---- PostgreSQL stopped mid-feed ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def database_crash(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer,
                   haproxy: None) -> Iterator[dict[str, Any]]:  # fmt: skip
    began = time.monotonic()
    with cluster(tmp_path_factory.mktemp("pgstop"), postgres, 2) as running:
        engines, streams = feed(running, "P", SEED * 20)
        deadline = time.monotonic() + pick(300, 900)
        pids = [b.pid for b in running.bridges]
        with sending(engines, streams, deadline, RATE) as (ledger, stop, errors):
            time.sleep(1.0)
            postgres.stop("immediate")
            down_from = time.time()
            acked_when_down = len(ledger)
            # /ready fails on the database check, and HAProxy takes every instance out.
            running.proxy.wait_down()
            time.sleep(pick(2.0, 20.0))
            down_until = time.time()
            postgres.start()
            running.proxy.wait_up()
            wait_for(lambda: len(ledger) >= acked_when_down + 60, 90, "acknowledgments after the restart")
            stop.set()
        assert not errors, errors
        drain_s = running.wait_drained(pick(90, 300))
        aa_while_down = [a.__dict__ for e in engines for a in e.answers
                         if a.code == "AA" and down_from < a.answered_at < down_until]  # fmt: skip
        figures = summary(running, ledger, engines, "cluster-postgres-stop",
                          injected=f"pg_ctl -m immediate stop for {down_until - down_from:.1f} s under load "
                                   f"through HAProxy to 2 instances, then start",
                          aa_while_down=len(aa_while_down), aa_while_down_examples=aa_while_down[:5],
                          same_processes=[b.pid for b in running.bridges] == pids
                                         and all(b.alive() for b in running.bridges),
                          drain_s=drain_s, duration_s=round(time.monotonic() - began, 1))  # fmt: skip
        yield figures


def test_nothing_is_answered_aa_while_the_database_is_down(database_crash: dict[str, Any]) -> None:
    assert database_crash["aa_while_down"] == 0, database_crash["aa_while_down_examples"]
    assert database_crash["wrong_acks"] == 0, database_crash["wrong_examples"]
    assert database_crash["answers"].get("AR", 0) + database_crash["connection_errors"] > 0


def test_instances_reconnect_without_a_restart_and_lose_nothing(database_crash: dict[str, Any]) -> None:
    assert database_crash["same_processes"]
    assert database_crash["log"]["lost_from_log"] == 0, database_crash["log"]
    assert database_crash["log"]["logged_twice"] == 0, database_crash["log"]
    assert database_crash["journeys"]["journey_missing"] == 0, database_crash["journeys"]


def test_after_the_database_restart_the_journeys_are_as_sent(database_crash: dict[str, Any]) -> None:
    """None doubled, every cancel applied (a doubled trigger after its cancel undoes it), in the order sent."""
    assert database_crash["lost"] == 0 and database_crash["duplicated"] == 0, database_crash["journeys"]
    assert database_crash["out_of_order"] == 0, database_crash["out_of_order_examples"]


# ---- the same message at two instances at once ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, postgres: PostgresServer, haproxy: None) -> Iterator[Cluster]:
    with cluster(tmp_path_factory.mktemp("pair"), postgres, 2) as running:
        yield running


def both_at_once(running: Cluster, payloads: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Each pair sent to instance 1 and 2 directly (not through HAProxy), released together; the two ACKs."""
    barrier = threading.Barrier(2, timeout=30)
    acks: list[list[bytes]] = [[], []]

    def send(side: int) -> None:
        with BlockingClient("127.0.0.1", running.bridges[side].port, timeout=30) as client:
            for pair_of in payloads:
                barrier.wait()
                client.send(pair_of[side])
                acks[side].append(client.receive())

    threads = [threading.Thread(target=send, args=(side,)) for side in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert len(acks[0]) == len(acks[1]) == len(payloads), "a sender stopped early"
    return list(zip(acks[0], acks[1], strict=True))


def test_the_same_message_at_two_instances_at_once_is_one_row_one_ack_one_command(pair: Cluster) -> None:
    messages = [siu("S12", f"TWIN-{n}", f"A-TWIN-{n}", future(days=10 + n % 300)) for n in range(PAIRS)]
    acks = both_at_once(pair, [(m, m) for m in messages])
    assert [segments(a)["MSA"][1] for a, _b in acks] == ["AA"] * PAIRS
    differing = [n for n, (a, b) in enumerate(acks) if a != b]
    assert not differing, f"{len(differing)} pairs got different ACKs, first TWIN-{differing[0]}"
    rows = pair.query("SELECT m.control_id, m.status, count(c.id) FROM messages m LEFT JOIN commands c "
                      "ON c.message_id = m.id WHERE m.control_id LIKE 'TWIN-%' GROUP BY m.id")  # fmt: skip
    accepted = Counter(control for control, status, _n in rows if status == "accepted")
    assert len(accepted) == PAIRS and set(accepted.values()) == {1}
    assert sum(n for _c, _s, n in rows) == PAIRS, "a duplicate queued a command"
    assert Counter(status for _c, status, _n in rows) == {"accepted": PAIRS, "duplicate": PAIRS}
    pair.wait_drained(pick(120, 300))
    started = Counter(i["parameters"]["appointmentId"] for i in pair.sandbox.get("/_sandbox/instances")
                      if i["parameters"]["appointmentId"].startswith("A-TWIN-"))  # fmt: skip
    assert len(started) == PAIRS and set(started.values()) == {1}
    write_results(
        {
            "scenario": "cluster-same-message-twice",
            "messages": PAIRS,
            "lost": 0,
            "duplicated": 0,
            "wrong_acks": 0,
            "injected": f"{PAIRS} messages each sent to two instances at the same moment",
        }
    )


def test_a_booking_resent_under_a_new_control_id_to_the_other_instance_triggers_once(pair: Cluster) -> None:
    """Half resent once the first copy was answered, half at the same moment as it."""
    start = future(days=40)
    bookings = [(siu("S12", f"NEW-{n}-a", f"A-NEW-{n}", start), siu("S12", f"NEW-{n}-b", f"A-NEW-{n}", start))
                for n in range(20)]  # fmt: skip
    for first, second in bookings[:10]:
        assert segments(pair.bridges[0].running.request(first))["MSA"][1] == "AA"  # type: ignore[union-attr]
        assert segments(pair.bridges[1].running.request(second))["MSA"][1] == "AA"  # type: ignore[union-attr]
    acks = both_at_once(pair, bookings[10:])
    assert {segments(a)["MSA"][1] for pair_acks in acks for a in pair_acks} == {"AA"}
    pair.wait_drained(pick(60, 120))
    triggered: Counter = Counter()
    for call in pair.sandbox.calls("bulk"):
        if call["status"] == 204 and call["body"]:
            for instance in call["body"].get("instances", []):
                triggered[instance["parameters"]["appointmentId"]] += 1
    assert {a: triggered[a] for a in (f"A-NEW-{n}" for n in range(20))} == {f"A-NEW-{n}": 1 for n in range(20)}
    outcomes = pair.query("SELECT c.outcome FROM commands c JOIN messages m ON m.id = c.message_id "
                          "WHERE m.control_id LIKE 'NEW-%'")  # fmt: skip
    assert len(outcomes) == 40


def test_a_refused_token_fails_healthz_but_keeps_every_instance_ready_in_haproxy(pair: Cluster) -> None:
    """The token and the API are shared: were the balancer's check to fail on them, every instance would be taken
    out at once and the feed refused while the bridges could still log and acknowledge it."""
    sandbox, bridge = pair.sandbox, pair.bridges[0]
    sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
    try:
        assert segments(bridge.running.request(siu("S12", "TOK-1", "A-TOK-1", future())))["MSA"][1] == "AA"  # type: ignore[union-attr]
        wait_for(lambda: "dispatch" in bridge.healthz()[1].get("failing", []), 30, "/healthz to name dispatch")
        ready = requests.get(f"http://127.0.0.1:{bridge.health_port}/ready", timeout=5)
        assert ready.status_code == 200 and ready.json() == {"ready": True, "failing": []}
        # Longer than HAProxy takes to mark an instance down (2 failed checks 1 s apart).
        for _ in range(20):
            assert set(pair.proxy.server_states().values()) == {"UP"}
            time.sleep(0.2)
        with BlockingClient("127.0.0.1", pair.port, timeout=10) as client:
            assert segments(client.request(siu("S12", "TOK-2", "A-TOK-2", future())))["MSA"][1] == "AA"
    finally:
        sandbox.post(
            "/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances", "read.journey_instances"]}}
        )
    pair.wait_drained(60)
