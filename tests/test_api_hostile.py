"""The API client against a hostile server on loopback: nothing it answers can steer, wedge or exhaust a call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from hl7bridge.dispatch.child import ChildSpec, EventPipe, LineBuffer
from hl7bridge.dispatch.dispatcher import Dispatcher
from hl7bridge.dispatch.journeys import (
    DEFAULT_CANCEL_PATH,
    MAX_BODY,
    REASON_CHARS,
    ApiResult,
    ApiSettings,
    JourneysClient,
    TokenSource,
    Verdict,
    _retry_after,
    api_text,
    plain_http_outside_loopback,
)
from hl7bridge.dispatch.rules import STRANGE_LIMIT, DispatchSettings
from hl7bridge.store import Writer, open_engine
from hl7bridge.store.schema import attempts, commands, messages

from .conftest import wait_until
from .hostile_api import Answer, HostileApi, api_fixture, json_answer, server_fixture  # noqa: F401 (fixtures)
from .test_outbox_writes import booking

TOKEN = "s3cret-token-for-tests"
INSTANCE = {"id": "81110ff3-061a", "status": "InProgress", "parameters": {"appointmentId": "A1"}}


@pytest.fixture
def client(api: HostileApi) -> JourneysClient:
    os.environ["HOSTILE_API_TOKEN"] = TOKEN
    return JourneysClient(
        ApiSettings(api.url, "org", read_timeout=2, call_timeout=3), TokenSource(env="HOSTILE_API_TOKEN")
    )


def trigger(client: JourneysClient):
    return client.trigger("bot", None, "UTC", [{"appointmentId": "A1"}])


# ---- steering: paths, redirects ----------------------------------------------------------------------


@pytest.mark.parametrize("instance_id", ["../../../../admin/tokens", "a/b", "x?y=1", "x#frag", "..", ".", "%2e%2e", ""])
def test_an_instance_id_that_is_not_plain_is_never_sent(client: JourneysClient, api: HostileApi,
                                                       instance_id: str) -> None:  # fmt: skip
    result = client.cancel("bot", instance_id)
    assert result.verdict is Verdict.MALFORMED and not result.reached
    assert "not sent" in result.reason
    assert api.requests() == []


def test_a_plain_instance_id_is_cancelled_at_its_path(client: JourneysClient, api: HostileApi) -> None:
    assert client.cancel("bot", "81110ff3-061a").ok
    (seen,) = api.requests("cancel")
    assert seen.path == "/chatbotapi/external/orgs/org/journeys/bot/instances/81110ff3-061a/execution"


def test_a_configured_cancel_path_cannot_leave_the_base(api: HostileApi) -> None:
    os.environ["HOSTILE_API_TOKEN"] = TOKEN
    client = JourneysClient(ApiSettings(api.url + "/api", "org", cancel_path="/../../admin/{instanceId}/execution"),
                            TokenSource(env="HOSTILE_API_TOKEN"))  # fmt: skip
    result = client.cancel("bot", "abc")
    assert result.verdict is Verdict.MALFORMED and "leaves the configured base_url" in result.reason
    assert api.requests() == []


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed(client: JourneysClient, api: HostileApi, status: int) -> None:
    api.script("bulk", Answer(status, b"<html>moved</html>", {"Location": "http://elsewhere.example/landing"}))
    result = trigger(client)
    assert result.verdict is Verdict.MALFORMED and not result.ok
    assert result.status == status
    assert "http://elsewhere.example/landing" in result.error
    assert len(api.requests()) == 1


@pytest.mark.parametrize("gap", [0.0, 0.3])
def test_an_interim_103_before_204_is_not_taken_for_the_verdict(
    client: JourneysClient, api: HostileApi, gap: float
) -> None:
    api.script("bulk", Answer(204, interim=(103,), interim_gap=gap))
    result = trigger(client)
    assert result.verdict is Verdict.MALFORMED and result.maybe_processed
    # The final 204 left on that connection (sent late: after the connection went back to the pool) must not
    # answer the next call.
    api.script("bulk", Answer(400, b'["bad"]'))
    assert trigger(client).status == 400


# ---- answers of the wrong shape ------------------------------------------------------------------------


@pytest.mark.parametrize("answer", [
    json_answer(200, {"errors": ["instance 1: appointmentId is required"]}),
    Answer(202), Answer(206, b"partial"), Answer(200, b"<html>captive portal</html>"),
])  # fmt: skip
def test_a_trigger_answered_other_than_204_is_no_success(client: JourneysClient, api: HostileApi,
                                                        answer: Answer) -> None:  # fmt: skip
    api.script("bulk", answer)
    result = trigger(client)
    assert result.verdict is Verdict.MALFORMED
    assert result.maybe_processed  # a 2xx may have done its work: the retry searches first
    assert f"expected 204 No Content, got {answer.status}" in result.reason


@pytest.mark.parametrize("answer, why", [
    (json_answer(200, {"id": "x"}), "got an object"),
    (Answer(200, b"<html><body>Login</body></html>"), "not JSON"),
    (json_answer(200, "InProgress"), "got a string"),
    (json_answer(200, ["a", "b"]), "holding a string"),
    (Answer(200, b"[" * 100_000 + b"]" * 100_000), "not JSON"),
    (json_answer(200, [{"id": 7, "status": "InProgress"}]), "id or status is not a string"),
    (json_answer(200, [{"id": "x", "parameters": {"a": ["deep"]}}]), "parameters are not an object of strings"),
    (Answer(204), "expected 200"),
])  # fmt: skip
def test_a_search_answered_with_anything_but_an_array_of_instances_fails(
    client: JourneysClient, api: HostileApi, answer: Answer, why: str
) -> None:
    api.script("search", answer)
    result = client.search("bot", {"appointmentId": "A1"})
    assert result.verdict is Verdict.MALFORMED and result.data is None
    assert why in result.reason


def test_a_search_answered_as_documented_succeeds(client: JourneysClient, api: HostileApi) -> None:
    api.script("search", json_answer(200, [INSTANCE]))
    result = client.search("bot", {"appointmentId": "A1"})
    assert result.ok and result.data == [INSTANCE]


# ---- exhausting: size and time ------------------------------------------------------------------------------


def test_an_endless_body_fails_the_call_at_the_byte_limit(client: JourneysClient, api: HostileApi) -> None:
    api.script("search", Answer(200, b"[" + b" " * 65536, endless=True))
    result = client.search("bot", {"appointmentId": "A1"})
    assert result.verdict is Verdict.RETRYABLE
    assert f"larger than {MAX_BODY // 2**20} MiB" in result.reason


def test_a_dripped_body_fails_the_call_at_its_deadline(client: JourneysClient, api: HostileApi) -> None:
    api.script("bulk", Answer(400, b'["' + b"x" * 600 + b'"]', drip=0.1))
    started = time.monotonic()
    result = trigger(client)
    assert result.verdict is Verdict.RETRYABLE and "call_timeout" in result.reason
    # The call_timeout is 3 s; the drip alone would take 60 s: a bound this loose only fails if it was ignored.
    assert time.monotonic() - started < 30


def test_dripped_headers_fail_the_call_at_its_deadline(client: JourneysClient, api: HostileApi) -> None:
    api.script("bulk", Answer(204, headers={"X-Pad": "x" * 100}, drip=0.5, drip_head=True))
    started = time.monotonic()
    result = trigger(client)
    assert result.verdict is Verdict.RETRYABLE and "call_timeout" in result.reason
    assert time.monotonic() - started < 30  # the call_timeout is 3 s; the drip alone would take over 60 s


def test_a_body_that_never_comes_is_a_timeout(client: JourneysClient, api: HostileApi) -> None:
    api.script("search", Answer(200, b"[]", stall=2.5))  # read_timeout is 2 s
    result = client.search("bot", {"appointmentId": "A1"})
    assert result.verdict is Verdict.RETRYABLE and "timeout" in result.reason


def test_a_huge_error_list_is_kept_short(client: JourneysClient, api: HostileApi) -> None:
    api.script("bulk", json_answer(400, [f"error number {i} " + "y" * 16 for i in range(100_000)]))
    result = trigger(client)
    assert result.verdict is Verdict.REJECTED
    assert len(result.reason) <= REASON_CHARS
    assert len(result.response_body) <= 4000


# ---- text from the API ----------------------------------------------------------------------------------


def test_api_text_is_made_safe_at_the_source(client: JourneysClient, api: HostileApi) -> None:
    api.script("bulk", json_answer(400, ["bad \udfff value\n<2>hl7bridge: FORGED LINE \x1b[31m",
                                         f"header was Authorization: Bearer {TOKEN}"]))  # fmt: skip
    result = trigger(client)
    text = result.reason + result.response_body
    json.dumps(text, ensure_ascii=False).encode("utf-8")  # encodable: no lone surrogate
    assert "\n" not in text and "\x1b" not in text and "\udfff" not in text
    assert "\\u000a<2>hl7bridge: FORGED LINE" in result.reason
    assert TOKEN not in text and "[token]" in result.reason


def test_api_text_cuts_and_escapes() -> None:
    assert api_text("a\u2028b\x00c\x9b", limit=100) == "a\\u2028b\\u0000c\\u009b"
    assert len(api_text("z" * 10_000)) == 300


@pytest.mark.parametrize("value, expected", [
    ("120", 120.0), ("9" * 400, 1e15), ("99999999", 99999999.0), ("Fri, 31 Dec 9999 23:59:59 GMT", None),
    ("inf", None), ("nan", None), ("-5", None), ("\u0661\u0662", None), ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
])  # fmt: skip
def test_retry_after_is_a_finite_number_of_seconds(value: str, expected: float | None) -> None:
    seconds = _retry_after(value)
    if expected is None and value.startswith("Fri"):
        assert seconds is not None and seconds > 1e9  # far, but finite: the dispatcher caps it at retry_max
    else:
        assert seconds == expected


def test_the_environment_is_not_trusted(client: JourneysClient) -> None:
    assert client.session.trust_env is False
    assert plain_http_outside_loopback("http://10.1.2.3:8080") and plain_http_outside_loopback("http://api.example")
    assert not plain_http_outside_loopback("http://127.0.0.1:8080") and not plain_http_outside_loopback("https://x")


# ---- the pipe between the service and the dispatcher process ---------------------------------------------


def test_the_pipe_reader_keeps_lines_whole_and_drops_an_overlong_one() -> None:
    lines = LineBuffer(max_length=1000)
    got = []
    for piece in [b"one\ntw", b"o\n", b"x" * 600, b"x" * 600, b"y" * 10, b"\nthree", b"\n"]:
        got += lines.feed(piece)
    assert got == [b"one", b"two", b"three"] and lines.dropped == 1
    long_line = LineBuffer(max_length=64 * 2**20)
    for _ in range(320):
        assert long_line.feed(b"z" * 65536) == []
    assert long_line.feed(b"\n") == [b"z" * (320 * 65536)]


# ---- the dispatcher process never lives on without its reader --------------------------------------------


def test_text_that_is_not_utf8_still_crosses_the_pipe() -> None:
    read_end, write_end = os.pipe()
    try:
        EventPipe(write_end).send({"paused": "refused \udfff"})
        assert json.loads(os.read(read_end, 4096)) == {"paused": "refused ?"}
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_dispatcher_process_whose_reader_fails_exits_to_be_restarted(tmp_path: Path, api: HostileApi) -> None:
    database = f"sqlite:///{tmp_path / 'log.db'}"
    open_engine(database).dispose()
    spec = ChildSpec(database=database, api=ApiSettings(base_url=api.url, org_id="org", cancel_path=DEFAULT_CANCEL_PATH,
                     connect_timeout=1, read_timeout=2), settings={}, token=TOKEN)  # fmt: skip
    read_events, write_events = os.pipe()
    child = subprocess.Popen(["bash", "-c", f"exec {sys.executable} -m hl7bridge.dispatch.child 3>&{write_events}"],
                             stdin=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(write_events,))  # fmt: skip
    os.close(write_events)
    try:
        child.stdin.write(spec.to_line())
        child.stdin.flush()
        assert b'"ready"' in os.read(read_events, 4096)
        child.stdin.write(b"f not-a-number\n")  # a line its reader cannot take
        child.stdin.flush()
        assert child.wait(timeout=20) == 70
        assert b"the dispatcher process failed; it exits to be restarted" in child.stderr.read()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.close(read_events)


# ---- an unexpected error in a dispatch job ---------------------------------------------------------------


class BrokenClient(JourneysClient):
    """A client whose trigger fails in a way no answer classification foresaw (a bug, a library's surprise)."""

    def trigger(self, *args: object, **kwargs: object) -> ApiResult:
        raise RuntimeError("unforeseen")


def test_an_unexpected_error_is_logged_as_an_attempt_and_ends_in_a_dead_letter(tmp_path: Path, api: HostileApi) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    now = time.time()
    with engine.begin() as conn:
        conn.execute(messages.insert(), [{"received_at": now, "listener": "t", "peer": "t", "status": "pending"}])
        conn.execute(commands.insert(), [booking(1, now)])
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    os.environ["HOSTILE_API_TOKEN"] = TOKEN
    # Its searches are answered (nothing found), so every retry tries the trigger again.
    client = BrokenClient(ApiSettings(api.url, "org"), TokenSource(env="HOSTILE_API_TOKEN"))
    dispatcher = Dispatcher(engine, writer, client, DispatchSettings(retry_initial=0.05, retry_max=0.1,
                                                                     batch_window=0.01))  # fmt: skip
    dispatcher.start()
    try:

        def final() -> Any:
            with engine.connect() as conn:
                row = conn.execute(select(commands.c.status, commands.c.outcome)).one()
            return row if row.status not in ("pending", "in_flight") else None

        status, outcome = wait_until(final, timeout=30, message="the command to be given up")
    finally:
        dispatcher.stop()
        writer.stop()
    with engine.connect() as conn:
        verdicts = [v for (v,) in conn.execute(select(attempts.c.verdict))]
    engine.dispose()
    assert status == "dead" and "internal error (RuntimeError)" in outcome
    assert verdicts == ["internal"] * STRANGE_LIMIT


class DyingDispatcher(Dispatcher):
    def _tick(self) -> float:
        raise SystemExit("a thread-killing error")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # it dies by design
def test_a_dispatcher_thread_that_dies_says_so(tmp_path: Path) -> None:
    """In the service's process (run_in = "thread") /healthz reads ``paused_reason``; the child exits instead."""
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    client = JourneysClient(ApiSettings("http://127.0.0.1:9", "org"), TokenSource(env="HL7BRIDGE_TEST_NO_TOKEN"))
    dispatcher = DyingDispatcher(engine, Writer(engine, lambda fn, *args: fn(*args)), client)
    dispatcher.start()
    try:
        wait_until(lambda: not dispatcher.alive, timeout=10, message="the thread to die")
        assert dispatcher.paused_reason == "the dispatcher's thread has died; restart the service"
    finally:
        dispatcher.stop()
        engine.dispose()
