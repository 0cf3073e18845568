"""The real service dispatching to a hostile API (``tests/hostile_api.py``): what the API answers can neither
cancel other appointments' journeys, nor stop, wedge or flood dispatch, nor reach logs, ACKs or /healthz raw."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient, TokenSource

from .conftest import RunningService, free_port, segments, start_service, wait_until
from .dispatch_support import TOKEN, ack, attempts_of, commands_of, future, service_toml, settled, siu
from .hostile_api import Answer, HostileApi, api_fixture, json_answer, server_fixture  # noqa: F401 (fixtures)

SECRET = TOKEN["TEST_API_TOKEN"]


@pytest.fixture(scope="module")
def health_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def bridge(tmp_path_factory: pytest.TempPathFactory, server: HostileApi, health_port: int) -> Iterator[RunningService]:
    config = service_toml(server.url) + f'\n[health]\nlisten = "tcp:{health_port}:interface=127.0.0.1"\n'
    running = start_service(tmp_path_factory.mktemp("bridge"), config, env=TOKEN)
    yield running
    stderr = running.stop()
    assert "Traceback" not in stderr, stderr[-3000:]
    assert SECRET not in stderr
    assert "\n<2>hl7bridge: FORGED" not in stderr


def healthz(port: int) -> dict:
    return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json()


def open_commands(service: RunningService, control: str) -> list[dict]:
    return commands_of(service, control)


def test_cancel_cancels_only_instances_whose_identifiers_match(bridge: RunningService, api: HostileApi) -> None:
    instances = [{"id": f"other-{i}", "status": "InProgress", "parameters": {"appointmentId": f"OTHER-{i}"}}
                 for i in range(3)]  # fmt: skip
    instances.append({"id": "mine-1", "status": "InProgress", "parameters": {"appointmentId": "H-CXL-1"}})
    instances.append({"id": "../../../../admin/tokens", "status": "InProgress", "parameters": {"appointmentId": "X"}})
    api.script("search", json_answer(200, instances))
    assert ack(bridge, siu("S15", "H-CXL-1", "H-CXL-1", future()))[1] == "AA"
    (cmd,) = settled(bridge, "H-CXL-1")
    assert cmd["status"] == "done"
    assert cmd["outcome"] == "cancelled 1 instance(s); 4 active instance(s) found with other identifiers left alone"
    assert [s.path.rsplit("/", 2)[-2] for s in api.requests("cancel")] == ["mine-1"]
    assert all(s.path.startswith("/chatbotapi/external/orgs/test-org/") for s in api.requests())


def test_a_path_injecting_instance_id_is_never_requested(bridge: RunningService, api: HostileApi) -> None:
    evil = {"id": "../../../../admin/tokens", "status": "InProgress", "parameters": {"appointmentId": "H-INJ-1"}}
    api.script("search", json_answer(200, [evil]))
    assert ack(bridge, siu("S15", "H-INJ-1", "H-INJ-1", future()))[1] == "AA"
    (cmd,) = settled(bridge, "H-INJ-1", timeout=30)
    assert cmd["status"] == "dead" and "not sent" in cmd["outcome"]
    assert api.requests("cancel") == [] and api.requests("other") == []


def test_a_redirected_trigger_is_not_delivered(bridge: RunningService, api: HostileApi) -> None:
    api.script("bulk", Answer(302, b"", {"Location": "http://portal.example/login"}))
    assert ack(bridge, siu("S12", "H-302", "H-302", future()))[1] == "AA"
    (cmd,) = settled(bridge, "H-302", timeout=30)
    assert cmd["status"] == "dead" and "triggered" not in cmd["outcome"]
    tries = attempts_of(bridge, cmd["id"])
    assert any("http://portal.example/login" in (a["error"] or "") for a in tries)
    assert all(s.method == "POST" for s in api.requests())  # never turned into a GET


def test_a_lone_surrogate_in_a_401_pauses_and_dispatch_resumes(bridge: RunningService, api: HostileApi,
                                                              health_port: int) -> None:  # fmt: skip
    api.script("bulk", *[json_answer(401, {"message": f"token \udfff refused\n<2>hl7bridge: FORGED; got Bearer {SECRET}"})] * 2,
               Answer(204))  # fmt: skip
    assert ack(bridge, siu("S12", "H-401", "H-401", future()))[1] == "AA"
    reason = wait_until(lambda: healthz(health_port)["checks"]["dispatch"]["detail"] != "not paused"
                        and healthz(health_port)["checks"]["dispatch"]["detail"], message="the pause")  # fmt: skip
    assert "\\udfff" in reason and "\n" not in reason and SECRET not in reason and "[token]" in reason
    (cmd,) = settled(bridge, "H-401", timeout=20)
    assert cmd["status"] == "done" and cmd["outcome"] == "triggered"
    wait_until(lambda: healthz(health_port)["checks"]["dispatch"]["detail"] == "not paused", message="resume")
    for attempt in attempts_of(bridge, cmd["id"]):
        assert SECRET not in (attempt["response_body"] or "") and "\udfff" not in (attempt["response_body"] or "")


@pytest.mark.parametrize("status", [400, 503])
def test_a_lone_surrogate_in_an_error_is_logged_not_an_endless_internal_error(
    bridge: RunningService, api: HostileApi, status: int
) -> None:
    api.script("bulk", json_answer(status, [f"bad \udfff {status}"]))
    control = f"H-SUR-{status}"
    assert ack(bridge, siu("S12", control, control, future()))[1] == "AA"
    (cmd,) = wait_until(lambda: [c for c in commands_of(bridge, control) if c["attempts"] >= 2 or c["status"] == "dead"],
                        message="attempts to be logged")  # fmt: skip
    tries = attempts_of(bridge, cmd["id"])
    assert tries and all(a["status_code"] == status for a in tries)
    assert "internal error" not in cmd["outcome"] and "\\udfff" in cmd["outcome"]
    api.script("bulk", Answer(204))
    if status == 503:
        assert settled(bridge, control, timeout=20)[0]["status"] == "done"


def test_retry_after_is_capped_at_retry_max(bridge: RunningService, api: HostileApi) -> None:
    for value in ("99999999", "Fri, 31 Dec 9999 23:59:59 GMT", "9" * 400):
        api.reset()
        api.script("bulk", Answer(503, headers={"Retry-After": value}))
        control = f"H-RA-{len(value)}"
        assert ack(bridge, siu("S12", control, control, future()))[1] == "AA"
        (cmd,) = wait_until(lambda c=control: [x for x in commands_of(bridge, c) if x["attempts"] >= 1],
                            message="a retry")  # fmt: skip
        # retry_max = 1 s in the test configuration; the API asked for years.
        assert cmd["next_attempt_at"] - time.time() < 5
        api.script("bulk", Answer(204))
        assert settled(bridge, control, timeout=20)[0]["status"] == "done"


@pytest.mark.parametrize("answer", [json_answer(200, {"instances": []}), Answer(200, b"<html>Sign in</html>"),
                                    json_answer(200, ["a"]), Answer(200, b"[" * 50_000 + b"]" * 50_000)])  # fmt: skip
def test_a_search_of_the_wrong_shape_is_retried_then_dead_lettered(bridge: RunningService, api: HostileApi,
                                                                   answer: Answer) -> None:  # fmt: skip
    api.script("search", answer)
    control = f"H-SHAPE-{len(answer.payload())}"
    assert ack(bridge, siu("S15", control, control, future()))[1] == "AA"
    (cmd,) = settled(bridge, control, timeout=40)
    assert cmd["status"] == "dead" and "nothing active" not in cmd["outcome"]
    tries = attempts_of(bridge, cmd["id"])
    assert len(tries) == 5 and all(a["verdict"] == "malformed" for a in tries)


@pytest.mark.parametrize("answer", [json_answer(200, {"errors": ["appointmentId is required"]}), Answer(202),
                                    Answer(206, b"x"), Answer(204, interim=(103,))])  # fmt: skip
def test_a_trigger_answered_other_than_204_is_never_triggered(bridge: RunningService, api: HostileApi,
                                                             answer: Answer) -> None:  # fmt: skip
    api.script("bulk", answer)
    control = f"H-TRG-{answer.status}-{len(answer.interim)}"
    assert ack(bridge, siu("S12", control, control, future()))[1] == "AA"
    (cmd,) = settled(bridge, control, timeout=20)
    # The answer may have meant success: the retry searches first, finds the journey, and sends nothing.
    assert cmd["status"] == "done" and "not sent again" in cmd["outcome"]
    assert len(api.requests("bulk")) == 1
    assert attempts_of(bridge, cmd["id"])[0]["verdict"] == "malformed"


def test_dispatched_ack_carries_a_capped_api_message(tmp_path: Path, server: HostileApi) -> None:
    server.reset()
    server.script("bulk", json_answer(400, [f"error {i}: appointmentId" for i in range(100_000)]))
    config = service_toml(server.url, listener_extra='ack_mode = "dispatched"\ndispatch_timeout = 10')
    service = start_service(tmp_path, config, env=TOKEN)
    try:
        raw = service.request(siu("S12", "H-DSP-BIG", "H-DSP-BIG", future()))
        msa = segments(raw)["MSA"]
        assert msa[1] == "AE" and "error 0: appointmentId" in msa[3]
        assert len(raw) < 8000
        (cmd,) = commands_of(service, "H-DSP-BIG")
        assert len(cmd["outcome"]) < 1100
        assert all(len(a["response_body"] or "") <= 4000 for a in attempts_of(service, cmd["id"]))
    finally:
        stderr = service.stop()
    assert "Traceback" not in stderr


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_an_endless_answer_does_not_grow_the_dispatcher(bridge: RunningService, api: HostileApi) -> None:
    api.script("bulk", Answer(503, b"x" * 65536, endless=True))
    assert ack(bridge, siu("S12", "H-ENDLESS", "H-ENDLESS", future()))[1] == "AA"
    (cmd,) = wait_until(lambda: [c for c in commands_of(bridge, "H-ENDLESS") if c["attempts"] >= 2],
                        message="two attempts", timeout=30)  # fmt: skip
    assert "larger than 4 MiB" in cmd["outcome"]
    pid = bridge.process.pid
    (child,) = open(f"/proc/{pid}/task/{pid}/children").read().split()
    rss_kib = int(next(line.split()[1] for line in open(f"/proc/{child}/status") if line.startswith("VmRSS:")))
    assert rss_kib < 150 * 1024  # unbounded, it grew by gigabytes
    api.script("bulk", Answer(204))
    settled(bridge, "H-ENDLESS", timeout=20)


def test_plain_http_to_another_machine_is_warned_about_at_start(tmp_path: Path) -> None:
    service = start_service(tmp_path, service_toml("http://192.0.2.1:9"), env=TOKEN)
    stderr = service.stop()
    assert "is plain http:// to another machine" in stderr


def test_a_pinned_ca_is_what_the_client_trusts(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    client = JourneysClient(ApiSettings("https://api.example", "org", ca_file=str(ca)), TokenSource(env="X"))
    assert client.session.verify == str(ca) and client.session.trust_env is False
