"""The JSON API's resources over real HTTP against the real service, which dispatches to a real sandbox (its own
process) whose journey lacks a parameter the route sends: the API answers 400, so the bookings become real dead
letters. Each role meets its limits; actions land in the audit log with the API's channel; and no answer carries
the patient data of the messages sent (checked over every answer of the module when it ends)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .api_support import PASSWORD, SECURITY_HEADERS, Api, start_api
from .conftest import RunningSandbox, start_sandbox
from .dispatch_support import SANDBOX_TOML, TOKEN, future, service_toml, settled, siu

START = future(days=20, hour=10, minute=0)
BROKEN_SANDBOX = SANDBOX_TOML.replace(
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime", "phoneNumber"]',
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime"]',
)
#: The patient data the messages carry: none of it may leave the API unmasked.
PATIENT = {"patient": "MRN-API-4417", "family": "QUIMBLEDORF", "given": "ZANTHIPPE", "phone": "555-0177"}
PHI = [*PATIENT.values(), "5550177", "19800101", "1980-01-01"]


@dataclass
class Setting:
    api: Api
    sandbox: RunningSandbox
    #: control id -> (message id, command id)
    sent: dict[str, tuple[int, int]]


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setting]:
    assert BROKEN_SANDBOX != SANDBOX_TOML
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"), BROKEN_SANDBOX)
    api = start_api(tmp_path_factory.mktemp("api"), service_toml(sandbox.url), env=TOKEN)
    sent: dict[str, tuple[int, int]] = {}
    try:
        for n in range(1, 5):
            control, appointment = f"API-{n}", f"A-API-{n}"
            assert api.service.request(siu("S12", control, appointment, START, **PATIENT)).count(b"MSA|AA|") == 1
            (command,) = settled(api.service, control)
            assert command["status"] == "dead", command
            sent[control] = (command["message_id"], command["id"])
        yield Setting(api, sandbox, sent)
        for response in api.seen:
            missing = {k: v for k, v in SECURITY_HEADERS.items() if response.headers.get(k) != v}
            assert not missing, f"{response.request.method} {response.url} ({response.status_code}) lacks {missing}"
            if "/unmask" not in response.url:
                leaked = [value for value in PHI if value in response.text]
                assert not leaked, f"{response.request.method} {response.url} answered patient data {leaked}"
        logged = api.service.stop()
        assert "console on http://127.0.0.1:" in logged
        assert not [value for value in PHI if value in logged], "the service's log holds patient data"
    finally:
        api.service.stop()
        sandbox.stop()


# ---- messages ------------------------------------------------------------------------------------------------


def test_search_by_appointment_control_id_and_patient(setting: Setting) -> None:
    api = setting.api
    message_id, _ = setting.sent["API-2"]
    for query in ("appointment=A-API-2", "control_id=API-2", f"patient={PATIENT['patient']}&limit=10"):
        answer = api.get(f"/api/v1/messages?{query}", role="viewer")
        assert answer.status_code == 200, answer.text
        ids = [m["id"] for m in answer.json()["messages"]]
        assert message_id in ids, (query, ids)
    by_patient = api.get(f"/api/v1/messages?patient={PATIENT['patient']}", role="viewer").json()
    assert {m["control_id"] for m in by_patient["messages"]} == set(setting.sent)
    assert all(m["dead_letters"] == 1 for m in by_patient["messages"])


def test_search_pages_newest_first_with_next_before(setting: Setting) -> None:
    api = setting.api
    first = api.get("/api/v1/messages?limit=2&control_id=API-1", role="viewer").json()
    assert first["more"] is False
    page = api.get(f"/api/v1/messages?limit=2&patient={PATIENT['patient']}", role="viewer").json()
    assert page["more"] is True and len(page["messages"]) == 2
    ids = [m["id"] for m in page["messages"]]
    assert ids == sorted(ids, reverse=True) and page["next_before"] == ids[-1]
    rest = api.get(f"/api/v1/messages?limit=2&patient={PATIENT['patient']}&before={page['next_before']}",
                   role="viewer").json()  # fmt: skip
    assert [m["id"] for m in rest["messages"]] == sorted({i for i, _ in setting.sent.values()} - set(ids),
                                                          reverse=True)  # fmt: skip
    assert rest["more"] is False and rest["next_before"] is None


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("text=checkup", "since"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("before=x", "before"),
        ("status=lost", "status"),
        ("since=yesterday", "since"),
        ("appointment=", "appointment"),
        ("colour=red", "colour"),
        ("event=S12&event=S13", "event"),
    ],
)
def test_search_input_is_refused_naming_the_parameter(setting: Setting, query: str, field: str) -> None:
    answer = setting.api.get(f"/api/v1/messages?{query}", role="viewer")
    assert answer.status_code == 400, answer.text
    assert answer.json()["field"] == field


def test_text_search_within_a_window_and_status_dead(setting: Setting) -> None:
    api = setting.api
    found = api.get("/api/v1/messages?text=checkup&since=1h", role="viewer").json()["messages"]
    assert {m["control_id"] for m in found} >= set(setting.sent)
    dead = api.get("/api/v1/messages?status=dead", role="viewer").json()["messages"]
    assert {m["control_id"] for m in dead} >= set(setting.sent)


def test_a_timeline_is_masked_for_every_role_without_an_unmask(setting: Setting) -> None:
    api = setting.api
    message, command = setting.sent["API-1"]
    for role in ("viewer", "operator", "admin"):
        answer = api.get(f"/api/v1/messages/{message}", role=role)
        assert answer.status_code == 200, answer.text
        found = answer.json()
        assert found["masked"] is True and found["message"]["id"] == message
        assert [s[:3] for s in found["raw"]][:2] == ["MSH", "SCH"] and any(s.startswith("PID") for s in found["raw"])
        (shown,) = found["commands"]
        assert shown["id"] == command and shown["attempts"] and shown["attempts"][0]["status_code"] == 400
        # The API's words may quote what was sent (a name, a phone): masked as its answer's body is.
        assert shown["outcome"].startswith("rejected by the API (400): i***")
        assert "not a parameter of the journey" not in answer.text
        assert found["ack"] and "MSA" in found["ack"]
    missing = api.get("/api/v1/messages/999999", role="viewer")
    assert missing.status_code == 404 and missing.json()["field"] == "id"
    assert api.get("/api/v1/messages/abc", role="viewer").json()["field"] == "id"


def test_a_viewer_may_not_unmask(setting: Setting) -> None:
    message, _ = setting.sent["API-1"]
    answer = setting.api.post(f"/api/v1/messages/{message}/unmask", {"reason": "curious"}, role="viewer")
    assert answer.status_code == 403 and "'unmask'" in answer.json()["error"]


def test_an_unmask_needs_a_reason_and_is_audited_before_the_data_is_shown(setting: Setting) -> None:
    api = setting.api
    message, _ = setting.sent["API-1"]

    def unmasks() -> list[dict]:
        entries = api.get("/api/v1/audit?action=unmask", role="viewer").json()["entries"]
        return [e for e in entries if e["ids"] == [message]]

    before = unmasks()
    for body in ({}, {"reason": "   "}, {"reason": "r" * 501}):
        refused = api.post(f"/api/v1/messages/{message}/unmask", body, role="operator")
        assert refused.status_code == 400 and refused.json()["field"] == "reason", refused.text
        assert not any(value in refused.text for value in PHI)
    assert unmasks() == before
    answer = api.post(f"/api/v1/messages/{message}/unmask", {"reason": "patient called about SMS"}, role="operator")
    assert answer.status_code == 200, answer.text
    found = answer.json()
    assert found["masked"] is False
    assert PATIENT["family"] in "".join(found["raw"]) and PATIENT["patient"] in answer.text
    assert "parameter 'phoneNumber' is not a parameter of the journey" in found["commands"][0]["outcome"]
    (entry,) = [e for e in unmasks() if e not in before]
    assert entry["actor"] == "operator" and entry["channel"] == "api" and entry["reason"] == "patient called about SMS"
    assert entry["id"] in [e["id"] for e in found["audit"]]
    # The next plain read is masked again: the unmask held for that one answer.
    assert api.get(f"/api/v1/messages/{message}", role="operator").json()["masked"] is True


# ---- dead letters --------------------------------------------------------------------------------------------


def test_dead_letters_list_for_a_viewer_oldest_first_in_pages(setting: Setting) -> None:
    api = setting.api
    answer = api.get("/api/v1/dead-letters?limit=2", role="viewer")
    assert answer.status_code == 200, answer.text
    page = answer.json()
    assert page["more"] is True and len(page["dead_letters"]) == 2
    first = page["dead_letters"][0]
    assert first["id"] == setting.sent["API-1"][1] and first["reason"].startswith("rejected by the API (400): i***")
    assert "not a parameter" not in answer.text, "the API's words are masked: they may quote a patient's values"
    rest = api.get(f"/api/v1/dead-letters?after={page['next_after']}", role="viewer").json()
    assert [d["id"] for d in rest["dead_letters"]][:2] == [setting.sent["API-3"][1], setting.sent["API-4"][1]]


def test_a_viewer_may_not_act(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-1"]
    for path, body in [("/api/v1/dead-letters/retry", {"ids": [command]}),
                       ("/api/v1/dead-letters/discard", {"ids": [command], "reason": "x"})]:  # fmt: skip
        answer = api.post(path, body, role="viewer")
        assert answer.status_code == 403, answer.text
        assert "'act'" in answer.json()["error"] and "'viewer'" in answer.json()["error"]


def test_retry_dry_run_says_what_would_be_queued_and_changes_nothing(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-1"]
    answer = api.post("/api/v1/dead-letters/retry", {"ids": [command], "dry_run": True}, role="operator")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["dry_run"] is True and [d["id"] for d in result["queued"]] == [command]
    assert result["audit_id"] is None
    still = api.get("/api/v1/dead-letters", role="viewer").json()["dead_letters"]
    assert command in [d["id"] for d in still]


def test_retry_and_discard_input_is_checked(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-4"]
    cases = [
        ("/api/v1/dead-letters/retry", {}, "ids"),
        ("/api/v1/dead-letters/retry", {"ids": [command], "all": True}, "ids"),
        ("/api/v1/dead-letters/retry", {"ids": ["one"]}, "ids"),
        ("/api/v1/dead-letters/retry", {"ids": [command], "reason": "r" * 501}, "reason"),
        ("/api/v1/dead-letters/discard", {"ids": [command]}, "reason"),
        ("/api/v1/dead-letters/discard", {"ids": [command], "reason": "   "}, "reason"),
        ("/api/v1/dead-letters/discard", {"ids": [], "reason": "why"}, "ids"),
    ]
    for path, body, field in cases:
        answer = api.post(path, body, role="operator")
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["field"] == field, (body, answer.json())


def test_an_operator_discards_with_a_reason_and_it_is_audited(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-4"]
    answer = api.post("/api/v1/dead-letters/discard", {"ids": [command], "reason": "vendor confirmed duplicate"},
                      role="operator")  # fmt: skip
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [d["id"] for d in result["discarded"]] == [command] and result["audit_id"]
    again = api.post("/api/v1/dead-letters/discard", {"ids": [command], "reason": "again"}, role="operator").json()
    assert again["discarded"] == [] and "discarded" in again["refused"][0]["reason"]
    entries = api.get("/api/v1/audit?action=discard", role="viewer").json()["entries"]
    (entry,) = [e for e in entries if e["id"] == result["audit_id"]]
    assert entry["actor"] == "operator" and entry["channel"] == "api" and entry["ids"] == [command]
    assert entry["reason"] == "vendor confirmed duplicate"


def test_an_operator_retries_and_it_is_audited(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-3"]
    answer = api.post("/api/v1/dead-letters/retry", {"ids": [command], "reason": "journey fixed"}, role="operator")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [d["id"] for d in result["queued"]] == [command] and result["audit_id"]
    entries = api.get("/api/v1/audit?action=retry&limit=5", role="viewer").json()["entries"]
    assert any(e["id"] == result["audit_id"] and e["channel"] == "api" for e in entries)


def test_a_cookie_session_acts_only_with_its_csrf_token(setting: Setting) -> None:
    api = setting.api
    _, command = setting.sent["API-2"]
    session, me = api.login("operator")
    body = {"ids": [command], "dry_run": True}
    refused = api.call("POST", "/api/v1/dead-letters/retry", session=session, json=body)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    done = api.call("POST", "/api/v1/dead-letters/retry", session=session, json=body,
                    headers={"X-CSRF-Token": me["csrf"]})  # fmt: skip
    assert done.status_code == 200, done.text


# ---- stats, status, audit ------------------------------------------------------------------------------------


def test_stats_and_status_for_a_viewer(setting: Setting) -> None:
    api = setting.api
    stats = api.get("/api/v1/stats", role="viewer")
    assert stats.status_code == 200, stats.text
    assert stats.json()["messages"]["accepted"] >= len(setting.sent)
    assert api.get("/api/v1/stats?since=1h", role="viewer").status_code == 200
    assert api.get("/api/v1/stats?since=soon", role="viewer").json()["field"] == "since"
    listed = api.get("/api/v1/dead-letters", role="viewer").json()["dead_letters"]
    status = api.get("/api/v1/status", role="viewer").json()
    # Read when asked, as the list is: the timer's last read of the log (every heartbeat_interval, 10 s) came before
    # the dead letters, and a page said "ok" beside its own count of them.
    assert status["dead_letters"]["open"] == len(listed) >= 1 and status["state"] == "degraded", status


def test_audit_is_paged_newest_first(setting: Setting) -> None:
    api = setting.api
    page = api.get("/api/v1/audit?limit=1", role="viewer").json()
    assert page["more"] is True and len(page["entries"]) == 1
    older = api.get(f"/api/v1/audit?limit=1&before={page['next_before']}", role="viewer").json()
    assert older["entries"][0]["id"] < page["entries"][0]["id"]


# ---- users ---------------------------------------------------------------------------------------------------


def test_only_an_admin_manages_users(setting: Setting) -> None:
    api = setting.api
    for role in ("viewer", "operator"):
        answer = api.get("/api/v1/users", role=role)
        assert answer.status_code == 403 and "'admin'" in answer.json()["error"]
        assert api.post("/api/v1/users", {"name": "x", "role": "admin", "password": PASSWORD},
                        role=role).status_code == 403  # fmt: skip
    users = api.get("/api/v1/users", role="admin").json()["users"]
    assert {(u["name"], u["role"]) for u in users} >= {
        ("viewer", "viewer"),
        ("operator", "operator"),
        ("admin", "admin"),
    }
    assert all("password_hash" not in u for u in users)
    assert "argon2" not in api.seen[-1].text


def test_an_admin_adds_a_user_who_logs_in_and_removes_them(setting: Setting) -> None:
    api = setting.api
    added = api.post("/api/v1/users", {"name": "night.shift", "role": "operator", "password": PASSWORD}, role="admin")
    assert added.status_code == 201, added.text
    session, me = api.login("night.shift")
    assert me["role"] == "operator"
    issued = api.post("/api/v1/users/night.shift/tokens", {"label": "script"}, role="admin")
    assert issued.status_code == 201 and issued.json()["token"].startswith("hb_")
    token = issued.json()["token"]
    assert api.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert api.call("DELETE", "/api/v1/users/night.shift", role="admin").status_code == 204
    assert api.get("/api/v1/status", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    assert api.get("/api/v1/session", session=session).status_code == 401
    missing = api.call("DELETE", "/api/v1/users/night.shift", role="admin")
    assert missing.status_code == 404
    entries = api.get("/api/v1/audit?limit=20", role="viewer").json()["entries"]
    assert any(e["target"] == "user" and e["ids"] == ["night.shift"] and e["channel"] == "api" for e in entries)


def test_user_input_is_checked_naming_the_field(setting: Setting) -> None:
    api = setting.api
    for body, field in [({"name": "a", "role": "root", "password": PASSWORD}, "role"),
                        ({"name": "a", "role": "viewer"}, "password"),
                        ({"role": "viewer", "password": PASSWORD}, "name")]:  # fmt: skip
        answer = api.post("/api/v1/users", body, role="admin")
        assert answer.status_code == 400 and answer.json()["field"] == field, answer.text
    short = api.post("/api/v1/users", {"name": "a", "role": "viewer", "password": "short"}, role="admin")
    assert short.status_code == 400 and "at least 12" in short.json()["error"]


# ---- replay (last: it settles API-2's dead letter as replayed) -----------------------------------------------


def test_a_viewer_may_not_replay(setting: Setting) -> None:
    message, _ = setting.sent["API-2"]
    answer = setting.api.post("/api/v1/replay", {"ids": [message], "dry_run": True}, role="viewer")
    assert answer.status_code == 403 and "'act'" in answer.json()["error"]


def test_replay_dry_run_describes_the_calls_masked_and_changes_nothing(setting: Setting) -> None:
    api = setting.api
    message, _ = setting.sent["API-2"]
    answer = api.post("/api/v1/replay", {"ids": [message], "dry_run": True}, role="operator")
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["dry_run"] is True and result["counts"]["checked"] == 1
    assert result["target"]["base_url"] == setting.sandbox.url
    (one,) = result["results"]
    assert one["message_id"] == message and one["new_message_id"] is None
    assert any(call.startswith("POST ") and "/bulk" in call for call in one["calls"]), one["calls"]
    assert '"patientId": "M***"' in " ".join(one["calls"])  # the journey parameters, masked
    by_filter = api.post("/api/v1/replay", {"filter": {"status": "dead", "since": "1h"}, "dry_run": True},
                         role="operator").json()  # fmt: skip
    assert message in [r["message_id"] for r in by_filter["results"]]


def test_replay_is_audited_with_the_apis_channel_and_reason(setting: Setting) -> None:
    api = setting.api
    message, _ = setting.sent["API-2"]
    answer = api.post("/api/v1/replay", {"ids": [message], "reason": "journey fixed"}, role="operator")
    assert answer.status_code == 200, answer.text
    (one,) = answer.json()["results"]
    assert one["new_message_id"] and one["commands"] == 1, one
    entries = api.get("/api/v1/audit?action=replay", role="viewer").json()["entries"]
    assert any(e["ids"] == [message, one["new_message_id"]] and e["channel"] == "api" and e["actor"] == "operator"
               and e["reason"] == "journey fixed" for e in entries), entries  # fmt: skip
    replayed = api.get("/api/v1/messages?control_id=API-2", role="viewer").json()["messages"]
    assert one["new_message_id"] in [m["id"] for m in replayed]


def test_replay_input_is_checked(setting: Setting) -> None:
    api = setting.api
    cases = [({}, "ids"), ({"ids": [1], "filter": {"status": "dead"}}, "ids"), ({"filter": {"status": "all"}},
             "filter.status"), ({"filter": {"status": "dead", "colour": 1}}, "colour"), ({"ids": [999999]}, "ids")]  # fmt: skip
    for body, field in cases:
        answer = api.post("/api/v1/replay", {**body, "dry_run": True}, role="operator")
        assert answer.status_code in (400, 404) and answer.json()["field"] == field, (body, answer.text)


def test_dashboard_counts_the_messages_by_ack_code_with_the_services_state(setting: Setting) -> None:
    api = setting.api
    answer = api.get("/api/v1/dashboard?minutes=30", role="viewer")
    assert answer.status_code == 200, answer.text
    picture = answer.json()
    assert len(picture["per_minute"]) == 30 and picture["minutes"] == 30
    assert picture["window"]["counts"].get("AA", 0) >= len(setting.sent)
    assert picture["dead_letters"]["open"] >= 1 and picture["messages_logged"] >= len(setting.sent)
    assert picture["service"]["state"] in ("ok", "degraded", "failing") and "listeners" in picture["service"]
    assert api.get("/api/v1/dashboard?minutes=0", role="viewer").json()["field"] == "minutes"
    assert api.get("/api/v1/dashboard").status_code == 401
