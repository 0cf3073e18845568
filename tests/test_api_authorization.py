"""Who may call what, for every route of the one route table (``ROUTES`` and ``PAGES``), over real HTTP against
the real service: each role gets through exactly where its permission allows and 403 elsewhere, no credentials is
401 (a page: the login form), and a route added without being listed here fails. Also what a security officer and
an on-call operator look for around it: failed logins counted and logged without the password, error pages with
the navigation, static files cacheable and nothing else, no query string in the access log, and the request
edge cases (methods, sizes, encodings, framing, idle connections)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import requests

from hl7bridge.api.console.pages import PAGES
from hl7bridge.api.routes import Route
from hl7bridge.api.v1 import ROUTES

from .api_support import PASSWORD, Api, start_api
from .conftest import free_port

#: Every route and the permission it needs ("-": none; "session": a logged-in session, any role). A route missing
#: here, or needing something else, fails ``test_every_route_is_listed_with_its_permission``.
EXPECTED = {
    ("POST", "/api/v1/session"): "-",
    ("GET", "/api/v1/session"): "read",
    ("DELETE", "/api/v1/session"): "session",
    ("GET", "/api/v1/messages"): "read",
    ("GET", "/api/v1/messages/{id}"): "read",
    ("POST", "/api/v1/messages/{id}/unmask"): "unmask",
    ("GET", "/api/v1/dead-letters"): "read",
    ("POST", "/api/v1/dead-letters/retry"): "act",
    ("POST", "/api/v1/dead-letters/discard"): "act",
    ("POST", "/api/v1/replay"): "act",
    ("GET", "/api/v1/stats"): "read",
    ("GET", "/api/v1/status"): "read",
    ("GET", "/api/v1/dashboard"): "read",
    ("GET", "/api/v1/audit"): "read",
    ("GET", "/api/v1/users"): "admin",
    ("POST", "/api/v1/users"): "admin",
    ("DELETE", "/api/v1/users/{name}"): "admin",
    ("POST", "/api/v1/users/{name}/tokens"): "admin",
    ("GET", "/api/v1/settings"): "admin",
    ("GET", "/api/v1/openapi.json"): "-",
    ("GET", "/login"): "-",
    ("POST", "/login"): "-",
    ("POST", "/logout"): "session",
    ("GET", "/"): "read",
    ("GET", "/messages"): "read",
    ("GET", "/messages/{id}"): "read",
    ("POST", "/messages/{id}/unmask"): "unmask",
    ("GET", "/dead-letters"): "read",
    ("POST", "/dead-letters/preview"): "act",
    ("POST", "/dead-letters/retry"): "act",
    ("POST", "/dead-letters/discard"): "act",
    ("GET", "/audit"): "read",
    ("GET", "/users"): "admin",
    ("POST", "/users"): "admin",
    ("POST", "/users/{name}/remove"): "admin",
    ("POST", "/users/{name}/token"): "admin",
    ("GET", "/settings"): "admin",
}
GRANTS = {"viewer": {"read"}, "operator": {"read", "unmask", "act"}, "admin": {"read", "unmask", "act", "admin"}}
ALL = [*ROUTES, *PAGES]


def _needs(route: Route) -> str:
    if route.permission is not None:
        return route.permission.value
    return "session" if route.session_only else "-"


def test_every_route_is_listed_with_its_permission() -> None:
    actual = {(r.method, r.path): _needs(r) for r in ALL}
    assert actual == EXPECTED


#: Typed as a password in failed logins, and as a patient id in a search: neither may reach the service's log.
WRONG_PASSWORD = "not-the-password-but-a-secret-3e9f"
PATIENT_ID = "MRN-QUERY-5521"
#: The peer the failed logins come from (the limiter counts per peer; the other tests log in from 127.0.0.1).
ATTACKER = "127.0.0.23"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The service at ``log_level = "debug"`` (Twisted's access log shows), with a burst of failed logins from
    one peer and a search by patient id behind it; its log is checked when the module ends."""
    health = free_port()
    config = f'[service]\nlog_level = "debug"\n\n[health]\nlisten = "tcp:{health}:interface=127.0.0.1"\n'
    running = start_api(tmp_path_factory.mktemp("authz"), config)
    running.health_port = health  # type: ignore[attr-defined]
    try:
        body = f'{{"name": "admin", "password": "{WRONG_PASSWORD}"}}'.encode()
        answers = [running.raw("POST", "/api/v1/session", body, {"Content-Type": "application/json"}, ATTACKER)[0]
                   for _ in range(6)]  # fmt: skip
        assert answers == [401] * 5 + [429]
        assert running.get(f"/api/v1/messages?patient={PATIENT_ID}", role="viewer").status_code == 200
        yield running
    finally:
        logged = running.service.stop()
    assert "login failed from 127.0.0.23: wrong name or password (api)" in logged
    assert logged.count("login failed from 127.0.0.23") == 1, "one line a minute per peer, with the count"
    assert "login refused from 127.0.0.23: too many failed logins" in logged
    assert '"GET /api/v1/messages?…" 200' in logged, "the access log shows (debug), without the query"
    assert WRONG_PASSWORD not in logged and PATIENT_ID not in logged


def _concrete(path: str) -> str:
    # A message and a user that do not exist: the handler answers 404/400 once the permission let it run.
    return path.replace("{id}", "999999").replace("{name}", "nobody-here")


def _send(api: Api, route: Route, role: str | None) -> requests.Response:
    path = _concrete(route.path)
    if route.kind == "api" and route.method in ("POST", "DELETE"):
        return api.call(route.method, path, role=role, json={})
    if route.method == "POST":
        return api.call("POST", path, role=role, data={})
    return api.call(route.method, path, role=role)


@pytest.mark.parametrize("route", ALL, ids=lambda r: f"{r.method} {r.path}")
def test_each_role_gets_exactly_what_its_permission_allows(api: Api, route: Route) -> None:
    needs = EXPECTED[(route.method, route.path)]
    for role, granted in GRANTS.items():
        answer = _send(api, route, role)
        if needs == "session":
            # A bearer token is no session: refused as bad input, never run (a 500 here was /logout's assert).
            assert answer.status_code == 400, (role, answer.status_code, answer.text[:200])
        elif needs == "-" or needs in granted:
            assert answer.status_code not in (401, 403) and answer.status_code < 500, (role, answer.status_code,
                                                                                       answer.text[:300])  # fmt: skip
        else:
            assert answer.status_code == 403, (role, answer.status_code, answer.text[:200])
            assert f"'{needs}'" in answer.text or f"&#39;{needs}&#39;" in answer.text


@pytest.mark.parametrize("route", [r for r in ALL if _needs(r) != "-"], ids=lambda r: f"{r.method} {r.path}")
def test_without_credentials_nothing_runs(api: Api, route: Route) -> None:
    answer = _send(api, route, None)
    if route.kind == "page":
        assert answer.status_code == 303 and answer.headers["Location"].startswith("/login")
    else:
        assert answer.status_code == 401


# ---- error pages, static files ---------------------------------------------------------------------------------


def _browser(api: Api, name: str) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    answer = session.post(f"{api.url}/login", data={"name": name, "password": PASSWORD}, allow_redirects=False,
                          timeout=30)  # fmt: skip
    assert answer.status_code == 303, answer.text
    return session


def test_a_refused_page_keeps_the_navigation_and_the_logout_form(api: Api) -> None:
    browser = _browser(api, "viewer")
    refused = browser.get(f"{api.url}/users", timeout=30)
    assert refused.status_code == 403 and "&#39;admin&#39;" in refused.text
    assert 'aria-label="Pages"' in refused.text and 'id="logout"' in refused.text
    csrf = re.search(r'name="csrf" value="([^"]+)"', refused.text)
    assert csrf and csrf.group(1)
    # A post without the CSRF token: refused, on a page that still lets the viewer go on (or log out).
    forged = browser.post(f"{api.url}/dead-letters/retry", data={"ids": "1"}, timeout=30)
    assert forged.status_code == 403 and "CSRF" in forged.text and 'aria-label="Pages"' in forged.text


def test_static_files_are_cacheable_and_nothing_else_is(api: Api) -> None:
    css = api.get("/static/console.css")
    assert css.status_code == 200 and css.headers["Cache-Control"] == "public, max-age=3600"
    assert css.headers["X-Content-Type-Options"] == "nosniff"
    assert api.get("/login").headers["Cache-Control"] == "no-store"
    assert api.get("/api/v1/status", role="viewer").headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("path", ["/static/../pyproject.toml", "/static/%2e%2e/templates/base.html",
                                  "/static/..%2fpages.py", "/static/%2e%2e%2f%2e%2e%2fpages.py", "/static/"])  # fmt: skip
def test_static_never_leaves_its_directory(api: Api, path: str) -> None:
    status, _, body = api.raw("GET", path)
    assert status in (403, 404), (path, status)
    assert b"{% extends" not in body and b"import" not in body


# ---- failed logins -----------------------------------------------------------------------------------------------


def _metric(api: Api, result: str) -> float:
    text = requests.get(f"http://127.0.0.1:{api.health_port}/metrics", timeout=10).text  # type: ignore[attr-defined]
    found = re.search(rf'^hl7bridge_console_logins_total{{result="{result}"}} (\S+)$', text, re.M)
    assert found, text[-2000:]
    return float(found.group(1))


def test_failed_logins_are_counted_by_result(api: Api) -> None:
    assert _metric(api, "failed") == 5 and _metric(api, "throttled") == 1
    before = _metric(api, "ok")
    api.login("viewer")
    assert _metric(api, "ok") == before + 1
