"""Who may reach the sandbox, and how it answers them: the bookings it holds are patient data.

Its /_sandbox/ controls take a control token of their own, it binds to loopback unless the config allows
more, a bad control request is a JSON 400 saying what is wrong, and ``serve --sandbox`` dispatches with the
sandbox's own token, never the configured (production) one. All over real HTTP, with real processes.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hl7bridge.app.config import ConfigError, parse

from .api_support import console_toml
from .conftest import RunningSandbox, control_token, free_port, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, ack, future, sandbox_for_module, service_toml, siu

CONTROLS = [
    ("GET", "/_sandbox/calls"),
    ("GET", "/_sandbox/instances"),
    ("GET", "/_sandbox/faults"),
    ("POST", "/_sandbox/faults"),
    ("PUT", "/_sandbox/faults"),
    ("POST", "/_sandbox/reset"),
    ("POST", "/_sandbox/tokens"),
    ("GET", "/_sandbox/no-such-control"),
]
#: Controls that need a body naming what to act on (``{}`` is a 400 for them).
TARGETED = [("POST", "/_sandbox/drift")]
API_TOKEN = {"Authorization": "Bearer test-token"}
SANDBOX_TABLES = "[sandbox]" + SANDBOX_TOML.split("[sandbox]", 1)[1]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


def control(sandbox: RunningSandbox, method: str, path: str, body: bytes | None = None) -> requests.Response:
    return requests.request(method, sandbox.url + path, data=body, headers=sandbox.control, timeout=10)


def bulk_url(sandbox: RunningSandbox) -> str:
    return f"{sandbox.url}/chatbotapi/external/orgs/test-org/journeys/dental/instances/bulk"


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=30)  # fmt: skip


# ---- the control token -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path"), CONTROLS + TARGETED)
@pytest.mark.parametrize("header", [None, "Bearer test-token", "Bearer wrong", "Basic dGVzdA=="])
def test_controls_need_the_control_token(sandbox: RunningSandbox, method: str, path: str, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    answer = requests.request(method, sandbox.url + path, json={}, headers=headers, timeout=10)
    assert answer.status_code == 401
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "control token" in answer.json()[0]


@pytest.mark.parametrize(("method", "path"), CONTROLS[:-1])
def test_the_control_token_opens_the_controls(sandbox: RunningSandbox, method: str, path: str) -> None:
    body = b"{}" if method != "GET" else None
    answer = control(sandbox, method, path, body)
    assert answer.status_code == 200, answer.text
    assert answer.headers["Content-Type"] == "application/json"


def test_the_control_token_does_not_open_the_api(sandbox: RunningSandbox) -> None:
    body = {"timeZone": "UTC", "instances": [{"parameters": {"patientId": "P", "appointmentId": "A-CT",
            "appointmentDateTime": "2027-01-05 09:30:00", "clinic": "north"}}]}  # fmt: skip
    assert requests.post(bulk_url(sandbox), json=body, headers=sandbox.control, timeout=10).status_code == 401
    assert requests.post(bulk_url(sandbox), json=body, headers=API_TOKEN, timeout=10).status_code == 204
    refused = control(sandbox, "POST", "/_sandbox/tokens",
                      json.dumps({"add": {sandbox.control_token: ["create.journey_instances"]}}).encode())  # fmt: skip
    assert refused.status_code == 400 and refused.json() == ["tokens.add: the control token cannot be an API token"]
    assert requests.post(bulk_url(sandbox), json=body, headers=sandbox.control, timeout=10).status_code == 401


def test_a_generated_token_is_logged_once_and_kept_in_a_private_file(tmp_path: Path) -> None:
    running = start_sandbox(tmp_path, SANDBOX_TOML)
    running.stop()
    log = running.process.stderr.read()
    token_file = tmp_path / "var" / "sandbox-control.token"
    assert len(running.control_token) >= 40
    assert log.count(running.control_token) == 1, log
    assert "var/sandbox-control.token" in log
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700

    again = start_sandbox(tmp_path, SANDBOX_TOML)  # a new token at each start, the old one refused
    try:
        assert again.control_token != running.control_token
        old = {"Authorization": f"Bearer {running.control_token}"}
        assert requests.get(again.url + "/_sandbox/instances", headers=old, timeout=10).status_code == 401
        assert requests.get(again.url + "/_sandbox/instances", headers=again.control, timeout=10).status_code == 200
    finally:
        again.stop()


def test_a_configured_token_is_used_and_not_logged(tmp_path: Path) -> None:
    configured = "configured-control-token-0123456789"
    text = SANDBOX_TOML.replace(
        "[sandbox]\n", f'[sandbox]\ncontrol_token = "{configured}"\ncontrol_token_file = ""\nstate_file = ""\n'
    )
    port = free_port()
    (tmp_path / "sandbox.toml").write_text(text, encoding="utf-8")
    process = subprocess.Popen([sys.executable, "-m", "hl7bridge", "sandbox", "--config", "sandbox.toml", "--listen",
                                f"tcp:{port}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert "sandbox" in process.stdout.readline()
        url = f"http://127.0.0.1:{port}/_sandbox/faults"
        assert requests.get(url, headers={"Authorization": f"Bearer {configured}"}, timeout=10).status_code == 200
        assert requests.get(url, headers=API_TOKEN, timeout=10).status_code == 401
    finally:
        process.terminate()
        _, log = process.communicate(timeout=20)
    assert configured not in log and "sandbox.control_token" in log
    assert not (tmp_path / "var").exists()


@pytest.mark.parametrize(
    ("setting", "needle"),
    [
        ('control_token = "test-token-is-an-api-token"', "sandbox.control_token: must differ from every"),
        ('control_token = "short"', "sandbox.control_token: expected"),
        ("control_token = 5", "sandbox.control_token: expected"),
        ('listen = "tcp:8080:interface=0.0.0.0"', "sandbox.listen: interface 0.0.0.0 can be reached from other hosts"),
        ('listen = "tcp6:8080:interface=\\\\:\\\\:"', "sandbox.listen: interface :: can be reached"),
        ('listen = "unix:/tmp/s"', "sandbox.listen: expected an endpoint such as"),
        ('allow_remote = "yes"', "sandbox.allow_remote: expected true or false"),
        ("faults = { error_rate = 2.0 }", "sandbox.faults.error_rate: expected a number from 0 to 1, got 2.0"),
        ("faults = { latency_ms = nan }", "sandbox.faults.latency_ms: expected a number, got nan"),
        ("faults = { outage_mode = 'refuse' }", "sandbox.faults.outage_mode: unknown setting"),
    ],
)
def test_sandbox_settings_are_checked(setting: str, needle: str) -> None:
    text = SANDBOX_TOML.replace('token = "test-token"', 'token = "test-token-is-an-api-token"')
    text = text.replace("[sandbox]\n", f"[sandbox]\n{setting}\n")
    with pytest.raises(ConfigError) as info:
        parse(tomllib.loads(text))
    assert any(needle in p for p in info.value.problems), info.value.problems


# ---- loopback unless told otherwise ------------------------------------------------------------------------


def test_the_sandbox_binds_to_loopback_unless_allowed(tmp_path: Path) -> None:
    (tmp_path / "sandbox.toml").write_text(SANDBOX_TOML, encoding="utf-8")
    refused = run("sandbox", "--config", "sandbox.toml", "--listen", f"tcp:{free_port()}:interface=0.0.0.0",
                  cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "allow_remote = true" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    port = free_port()
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "sandbox.toml").write_text(SANDBOX_TOML.replace("[sandbox]\n", "[sandbox]\nallow_remote = true\n"))
    process = subprocess.Popen([sys.executable, "-m", "hl7bridge", "sandbox", "--config", "sandbox.toml", "--listen",
                                f"tcp:{port}:interface=0.0.0.0"], cwd=wide, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert f"on http://0.0.0.0:{port}" in process.stdout.readline()
    finally:
        process.terminate()
        _, log = process.communicate(timeout=20)
    assert "reachable from other hosts (sandbox.allow_remote = true)" in log


def test_serve_sandbox_listen_refuses_a_wildcard_interface(tmp_path: Path) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(service_toml("http://127.0.0.1:9") + SANDBOX_TABLES, encoding="utf-8")
    result = run("serve", "--config", str(config), "--database", f"sqlite:///{tmp_path}/log.db", "--listen",
                 f"tcp:{free_port()}:interface=127.0.0.1", "--sandbox", "--sandbox-listen",
                 f"tcp:{free_port()}:interface=0.0.0.0", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "the sandbox cannot start on" in result.stderr and "allow_remote = true" in result.stderr


# ---- serve --sandbox: its own token, and where it dispatches -----------------------------------------------


def test_serve_sandbox_needs_a_sandbox_token_that_can_trigger(tmp_path: Path) -> None:
    tables = SANDBOX_TABLES.replace(
        'token = "test-token"\nscopes = ["create.journey_instances", ', 'token = "x"\nscopes = ['
    )
    config = tmp_path / "bridge.toml"
    config.write_text(service_toml("http://127.0.0.1:9") + tables, encoding="utf-8")
    result = run("serve", "--config", str(config), "--database", f"sqlite:///{tmp_path}/log.db", "--listen",
                 f"tcp:{free_port()}:interface=127.0.0.1", "--sandbox", "--sandbox-listen", f"tcp:{free_port()}",
                 cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--sandbox needs a [[sandbox.tokens]] entry with the scopes create.journey_instances" in result.stderr


def test_serve_sandbox_never_sends_the_configured_token(tmp_path: Path) -> None:
    """The configured token (here in $PROD_TOKEN) is the production API's secret: the sandbox gets its own."""
    port = free_port()
    config = service_toml("https://api.example.invalid", token_env="PROD_TOKEN") + SANDBOX_TABLES
    service = start_service(tmp_path, config, env={"PROD_TOKEN": "production-secret"},
                            extra=["--sandbox", "--sandbox-listen", f"tcp:{port}"])  # fmt: skip
    try:
        sandbox = RunningSandbox(service.process, port, control_token(tmp_path))
        assert ack(service, siu("S12", "SBX-1", "A-SBX-1", future()))[1] == "AA"
        wait_until(lambda: sandbox.instances(appointmentId="A-SBX-1"), message="the journey in the sandbox")
        statuses = {c["status"] for c in sandbox.calls()}
        assert statuses == {204}, statuses
    finally:
        log = service.stop()
    assert f"dispatching to the built-in sandbox at http://127.0.0.1:{port}" in log
    assert "production-secret" not in log


def test_serve_says_where_it_dispatches(tmp_path: Path, sandbox: RunningSandbox) -> None:
    port = free_port()
    (tmp_path / "a").mkdir()
    with_sandbox = start_service(tmp_path / "a", service_toml("https://api.example.invalid") + SANDBOX_TABLES,
                                 extra=["--sandbox", "--sandbox-listen", f"tcp:{port}"])  # fmt: skip
    with_sandbox.stop()
    assert f"dispatching to http://127.0.0.1:{port}" in with_sandbox.banner
    assert f"see http://127.0.0.1:{port}/_sandbox/instances" in with_sandbox.banner

    (tmp_path / "b").mkdir()
    elsewhere = start_service(tmp_path / "b", service_toml("https://api.example.invalid"),
                              env={"TEST_API_TOKEN": "t"}, extra=["--api-url", sandbox.url])  # fmt: skip
    log = elsewhere.stop()
    assert f"dispatching to {sandbox.url} (--api-url)" in elsewhere.banner
    assert f"--api-url: dispatching to {sandbox.url} instead of api.base_url" in log


def _login(port: int, name: str, password: str) -> requests.Response:
    session = requests.Session()
    session.trust_env = False
    return session.post(f"http://127.0.0.1:{port}/api/v1/session", json={"name": name, "password": password},
                        timeout=30)  # fmt: skip


def test_serve_sandbox_makes_a_demo_console_account_once(tmp_path: Path) -> None:
    """`make run` is a newcomer's first look: with no account yet, `--sandbox` makes an admin `demo` whose
    random password is in a 0600 file (never in the log); a second start keeps it; without `--sandbox`, none."""
    config = service_toml("https://api.example.invalid") + SANDBOX_TABLES + console_toml(console := free_port())
    service = start_service(tmp_path, config, extra=["--sandbox", "--sandbox-listen", f"tcp:{free_port()}"])
    secret = tmp_path / "var" / "console-demo.password"
    try:
        password = secret.read_text(encoding="utf-8").strip()
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(password) >= 20
        answer = _login(console, "demo", password)
        assert answer.status_code == 200 and answer.json()["role"] == "admin"
    finally:
        log = service.stop()
    assert "console demo account" in log and "console-demo.password" in log and password not in log

    again = start_service(tmp_path, config, extra=["--sandbox", "--sandbox-listen", f"tcp:{free_port()}"])
    try:
        assert secret.read_text(encoding="utf-8").strip() == password
        assert _login(console, "demo", password).status_code == 200
    finally:
        assert "console demo account" not in again.stop()

    (tmp_path / "plain").mkdir()
    plain = start_service(tmp_path / "plain", service_toml("https://api.example.invalid") + console_toml(free_port()),
                          env={"TEST_API_TOKEN": "t"})  # fmt: skip
    assert ack(plain, siu("S12", "LOGGED-1", "A-LOGGED-1", future()))[1] == "AA"
    plain.stop()
    assert not (tmp_path / "plain" / "var" / "console-demo.password").exists()
    # A log that holds messages is no newcomer's demo: --sandbox on it makes no admin.
    config = service_toml("https://api.example.invalid") + SANDBOX_TABLES + console_toml(free_port())
    later = start_service(tmp_path / "plain", config, extra=["--sandbox", "--sandbox-listen", f"tcp:{free_port()}"])
    assert "console demo account" not in later.stop()
    assert not (tmp_path / "plain" / "var" / "console-demo.password").exists()


# ---- bad control requests: a JSON 400 that says what is wrong ----------------------------------------------

HUGE = b"9" * 4000
BAD = [
    ("POST", "/_sandbox/faults", b"{bad", "the body is not valid JSON"),
    ("POST", "/_sandbox/faults", b"\xff\xfe{}", "the body is not valid JSON"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": NaN}', "NaN is not a JSON number"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": Infinity}', "Infinity is not a JSON number"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": 1e999}', "faults.latency_ms: expected a number, got inf"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": ' + HUGE + b"}", "faults.latency_ms: expected a number from 0 to"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": "x"}', "faults.latency_ms: expected a number, got 'x'"),
    ("POST", "/_sandbox/faults", b'{"latency_ms": true}', "faults.latency_ms: expected a number, got True"),
    ("POST", "/_sandbox/faults", b'{"error_rate": 1.5}', "faults.error_rate: expected a number from 0 to 1"),
    ("POST", "/_sandbox/faults", b'{"slow_every": 2.5}', "faults.slow_every: expected an integer, got 2.5"),
    ("POST", "/_sandbox/faults", b'{"laytency_ms": 5}', "faults.laytency_ms: unknown setting"),
    ("POST", "/_sandbox/faults", b'{"outage_until": 5}', "faults.outage_until: unknown setting"),
    ("POST", "/_sandbox/faults", b'{"outage": "refuse"}', 'faults.outage: expected {"mode"'),
    ("POST", "/_sandbox/faults", b'{"outage": {"mode": "refuse"}}', 'faults.outage: expected {"mode"'),
    ("POST", "/_sandbox/faults", b'{"outage": {"mode": "down", "seconds": 1}}', "faults.outage.mode: expected one"),
    ("POST", "/_sandbox/faults", b'{"outage": {"mode": "503", "seconds": -1}}', "faults.outage.seconds: expected"),
    ("PUT", "/_sandbox/faults", b"[1, 2]", "the body must be a JSON object, got list"),
    ("POST", "/_sandbox/faults", b"[" * 100_000, "the body is larger than 65536 bytes"),
    ("POST", "/_sandbox/faults", b"[" * 60_000, "the body is not valid JSON"),
    ("POST", "/_sandbox/reset", b'{"all": true}', "reset takes no settings, got all"),
    ("POST", "/_sandbox/reset", b'"now"', "the body must be a JSON object, got str"),
    ("POST", "/_sandbox/tokens", b'{"add": ["t"]}', "tokens.add: expected an object of token to scopes"),
    ("POST", "/_sandbox/tokens", b'{"add": {"t": 5}}', "tokens.add[0].scopes: expected a string or a list"),
    ("POST", "/_sandbox/tokens", b'{"add": {"a b": []}}', "tokens.add[0]: expected tokens of 1 to 512"),
    ("POST", "/_sandbox/tokens", b'{"add": {"": []}}', "tokens.add[0]: expected tokens of 1 to 512"),
    ("POST", "/_sandbox/tokens", b'{"revoke": "test-token"}', "tokens.revoke: expected a list of tokens, got str"),
    ("POST", "/_sandbox/tokens", b'{"revoke": [null]}', "tokens.revoke: expected tokens of 1 to 512"),
    ("POST", "/_sandbox/tokens", b'{"grant": {}}', "tokens.grant: unknown setting"),
    ("POST", "/_sandbox/tokens", json.dumps({"add": {f"t{i}": [] for i in range(1000)}}).encode(), "at most 1000"),
    ("GET", "/_sandbox/reset", None, "GET is not allowed on /_sandbox/reset (allowed: POST)"),
    ("POST", "/_sandbox/drift", b"{}", "drift: needs action and id"),
    ("POST", "/_sandbox/drift", b'{"action": "explode", "id": "x"}', "drift.action: expected one of"),
    ("POST", "/_sandbox/drift", b'{"action": "delete", "id": ""}', "drift.id: expected a non-empty string"),
    ("POST", "/_sandbox/drift", b'{"action": "delete", "id": "x", "status": "InProgress"}', "with action 'edit'"),
    ("POST", "/_sandbox/drift", b'{"action": "edit", "id": "x", "parameters": {"a": 1}}', "drift.parameters: expected"),
    ("POST", "/_sandbox/drift", b'{"action": "edit", "id": "x", "color": "red"}', "drift.color: unknown setting"),
    ("DELETE", "/_sandbox/faults", None, "DELETE is not allowed on /_sandbox/faults"),
]


@pytest.mark.parametrize(("method", "path", "body", "needle"), BAD, ids=[f"{m} {p} {n[:40]}" for m, p, _, n in BAD])
def test_bad_control_requests_are_answered_400_and_change_nothing(
    sandbox: RunningSandbox, method: str, path: str, body: bytes | None, needle: str
) -> None:
    before = (sandbox.get("/_sandbox/faults"), len(sandbox.get("/_sandbox/calls")))
    answer = control(sandbox, method, path, body)
    assert answer.status_code == (405 if method in ("GET", "DELETE") else 400)
    assert answer.headers["Content-Type"] == "application/json"
    assert any(needle in problem for problem in answer.json()), answer.json()
    assert (sandbox.get("/_sandbox/faults"), len(sandbox.get("/_sandbox/calls"))) == before
    assert requests.post(bulk_url(sandbox), json={}, headers=API_TOKEN, timeout=10).status_code == 400  # still the API


def test_get_faults_shows_the_faults_in_force(sandbox: RunningSandbox) -> None:
    try:
        set_ = sandbox.post("/_sandbox/faults", {"latency_ms": 5, "rate_limit_every": 7,
                                                 "outage": {"mode": "503", "seconds": 60}})  # fmt: skip
        shown = sandbox.get("/_sandbox/faults")
        assert shown["latency_ms"] == 5 and shown["rate_limit_every"] == 7 and shown["error_rate"] == 0
        assert shown["outage"]["mode"] == "503" and 0 < shown["outage"]["seconds"] <= 60
        assert set_.keys() == shown.keys()
    finally:
        sandbox.post("/_sandbox/reset", {})
    assert sandbox.get("/_sandbox/faults")["outage"] is None


def test_api_bodies_that_are_not_what_the_api_takes_get_400(sandbox: RunningSandbox) -> None:
    search = bulk_url(sandbox).replace("/bulk", "/search")
    spec = {"type": "JourneyParameterSpecification", "operator": "equals", "parameterName": "a", "rightOperand": [1]}
    body = {"filterSpecification": {"type": "AndSpecification", "specifications": [spec]}}
    answer = requests.post(search, json=body, headers=API_TOKEN, timeout=10)
    assert answer.status_code == 400 and answer.json() == ["parameterName and rightOperand must be strings"]
    deep = requests.post(bulk_url(sandbox), data=b"[" * 60_000, headers=API_TOKEN, timeout=10)
    assert deep.status_code == 400 and "not valid JSON" in deep.json()[0]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(["error_rate", "latency_ms", "rate_limit_every", "retry_after", "slow_every", "slow_seconds",
                        "outage", "mode", "seconds", "add", "revoke", "x"])  # fmt: skip
BODIES = JSON | st.dictionaries(KEYS, JSON | st.dictionaries(KEYS, JSON, max_size=3), max_size=4)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/_sandbox/faults", "/_sandbox/tokens", "/_sandbox/reset"]), body=BODIES)
def test_any_json_to_a_control_is_answered_200_or_400(fuzzed: RunningSandbox, path: str, body: object) -> None:
    answer = control(fuzzed, "POST", path, json.dumps(body).encode())
    assert answer.status_code in (200, 400), answer.text
    assert answer.headers["Content-Type"] == "application/json"
    answer.json()
    if answer.status_code == 200:
        fuzzed.post("/_sandbox/reset", {})
        fuzzed.post("/_sandbox/tokens", {"add": {"test-token": ["create.journey_instances", "read.journey_instances"]}})
