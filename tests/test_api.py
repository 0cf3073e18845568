"""The JSON API over real HTTP against the real service: who may call what (401 without credentials, 403 without
the permission), the session cookie and its CSRF token, the same-origin check, login throttling, bounded bodies,
the security headers on every answer, and the OpenAPI document generated from the route table."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests
from openapi_spec_validator import validate

from .api_support import PASSWORD, SECURITY_HEADERS, Api, body_of, start_api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    running = start_api(tmp_path_factory.mktemp("api"), "")
    yield running
    for response in running.seen:
        missing = {k: v for k, v in SECURITY_HEADERS.items() if response.headers.get(k) != v}
        assert not missing, f"{response.request.method} {response.url} ({response.status_code}) lacks {missing}"
    running.service.stop()


# ---- authentication ------------------------------------------------------------------------------------------


def test_the_start_up_line_names_the_console(api: Api) -> None:
    assert f"console on http://127.0.0.1:{api.port}/" in api.service.banner


def test_without_credentials_is_401_naming_how_to_authenticate(api: Api) -> None:
    answer = api.get("/api/v1/status")
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert "Bearer" in body_of(answer)["error"]


def test_a_wrong_token_is_401_not_anonymous(api: Api) -> None:
    answer = api.get("/api/v1/status", headers={"Authorization": "Bearer hb_not-a-token"})
    assert answer.status_code == 401 and "not valid" in answer.json()["error"]
    answer = api.get("/api/v1/status", headers={"Authorization": "Basic dXNlcjpwdw=="})
    assert answer.status_code == 401


def test_status_with_a_viewers_token_is_the_services_status(api: Api) -> None:
    answer = api.get("/api/v1/status", role="viewer")
    assert answer.status_code == 200, answer.text
    status = answer.json()
    assert status["state"] in ("ok", "degraded", "failing")
    assert {"reasons", "listeners", "outbox", "dead_letters"} <= set(status)
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Content-Length"] == str(len(answer.content)) and answer.headers["Server"] == "hl7bridge"


def test_login_sets_a_strict_http_only_cookie_and_answers_the_csrf_token(api: Api) -> None:
    session, me = api.login("operator")
    assert me["name"] == "operator" and me["role"] == "operator" and len(me["csrf"]) >= 32
    (answer,) = [r for r in api.seen[-1:]]
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith("hb_session=")
    attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite"} <= attributes and "secure" not in attributes  # plain http here
    assert "SameSite=Strict" in cookie and "Path=/" in cookie
    who = api.get("/api/v1/session", session=session)
    assert who.status_code == 200 and who.json()["name"] == "operator" and who.json()["via"] == "session"
    assert who.json()["csrf"] == me["csrf"]
    assert api.get("/api/v1/status", session=session).status_code == 200


def test_a_wrong_password_is_401_and_says_nothing_of_which_part_was_wrong(api: Api) -> None:
    headers = {"Content-Type": "application/json"}
    # From a peer of its own: failures count per peer, and the other tests log in from 127.0.0.1.
    wrong = api.raw("POST", "/api/v1/session", b'{"name": "viewer", "password": "not the password"}', headers,
                    source="127.0.0.9")  # fmt: skip
    unknown = api.raw("POST", "/api/v1/session", b'{"name": "nobody-here", "password": "not the password"}',
                      headers, source="127.0.0.9")  # fmt: skip
    assert wrong[0] == unknown[0] == 401
    assert wrong[2] == unknown[2]
    assert "Set-Cookie" not in wrong[1]


def test_login_input_is_checked_naming_the_field(api: Api) -> None:
    answer = api.post("/api/v1/session", {"name": "viewer"})
    assert answer.status_code == 400 and answer.json()["field"] == "password"
    answer = api.post("/api/v1/session", {"name": "viewer", "password": PASSWORD, "admin": True})
    assert answer.status_code == 400 and answer.json()["field"] == "admin"
    answer = api.call("POST", "/api/v1/session", data=b"name=viewer", headers={"Content-Type": "text/plain"})
    assert answer.status_code == 415


# ---- CSRF and origin -----------------------------------------------------------------------------------------


def test_a_cookie_authenticated_state_change_without_the_csrf_token_is_403(api: Api) -> None:
    session, me = api.login("viewer")
    refused = api.call("DELETE", "/api/v1/session", session=session)
    assert refused.status_code == 403 and "CSRF" in refused.json()["error"]
    wrong = api.call("DELETE", "/api/v1/session", session=session, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    assert api.get("/api/v1/session", session=session).status_code == 200  # still logged in
    done = api.call("DELETE", "/api/v1/session", session=session, headers={"X-CSRF-Token": me["csrf"]})
    assert done.status_code == 204, done.text
    assert "Max-Age=0" in done.headers["Set-Cookie"]


def test_the_logged_out_session_cookie_no_longer_works(api: Api) -> None:
    session, me = api.login("viewer")
    secret = session.cookies["hb_session"]
    api.call("DELETE", "/api/v1/session", session=session, headers={"X-CSRF-Token": me["csrf"]})
    replayed = requests.Session()
    replayed.cookies.set("hb_session", secret)
    answer = api.get("/api/v1/status", session=replayed)
    assert answer.status_code == 401 and "ended" in answer.json()["error"]


def test_a_foreign_origin_is_refused_even_with_the_csrf_token(api: Api) -> None:
    session, me = api.login("viewer")
    answer = api.call("DELETE", "/api/v1/session", session=session,
                      headers={"X-CSRF-Token": me["csrf"], "Origin": "https://evil.example"})  # fmt: skip
    assert answer.status_code == 403 and "origin" in answer.json()["error"].lower()
    own = api.call("DELETE", "/api/v1/session", session=session,
                   headers={"X-CSRF-Token": me["csrf"], "Origin": api.url})  # fmt: skip
    assert own.status_code == 204


def test_a_bearer_request_needs_no_csrf_token(api: Api) -> None:
    token_call = api.call("DELETE", "/api/v1/session", role="viewer")
    # A bearer request has no session to end; it is not refused for want of a CSRF token.
    assert token_call.status_code == 400 and "bearer" in token_call.json()["error"]


# ---- throttling, bodies, routing -----------------------------------------------------------------------------


def test_failed_logins_are_throttled_with_retry_after(api: Api) -> None:
    source = "127.0.0.7"  # a peer of its own: the limiter also counts per peer
    body = b'{"name": "operator", "password": "a wrong password!"}'
    headers = {"Content-Type": "application/json"}
    for _ in range(5):
        status, _, _ = api.raw("POST", "/api/v1/session", body, headers, source=source)
        assert status == 401
    right = f'{{"name": "operator", "password": "{PASSWORD}"}}'.encode()
    status, answer_headers, content = api.raw("POST", "/api/v1/session", right, headers, source=source)
    assert status == 429, content
    assert 1 <= int(answer_headers["Retry-After"]) <= 900
    for name, value in SECURITY_HEADERS.items():
        assert answer_headers[name] == value


def test_a_body_over_64_kib_is_413(api: Api) -> None:
    big = b'{"name": "viewer", "password": "' + b"x" * (64 * 1024) + b'"}'
    answer = api.call("POST", "/api/v1/session", data=big, headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    under = b'{"name": "viewer", "password": "' + b"x" * 2000 + b'"}'
    answer = api.call("POST", "/api/v1/session", data=under, headers={"Content-Type": "application/json"})
    assert answer.status_code == 400  # read, and refused for its content (a password is at most 1024 characters)
    assert answer.json()["field"] == "password"


def test_unknown_paths_and_methods(api: Api) -> None:
    assert api.get("/api/v1/nothing-here", role="viewer").status_code == 404
    answer = api.call("PUT", "/api/v1/status", role="viewer")
    assert answer.status_code == 405 and answer.headers["Allow"] == "GET"


# ---- OpenAPI ------------------------------------------------------------------------------------------------


def test_openapi_document_is_valid_openapi_31_and_needs_no_credentials(api: Api) -> None:
    answer = api.get("/api/v1/openapi.json")
    assert answer.status_code == 200
    document = answer.json()
    validate(document)
    assert document["openapi"].startswith("3.1")
    status = document["paths"]["/api/v1/status"]["get"]
    assert status["x-permission"] == "read" and "401" in status["responses"]
    assert document["paths"]["/api/v1/openapi.json"]["get"]["security"] == []


def test_openapi_lists_every_route_of_the_table_with_its_permission(api: Api) -> None:
    from hl7bridge.api.v1 import ROUTES

    document = api.get("/api/v1/openapi.json").json()
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        expected = route.permission.value if route.permission is not None else None
        assert operation.get("x-permission", None if not route.session_only else "a session") in (expected, "a session")
        declared = {p["name"] for p in operation.get("parameters", [])}
        assert declared == {p.name for p in route.params if p.where in ("path", "query")}
