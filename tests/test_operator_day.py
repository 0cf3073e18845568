"""An operator's day, end to end, against the real service and a sandbox in its own process.

The morning's bookings die on a configuration mismatch (the journey at MedChat lacks a parameter the
route sends); then the API goes down and comes back fixed. The operator sees each of these in
``/status``, finds the dead letters, discards one with a reason, retries the rest, finds a patient's
messages when they call, reconciles the log with the API after drift and repairs it, and the audit log
holds every action, intact. Each step is checked by what the sandbox received, not by what the CLI said.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from .conftest import RunningSandbox, RunningService, free_port, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, service_toml, settled, siu
from .test_dead_letters import BROKEN_SANDBOX
from .test_operate import health_toml, metric

START = future(days=12, hour=11, minute=15)
#: (control id, appointment, patient) of the morning's bookings.
MORNING = [("DAY-1", "A-DAY-1", "MRN-DAY-1"), ("DAY-2", "A-DAY-2", "MRN-DAY-2"), ("DAY-3", "A-DAY-3", "MRN-DAY-3")]


def status(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/status", timeout=5).json()


def in_state(port: int, state: str) -> dict | None:
    return status_when(port, lambda body: body["state"] == state)


def status_when(port: int, predicate: Callable[[dict], bool]) -> dict | None:
    body = status(port)
    return body if predicate(body) else None


def cli(service: RunningService, *args: str) -> subprocess.CompletedProcess:
    assert service.config is not None
    cmd = [sys.executable, "-m", "hl7bridge", *args, "--config", str(service.config), "--database", service.url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=service.workdir)


def triggered(sandbox: RunningSandbox, appointment: str) -> int:
    return sum(
        1
        for call in sandbox.calls("bulk")
        if call["status"] == 204 for i in call["body"]["instances"] if i["parameters"]["appointmentId"] == appointment
    )  # fmt: skip


def test_an_operators_day(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(*next(iter(TOKEN.items())))
    api_port, health_port = free_port(), free_port()
    for name in ("mismatch", "fixed", "svc"):
        (tmp_path / name).mkdir()
    sandbox = start_sandbox(tmp_path / "mismatch", BROKEN_SANDBOX, port=api_port)
    service = start_service(tmp_path / "svc", service_toml(sandbox.url) + health_toml(health_port), env=TOKEN)
    try:
        wait_until(lambda: in_state(health_port, "ok"), message="ok at start")

        # Morning: every booking dies on the configuration mismatch, and the status says so.
        dead: dict[str, int] = {}
        for control, appointment, patient in MORNING:
            assert b"MSA|AA|" in service.request(siu("S12", control, appointment, START, patient=patient))
            (command,) = settled(service, control)
            assert command["status"] == "dead" and "phoneNumber" in command["outcome"]
            dead[appointment] = command["id"]
        body = wait_until(lambda: status_when(health_port, lambda b: b["dead_letters"]["open"] == 3), message="3 dead")
        assert body["state"] == "degraded", body
        assert any(r.startswith("3 dead letter(s) wait for an operator") for r in body["reasons"]), body
        listed = json.loads(cli(service, "log", "list", "--status", "dead", "--json").stdout)
        rows = listed["messages"] if isinstance(listed, dict) else listed
        assert sorted(r["control_id"] for r in rows) == ["DAY-1", "DAY-2", "DAY-3"]

        # The third patient cancels: the cancel settles, and the dead booking can only be discarded.
        assert b"MSA|AA|" in service.request(siu("S15", "DAY-3C", "A-DAY-3", None, patient="MRN-DAY-3"))
        assert settled(service, "DAY-3C")[0]["status"] == "done"

        # Then the API goes down; a new booking waits, and the status names the API within 30 s.
        sandbox.stop()
        assert b"MSA|AA|" in service.request(siu("S12", "DAY-4", "A-DAY-4", START, patient="MRN-DAY-4"))
        body = wait_until(
            lambda: status_when(health_port, lambda b: any("Journeys API" in r for r in b["reasons"])),
            timeout=30, message="the outage named",
        )  # fmt: skip
        assert body["state"] == "degraded" and body["dispatch"]["held"]
        assert metric(health_port, "hl7bridge_dispatch_held") == 1

        # It comes back with the journey fixed: the waiting booking goes out once, the hold clears.
        sandbox = start_sandbox(tmp_path / "fixed", SANDBOX_TOML, port=api_port)
        wait_until(lambda: triggered(sandbox, "A-DAY-4") == 1, timeout=60, message="the waiting booking sent")
        wait_until(lambda: not status(health_port)["dispatch"]["held"], message="the hold cleared")
        assert metric(health_port, "hl7bridge_dispatch_held") == 0

        # The operator settles the dead letters: the cancelled one discarded with a reason, the rest retried.
        refused = cli(service, "dead-letters", "retry", str(dead["A-DAY-3"]), "--by", "ops-anna")
        assert refused.returncode == 1 and "superseded by command" in refused.stdout + refused.stderr
        no_reason = cli(service, "dead-letters", "discard", str(dead["A-DAY-3"]))
        assert no_reason.returncode == 2 and "--reason" in no_reason.stderr
        discarded = cli(service, "dead-letters", "discard", str(dead["A-DAY-3"]), "--reason", "patient cancelled",
                        "--by", "ops-anna")  # fmt: skip
        assert discarded.returncode == 0, discarded.stderr
        retried = cli(service, "dead-letters", "retry", "--all", "--reason", "phoneNumber added", "--by", "ops-anna")
        assert retried.returncode == 0, retried.stdout + retried.stderr
        for appointment in ("A-DAY-1", "A-DAY-2"):
            wait_until(lambda a=appointment: triggered(sandbox, a) == 1, message=f"{appointment} sent after the fix")
        assert triggered(sandbox, "A-DAY-3") == 0
        body = wait_until(lambda: in_state(health_port, "ok"), message="ok once settled")
        assert body["dead_letters"]["open"] == 0 and metric(health_port, "hl7bridge_dead_letters_open") == 0

        # A patient calls about a reminder: their messages are found by their identifier, masked.
        found = cli(service, "log", "list", "--patient", "MRN-DAY-2", "--json")
        assert found.returncode == 0, found.stderr
        rows = (lambda d: d["messages"] if isinstance(d, dict) else d)(json.loads(found.stdout))
        assert [r["control_id"] for r in rows] == ["DAY-2"]
        by_appointment = cli(service, "log", "list", "--appointment", "A-DAY-3", "--json")
        rows = (lambda d: d["messages"] if isinstance(d, dict) else d)(json.loads(by_appointment.stdout))
        assert sorted(r["control_id"] for r in rows) == ["DAY-3", "DAY-3C"]
        assert "TESTPATIENT" not in found.stdout + by_appointment.stdout

        # Drift at the API: one journey gone. Reconcile finds exactly it and repairs it through the outbox.
        (gone,) = sandbox.instances(appointmentId="A-DAY-1")
        sandbox.post("/_sandbox/drift", {"action": "delete", "id": gone["id"]})
        drift = cli(service, "reconcile", "--json")
        assert drift.returncode == 1, drift.stderr
        findings = json.loads(drift.stdout)["findings"]
        assert [(f["kind"], f["appointment"]) for f in findings] == [("missing", "MAIN|A-DAY-1")]
        repaired = cli(service, "reconcile", "--repair", "--by", "ops-anna")
        assert repaired.returncode == 1 and "queued" in repaired.stdout, repaired.stdout + repaired.stderr
        wait_until(lambda: len(sandbox.instances(appointmentId="A-DAY-1")) == 1, message="the repair sent")
        wait_until(lambda: cli(service, "reconcile").returncode == 0, message="no drift after the repair")

        # Every action is in the audit log, by whom and why, and the chain holds.
        entries = json.loads(cli(service, "audit", "list", "--json").stdout)["entries"]
        actions = {(e["action"], e["actor"]) for e in entries}
        assert {("discard", "ops-anna"), ("retry", "ops-anna"), ("repair", "ops-anna")} <= actions, actions
        (discard,) = [e for e in entries if e["action"] == "discard"]
        assert discard["reason"] == "patient cancelled" and discard["ids"] == [dead["A-DAY-3"]]
        verified = cli(service, "audit", "verify")
        assert verified.returncode == 0 and "intact" in verified.stdout
        assert in_state(health_port, "ok")
    finally:
        service.stop()
        sandbox.stop()
