"""Hostile API: `hl7bridge serve --api-url` pointed at a scriptable hostile server (``tests/hostile_api.py``),
one case after another, while an engine keeps sending messages over MLLP.

For each case the figures record what the dispatcher sent, what it logged (command status and outcome, the
attempts' verdicts), the memory of the service and its dispatcher process (RSS, the most seen while the case
ran), and the MLLP side's worst ACK latency meanwhile. Checks: no call leaves the configured base, nothing is
cancelled but the appointment's own journey, no wrong answer is taken for success, every case ends (a retry
that succeeds, or a dead letter) within its bound, no text of the API reaches the log raw, the token is
nowhere, memory stays bounded, and the MLLP side keeps answering.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import segments
from tests.dispatch_support import future, siu
from tests.hostile_api import Answer, HostileApi, json_answer

from .support import Bridge, bridge_config, finish_scenario, free_port, percentile, pick, wait_for

TOKEN = "test-token"
BIG = pick(200, 200) * 1024 * 1024  # a body of this many bytes
DRIP = pick(0.05, 1.0)  # seconds per byte of a dripped body
CALL_TIMEOUT = pick(3, 10)
pytestmark = pytest.mark.timeout(pick(600, 1800))


@dataclass
class Case:
    name: str
    scripts: dict[str, list[Answer]]
    event: str = "S12"
    #: Appointments sent at once (each its own command).
    copies: int = 1
    #: How the case must end: "done" (after the API recovered), "dead", or "paused" (then done).
    ends: str = "done"
    #: Seconds after which the scripts turn to the API's documented answers (cases that must recover).
    recover_after: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def evil_search(appointment: str) -> list[Answer]:
    return [json_answer(200, [{"id": "../../../../admin/tokens", "status": "InProgress",
                               "parameters": {"appointmentId": appointment}}])]  # fmt: skip


def crowd_search(appointment: str) -> list[Answer]:
    others = [{"id": f"other-{i}", "status": "InProgress", "parameters": {"appointmentId": f"OTHER-{i}"}}
              for i in range(pick(3000, 3000))]  # fmt: skip
    mine = {"id": "mine-1", "status": "InProgress", "parameters": {"appointmentId": appointment}}
    return [json_answer(200, [*others, mine])]


FORGED = "bad value\n<2>hl7bridge: FORGED LINE \x1b[31m"


def cases() -> list[Case]:
    deep = b"[" * 100_000 + b"]" * 100_000
    return [
        Case("path injection in a search answer", {"search": evil_search("H-INJ")}, event="S15", ends="dead"),
        Case("3,000 instances of other appointments", {"search": crowd_search("H-CROWD")}, event="S15"),
        Case("401 with a lone surrogate", {"bulk": [json_answer(401, {"message": "no \udfff"})] * 3 + [Answer(204)]}),
        Case("400 with a lone surrogate", {"bulk": [json_answer(400, ["bad \udfff"])]}, ends="dead"),
        Case("503 with a lone surrogate", {"bulk": [json_answer(503, ["busy \udfff"])]}, recover_after=3),
        Case(
            "401 echoing the token",
            {"bulk": [json_answer(401, {"message": f"got Bearer {TOKEN}"})] * 2 + [Answer(204)]},
        ),
        Case("a forged log line", {"bulk": [json_answer(400, [FORGED])]}, ends="dead"),
        Case("Retry-After: 99999999", {"bulk": [Answer(503, headers={"Retry-After": "99999999"})] * 3 + [Answer(204)]}),
        Case(
            "Retry-After: a date in 9999",
            {"bulk": [Answer(503, headers={"Retry-After": "Fri, 31 Dec 9999 23:59:59 GMT"})] * 3 + [Answer(204)]},
        ),
        Case(
            "Retry-After: 400 digits", {"bulk": [Answer(503, headers={"Retry-After": "9" * 400})] * 3 + [Answer(204)]}
        ),
        Case("302 redirect", {"bulk": [Answer(302, headers={"Location": "/chatbotapi/landing"})]}, ends="dead"),
        Case(
            "307 to another origin",
            {"bulk": [Answer(307, headers={"Location": "http://127.0.0.2:9/steal"})]},
            ends="dead",
        ),
        Case("redirect loop", {"bulk": [Answer(301, headers={"Location": "/loop"})]}, ends="dead"),
        Case(f"a {BIG // 2**20} MB body", {"bulk": [Answer(503, b"x" * BIG)]}, recover_after=3),
        Case(f"four {BIG // 2**20} MB bodies at once", {"bulk": [Answer(503, b"x" * BIG)]}, copies=4, recover_after=3),
        Case("an endless chunked body", {"bulk": [Answer(200, b"y" * 65536, endless=True)]}, recover_after=3),
        Case(
            "a body dripped byte by byte",
            {"bulk": [Answer(400, b'["' + b"z" * 10_000 + b'"]', drip=DRIP)]},
            recover_after=CALL_TIMEOUT + 1,
        ),
        Case(
            "four drips at once",
            {"bulk": [Answer(400, b"[]" + b" " * 10_000, drip=DRIP)]},
            copies=4,
            recover_after=CALL_TIMEOUT + 1,
        ),
        Case(
            "headers dripped byte by byte",
            {"bulk": [Answer(204, drip=DRIP * 20, drip_head=True)]},
            recover_after=CALL_TIMEOUT + 1,
        ),
        Case(
            "400 with 100,000 messages",
            {"bulk": [json_answer(400, [f"error {i}: field" for i in range(100_000)])]},
            ends="dead",
        ),
        Case(
            "search answered with an object",
            {"search": [json_answer(200, {"instances": []})]},
            event="S15",
            ends="dead",
        ),
        Case("search answered with HTML", {"search": [Answer(200, b"<html>Sign in</html>")]}, event="S15", ends="dead"),
        Case("search answered with a string", {"search": [json_answer(200, "InProgress")]}, event="S15", ends="dead"),
        Case("search answered with strings", {"search": [json_answer(200, ["a", "b"])]}, event="S15", ends="dead"),
        Case("search answered with deep nesting", {"search": [Answer(200, deep)]}, event="S15", ends="dead"),
        Case(
            "bulk answered 200 with errors",
            {"bulk": [json_answer(200, {"errors": ["appointmentId is required"]})]},
            ends="done-found",
        ),
        Case("bulk answered 202", {"bulk": [Answer(202)]}, ends="done-found"),
        Case("bulk answered 206", {"bulk": [Answer(206, b"x")]}, ends="done-found"),
        Case("103 before 204", {"bulk": [Answer(204, interim=(103,))]}, ends="done-found"),
    ]


class Prober:
    """An engine sending slot events (logged, answered AA, no command) every 20 ms; the worst ACK latency."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.latencies: list[tuple[float, float]] = []
        self.failures = 0
        #: Control ids answered AA, and answers that were anything else.
        self.accepted: list[str] = []
        self.wrong = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        assert self.bridge.running is not None
        n = 0
        while not self.stop.is_set():
            n += 1
            try:
                with self.bridge.running.client(timeout=30) as client:
                    while not self.stop.is_set():
                        n += 1
                        sent = time.monotonic()
                        answer = client.request(siu("S23", f"PROBE-{n}", f"PROBE-{n}", future()))
                        self.latencies.append((sent, (time.monotonic() - sent) * 1000))
                        msa = segments(answer).get("MSA", [])
                        if msa[1:3] == ["AA", f"PROBE-{n}"]:
                            self.accepted.append(f"PROBE-{n}")
                        else:
                            self.wrong += 1
                        self.stop.wait(0.02)
            except OSError:
                self.failures += 1
                self.stop.wait(0.1)

    def worst_since(self, since: float) -> float | None:
        return max((ms for at, ms in self.latencies if at >= since), default=None)


class Memory:
    """The most RSS (service + dispatcher process) seen while a case runs, sampled every 50 ms."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.bridge.rss_kb() or 0)

    def reset(self) -> int:
        peak, self.peak = self.peak, self.bridge.rss_kb() or 0
        return peak


def command_of(bridge: Bridge, control: str) -> tuple | None:
    rows = bridge.query("SELECT c.id, c.status, c.outcome, c.attempts FROM commands c JOIN messages m "
                        "ON m.id = c.message_id WHERE m.control_id = ?", control)  # fmt: skip
    return rows[0] if rows else None


def run_case(bridge: Bridge, api: HostileApi, prober: Prober, memory: Memory, index: int, case: Case) -> None:
    api.reset()
    for endpoint, answers in case.scripts.items():
        api.script(endpoint, *answers)
    memory.reset()
    began = time.monotonic()
    controls = [f"H{index}-{n}" for n in range(case.copies)]
    assert bridge.running is not None
    for control in controls:
        target = "H-INJ" if "injection" in case.name else "H-CROWD" if "3,000" in case.name else control
        with bridge.running.client() as client:
            client.request(siu(case.event, control, target, future()))
    recovered = False

    def settled() -> bool:
        nonlocal recovered
        if case.recover_after is not None and not recovered and time.monotonic() - began > case.recover_after:
            for endpoint in case.scripts:
                api.script(endpoint)  # the API answers as documented again
            recovered = True
        rows = [command_of(bridge, c) for c in controls]
        return all(r is not None and r[1] not in ("pending", "in_flight") for r in rows)

    wait_for(settled, pick(60, 180), f"case {case.name!r} to settle", interval=0.1)
    took = round(time.monotonic() - began, 2)
    rows = [command_of(bridge, c) for c in controls]
    attempts = [bridge.query("SELECT operation, status_code, verdict, error, length(response_body) FROM attempts "
                             "WHERE command_id = ? ORDER BY id", r[0]) for r in rows]  # fmt: skip
    seen = api.requests()
    case.figures = {
        "case": case.name,
        "sent": {"requests": len(seen), "by_endpoint": {e: len(api.requests(e)) for e in ("bulk", "search", "cancel",
                                                                                          "other")},
                 "paths_outside_api": sorted({s.path for s in seen if not s.path.startswith(
                     "/chatbotapi/external/orgs/test-org/journeys/reminders/instances")}),
                 "cancelled_ids": [s.path.rsplit("/", 2)[-2] for s in api.requests("cancel")]},
        "logged": {"statuses": [r[1] for r in rows], "outcome": (rows[0][2] or "")[:200],
                   "outcome_chars": max(len(r[2] or "") for r in rows), "attempts": len(attempts[0]), "verdicts": sorted({a[2] for a in attempts[0]}),
                   "errors": sorted({(a[3] or "")[:80] for a in attempts[0]})[:3],
                   "largest_stored_body": max((a[4] or 0 for rows_ in attempts for a in rows_), default=0)},
        "settled_s": took,
        "rss_peak_mb": round(memory.reset() / 1024, 1),
        "mllp_worst_ack_ms": round(prober.worst_since(began) or 0, 1),
    }  # fmt: skip


def settled_health(bridge: Bridge) -> tuple[int, dict]:
    """/healthz once it is 200 (within 5 s), else as it is then."""
    deadline = time.monotonic() + 5
    while (health := bridge.healthz())[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    return health


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    began = time.monotonic()
    api = HostileApi()
    workdir = tmp_path_factory.mktemp("bridge")
    health_port = free_port()
    config = bridge_config(api.url, health_port, retry_initial=0.2, retry_max=1.0)
    config = config.replace("read_timeout = 2", f"read_timeout = 2\ncall_timeout = {CALL_TIMEOUT}")
    bridge = Bridge(workdir, config, health_port=health_port)
    bridge.start()
    prober = Prober(bridge)
    memory = Memory(bridge)
    all_cases = cases()
    health: list[tuple[int, str]] = []
    try:
        rss_before, fds_before = bridge.rss_kb(), bridge.fds()
        for index, case in enumerate(all_cases):
            run_case(bridge, api, prober, memory, index, case)
            # A pause ends with the call that succeeded; /healthz hears of it within a poll of the child.
            status, body = settled_health(bridge)
            health.append((status, body.get("checks", {}).get("dispatch", {}).get("detail", "")))
        rss_after, fds_after = bridge.rss_kb(), bridge.fds()
    finally:
        prober.stop.set()
        memory.stop.set()
        api.close()
    prober.thread.join(40)  # its last request may still be answered: count it before reading the log
    logged = Counter(
        row[0]
        for row in bridge.query(
            "SELECT control_id FROM messages WHERE control_id LIKE 'PROBE-%' AND status = 'ignored' AND replay_of IS NULL"
        )
    )
    figures = {
        "scenario": "hostile_api",
        "messages": len(prober.accepted),
        "lost": sum(1 for control in prober.accepted if control not in logged),
        "duplicated": sum(1 for count in logged.values() if count > 1),
        "wrong_acks": prober.wrong,
        "injected": f"{len(all_cases)} hostile API answers, one case at a time, while an engine sends slot events "
                    "every 20 ms",
        "cases": [c.figures for c in all_cases],
        "rss_before_kb": rss_before, "rss_after_kb": rss_after, "fds_before": fds_before, "fds_after": fds_after,
        "mllp_ack_ms": {"p50": percentile([ms for _, ms in prober.latencies], 50),
                        "p99": percentile([ms for _, ms in prober.latencies], 99),
                        "max": max((ms for _, ms in prober.latencies), default=None),
                        "probes": len(prober.latencies), "connection_failures": prober.failures},
        "health_after_each": health,
    }  # fmt: skip
    result = finish_scenario(figures, bridge, began)
    result["logs"] = bridge.logs()
    result["by_name"] = {c.name: c for c in all_cases}
    yield result


def test_no_call_leaves_the_api_and_only_the_appointments_journey_is_cancelled(hostile: dict[str, Any]) -> None:
    for case in hostile["cases"]:
        assert case["sent"]["paths_outside_api"] == [], case
    crowd = hostile["by_name"]["3,000 instances of other appointments"].figures
    assert crowd["sent"]["cancelled_ids"] == ["mine-1"], crowd
    injection = hostile["by_name"]["path injection in a search answer"].figures
    assert injection["sent"]["by_endpoint"]["cancel"] == 0, injection


def test_the_engine_beside_the_hostile_api_lost_nothing(hostile: dict[str, Any]) -> None:
    """Whatever the API does, the MLLP side's messages are answered AA, each logged once."""
    assert hostile["messages"] > 0
    assert (hostile["lost"], hostile["duplicated"], hostile["wrong_acks"]) == (0, 0, 0), hostile["mllp_ack_ms"]


def test_every_case_ends_as_it_must(hostile: dict[str, Any]) -> None:
    for name, case in hostile["by_name"].items():
        logged = case.figures["logged"]
        if case.ends == "dead":
            assert set(logged["statuses"]) == {"dead"}, (name, case.figures)
        elif case.ends == "done-found":
            # The answer may have meant success: the retry searched, found the journey, sent nothing again.
            assert set(logged["statuses"]) == {"done"} and "not sent again" in logged["outcome"], (name, case.figures)
            assert case.figures["sent"]["by_endpoint"]["bulk"] == 1, (name, case.figures)
        else:
            assert set(logged["statuses"]) == {"done"}, (name, case.figures)
        assert "internal error" not in logged["outcome"], (name, case.figures)


def test_no_wrong_answer_is_taken_for_success(hostile: dict[str, Any]) -> None:
    for name in ("302 redirect", "307 to another origin", "redirect loop", "bulk answered 200 with errors",
                 "bulk answered 202", "bulk answered 206", "103 before 204"):  # fmt: skip
        first = hostile["by_name"][name].figures["logged"]
        assert first["outcome"] != "triggered", (name, first)
    loop = hostile["by_name"]["redirect loop"].figures
    assert loop["sent"]["requests"] <= 5, loop  # one request per attempt, never 31


def test_text_from_the_api_is_kept_short_safe_and_without_the_token(hostile: dict[str, Any]) -> None:
    logs = hostile["logs"]
    assert "\n<2>hl7bridge: FORGED" not in logs and "\x1b[31m" not in logs
    assert TOKEN not in logs
    assert all(TOKEN not in detail for _, detail in hostile["health_after_each"])
    for case in hostile["cases"]:
        assert TOKEN not in str(case["logged"]), case
        assert case["logged"]["outcome_chars"] <= 1100, case
        assert case["logged"]["largest_stored_body"] <= 4000, case


def test_memory_stays_bounded_and_the_mllp_side_keeps_answering(hostile: dict[str, Any]) -> None:
    for case in hostile["cases"]:
        assert case["rss_peak_mb"] < 400, case  # four 200 MB bodies took 1.9 GB before
        assert case["mllp_worst_ack_ms"] < 2000, case
    assert hostile["mllp_ack_ms"]["connection_failures"] == 0
    assert all(status == 200 for status, _ in hostile["health_after_each"]), hostile["health_after_each"]
