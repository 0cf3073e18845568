"""The status picture, judged from facts alone (``workflow.status.assess``), ``api.token_expires`` and where
``hl7bridge status`` asks: each rule that makes the state degraded or failing, on its own."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta

import pytest
from twisted.internet import task
from twisted.internet.error import ProcessTerminated
from twisted.python.failure import Failure

from hl7bridge.app.cli_status import status_url
from hl7bridge.app.config import ConfigError, parse
from hl7bridge.core.observer import NullObserver
from hl7bridge.core.status import ServiceState
from hl7bridge.dispatch import pipe
from hl7bridge.dispatch.child import ChildSpec
from hl7bridge.dispatch.journeys import ApiSettings
from hl7bridge.dispatch.pipe import DispatchState
from hl7bridge.dispatch.process import DispatcherProcess
from hl7bridge.workflow.status import Facts, ListenerFacts, LogFacts, assess

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC).timestamp()
FLOWING = DispatchState()


def judged(**facts: object) -> tuple[ServiceState, list[str]]:
    status = assess(Facts(now=NOW, dispatch=facts.pop("dispatch", FLOWING), **facts))  # type: ignore[arg-type]
    json.dumps(status.to_json())
    return status.state, list(status.reasons)


def test_nothing_wrong_is_ok() -> None:
    listeners = (ListenerFacts("main", 2, NOW - 5),)
    status = assess(Facts(now=NOW, dispatch=FLOWING, listeners=listeners, log=LogFacts(3, 12.0)))
    assert (status.state, status.reasons) == (ServiceState.OK, ())
    body = status.to_json()
    assert body["state"] == "ok" and body["outbox"] == {"depth": 3, "oldest_age_s": 12.0}
    assert body["listeners"] == [{"name": "main", "connections": 2, "last_message_at": "2026-12-04T11:59:55+00:00"}]
    assert body["dispatch"]["running"] and not body["dispatch"]["held"] and not body["dispatch"]["auth_paused"]


def test_no_routes_means_no_dispatch_facts() -> None:
    status = assess(Facts(now=NOW, dispatch=None))
    assert status.state is ServiceState.OK and status.to_json()["dispatch"] is None


def test_an_api_that_does_not_answer_degrades_naming_the_api_and_since_when() -> None:
    held = DispatchState(held_reason="the Journeys API is unavailable (HTTP 503)", held_since=NOW - 60)
    state, reasons = judged(dispatch=held)
    assert state is ServiceState.DEGRADED
    assert reasons == [
        "Dispatching holds since 2026-12-04T11:59:00+00:00: the Journeys API is unavailable (HTTP 503); one command "
        "at a time is tried until the Journeys API answers."
    ]


def test_a_refused_token_fails_with_since_and_next_try() -> None:
    paused = DispatchState(paused_reason="the API refused the token (401): invalid token", paused_since=NOW - 30,
                           paused_until=NOW + 870)  # fmt: skip
    state, reasons = judged(dispatch=paused)
    assert state is ServiceState.FAILING
    assert reasons == [
        "Dispatching is paused since 2026-12-04T11:59:30+00:00: the API refused the token (401): invalid token; "
        "the next try is at 2026-12-04T12:14:30+00:00."
    ]


def test_a_dispatcher_down_fails_and_hides_its_stale_hold() -> None:
    down = DispatchState(held_reason="x", held_since=NOW, down_reason="the dispatcher process exited with status 70")
    state, reasons = judged(dispatch=down)
    assert state is ServiceState.FAILING
    assert reasons == ["The dispatcher is not running: the dispatcher process exited with status 70."]


def test_an_unwritable_log_and_unbound_listeners_fail() -> None:
    state, reasons = judged(database_problem="the last write failed: disk I/O error",
                            listeners_problem="1 of 2 listener(s) bound")  # fmt: skip
    assert state is ServiceState.FAILING
    assert reasons == ["The message log: the last write failed: disk I/O error.",
                       "Listeners: 1 of 2 listener(s) bound."]  # fmt: skip


def test_open_dead_letters_degrade_with_their_count() -> None:
    state, reasons = judged(log=LogFacts(dead_letters_open=2, dead_letters_since=NOW - 3600))
    assert state is ServiceState.DEGRADED
    assert reasons == ["2 dead letter(s) wait for an operator, the oldest since 2026-12-04T11:00:00+00:00 "
                       "(hl7bridge dead-letters list)."]  # fmt: skip


def test_an_outbox_older_than_the_limit_degrades() -> None:
    assert judged(log=LogFacts(4, 899.0), outbox_limit=900.0)[0] is ServiceState.OK
    state, reasons = judged(log=LogFacts(4, 901.0), outbox_limit=900.0)
    assert state is ServiceState.DEGRADED
    assert reasons == ["4 command(s) wait to be dispatched, the oldest for 901 s (health.outbox_stuck_after is 900 s)."]


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (20, None),
        (14.5, None),
        (13.5, "The API token expires on 2026-12-18, in 14 day(s) (api.token_expires): renew it and update "
               "api.token_expires."),
        (-1, "The API token expired on 2026-12-03 (api.token_expires): renew it, or the API will refuse it."),
    ],
)  # fmt: skip
def test_the_token_expiry_degrades_from_14_days_ahead_naming_the_date(days: float, expected: str | None) -> None:
    expires = datetime.fromtimestamp(NOW, UTC) + timedelta(days=days)
    state, reasons = judged(token_expires=expires)
    assert reasons == ([expected] if expected else [])
    assert state is (ServiceState.DEGRADED if expected else ServiceState.OK)


def test_failing_reasons_come_before_degraded_ones() -> None:
    paused = DispatchState(paused_reason="the API refused the token (403): no scope", paused_since=NOW)
    state, reasons = judged(dispatch=paused, log=LogFacts(dead_letters_open=1, dead_letters_since=NOW))
    assert state is ServiceState.FAILING
    assert reasons[0].startswith("Dispatching is paused") and reasons[1].startswith("1 dead letter(s)")


# --- api.token_expires ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2027-03-01", datetime(2027, 3, 1, tzinfo=UTC)),
        ('"2027-03-01"', datetime(2027, 3, 1, tzinfo=UTC)),
        ("2027-03-01T12:30:00Z", datetime(2027, 3, 1, 12, 30, tzinfo=UTC)),
        ("2027-03-01T12:30:00+02:00", datetime(2027, 3, 1, 10, 30, tzinfo=UTC)),
        ("2027-03-01T12:30:00", datetime(2027, 3, 1, 12, 30, tzinfo=UTC)),
        ('"2027-03-01T12:30:00Z"', datetime(2027, 3, 1, 12, 30, tzinfo=UTC)),
        ('""', None),
    ],
)
def test_token_expires_takes_a_date_or_date_time(value: str, expected: datetime | None) -> None:
    assert parse(tomllib.loads(f"[api]\ntoken_expires = {value}\n")).api.token_expiry() == expected


@pytest.mark.parametrize("value", ['"soon"', "20270301", '"2027-02-30"', "true", "12:00:00"])
def test_a_bad_token_expires_is_a_problem_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(tomllib.loads(f"[api]\ntoken_expires = {value}\n"))
    assert [p for p in raised.value.problems if "api.token_expires: expected a date or date-time" in p]


def test_no_expiry_by_default() -> None:
    assert parse({"api": {}}).api.token_expiry() is None


# --- where `hl7bridge status` asks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "url"),
    [
        ("tcp:9102:interface=127.0.0.1", "http://127.0.0.1:9102/status"),
        ("tcp:port=9102", "http://127.0.0.1:9102/status"),
        ("tcp:9102:interface=0.0.0.0", "http://127.0.0.1:9102/status"),
        ("tcp6:9102:interface=\\:\\:1", "http://[::1]:9102/status"),
        ("tcp6:9102", "http://[::1]:9102/status"),
        ("", None),
        ("unix:/run/hl7bridge/health.sock", None),
    ],
)
def test_status_url_from_health_listen(listen: str, url: str | None) -> None:
    assert status_url(listen) == url


# --- the service's view of its dispatcher process ----------------------------------------------------------


def test_a_dead_dispatcher_process_is_down_and_its_last_state_forgotten() -> None:
    spec = ChildSpec(database="sqlite:///unused.db", api=ApiSettings(base_url="http://127.0.0.1:9"), settings={})
    clock = task.Clock()
    process = DispatcherProcess(clock, spec, NullObserver(), writer=None)  # type: ignore[arg-type]
    held = DispatchState(held_reason="the Journeys API is unavailable (HTTP 503)", held_since=NOW)
    process.event({pipe.STATE: held.to_json()})
    assert process.state() == held
    process.ended(Failure(ProcessTerminated(exitCode=70)))
    down = process.state()
    assert down == DispatchState(down_reason="the dispatcher process exited with status 70; it restarts in 0.5 s")
    assert assess(Facts(now=NOW, dispatch=down)).state is ServiceState.FAILING
