"""`config diff` over HTTP against the real service: `POST /api/v1/config-diff` and the console's `/config-diff`,
for admins only, comparing with the configuration the service runs; an upload up to 256 KiB (past the API's
64 KiB body limit, for these routes only), a path only inside the running configuration's directory, parameter
values masked unless unmasked with a reason, which is audited."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

import pytest

from hl7bridge.app.config_diff import ServiceDiff
from hl7bridge.store import open_engine
from hl7bridge.workflow.config_diff import DiffBusy

from .api_support import Api, start_api
from .dispatch_support import siu
from .test_config_diff import BASE, START, changed

RENAMED = changed('template = "{given_name} {family_name}"', 'template = "{family_name}, {given_name}"')


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    running = start_api(tmp_path_factory.mktemp("config-diff-api"), BASE)
    with running.service.client() as client:
        for n in range(3):
            client.request(siu("S12", f"CDA-{n}", f"A-CDA-{n}", START, given=f"ANN{n}", family=f"LEE{n}"))
        client.request(siu("S15", "CDA-X", "A-CDA-0", START))
    yield running
    running.service.stop()


def test_an_admin_gets_the_differences_masked(api: Api) -> None:
    answer = api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "1d"}, role="admin")
    assert answer.status_code == 200, answer.text
    report = answer.json()
    assert report["against"]["path"] == str(api.service.config) and "the service runs" in report["against"]["how"]
    found = report["differences"]
    assert len(found) == 3 and {(d["kind"], d["parameter"]) for d in found} == {("parameter", "patientName")}
    assert [d["before"] for d in found] == ["A***", "A***", "A***"] and report["masked"]


def test_only_admins_may(api: Api) -> None:
    for role in ("viewer", "operator"):
        assert api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "1d"}, role=role).status_code == 403


def test_unmasking_needs_a_reason_and_is_audited(api: Api) -> None:
    refused = api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "1d", "phi": True}, role="admin")
    assert refused.status_code == 400 and refused.json()["field"] == "reason"
    answer = api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "1d", "phi": True, "reason": "check names"},
                      role="admin")  # fmt: skip
    assert answer.status_code == 200
    assert sorted(d["after"] for d in answer.json()["differences"]) == ["LEE0, ANN0", "LEE1, ANN1", "LEE2, ANN2"]
    con = sqlite3.connect(api.service.database)
    try:
        entry = con.execute("SELECT actor, channel, action, reason FROM audit ORDER BY id DESC LIMIT 1").fetchone()
    finally:
        con.close()
    assert entry == ("admin", "api", "unmask", "check names")


def test_a_path_only_in_the_running_configuration_directory(api: Api) -> None:
    (api.service.workdir / "renamed.toml").write_text(RENAMED, encoding="utf-8")
    answer = api.post("/api/v1/config-diff", {"path": "renamed.toml", "since": "1d"}, role="admin")
    assert answer.status_code == 200 and len(answer.json()["differences"]) == 3
    for outside in ("../hl7bridge.toml", "/etc/passwd", "var/log.db/.."):
        refused = api.post("/api/v1/config-diff", {"path": outside, "since": "1d"}, role="admin")
        assert refused.status_code == 400 and refused.json()["field"] == "path", outside
        assert "running configuration's directory" in refused.json()["error"]


def test_an_upload_past_the_api_body_limit_up_to_256_kib(api: Api) -> None:
    padded = RENAMED + ("# a comment line to make the upload large\n" * 4000)  # about 170 KiB
    assert 64 * 1024 < len(padded) < 256 * 1024
    answer = api.post("/api/v1/config-diff", {"toml": padded, "since": "1d"}, role="admin")
    assert answer.status_code == 200 and len(answer.json()["differences"]) == 3
    too_large = api.post("/api/v1/config-diff", {"toml": padded * 2, "since": "1d"}, role="admin")
    assert too_large.status_code == 413
    elsewhere = api.post("/api/v1/replay", {"ids": [1], "reason": "x" * 70_000}, role="admin")
    assert elsewhere.status_code == 413, "other routes keep the 64 KiB limit"


def test_a_bad_configuration_is_400_naming_the_problem(api: Api) -> None:
    answer = api.post("/api/v1/config-diff", {"toml": BASE.replace("[routes.match]", "[routes.wrong]"),
                                              "since": "1d"}, role="admin")  # fmt: skip
    assert answer.status_code == 400 and "routes" in answer.json()["error"] and answer.json()["field"] == "toml"


def test_the_console_page_shows_the_summary_and_examples(api: Api) -> None:
    session, me = api.login("admin")
    form = api.call("GET", "/config-diff", session=session)
    assert form.status_code == 200 and 'action="/config-diff"' in form.text
    shown = api.call("POST", "/config-diff", session=session,
                     data={"csrf": me["csrf"], "toml": RENAMED, "since": "1d"})  # fmt: skip
    assert shown.status_code == 200, shown.text
    assert 'id="config-diff-parameter"' in shown.text and "patientName" in shown.text
    assert "LEE0" not in shown.text and "A***" in shown.text
    viewer, _me = api.login("viewer")
    assert api.call("GET", "/config-diff", session=viewer).status_code == 403
    assert "/config-diff" not in api.call("GET", "/", session=viewer).text


def test_the_service_diffs_at_most_31_days_one_at_a_time(api: Api) -> None:
    """Inside the service the diff runs beside the listeners and the writer: in-process, one at a time, over a
    bounded window (`hl7bridge config diff` on the machine takes any window, on every CPU)."""
    answer = api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "32d"}, role="admin")
    assert answer.status_code == 400 and answer.json()["field"] == "since" and "31 days" in answer.json()["error"]
    service_diff = ServiceDiff(open_engine(api.service.url, create=False))
    assert service_diff._running.acquire()  # another diff running
    with pytest.raises(DiffBusy, match="another config diff is running"):
        service_diff(toml=RENAMED, path=None, since=time.time() - 3600, route=None, phi=False, actor="t", channel="api")
    service_diff._running.release()
    assert service_diff(toml=RENAMED, path=None, since=time.time() - 86400, route=None, phi=False, actor="t",
                        channel="api").counts == {"parameter": 3}  # fmt: skip


def test_a_running_file_changed_since_it_was_loaded_is_not_compared(api: Api) -> None:
    """Copied over the running file before the reload, the new configuration would be compared with itself and
    report nothing: refused, naming what to do."""
    config = api.service.config
    kept = config.read_text(encoding="utf-8")
    try:
        config.write_text(RENAMED, encoding="utf-8")
        answer = api.post("/api/v1/config-diff", {"toml": RENAMED, "since": "1d"}, role="admin")
        assert answer.status_code == 400 and "has changed since the service loaded it" in answer.json()["error"]
    finally:
        config.write_text(kept, encoding="utf-8")
