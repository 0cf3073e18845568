"""Sender text aimed at operations: every message carries a trigger code never seen before and a control id full
of control characters (ESC sequences, BEL, NUL, C1, U+2028, a forged ``\\n<2>`` journald priority) or thousands
of characters long, from several connections at once, while a clean connection books appointments.

Checks: ``/metrics`` keeps a fixed set of series (junk codes count as ``other``); every line of the service's
log is a record of its own (no raw control character, none forged), capped in length; ``log list`` prints no
control character; the clean connection's bookings are all answered AA and start their journeys.
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from hl7bridge.testing.client import BlockingClient
from tests.conftest import segments
from tests.dispatch_support import future, siu

from .support import finish_scenario, knob, resource_figures, scenario_processes, threads_running, wait_for

MESSAGES = int(knob("hostile_label_messages", 4_000, 40_000))  # junk-coded messages in all
WORKERS = 4
SEED = int(knob("seed", 20261123, 20261123))
NASTY = ["\x1b[2J", "\x1b]0;owned\x07", "\x00", "\x9b31m", "\u2028", "\n<2>hl7bridge.service: FORGED", "\x7f", "\t"]
#: A record as the text formatter writes it outside journald: ISO time, level, logger.
RECORD = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")
RAW_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def junk_worker(port: int, worker: int, count: int, sent: list[int], latencies: list[float]) -> None:
    rng = random.Random(SEED + worker)
    with BlockingClient("127.0.0.1", port, timeout=30) as client:
        for number in range(count):
            event = f"{rng.choice('QXYZ')}{worker}{number:05d}"
            control = f"J{worker}-{number}" + rng.choice(NASTY) + ("9" * rng.choice((0, 0, 0, 3000)))
            began = time.monotonic()
            client.request(siu(event, control, f"HL-{worker}-{number}"))
            latencies.append(time.monotonic() - began)
            sent[worker] += 1


def clean_worker(port: int, bookings: int, answers: list[str], latencies: list[float]) -> None:
    with BlockingClient("127.0.0.1", port, timeout=30) as client:
        for number in range(bookings):
            began = time.monotonic()
            answer = client.request(siu("S12", f"HL-OK-{number}", f"HL-OK-APPT-{number}", future()))
            latencies.append(time.monotonic() - began)
            answers.append(segments(answer)["MSA"][1])
            time.sleep(0.02)


@pytest.fixture(scope="module")
def labels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    with scenario_processes(tmp_path_factory, log_level="info") as (bridge, sandbox):
        bridge.start()
        url = f"http://127.0.0.1:{bridge.health_port}/metrics"
        wait_for(lambda: bridge.healthz()[0] == 200, 30, "the service to be healthy")
        with BlockingClient("127.0.0.1", bridge.port, timeout=30) as client:
            client.request(siu("S12", "HL-WARM", "HL-WARM-APPT", future()))
            client.request(siu("Q0", "HL-WARM-JUNK", "HL-WARM-JUNK"))
        before = requests.get(url, timeout=10).text
        resources_before = (bridge.rss_kb(), bridge.fds())
        sent, junk_latencies, answers, clean_latencies = [0] * WORKERS, [], [], []  # type: ignore[var-annotated]
        bookings = 100
        targets = [lambda w=w: junk_worker(bridge.port, w, MESSAGES // WORKERS, sent, junk_latencies)
                   for w in range(WORKERS)]  # fmt: skip
        targets.append(lambda: clean_worker(bridge.port, bookings, answers, clean_latencies))
        with threads_running(targets):
            pass
        after = requests.get(url, timeout=10).text
        resources_after = (bridge.rss_kb(), bridge.fds())
        bridge.wait_drained(60)
        started = Counter(i["parameters"].get("appointmentId") for i in sandbox.get("/_sandbox/instances"))
        running = {i["parameters"].get("appointmentId") for i in sandbox.get("/_sandbox/instances")
                   if i["status"] == "InProgress"}  # fmt: skip
        listed = bridge.running.cli("log", "list", "--limit", "100000").stdout  # type: ignore[union-attr]
        exit_status = bridge.stop()  # before reading the log, so that it is complete; finish_scenario's is a no-op
        lines = bridge.logs().splitlines()
        records = [line for line in lines if RECORD.match(line)]
        stray = [line for line in lines if not RECORD.match(line) and not line.startswith("    ")
                 and "listening" not in line]  # fmt: skip
        series = [line for line in after.splitlines() if line.startswith("hl7bridge_messages_received_total{")]
        figures = {
            "scenario": "hostile_labels",
            "injected": f"{sum(sent)} messages with a new trigger code each and control characters or 3,000 "
                        f"characters in MSH-10, on {WORKERS} connections, beside {bookings} clean bookings",
            "messages": sum(sent) + len(answers),
            "lost": sum(1 for n in range(bookings) if f"HL-OK-APPT-{n}" not in running),
            "duplicated": sum(count - 1 for appointment, count in started.items()
                              if appointment and appointment.startswith("HL-OK-APPT-") and count > 1),
            **resource_figures(resources_before, resources_after),
            "wrong_acks": sum(1 for a in answers if a != "AA"),
            "metrics_bytes_before": len(before),
            "metrics_bytes_after": len(after),
            "message_series_after": len(series),
            "log_lines": len(lines),
            "log_records": len(records),
            "stray_log_lines": stray[:10],
            "raw_control_characters_in_log": sum(len(RAW_CONTROL.findall(line)) for line in lines),
            "longest_log_line": max((len(line) for line in lines), default=0),
            "raw_control_characters_in_log_list": len(RAW_CONTROL.findall(listed)),
            "junk_answer_p_max_s": round(max(junk_latencies, default=0.0), 3),
            "clean_answer_max_s": round(max(clean_latencies, default=0.0), 3),
            "alive_until_stopped": exit_status == 0,
        }  # fmt: skip
        yield finish_scenario(figures, bridge, began)


def test_metrics_keep_a_fixed_set_of_series(labels: dict[str, Any]) -> None:
    assert labels["metrics_bytes_after"] - labels["metrics_bytes_before"] < 4096, labels
    assert labels["message_series_after"] <= 6, labels


def test_every_log_line_is_a_record_of_its_own(labels: dict[str, Any]) -> None:
    assert labels["raw_control_characters_in_log"] == 0
    assert not labels["stray_log_lines"], labels["stray_log_lines"]
    assert labels["log_records"] >= labels["messages"] - 200, labels  # AA bookings log at debug
    assert labels["longest_log_line"] < 8192


def test_the_cli_prints_no_control_character(labels: dict[str, Any]) -> None:
    assert labels["raw_control_characters_in_log_list"] == 0


def test_clean_bookings_are_answered_and_start_journeys(labels: dict[str, Any]) -> None:
    assert (labels["wrong_acks"], labels["lost"], labels["duplicated"]) == (0, 0, 0), labels
    assert labels["alive_until_stopped"]
