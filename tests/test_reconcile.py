"""`hl7bridge reconcile`: the log against the Journeys API, with drift injected into a real sandbox.

The real service fills the log and dispatches to the sandbox (its own process, over HTTP); the sandbox's
drift controls then make the API differ from what was sent, and `python -m hl7bridge reconcile` (with a
read-only token) must find exactly that drift. Its repairs are queued in the outbox and sent by the same
running service, after which a second run finds nothing.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from hl7bridge.app.config import load
from hl7bridge.dispatch.journeys import JourneysClient
from hl7bridge.store import open_engine
from hl7bridge.workflow.reconcile import reconcile as reconcile_log
from hl7bridge.workflow.reconcile import repair, route_facts

from .conftest import RunningSandbox, RunningService, start_service, wait_until
from .dispatch_support import OPEN, TOKEN, future, iso, query, sandbox_for_module, service_toml, settled, siu
from .hostile_api import Answer, HostileApi, api_fixture, json_answer, server_fixture  # noqa: F401 (fixtures)

START = future(days=30, hour=10, minute=0)
MOVED = future(days=32, hour=15, minute=30)
#: The reconcile runs see only this token: read scope, no create scope (SANDBOX_TOML's "read-only-token").
READ_ONLY = {"RECONCILE_TOKEN": "read-only-token"}
RECONCILE = """
[reconcile]
token_env = "RECONCILE_TOKEN"
calls_per_second = 200
retry_after_max = 1
page_size = 2
"""
#: The appointments of this module, one per kind of drift and one left alone.
BOOKED = ("RC-OK", "RC-MISS", "RC-DUP", "RC-STALE", "RC-CXL")


@dataclass
class Setting:
    workdir: Path
    service: RunningService
    config: Path


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> Iterator[Setting]:
    workdir = tmp_path_factory.mktemp("reconcile")
    service = start_service(workdir, service_toml(sandbox.url) + RECONCILE, env=TOKEN)
    try:
        for appointment in BOOKED:
            service.request(siu("S12", f"{appointment}-1", appointment, START))
            settled(service, f"{appointment}-1")
        service.request(siu("S15", "RC-CXL-2", "RC-CXL", None))
        assert settled(service, "RC-CXL-2")[0]["status"] == "done"
        yield Setting(workdir, service, workdir / "hl7bridge.toml")
    finally:
        service.stop()


def reconcile(setting: Setting, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI as an operator runs it: the API's own token is not in its environment, only the read-only one."""
    env = {k: v for k, v in os.environ.items() if k not in TOKEN} | READ_ONLY
    cmd = [sys.executable, "-m", "hl7bridge", "reconcile", "--config", str(config or setting.config),
           "--database", setting.service.url, *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=setting.workdir, env=env)


def findings(result: subprocess.CompletedProcess) -> dict[str, dict]:
    """This module's findings by appointment id (other modules' appointments are not in this log)."""
    return {f["appointment"].split("|", 1)[1]: f for f in json.loads(result.stdout)["findings"]}


def active(sandbox: RunningSandbox, appointment: str) -> list[dict]:
    return [i for i in sandbox.instances(appointmentId=appointment) if i["status"] == "InProgress"]


def commands(setting: Setting) -> list[dict]:
    return commands_of_log(setting.service)


def repairs(setting: Setting) -> list[dict]:
    return query(setting.service, "SELECT * FROM audit WHERE action = 'repair' ORDER BY id")


def test_reconcile_finds_exactly_the_injected_drift_and_its_repair_clears_it(
    setting: Setting, sandbox: RunningSandbox
) -> None:
    clean = reconcile(setting, "--json")
    assert clean.returncode == 0, clean.stderr
    assert json.loads(clean.stdout)["findings"] == [] and json.loads(clean.stdout)["checked"] == len(BOOKED)

    [missing] = active(sandbox, "RC-MISS")
    sandbox.post("/_sandbox/drift", {"action": "delete", "id": missing["id"]})
    [doubled] = active(sandbox, "RC-DUP")
    copy = sandbox.post("/_sandbox/drift", {"action": "duplicate", "id": doubled["id"]})
    [stale] = active(sandbox, "RC-STALE")
    sandbox.post("/_sandbox/drift", {"action": "edit", "id": stale["id"],
                                     "parameters": {"appointmentDateTime": iso(MOVED)}})  # fmt: skip
    [cancelled] = sandbox.instances(appointmentId="RC-CXL")
    assert cancelled["status"] == "Cancelled"
    sandbox.post("/_sandbox/drift", {"action": "edit", "id": cancelled["id"], "status": "InProgress"})
    # A journey that ran to its end before the appointment is no drift: re-triggering it would repeat it.
    [finished] = active(sandbox, "RC-OK")
    sandbox.post("/_sandbox/drift", {"action": "edit", "id": finished["id"], "status": "Completed"})

    found = reconcile(setting, "--json")
    assert found.returncode == 1, found.stderr
    by_appointment = findings(found)
    assert {k: f["kind"] for k, f in by_appointment.items()} == {
        "RC-MISS": "missing", "RC-DUP": "doubled", "RC-STALE": "stale_start", "RC-CXL": "active_cancelled"}  # fmt: skip
    assert sorted(by_appointment["RC-DUP"]["details"]["instance_ids"]) == sorted([doubled["id"], copy["id"]])
    assert by_appointment["RC-STALE"]["details"]["parameters"] == ["appointmentDateTime"]
    booked = {r["control_id"]: r["id"] for r in query(setting.service, "SELECT id, control_id FROM messages")}
    assert by_appointment["RC-MISS"]["message_id"] == booked["RC-MISS-1"]
    assert by_appointment["RC-CXL"]["message_id"] == booked["RC-CXL-2"]
    assert iso(MOVED) not in found.stdout and "TESTPATIENT" not in found.stdout  # no parameter values shown

    text = reconcile(setting)
    assert text.returncode == 1
    assert "drift: active_cancelled 1, doubled 1, missing 1, stale_start 1" in text.stdout
    assert "appointment MAIN|RC-MISS  message" in text.stdout and "TESTPATIENT" not in text.stdout

    before = commands(setting)
    dry = reconcile(setting, "--repair", "--dry-run", "--json")
    assert dry.returncode == 1, dry.stderr
    assert {f["repair"]["command"] for f in findings(dry).values()} == {"reschedule", "cancel"}
    assert all(not f["repair"]["queued"] and f["repair"]["command_id"] is None for f in findings(dry).values())
    assert commands(setting) == before and repairs(setting) == []

    fixed = reconcile(setting, "--repair", "--by", "ops-anna", "--json")
    assert fixed.returncode == 1, fixed.stderr
    plans = {k: f["repair"] for k, f in findings(fixed).items()}
    assert {k: p["command"] for k, p in plans.items()} == {
        "RC-MISS": "reschedule", "RC-DUP": "reschedule", "RC-STALE": "reschedule", "RC-CXL": "cancel"}  # fmt: skip
    assert all(p["queued"] for p in plans.values())
    audit = repairs(setting)
    assert sorted(json.loads(a["ids"])[0] for a in audit) == sorted(p["command_id"] for p in plans.values())
    assert {a["actor"] for a in audit} == {"ops-anna"}
    assert sorted(json.loads(a["details"])["kind"] for a in audit) == [
        "active_cancelled", "doubled", "missing", "stale_start"]  # fmt: skip
    # Reconcile holds only a read-scope token: a call of its own to change anything would be a 403.
    assert [c for c in sandbox.calls() if c["status"] == 403] == []

    ids = [p["command_id"] for p in plans.values()]
    marks = ",".join("?" * len(ids))
    wait_until(lambda: all(c["status"] not in OPEN for c in query(
        setting.service, f"SELECT status FROM commands WHERE id IN ({marks})", *ids)), message="repairs to settle")  # fmt: skip
    assert {c["status"] for c in query(setting.service, f"SELECT status FROM commands WHERE id IN ({marks})", *ids)} == {
        "done"}  # fmt: skip

    after = reconcile(setting, "--json")
    assert after.returncode == 0, after.stdout + after.stderr
    assert json.loads(after.stdout)["findings"] == []
    assert len(active(sandbox, "RC-MISS")) == len(active(sandbox, "RC-DUP")) == 1
    assert [i["parameters"]["appointmentDateTime"] for i in active(sandbox, "RC-STALE")] == [iso(START)]
    assert active(sandbox, "RC-CXL") == []
    assert reconcile(setting).stdout.splitlines()[-1] == "no drift"


def test_a_rate_limited_api_is_waited_for(setting: Setting, sandbox: RunningSandbox) -> None:
    sandbox.faults(rate_limit_every=2, retry_after=1)
    try:
        result = reconcile(setting, "--json")
    finally:
        sandbox.faults(rate_limit_every=0)
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["checked"] + report["skipped"].get("busy", 0) == len(BOOKED)
    searches = [c for c in sandbox.calls() if c["path"].endswith("/search")][-report["calls"] :]
    assert 429 in [c["status"] for c in searches]
    assert [c["status"] for c in searches].count(200) == report["checked"]
    assert report["calls"] > report["checked"]
    # Each retry waited out the Retry-After (1 s), by the sandbox's own clock.
    for refused, retried in itertools.pairwise(searches):
        if refused["status"] == 429:
            gap = datetime.fromisoformat(retried["at"]) - datetime.fromisoformat(refused["at"])
            assert gap.total_seconds() >= 0.95, (refused, retried)


def test_a_rate_limit_asking_for_longer_than_allowed_ends_the_run(setting: Setting, sandbox: RunningSandbox) -> None:
    sandbox.faults(rate_limit_every=1, retry_after=30)
    try:
        result = reconcile(setting, "--repair")
    finally:
        sandbox.faults(rate_limit_every=0)
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr.strip() == ("hl7bridge: reconcile stopped, nothing repaired: the Journeys API asks to wait 30 s "
                                     "(429), longer than reconcile.retry_after_max = 1; run it later")  # fmt: skip
    assert [c["status"] for c in sandbox.calls() if c["path"].endswith("/search")][-1:] == [429]


def test_the_call_cap_stops_the_run_and_says_so(setting: Setting) -> None:
    capped = setting.workdir / "capped.toml"
    capped.write_text(setting.config.read_text() + "max_calls = 2\n", encoding="utf-8")
    result = reconcile(setting, "--json", config=capped)
    assert result.returncode == 3
    report = json.loads(result.stdout)
    assert report["calls"] == 2 and not report["complete"] and report["skipped"]["cap"] >= 1
    assert "reconcile.max_calls = 2" in result.stderr


@pytest.mark.parametrize(("answer", "needle"), [
    (Answer(200, b"<html>not json</html>", {"Content-Type": "text/html"}), "a body that is not JSON"),
    (json_answer(200, {"instances": []}), "expected an array of instances, got an object"),
    (Answer(200, b"[" + b" " * 65536, endless=True), "larger than 4 MiB"),
    (json_answer(401, ["token expired"]), "refused the token (401): token expired"),
    (json_answer(500, ["boom\x1b[31m"]), "boom\\u001b[31m"),
])  # fmt: skip
def test_a_hostile_api_answer_is_one_clear_line(setting: Setting, api: HostileApi, answer: Answer, needle: str) -> None:
    hostile = setting.workdir / "hostile.toml"
    hostile.write_text(setting.config.read_text().replace(_base_url(setting), api.url), encoding="utf-8")
    api.script("search", answer)
    before = commands(setting)
    result = reconcile(setting, "--repair", "--api-url", api.url, config=hostile)
    assert result.returncode == 3
    assert result.stdout == "" and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith("hl7bridge: reconcile stopped, nothing repaired: ") and needle in line, line
    assert commands(setting) == before


def test_bad_input_is_one_line_and_exit_2(setting: Setting) -> None:
    for args, needle in [
        (("--dry-run",), "--dry-run goes with --repair"),
        (("--route", "nope"), "no route named 'nope' (configured: reminders)"),
        (("--since", "soon"), "'soon' is not a duration"),
    ]:
        result = reconcile(setting, *args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and needle in result.stderr and "Traceback" not in result.stderr


def test_a_read_token_that_cannot_be_found_is_one_clear_line(setting: Setting) -> None:
    tokenless = setting.workdir / "tokenless.toml"
    tokenless.write_text(setting.config.read_text().replace('"RECONCILE_TOKEN"', '"NO_SUCH_TOKEN_VARIABLE"'))
    result = reconcile(setting, config=tokenless)
    assert result.returncode == 3 and result.stdout == ""
    assert result.stderr == ("hl7bridge: reconcile stopped, nothing repaired: no API token: looked in "
                             "$NO_SUCH_TOKEN_VARIABLE (unset)\n")  # fmt: skip


def test_a_route_filter_checks_only_that_route(setting: Setting) -> None:
    result = reconcile(setting, "--route", "reminders", "--json")
    assert json.loads(result.stdout)["route"] == "reminders"
    assert json.loads(result.stdout)["checked"] + json.loads(result.stdout)["skipped"].get("busy", 0) == len(BOOKED)


def _base_url(setting: Setting) -> str:
    line = next(ln for ln in setting.config.read_text().splitlines() if ln.startswith("base_url"))
    return line.split('"')[1]


def test_a_repair_is_not_queued_for_an_appointment_that_changed_since_it_was_judged(
    tmp_path: Path, sandbox: RunningSandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = start_service(tmp_path, service_toml(sandbox.url) + RECONCILE, env=TOKEN)
    try:
        service.request(siu("S12", "RC-RACE-1", "RC-RACE", START))
        settled(service, "RC-RACE-1")
        [instance] = active(sandbox, "RC-RACE")
        sandbox.post("/_sandbox/drift", {"action": "delete", "id": instance["id"]})
        monkeypatch.setenv(*next(iter(READ_ONLY.items())))
        config = load(tmp_path / "hl7bridge.toml")
        engine = open_engine(service.url, create=False)
        routes = route_facts(config.routes)
        report = reconcile_log(
            engine,
            JourneysClient(config.api, config.reconcile.tokens(config.api.tokens())),
            0.0,
            routes,
            settings=config.reconcile,
        )
        assert [f.kind for f in report.findings] == ["missing"]

        service.request(siu("S13", "RC-RACE-2", "RC-RACE", MOVED))  # the sender moves it meanwhile
        settled(service, "RC-RACE-2")
        before = commands_of_log(service)
        repair(engine, report, routes, "ops-anna")
        assert report.findings[0].repair == {"command": "reschedule", "command_id": None, "queued": False,
                                             "note": "the appointment changed since it was checked; not queued"}  # fmt: skip
        assert commands_of_log(service) == before
        assert query(service, "SELECT * FROM audit") == []
        assert [i["parameters"]["appointmentDateTime"] for i in active(sandbox, "RC-RACE")] == [iso(MOVED)]
    finally:
        service.stop()


def commands_of_log(service: RunningService) -> list[dict]:
    return query(service, "SELECT * FROM commands ORDER BY id")


def test_an_api_that_ignores_the_search_filter_makes_no_other_journey_count(setting: Setting, api: HostileApi) -> None:
    hostile = setting.workdir / "unfiltered.toml"
    hostile.write_text(setting.config.read_text().replace(_base_url(setting), api.url), encoding="utf-8")
    others = [{"id": f"other-{n}", "status": "InProgress", "parameters": {"appointmentId": "SOMEONE-ELSE"}}
              for n in range(2)]  # fmt: skip
    api.script("search", json_answer(200, others))
    result = reconcile(setting, "--json", "--api-url", api.url, config=hostile)
    report = json.loads(result.stdout)
    assert report["checked"] >= 1
    assert {f["kind"] for f in report["findings"]} <= {"missing"}
    assert "MAIN|RC-CXL" not in {f["appointment"] for f in report["findings"]}
