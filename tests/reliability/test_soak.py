"""Load and soak: a steady rate from several connections (short: one minute; long: one hour, or
HL7BRIDGE_SOAK_SECONDS), with a background API outage coming and going and replays running.

Checks: memory and open descriptors stay flat; every message answered AA is logged once; every appointment
ends in its expected state with nothing triggered twice; replays start nothing new. The ACK latency at that
rate is recorded as a figure (compared with the benchmark's target in docs/reliability.md), never asserted.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.dispatch_support import siu

from .support import (
    TOKEN,
    Booking,
    Bridge,
    Engine,
    Ledger,
    Outgoing,
    Stream,
    answer_codes,
    command_statuses,
    descriptor_problems,
    finish_scenario,
    journey_check,
    knob,
    log_check,
    loss_figures,
    mb,
    percentile,
    pick,
    resource_figures,
    sandbox_reachable,
    scenario_processes,
    threads_running,
    wait_for,
    wrong_answers,
)

SECONDS = knob("soak_seconds", 60, 3600)
RATE = knob("soak_rate", 200, 200)  # messages per second, over all connections
CONNECTIONS = int(knob("soak_connections", 8, 8))
OUTAGE_PERIOD = knob("soak_outage_period", 20, 300)
OUTAGE_SECONDS = knob("soak_outage_seconds", 5, 60)
REPLAY_PERIOD = knob("soak_replay_period", 15, 60)
SEED = int(knob("seed", 20261123, 20261123))
RETRY_MAX = pick(2.0, 10.0)
pytestmark = pytest.mark.timeout(pick(300, SECONDS + 1800))  # the module fixture runs the whole scenario
NO_OP_REPLAYS = ("already triggered with these parameters", "no change", "already cancelled",
                 "its trigger was never sent; nothing to cancel", "nothing active to cancel")  # fmt: skip


class SoakStream(Stream):
    """A feed mix: new bookings, reschedules, cancels, modifications that change nothing, slot events."""

    def __init__(self, prefix: str, seed: int) -> None:
        super().__init__(prefix, seed, open_count=0)
        self.lock = threading.Lock()
        self.finished: list[tuple[str, str]] = []  # (appointment, last control) no message will follow

    def next(self) -> Outgoing:
        r = self.rng.random()
        self.sequence += 1
        control = f"{self.prefix}-{self.sequence}"
        if r < 0.30 or len(self.open) < 5:
            if r >= 0.12 and len(self.open) >= 5:
                slot = f"{self.prefix}-SLOT{self.sequence}"
                return Outgoing(slot, "S23", control, siu("S23", control, slot, self.start(self._new())), None)
            booking = self._new()
            booking.version = 1
            booking.start_at = self.start(booking)
            self.open.append(booking)
            return self.message(booking, "S12", control)
        booking = self.rng.choice(self.open)
        if r < 0.40:
            booking.version += 1
            booking.start_at = self.start(booking)
            out = self.message(booking, "S13", control)
        elif r < 0.47:
            out = self.message(booking, "S15", control)
            self._finish(booking, control)
        else:
            out = self.message(booking, "S14", control)
        if len(self.open) > 40:
            self._finish(self.open[0], None)
        return out

    def _finish(self, booking: Booking, control: str | None) -> None:
        self.open.remove(booking)
        with self.lock:
            self.finished.append((booking.appointment, control or ""))


def open_loop(engine: Engine, stream: SoakStream, ledger: Ledger, stop: threading.Event, rate: float,
              latencies: list[float], service: list[float], dues: list[float], last: dict[str, str],
              errors: list[str]) -> None:  # fmt: skip
    """Messages due at a fixed rate; latency from when each was due (queueing behind a slow one counts)."""
    interval = 1.0 / rate
    due = time.monotonic() + random.Random(id(stream)).uniform(0, interval)
    try:
        while not stop.is_set():
            delay = due - time.monotonic()
            if delay > 0 and stop.wait(delay):
                break
            outgoing = stream.next()
            answer = engine.deliver(outgoing.control, outgoing.payload, time.monotonic() + 120)
            latencies.append(time.monotonic() - due)
            dues.append(due)
            service.append(answer.answered_at - answer.sent_at)
            if answer.code == "AA":
                if outgoing.event == "S23":
                    ledger.record_control(outgoing.control)  # a slot event: logged, no journey
                else:
                    ledger.record(outgoing)
                    last[outgoing.appointment] = outgoing.control
            due += interval
    except Exception as exc:  # noqa: BLE001 - reported by the test
        errors.append(f"{exc.__class__.__name__}: {exc}")
    finally:
        engine.close()


def latency_over_time(dues: list[list[float]], latencies: list[list[float]], began: float) -> dict[str, Any]:
    """When the slow answers happened: per minute of the run, and the ten worst seconds (ms, from due)."""
    by_second: dict[int, list[float]] = {}
    for due_list, latency_list in zip(dues, latencies, strict=True):
        for due, latency in zip(due_list, latency_list, strict=True):
            by_second.setdefault(int(due - began), []).append(latency * 1000)
    by_minute: dict[int, list[float]] = {}
    for second, values in by_second.items():
        by_minute.setdefault(second // 60, []).extend(values)
    worst = sorted(by_second.items(), key=lambda item: -max(item[1]))[:10]
    return {
        "ack_latency_ms_by_minute": [[m, round(percentile(v, 50), 1), round(percentile(v, 99), 1), round(max(v), 1)]
                                     for m, v in sorted(by_minute.items())],
        "worst_seconds": [[t, round(max(v), 1), len(v)] for t, v in sorted(worst)],
        "seconds_with_an_answer_over_100ms": sum(1 for v in by_second.values() if max(v) > 100),
        "seconds_measured": len(by_second),
    }  # fmt: skip


def histogram_figures(cumulative: dict[str, int]) -> dict[str, Any]:
    """The service's ACK latency histogram (frame complete to ACK written), as shares under each bound."""
    total = cumulative.get("+Inf", 0)
    if not total:
        return {"messages": 0}
    shares = {f"le_{bound}s": round(count / total, 5) for bound, count in cumulative.items() if bound != "+Inf"}
    return {"messages": total, **shares}


def replayer(bridge: Bridge, streams: list[SoakStream], last: dict[str, str], stop: threading.Event,
             runs: list[dict]) -> None:  # fmt: skip
    """Every REPLAY_PERIOD s, replay the last message of up to 20 appointments that will get no further message."""
    done: set[str] = set()
    while not stop.wait(REPLAY_PERIOD):
        chosen = []
        for stream in streams:
            with stream.lock:
                chosen += [(a, c or last.get(a, "")) for a, c in stream.finished if a not in done]
        chosen = [(a, c) for a, c in chosen if c][:20]
        if not chosen:
            continue
        done.update(a for a, _c in chosen)
        marks = ",".join("?" * len(chosen))
        ids = [str(i) for (i,) in bridge.query(
            f"SELECT id FROM messages WHERE status = 'accepted' AND control_id IN ({marks})", *[c for _a, c in chosen])]  # fmt: skip
        cmd = [sys.executable, "-m", "hl7bridge", "replay", "--config", str(bridge.workdir / "hl7bridge.toml"),
               "--database", bridge.url, *ids]  # fmt: skip
        began = time.monotonic()
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=bridge.workdir,
                                env={**os.environ, **TOKEN})  # fmt: skip
        runs.append({"at": datetime.now().isoformat(timespec="seconds"), "messages": len(ids),
                     "exit": result.returncode, "seconds": round(time.monotonic() - began, 1),
                     "summary": result.stderr.strip().splitlines()[-1:] if result.stderr else []})  # fmt: skip


class CollectorPauses:
    """This process's own garbage-collection pauses, kept short while it measures.

    The senders are threads of this process, and what the soak records grows all along (every answer, every
    booking): a full collection walks all of it and stops every sender meanwhile, 0.5-1.6 s late in the hour,
    which would be counted as the service's latency. Freezing what is recorded, once a second, leaves the
    collector only the young objects; the pauses longer than 5 ms are reported with the figures."""

    def __init__(self) -> None:
        self.pauses: list[tuple[float, int, float]] = []  # (wall time, generation, ms)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        ms = (time.perf_counter() - self._started) * 1000
        if ms > 5:
            self.pauses.append((round(time.time(), 3), info["generation"], round(ms, 1)))

    def freeze_every_second(self, stop: threading.Event) -> None:
        while not stop.wait(1.0):
            gc.freeze()

    @contextlib.contextmanager
    def watching(self) -> Iterator[CollectorPauses]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)
            gc.unfreeze()

    def figures(self) -> dict[str, Any]:
        return {"pauses_over_5ms": len(self.pauses), "max_ms": max((p[2] for p in self.pauses), default=0.0),
                "longest": sorted(self.pauses, key=lambda p: -p[2])[:5]}  # fmt: skip


def outages(sandbox: Any, stop: threading.Event, log: list[dict]) -> None:
    modes = ("503", "refuse", "timeout")
    n = 0
    while not stop.wait(OUTAGE_PERIOD / 2 if n == 0 else OUTAGE_PERIOD):
        mode = modes[n % len(modes)]
        with contextlib.suppress(Exception):
            wait_for(lambda: sandbox_reachable(sandbox), 30, "the sandbox")
            sandbox.faults(outage={"mode": mode, "seconds": OUTAGE_SECONDS})
            log.append({"mode": mode, "at": datetime.now().isoformat(timespec="seconds"), "seconds": OUTAGE_SECONDS})
        n += 1


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory, retry_initial=0.5, retry_max=RETRY_MAX) as (bridge, sandbox):
        bridge.start()
        ledger, stop, errors = Ledger(), threading.Event(), []
        base = datetime.now() + timedelta(days=1)
        streams = [SoakStream(f"SK{i}", SEED * 13 + i) for i in range(CONNECTIONS)]
        for stream in streams:
            stream.base = base.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=30)
        engines = [Engine(bridge.port, timeout=30) for _ in range(CONNECTIONS)]
        latencies: list[list[float]] = [[] for _ in range(CONNECTIONS)]
        service: list[list[float]] = [[] for _ in range(CONNECTIONS)]
        dues: list[list[float]] = [[] for _ in range(CONNECTIONS)]
        last: dict[str, str] = {}
        samples: list[dict] = []
        replays: list[dict] = []
        outage_log: list[dict] = []
        background_stop = threading.Event()

        def sampler() -> None:
            t0 = time.monotonic()
            while not background_stop.wait(5 if SECONDS <= 600 else 30):
                samples.append({"t": round(time.monotonic() - t0), "rss_kb": bridge.rss_kb(), "fds": bridge.fds(),
                                "acked": sum(len(x) for x in latencies), "outbox": bridge.open_commands()})  # fmt: skip

        senders = [functools.partial(open_loop, e, s, ledger, stop, RATE / CONNECTIONS, lat, svc, due, last, errors)
                   for e, s, lat, svc, due in zip(engines, streams, latencies, service, dues, strict=True)]  # fmt: skip
        collector = CollectorPauses()
        background = [sampler, functools.partial(outages, sandbox, background_stop, outage_log),
                      functools.partial(replayer, bridge, streams, last, background_stop, replays),
                      functools.partial(collector.freeze_every_second, background_stop)]  # fmt: skip
        load_began = time.monotonic()
        # On an error in the block, the threads must stop too, or their joins would hang the run.
        with (collector.watching(), threads_running(background, background_stop.set),
              threads_running(senders, stop.set)):  # fmt: skip
            warm = min(10.0, SECONDS * 0.1)
            time.sleep(warm)
            before = (bridge.rss_kb(), bridge.fds())
            fd_kinds_before = bridge.fd_kinds()
            acked_at_warm = sum(len(x) for x in latencies)
            end = load_began + SECONDS
            while time.monotonic() < end and not errors and bridge.alive():
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            after = (bridge.rss_kb(), bridge.fds())
            fd_kinds_after = bridge.fd_kinds()
            load_s = time.monotonic() - load_began
            stop.set()
            background_stop.set()
        assert not errors, errors
        service_histogram = bridge.ack_histogram()
        wait_for(lambda: sandbox_reachable(sandbox), OUTAGE_SECONDS + 30, "the sandbox after the last outage")
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        drain_s = bridge.wait_drained(RETRY_MAX * 4 + OUTAGE_SECONDS + 120)
        instances = sandbox.get("/_sandbox/instances")
        log = log_check(bridge, ledger.controls)
        journeys = journey_check(ledger, instances)
        replayed = bridge.query(
            "SELECT c.status, c.outcome FROM commands c JOIN messages m ON m.id = c.message_id "
            "WHERE m.replay_of IS NOT NULL")  # fmt: skip
        replay_outcomes = Counter(f"{s}: {o}" for s, o in replayed)
        every = [x for lst in latencies for x in lst]
        svc = [x for lst in service for x in lst]
        acked = sum(len(x) for x in latencies)
        figures = {
            "scenario": "load_soak",
            "injected": f"{RATE:g} msg/s offered over {CONNECTIONS} connections for {SECONDS:g} s; API outage of "
                        f"{OUTAGE_SECONDS:g} s every {OUTAGE_PERIOD:g} s (503, refused, no answer in turn); "
                        f"'hl7bridge replay' of finished appointments every {REPLAY_PERIOD:g} s",
            **loss_figures(log, journeys),
            "wrong_acks": sum(len(e.wrong) for e in engines),
            **resource_figures(before, after),
            "fd_kinds_before": fd_kinds_before,
            "fd_kinds_after": fd_kinds_after,
            "load_seconds": round(load_s, 1),
            "achieved_rate": round((acked - acked_at_warm) / max(load_s - warm, 1e-9), 1),
            "offered_rate": RATE,
            "ack_latency_ms_from_due": {q: round(percentile(every, p) * 1000, 2) for q, p in
                                        (("p50", 50), ("p90", 90), ("p99", 99), ("p99.9", 99.9))} | {
                                            "max": round(max(every) * 1000, 2)},
            "ack_latency_ms_from_send": {q: round(percentile(svc, p) * 1000, 2) for q, p in
                                         (("p50", 50), ("p99", 99))} | {"max": round(max(svc) * 1000, 2)},
            "ack_latency_in_the_service": histogram_figures(service_histogram),
            **latency_over_time(dues, latencies, load_began),
            "answers": answer_codes(engines),
            "outages": outage_log,
            "replay_runs": replays,
            "replayed_commands": dict(replay_outcomes),
            "drain_s": drain_s,
            "command_statuses": command_statuses(bridge),
            "samples": samples,
            "log": {k: v for k, v in log.items() if not k.endswith("examples")},
            "journeys": journeys,
            "wrong_examples": wrong_answers(engines)[:10],
            "measuring_process_gc": collector.figures(),
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_the_load_ran_at_about_the_offered_rate(soak: dict[str, Any]) -> None:
    # The load ran (a stalled sender sends next to nothing); the rate itself is a figure, never asserted.
    assert soak["messages"] >= soak["offered_rate"] * SECONDS * 0.1, (soak["messages"], soak["achieved_rate"])
    assert soak["outages"], "no outage was injected"
    assert soak["replay_runs"] and all(r["exit"] == 0 for r in soak["replay_runs"]), soak["replay_runs"]


def test_every_message_answered_aa_is_logged_once(soak: dict[str, Any]) -> None:
    assert soak["answers"].keys() <= {"AA", "AR"} and soak["wrong_acks"] == 0, (soak["answers"], soak["wrong_examples"])
    assert soak["log"]["lost_from_log"] == 0 and soak["log"]["logged_twice"] == 0, soak["log"]


def test_every_appointment_ends_in_its_state_once(soak: dict[str, Any]) -> None:
    journeys = soak["journeys"]
    for key in ("journey_missing", "wrong_parameters", "cancels_lost", "triggered_twice", "phantom_journeys"):
        assert journeys[key] == 0, (key, journeys)
    assert set(soak["command_statuses"]) <= {"done", "annihilated"}, soak["command_statuses"]


def test_replays_started_nothing_new(soak: dict[str, Any]) -> None:
    assert soak["replayed_commands"], "no replayed command was dispatched"
    for outcome in soak["replayed_commands"]:
        status, _, why = outcome.partition(": ")
        assert status in ("done", "annihilated") and (why in NO_OP_REPLAYS or why.startswith("cancelled by command")
                                                      or why.startswith("superseded by cancel")), outcome  # fmt: skip


def test_memory_and_open_files_stay_flat(soak: dict[str, Any]) -> None:
    growth = mb(soak["rss_after_kb"] - soak["rss_before_kb"])
    assert growth <= pick(30, 60), (mb(soak["rss_before_kb"]), mb(soak["rss_after_kb"]), soak["samples"])
    # Both pictures are taken under load (the same MLLP connections open): pipes and files are the same, the
    # database pool and the API client's kept-alive connections stay within their bounds.
    assert descriptor_problems(soak["fd_kinds_before"], soak["fd_kinds_after"]) == [], soak["fd_kinds_after"]
