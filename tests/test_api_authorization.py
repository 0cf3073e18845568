"""Who may call what, for every route of the one route table (``ROUTES`` and ``PAGES``), over real HTTP against
the real service: each role gets through exactly where its permission allows and 403 elsewhere, no credentials is
401 (a page: the login form), and a route added without being listed here fails. Also what a security officer and
an on-call operator look for around it: failed logins counted and logged without the password, error pages with
the navigation, static files cacheable and nothing else, no query string in the access log, and the request
edge cases (methods, sizes, encodings, framing, idle connections)."""

from __future__ import annotations

import re
import socket
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
    ("POST", "/api/v1/config-diff"): "admin",
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
    ("GET", "/config-diff"): "admin",
    ("POST", "/config-diff"): "admin",
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
        body = f'{{"name": "not-a-user", "password": "{WRONG_PASSWORD}"}}'.encode()
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
    assert "Strict-Transport-Security" not in css.headers, "plain http: no HSTS (the TLS console sends it)"
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


# ---- sessions: fixation, logout, CSRF rotation -----------------------------------------------------------------


def test_a_login_never_adopts_a_session_id_the_browser_brought(api: Api) -> None:
    planted = "attacker-chosen-session-id-0123456789"
    session = requests.Session()
    session.trust_env = False
    session.cookies.set("hb_session", planted)
    answer = session.post(f"{api.url}/login", data={"name": "operator", "password": PASSWORD}, allow_redirects=False,
                          timeout=30)  # fmt: skip
    assert answer.status_code == 303
    issued = answer.cookies.get("hb_session")
    assert issued and issued != planted
    fixed = api.get("/api/v1/session", headers={"Cookie": f"hb_session={planted}"})
    assert fixed.status_code == 401


def test_each_login_has_its_own_csrf_token_and_logout_clears_the_cookie(api: Api) -> None:
    first, one = api.login("operator")
    second, two = api.login("operator")
    assert one["csrf"] != two["csrf"]
    ended = api.call("DELETE", "/api/v1/session", session=first, headers={"X-CSRF-Token": one["csrf"]})
    assert ended.status_code == 204
    cookie = ended.headers["Set-Cookie"]
    assert cookie.startswith("hb_session=;") and "Max-Age=0" in cookie and "HttpOnly" in cookie
    assert api.get("/api/v1/session", session=first).status_code == 401
    assert api.get("/api/v1/session", session=second).status_code == 200, "the other session lives on"


# ---- the request's edges ---------------------------------------------------------------------------------------


def test_the_user_removal_asks_first(api: Api) -> None:
    from hl7bridge.store import open_engine
    from hl7bridge.workflow import accounts

    engine = open_engine(api.service.url, create=False)
    try:
        accounts.add_user(engine, "leaving", "viewer", PASSWORD, actor="test")
        browser = _browser(api, "admin")
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get(f"{api.url}/users", timeout=30).text)
        assert csrf
        asked = browser.post(f"{api.url}/users/leaving/remove", data={"csrf": csrf.group(1)}, timeout=30)
        assert asked.status_code == 200 and "Remove leaving?" in asked.text and 'name="confirm"' in asked.text
        assert "leaving" in [u.name for u in accounts.list_users(engine)]
        done = browser.post(f"{api.url}/users/leaving/remove", data={"csrf": csrf.group(1), "confirm": "yes"},
                            timeout=30)  # fmt: skip
        assert done.status_code == 200 and "Removed leaving" in done.text
        assert "leaving" not in [u.name for u in accounts.list_users(engine)]
    finally:
        engine.dispose()


def test_the_settings_view_for_an_admin(api: Api) -> None:
    answer = api.get("/api/v1/settings", role="admin")
    assert answer.status_code == 200, answer.text
    shown = answer.json()
    assert shown["console"]["listen"] == f"tcp:{api.port}:interface=127.0.0.1"
    assert shown["sandbox"]["control_token"] in ("", "[redacted]")
    page = _browser(api, "admin").get(f"{api.url}/settings", timeout=30)
    assert page.status_code == 200 and 'id="settings-listeners"' in page.text and 'href="/settings"' in page.text
    assert 'href="/settings"' not in _browser(api, "operator").get(f"{api.url}/", timeout=30).text


def test_head_and_options(api: Api) -> None:
    head = api.call("HEAD", "/api/v1/status", role="viewer")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["Content-Length"]) > 0
    options = api.call("OPTIONS", "/api/v1/status", role="viewer")
    assert options.status_code == 405 and options.headers["Allow"] == "GET"


def test_json_bodies_that_are_not_plain_objects_are_400(api: Api) -> None:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api.tokens['operator']}"}
    for body in (b"[" * 30_000 + b"]" * 30_000, b'{"ids": [1], "ids": [2], "reason": "x"}', b"\xff\xfe{}",
                 b'{"reason": "\xe9t\xe9"}'):  # fmt: skip
        status, _, answer = api.raw("POST", "/api/v1/dead-letters/discard", body, headers)
        assert status == 400, (body[:40], status, answer[:200])


def test_many_query_fields_or_a_huge_request_line_are_refused_plainly(api: Api) -> None:
    many = "&".join(f"f{i}=1" for i in range(150))
    answer = api.get(f"/api/v1/messages?{many}", role="viewer")
    assert answer.status_code == 400 and "UTF-8" not in answer.json()["error"], answer.text
    # Past Twisted's line limit (16 KiB) the connection is closed unread: nothing is buffered or parsed.
    with pytest.raises(ConnectionError):
        api.raw(
            "GET", "/api/v1/messages?text=" + "x" * 70_000, headers={"Authorization": f"Bearer {api.tokens['viewer']}"}
        )
    assert api.get("/api/v1/status", role="viewer").status_code == 200


def test_content_length_with_chunked_is_refused(api: Api) -> None:
    request = (b"POST /api/v1/session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/v1/openapi.json HTTP/1.1\r\n"
               b"Host: 127.0.0.1\r\n\r\n")  # fmt: skip
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1, "nothing smuggled behind it was answered"


@pytest.mark.parametrize("target", ["/\t/evil.example/", "/\n/evil.example", "/\r\n/evil.example", " //evil.example",
                                    "/\x0b/evil.example", "//evil.example", "https://evil.example/"])  # fmt: skip
def test_after_login_the_browser_stays_on_this_site(api: Api, target: str) -> None:
    answer = api.call("POST", "/login", data={"name": "viewer", "password": PASSWORD, "next": target})
    assert answer.status_code == 303 and answer.headers["Location"] == "/", repr(target)
    kept = api.call("POST", "/login", data={"name": "viewer", "password": PASSWORD, "next": "/audit?before=5"})
    assert kept.headers["Location"] == "/audit?before=5"


@pytest.mark.parametrize(("fetch_site", "refused"), [(None, True), ("cross-site", True), ("same-site", True),
                                                     ("none", True), ("same-origin", False)])  # fmt: skip
def test_origin_null_is_accepted_only_from_this_sites_own_page(api: Api, fetch_site: str | None, refused: bool) -> None:
    """A sandboxed iframe or a data: page sends ``Origin: null`` too; only ``Sec-Fetch-Site: same-origin`` (which no
    page's script can set) tells this site's own form apart."""
    headers = {"Origin": "null", "Content-Type": "application/x-www-form-urlencoded"}
    if fetch_site is not None:
        headers["Sec-Fetch-Site"] = fetch_site
    status, answer_headers, _ = api.raw("POST", "/login", b"name=viewer&password=" + PASSWORD.replace(" ", "+").encode(),
                                        headers)  # fmt: skip
    assert (status == 403) is refused, (fetch_site, status)
    assert refused or (status == 303 and "hb_session=" in answer_headers.get("Set-Cookie", ""))
