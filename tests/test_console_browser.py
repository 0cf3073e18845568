"""The console in a real headless Chromium against the real service (its own process, its console listener on
loopback) dispatching to a real sandbox process: an operator logs in, searches by appointment, opens a
timeline, unmasks it with a reason, discards a dead letter with a reason after its dry run, and finds both in
the audit log; a viewer sees no action and is refused when posting one anyway; logging out ends the session.

The dead letters are real: the sandbox's "reminders" journey lacks the phoneNumber parameter, so the API
answers the bookings 400. ``HL7BRIDGE_SCREENSHOTS=1`` saves each page to ``docs/console/<page>.png``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from hl7bridge.core.status import Role
from hl7bridge.store import audit, open_engine
from hl7bridge.workflow import accounts

from .browser import chromium, screenshot
from .conftest import RunningSandbox, RunningService, free_port, start_sandbox, start_service, wait_until
from .dispatch_support import SANDBOX_TOML, TOKEN, future, service_toml, settled, siu

__all__ = ["chromium"]

PASSWORD = "correct horse battery"
BROKEN_SANDBOX = SANDBOX_TOML.replace(
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime", "phoneNumber"]',
    'parameters = ["patientId", "patientName", "appointmentId", "appointmentDateTime"]',
)
START = future(days=20, hour=10)


@dataclass
class Console:
    service: RunningService
    sandbox: RunningSandbox
    port: int
    #: Control id -> command id of the dead letters made at start.
    dead: dict[str, int]
    #: Control id -> message id.
    messages: dict[str, int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def user_add(service: RunningService, name: str, role: str) -> None:
    accounts.add_user(open_engine(service.url, create=False), name, Role(role), PASSWORD, actor="test")


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    assert BROKEN_SANDBOX != SANDBOX_TOML
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"), BROKEN_SANDBOX)
    port = free_port()
    extra = f'\n[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
    service = start_service(tmp_path_factory.mktemp("console"), service_toml(sandbox.url) + extra, env=TOKEN)
    try:
        dead: dict[str, int] = {}
        messages: dict[str, int] = {}
        for n in range(1, 4):
            control = f"CON-{n}"
            assert (
                service.request(siu("S12", control, f"A-CON-{n}", START, family="LOVELACE", given="ADA")).count(
                    b"MSA|AA|"
                )
                == 1
            )
            (command,) = settled(service, control)
            assert command["status"] == "dead", command
            dead[control] = command["id"]
            messages[control] = command["message_id"]
        # An AE for the chart and the browser: a booking without its start time.
        assert b"MSA|AE|" in service.request(siu("S12", "CON-AE", "A-CON-AE", None))
        for name, role in (("olivia", "operator"), ("victor", "viewer"), ("ada", "admin")):
            user_add(service, name, role)
        yield Console(service, sandbox, port, dead, messages)
    finally:
        service.stop()
        sandbox.stop()


def wait(driver: WebDriver, css: str, timeout: float = 15.0):
    return WebDriverWait(driver, timeout).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))


def log_in(driver: WebDriver, console: Console, name: str, then: str | None = "/") -> None:
    if then is not None:
        driver.get(console.url + then)
    wait(driver, "#login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(PASSWORD)
    driver.find_element(By.ID, "login").click()
    wait(driver, "#logout")


def text(driver: WebDriver) -> str:
    return driver.find_element(By.TAG_NAME, "main").text


def entries(console: Console, action: str) -> list[audit.AuditEntry]:
    return audit.entries(open_engine(console.service.url, create=False), action=action)


def leading(console: Console, driver: WebDriver) -> list[dict] | None:
    """The service's instances as its status shows them (with the browser's session), once its one instance leads."""
    cookie = driver.get_cookie("hb_session")
    assert cookie is not None
    status = requests.get(console.url + "/api/v1/status", cookies={"hb_session": cookie["value"]}, timeout=10)
    instances = status.json()["instances"]
    return instances if [i["role"] for i in instances] == ["leader"] else None


def test_an_operator_searches_unmasks_with_a_reason_discards_and_finds_it_audited(
    console: Console, chromium: WebDriver
) -> None:
    driver = chromium
    log_in(driver, console, "olivia", then="/messages")
    assert driver.current_url.endswith("/messages"), "after logging in, the page first asked for"
    # Nothing is loaded before the form is submitted, though the log holds messages.
    assert "Nothing is loaded until you search" in text(driver)
    assert not driver.find_elements(By.ID, "results")
    screenshot(driver, "messages")

    driver.find_element(By.NAME, "appointment").send_keys("A-CON-2")
    driver.find_element(By.ID, "search").click()
    table = wait(driver, "#results")
    rows = table.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1 and "CON-2" in rows[0].text, table.text
    screenshot(driver, "messages-found")

    rows[0].find_element(By.CSS_SELECTOR, "a").click()
    wait(driver, "#masked")
    page = text(driver)
    assert "LOVELACE" not in page and "ADA" not in page.replace("ADA^", ""), "patient data is masked by default"
    assert "A-CON-2" in page
    # Times are shown in the viewer's zone by console.js (the UTC text is kept as the title).
    stamp = driver.find_element(By.CSS_SELECTOR, "time[datetime]")
    assert stamp.get_attribute("title").endswith("UTC") and stamp.text != stamp.get_attribute("title")
    screenshot(driver, "message")

    # The reason is required: the browser will not submit an empty one, and the server refuses a blank one.
    driver.find_element(By.ID, "unmask").click()
    assert driver.find_elements(By.ID, "masked"), "an empty reason must not unmask"
    driver.find_element(By.ID, "reason").send_keys("ticket INC-77: the engine says the name is wrong")
    driver.find_element(By.ID, "unmask").click()
    wait(driver, "#unmasked")
    assert "LOVELACE" in text(driver)
    screenshot(driver, "message-unmasked")
    (unmask,) = entries(console, "unmask")
    assert unmask.actor == "olivia" and unmask.channel == "console"
    assert unmask.reason == "ticket INC-77: the engine says the name is wrong"
    # The unmasked view was that response only: the page itself is masked again.
    driver.get(driver.current_url.removesuffix("/unmask"))
    wait(driver, "#masked")
    assert "LOVELACE" not in text(driver)

    # A dead letter: the dry run first, then the discard with its reason.
    driver.get(console.url + "/dead-letters")
    wait(driver, "#dead-letters")
    screenshot(driver, "dead-letters")
    one = console.dead["CON-1"]
    driver.find_element(By.ID, f"discard-{one}").click()
    assert "1 would be discarded" in wait(driver, "#dry-run").text
    screenshot(driver, "dead-letters-confirm")
    driver.find_element(By.ID, "reason").send_keys("duplicate booking, the clinic called the patient")
    driver.find_element(By.ID, "confirm").click()
    wait(driver, ".notice-ok")
    assert "Discarded 1 dead letter" in text(driver)
    assert not driver.find_elements(By.ID, f"dl-{one}")
    (discard,) = entries(console, "discard")
    assert discard.ids == (one,) and discard.actor == "olivia" and discard.channel == "console"
    assert discard.reason == "duplicate booking, the clinic called the patient"

    # The bulk action on the filter shows its count before anything changes.
    driver.find_element(By.ID, "retry-all").click()
    assert "2 would be queued again" in wait(driver, "#dry-run").text
    assert not entries(console, "retry"), "a dry run changes nothing"

    driver.get(console.url + "/audit")
    audit_table = wait(driver, "#audit").text
    assert "unmask" in audit_table and "ticket INC-77" in audit_table
    assert "discard" in audit_table and "duplicate booking" in audit_table
    screenshot(driver, "audit")

    # The service reads the instances on its health probe's timer: wait until it has seen its dispatcher lead.
    (instance,) = wait_until(lambda: leading(console, driver), timeout=30, message="the instance to show as leader")
    driver.get(console.url + "/")
    wait(driver, "#chart")
    assert driver.find_element(By.ID, "dead").text == "2"
    tables = driver.find_elements(By.ID, "instances")
    assert tables, "the dashboard lists the instances on the log"
    (row,) = tables[0].find_elements(By.CSS_SELECTOR, "tbody tr")
    cells = [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
    assert cells[0] == f"{instance['name']} this instance" and cells[2] == "leader", cells
    screenshot(driver, "dashboard", whole_page=True)

    driver.find_element(By.ID, "logout").click()
    wait(driver, "#login")
    assert [e.channel for e in entries(console, "logout") if e.actor == "olivia"] == ["console"]
    assert {e.channel for e in entries(console, "login") if e.actor == "olivia"} == {"console"}
    driver.get(console.url + "/dead-letters")
    wait(driver, "#login")
    assert "/login" in driver.current_url, "after logging out the pages ask to log in again"


def test_a_viewer_sees_no_actions_and_is_refused_when_posting_one(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    log_in(driver, console, "victor", then="/dead-letters")
    wait(driver, "#dead-letters")
    assert not driver.find_elements(By.CSS_SELECTOR, "button[name=action]"), "a viewer gets no action buttons"
    assert not driver.find_elements(By.CSS_SELECTOR, "input[type=checkbox]")
    nav = [a.text.lower() for a in driver.find_elements(By.CSS_SELECTOR, "nav a")]
    assert "dead letters" in nav and "users" not in nav, nav
    driver.get(console.url + "/users")
    assert "Not allowed" in driver.find_element(By.TAG_NAME, "h1").text
    # The timeline offers no unmask to a viewer.
    driver.get(console.url + "/messages?search=1&control_id=CON-3")
    wait(driver, "#results").find_element(By.CSS_SELECTOR, "a").click()
    wait(driver, "#masked")
    assert not driver.find_elements(By.ID, "unmask-form")

    # Posting anyway, with the viewer's own session and CSRF token: 403, and nothing changed.
    cookie = driver.get_cookie("hb_session")
    assert cookie is not None and cookie["httpOnly"] and cookie.get("sameSite") == "Strict"
    driver.get(console.url + "/")
    csrf = driver.find_element(By.CSS_SELECTOR, "input[name=csrf]").get_attribute("value")
    two = console.dead["CON-2"]
    answer = requests.post(console.url + "/dead-letters/discard", data={"csrf": csrf, "ids": str(two), "reason": "x"},
                           cookies={"hb_session": cookie["value"]}, allow_redirects=False, timeout=10)  # fmt: skip
    assert answer.status_code == 403, answer.text
    assert all(two not in e.ids for e in entries(console, "discard"))
    message_id = console.messages["CON-3"]
    answer = requests.post(f"{console.url}/messages/{message_id}/unmask", data={"csrf": csrf, "reason": "curious"},
                           cookies={"hb_session": cookie["value"]}, allow_redirects=False, timeout=10)  # fmt: skip
    assert answer.status_code == 403 and "LOVELACE" not in answer.text
    assert all(e.actor != "victor" for e in entries(console, "unmask"))


def test_keyboard_shortcuts_move_between_pages_and_focus_the_search(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    log_in(driver, console, "victor", then="/")
    wait(driver, "#chart")
    body = driver.find_element(By.TAG_NAME, "body")
    body.send_keys("g")
    body.send_keys("m")
    WebDriverWait(driver, 10).until(lambda d: d.current_url.endswith("/messages"))
    wait(driver, "[data-search]")
    driver.find_element(By.TAG_NAME, "body").send_keys("/")
    assert driver.switch_to.active_element.get_attribute("name") == "appointment"
    driver.switch_to.active_element.send_keys("A-CON-3\n")
    wait(driver, "#results")
    driver.find_element(By.TAG_NAME, "body").send_keys("j")
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
    wait(driver, "#masked")
    assert re.search(r"/messages/\d+$", driver.current_url)


def test_an_admin_adds_a_user_and_issues_a_token_shown_once(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    log_in(driver, console, "ada", then="/users")
    form = wait(driver, "#add-user")
    form.find_element(By.NAME, "name").send_keys("nora")
    form.find_element(By.NAME, "password").send_keys(PASSWORD)
    form.find_element(By.CSS_SELECTOR, "button").click()
    wait(driver, ".notice-ok")
    assert "nora" in driver.find_element(By.ID, "users").text
    row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#users tbody tr") if r.text.startswith("nora"))
    row.find_element(By.NAME, "label").send_keys("script")
    row.find_element(By.XPATH, ".//button[text()='Issue token']").click()
    token = wait(driver, "#token").text
    assert re.fullmatch(r"hb_\S{20,}", token), token
    screenshot(driver, "users")
    # The token works for the JSON API, and is not on the page any more once it is reloaded.
    answer = requests.get(console.url + "/api/v1/session", headers={"Authorization": f"Bearer {token}"}, timeout=10)
    assert answer.status_code == 200 and answer.json()["name"] == "nora"
    driver.get(console.url + "/users")
    assert token not in driver.page_source


def test_an_admin_sees_the_settings_with_secrets_redacted(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    log_in(driver, console, "ada", then="/")
    driver.find_element(By.CSS_SELECTOR, "nav a[href='/settings']").click()
    listeners = wait(driver, "#settings-listeners")
    assert "endpoint" in listeners.text and wait(driver, "#settings-console").text
    screenshot(driver, "settings")


def test_an_admin_diffs_a_new_configuration_against_the_running_one(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    running = console.service.config.read_text(encoding="utf-8")
    rule = 'template = "{PID-5.2} {PID-5.1}"'
    assert running.count(rule) == 1
    (console.service.workdir / "renamed.toml").write_text(running.replace(rule, 'template = "{PID-5.1}, {PID-5.2}"'))
    log_in(driver, console, "ada", then="/config-diff")
    form = wait(driver, "#config-diff-form")
    form.find_element(By.NAME, "path").send_keys("renamed.toml")
    since = form.find_element(By.NAME, "since")
    since.clear()
    since.send_keys("1d")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait(driver, "#config-diff-report, .notice-error")
    assert not driver.find_elements(By.CSS_SELECTOR, ".notice-error"), text(driver)
    report = driver.find_element(By.ID, "config-diff-report").text
    assert "would be handled differently" in report and "parameter values masked" in report
    rows = driver.find_element(By.ID, "config-diff-parameter").text
    assert "patientName" in rows and "LOVELACE" not in driver.page_source and "A***" in rows
    screenshot(driver, "config-diff")


def test_the_login_page(console: Console, chromium: WebDriver) -> None:
    driver = chromium
    driver.get(console.url + "/")
    wait(driver, "#login")
    screenshot(driver, "login")
    driver.find_element(By.ID, "name").send_keys("olivia")
    driver.find_element(By.ID, "password").send_keys("not the password")
    driver.find_element(By.ID, "login").click()
    assert "Wrong name or password" in wait(driver, ".notice-error").text
    assert driver.get_cookie("hb_session") is None


def pages_of(console: Console) -> list[str]:
    return ["/", "/messages", "/messages?search=1", "/dead-letters", "/audit", "/users", "/settings", "/login"]


def session_for(console: Console, name: str) -> requests.Session:
    http = requests.Session()
    answer = http.post(console.url + "/login", data={"name": name, "password": PASSWORD}, allow_redirects=False,
                       timeout=10)  # fmt: skip
    assert answer.status_code == 303, answer.text
    return http


def test_every_page_is_no_store_and_every_form_carries_the_csrf_token(console: Console) -> None:
    http = session_for(console, "ada")
    for path in pages_of(console):
        answer = http.get(console.url + path, allow_redirects=False, timeout=10)
        assert answer.status_code in (200, 303), (path, answer.status_code)
        assert answer.headers["Cache-Control"] == "no-store", path
        assert "default-src 'self'" in answer.headers["Content-Security-Policy"], path
        for form in re.findall(r"<form[^>]*method=\"post\".*?</form>", answer.text, re.S):
            if 'action="/login"' not in form:
                assert 'name="csrf"' in form, (path, form[:200])
        assert "<script>" not in answer.text and " style=" not in answer.text, "CSP allows no inline script or style"


def test_the_message_browser_pages_by_keyset_without_gaps_or_repeats(console: Console) -> None:
    with console.service.client() as client:
        for n in range(55):
            assert b"MSA|AE|" in client.request(siu("S12", f"PAGE-{n}", f"A-PAGE-{n}", None))
    http = session_for(console, "victor")
    url, seen, pages = console.url + "/messages?search=1&event=S12", [], 0
    while url and pages < 5:
        page = http.get(url, timeout=10).text
        seen += [int(i) for i in re.findall(r'<td class="num"><a href="/messages/(\d+)">', page)]
        older = re.search(r'id="older" href="([^"]+)"', page)
        url = console.url + older[1].replace("&amp;", "&") if older else ""
        pages += 1
    assert pages == 2 and len(seen) == len(set(seen)) == 59, (pages, len(seen))
    assert seen == sorted(seen, reverse=True), "newest first across pages"


def test_a_post_without_the_csrf_token_is_refused(console: Console) -> None:
    http = session_for(console, "olivia")
    two = console.dead["CON-2"]
    answer = http.post(console.url + "/dead-letters/discard", data={"ids": str(two), "reason": "no token"},
                       allow_redirects=False, timeout=10)  # fmt: skip
    assert answer.status_code == 403 and "CSRF" in answer.text
    assert all(two not in e.ids for e in entries(console, "discard"))


def test_a_page_bookmarked_after_the_session_ended_leads_to_the_login_form(
    console: Console, chromium: WebDriver
) -> None:
    driver = chromium
    driver.get(console.url + "/static/console.css")
    driver.add_cookie({"name": "hb_session", "value": "ended-long-ago", "path": "/"})
    driver.get(console.url + "/audit")
    wait(driver, "#login")
    assert driver.current_url.endswith("/login?next=%2Faudit"), "no redirect loop: the login form, then the page"
    assert driver.get_cookie("hb_session") is None, "the ended session's cookie is cleared"
    log_in(driver, console, "victor", then=None)
    assert driver.current_url.endswith("/audit")


def test_a_login_never_sends_the_browser_to_another_site(console: Console) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example"):
        answer = requests.post(console.url + "/login", data={"name": "ada", "password": PASSWORD, "next": target},
                               allow_redirects=False, timeout=10)  # fmt: skip
        assert answer.status_code == 303 and answer.headers["Location"] == "/", target


def test_a_form_posted_from_another_site_is_refused(console: Console) -> None:
    """Under Referrer-Policy no-referrer Chromium posts the console's own forms with ``Origin: null``; that is
    accepted only when the browser's ``Sec-Fetch-Site`` says the form was this site's (not a sandboxed page's)."""
    for headers in ({"Origin": "null", "Sec-Fetch-Site": "cross-site"}, {"Origin": "null"},
                    {"Origin": "http://evil.example"}):  # fmt: skip
        answer = requests.post(console.url + "/login", data={"name": "ada", "password": PASSWORD}, headers=headers,
                               allow_redirects=False, timeout=10)  # fmt: skip
        assert answer.status_code == 403 and "hb_session" not in answer.headers.get("Set-Cookie", ""), headers


def test_the_dashboard_shows_dispatch_paused_with_its_reason(tmp_path_factory: pytest.TempPathFactory) -> None:
    sandbox = start_sandbox(tmp_path_factory.mktemp("sandbox"), SANDBOX_TOML)
    port = free_port()
    extra = f'\n[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'
    service = start_service(tmp_path_factory.mktemp("paused"), service_toml(sandbox.url) + extra,
                            env={"TEST_API_TOKEN": "a-revoked-token"})  # fmt: skip
    try:
        user_add(service, "victor", "viewer")
        assert b"MSA|AA|" in service.request(siu("S12", "PAUSE-1", "A-PAUSE-1", START))
        http = session_for(Console(service, sandbox, port, {}, {}), "victor")

        def paused() -> str | None:
            page = http.get(f"http://127.0.0.1:{port}/", timeout=10).text
            return page if 'id="dispatch">paused<' in page else None

        page = wait_until(paused, message="the dashboard to show dispatch paused")
        assert "401" in page and "failing" in page
        assert re.search(r'id="outbox">1<', page), "the booking waits in the outbox"
    finally:
        service.stop()
        sandbox.stop()


# Last in the module: it throttles logins from 127.0.0.1 for 15 minutes.
def test_failed_logins_are_throttled_on_the_login_page(console: Console) -> None:
    refused = []
    for _ in range(6):  # the login page test failed once already from this peer
        answer = requests.post(console.url + "/login", data={"name": "victor", "password": "wrong password!"},
                               allow_redirects=False, timeout=10)  # fmt: skip
        refused.append(answer.status_code)
        if answer.status_code == 429:
            break
    assert refused[0] == 401 and refused[-1] == 429, refused
    answer = requests.post(console.url + "/login", data={"name": "victor", "password": PASSWORD},
                           allow_redirects=False, timeout=10)  # fmt: skip
    assert answer.status_code == 429 and int(answer.headers["Retry-After"]) > 0, "even the right password waits"
    assert "Too many failed logins" in answer.text and "hb_session" not in answer.headers.get("Set-Cookie", "")
