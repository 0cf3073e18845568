"""A truthful status on the real service: ``GET /status``, the dispatch gauges and ``hl7bridge status`` follow an
API outage, a refused token, a dead letter and a token near its expiry, and clear once the cause is gone."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from .conftest import RunningSandbox, RunningService, free_port, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, service_toml, siu
from .test_operate import health_toml, metric

#: The bound the issue sets for an API outage to show.
OUTAGE_SHOWS_WITHIN = 30.0


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[RunningSandbox]:
    running = start_sandbox(tmp_path, SANDBOX_TOML)
    yield running
    running.stop()


def status(port: int) -> tuple[int, dict]:
    response = requests.get(f"http://127.0.0.1:{port}/status", timeout=5)
    return response.status_code, response.json()


def in_state(port: int, state: str) -> dict | None:
    _code, body = status(port)
    return body if body["state"] == state else None


def status_cli(service: RunningService, *args: str) -> subprocess.CompletedProcess:
    assert service.config is not None
    return service.cli("status", "--config", str(service.config), "--database", service.url, *args, check=False)


def dispatch_gauges(port: int) -> tuple[float, float, float]:
    return (metric(port, "hl7bridge_dispatch_held"), metric(port, "hl7bridge_dispatch_auth_paused"),
            metric(port, "hl7bridge_dispatch_paused"))  # fmt: skip


def test_an_api_outage_is_degraded_naming_the_api_and_clears(tmp_path: Path, sandbox: RunningSandbox) -> None:
    port = free_port()
    service = start_service(tmp_path, service_toml(sandbox.url) + health_toml(port), env=TOKEN)
    try:
        wait_until(lambda: in_state(port, "ok"), message="ok at start")
        assert dispatch_gauges(port) == (0, 0, 0)
        sandbox.faults(outage={"mode": "503", "seconds": 600})
        service.request(siu("S12", "OUT-1", "A-OUT-1", future()))
        body = wait_until(lambda: in_state(port, "degraded"), timeout=OUTAGE_SHOWS_WITHIN, message="degraded")
        assert [r for r in body["reasons"] if r.startswith("Dispatching holds since") and "Journeys API" in r], body
        assert body["dispatch"]["held"] and body["dispatch"]["held_since"] and not body["dispatch"]["auth_paused"]
        assert status(port)[0] == 200
        assert dispatch_gauges(port) == (1, 0, 1)
        shown = status_cli(service)
        assert shown.returncode == 1, shown.stderr
        assert shown.stdout.startswith("hl7bridge is DEGRADED") and "  - Dispatching holds since" in shown.stdout
        assert "dispatch: HELD since" in shown.stdout

        sandbox.faults(outage={"mode": "503", "seconds": 0})
        body = wait_until(lambda: in_state(port, "ok"), timeout=OUTAGE_SHOWS_WITHIN, message="ok again")
        assert body["reasons"] == [] and not body["dispatch"]["held"]
        wait_until(lambda: sandbox.instances(appointmentId="A-OUT-1"), message="the booking sent after the outage")
        assert dispatch_gauges(port) == (0, 0, 0)
        shown = status_cli(service, "--json")
        assert shown.returncode == 0 and json.loads(shown.stdout)["state"] == "ok"
    finally:
        service.stop()


@pytest.mark.parametrize("run_in", ["process", "thread"])
def test_a_refused_token_is_failing_and_clears(tmp_path: Path, sandbox: RunningSandbox, run_in: str) -> None:
    port = free_port()
    config = service_toml(sandbox.url, dispatch_extra=f'run_in = "{run_in}"') + health_toml(port)
    service = start_service(tmp_path, config, env=TOKEN)
    try:
        sandbox.post("/_sandbox/tokens", {"revoke": ["test-token"]})
        service.request(siu("S12", "AUTH-1", "A-AUTH-1", future()))
        body = wait_until(lambda: in_state(port, "failing"), message="failing")
        assert body["reasons"][0].startswith("Dispatching is paused since") and "401" in body["reasons"][0]
        assert body["dispatch"]["auth_paused"] and body["dispatch"]["paused_since"] and body["dispatch"]["paused_until"]
        assert status(port)[0] == 503
        assert dispatch_gauges(port) == (0, 1, 1)
        shown = status_cli(service)
        assert shown.returncode == 3 and shown.stdout.startswith("hl7bridge is FAILING"), shown
        assert "dispatch: PAUSED since" in shown.stdout

        sandbox.post("/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances",
                                                                 "read.journey_instances"]}})  # fmt: skip
        wait_until(lambda: in_state(port, "ok"), message="ok once the token is accepted")
        assert dispatch_gauges(port) == (0, 0, 0)
    finally:
        service.stop()


def test_a_dead_letter_degrades_with_the_count_and_the_log_tells_when_stopped(
    tmp_path: Path, sandbox: RunningSandbox
) -> None:
    """The timer reads the log once an hour here: every answer below is read when asked (``/status`` reads the log's
    facts anew), and the gauges follow it."""
    port = free_port()
    service = start_service(tmp_path, service_toml(sandbox.url) + health_toml(port, heartbeat=3600), env=TOKEN)

    def dead(count: int) -> dict | None:
        body = in_state(port, "degraded" if count else "ok")
        return body if body is not None and body["dead_letters"]["open"] == count else None

    try:
        service.request(siu("S12", "DL-1", "A-DL-1", future(), phone=None))  # the API answers 400: dead
        body = wait_until(lambda: dead(1), message="degraded by the dead letter")
        assert body["dead_letters"]["oldest_since"]
        assert [r for r in body["reasons"] if r.startswith("1 dead letter(s) wait for an operator")], body
        assert metric(port, "hl7bridge_dead_letters_open") == 1
        assert body["listeners"][0]["name"] == "main" and body["listeners"][0]["last_message_at"]
        assert metric(port, "hl7bridge_last_message_timestamp_seconds", listener="main") > 0
        shown = status_cli(service)
        assert shown.returncode == 1 and "dead letters: 1 open" in shown.stdout
        (letter,) = json.loads(service.cli("dead-letters", "list", "--json", "--config", str(service.config),
                                           "--database", service.url).stdout)["dead_letters"]  # fmt: skip
        service.cli("dead-letters", "discard", str(letter["id"]), "--reason", "test", "--config", str(service.config),
                    "--database", service.url)  # fmt: skip
        wait_until(lambda: dead(0), message="ok once the dead letter is discarded")
        assert metric(port, "hl7bridge_dead_letters_open") == 0
        service.request(siu("S12", "DL-2", "A-DL-2", future(), phone=None))
        wait_until(lambda: dead(1), message="degraded by the next dead letter")
    finally:
        service.stop()

    shown = status_cli(service)
    assert shown.returncode == 4, shown
    assert shown.stdout.startswith("hl7bridge is not running, or not reachable: nothing answers at http://127.0.0.1")
    assert "outbox: 0 waiting" in shown.stdout and "dead letters: 1 open" in shown.stdout
    shown = status_cli(service, "--json")
    offline = json.loads(shown.stdout)
    assert shown.returncode == 4 and offline["running"] is False and offline["dead_letters"]["open"] == 1


def test_a_token_near_its_expiry_is_degraded_naming_the_date(tmp_path: Path) -> None:
    port = free_port()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=5)
    config = service_toml("http://127.0.0.1:9").replace(
        'org_id = "test-org"\n', f'org_id = "test-org"\ntoken_expires = {expires.isoformat()}\n', 1
    )
    service = start_service(tmp_path, config + health_toml(port), env=TOKEN)
    try:
        body = wait_until(lambda: in_state(port, "degraded"), message="degraded by the token's expiry")
        assert body["reasons"] == [f"The API token expires on {expires.date().isoformat()}, in 5 day(s) "
                                   "(api.token_expires): renew it and update api.token_expires."]  # fmt: skip
        assert body["api_token"]["expires"] == expires.isoformat()
        assert metric(port, "hl7bridge_api_token_expiry_timestamp_seconds") == expires.timestamp()
        shown = status_cli(service)
        assert shown.returncode == 1 and "API token: expires" in shown.stdout
    finally:
        service.stop()


def test_status_without_a_health_listener_says_so(tmp_path: Path) -> None:
    service = start_service(tmp_path, "[listeners.main]\n")
    try:
        shown = status_cli(service)
        assert shown.returncode == 4
        assert shown.stdout.startswith("hl7bridge status: cannot ask the service whether it runs: health.listen is not "
                                       "set.")  # fmt: skip
        assert "outbox: 0 waiting" in shown.stdout
    finally:
        service.stop()
