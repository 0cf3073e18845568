"""The sandbox's search, over real HTTP: equality on every criterion, per journey, across resets.

The dispatcher's cancels depend on it, and since search is answered from an index of parameter values
(a long soak holds hundreds of thousands of instances), these tests hold the index to a plain reading.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from .conftest import RunningSandbox
from .dispatch_support import sandbox_for_module

AUTH = {"Authorization": "Bearer test-token"}


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


def api(sandbox: RunningSandbox, bot: str, action: str) -> str:
    return f"{sandbox.url}/chatbotapi/external/orgs/test-org/journeys/{bot}/instances/{action}"


def trigger(sandbox: RunningSandbox, bot: str, *rows: dict[str, str]) -> None:
    body = {"timeZone": "America/New_York", "instances": [{"parameters": row} for row in rows]}
    answer = requests.post(api(sandbox, bot, "bulk"), json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 204, answer.text


def search(sandbox: RunningSandbox, bot: str, **criteria: str) -> list[dict]:
    spec = [{"type": "JourneyParameterSpecification", "parameterName": k, "operator": "equals", "rightOperand": v}
            for k, v in criteria.items()]  # fmt: skip
    body = {"filterSpecification": {"type": "AndSpecification", "specifications": spec}, "includeParameters": True}
    answer = requests.post(api(sandbox, bot, "search"), json=body, headers=AUTH, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def dental(appointment: str, clinic: str, patient: str = "P1") -> dict[str, str]:
    return {"patientId": patient, "appointmentId": appointment, "appointmentDateTime": "2027-01-05 09:30:00",
            "clinic": clinic}  # fmt: skip


def test_search_matches_every_criterion_within_its_journey(sandbox: RunningSandbox) -> None:
    sandbox.post("/_sandbox/reset", {})
    trigger(sandbox, "dental", dental("D-1", "north"), dental("D-1", "south"), dental("D-2", "north"))
    trigger(sandbox, "dental", dental("D-1", "north", patient="P2"))

    found = search(sandbox, "dental", appointmentId="D-1", clinic="north")
    assert sorted(i["parameters"]["patientId"] for i in found) == ["P1", "P2"]
    assert [i["parameters"]["clinic"] for i in search(sandbox, "dental", appointmentId="D-1", patientId="P1")] == [
        "north", "south"]  # fmt: skip
    assert search(sandbox, "dental", appointmentId="D-2", clinic="south") == []
    assert search(sandbox, "dental", appointmentId="D-404") == []
    assert search(sandbox, "reminders", appointmentId="D-1") == []  # same values, another journey


def test_search_sees_cancels_and_forgets_instances_on_reset(sandbox: RunningSandbox) -> None:
    sandbox.post("/_sandbox/reset", {})
    trigger(sandbox, "dental", dental("D-9", "north"))
    [instance] = search(sandbox, "dental", appointmentId="D-9")
    cancel = f"{sandbox.url}/chatbotapi/orgs/test-org/journeys/dental/instances/{instance['id']}/execution"
    assert requests.delete(cancel, headers=AUTH, timeout=10).status_code == 204
    assert [i["status"] for i in search(sandbox, "dental", appointmentId="D-9")] == ["Cancelled"]

    sandbox.post("/_sandbox/reset", {})
    assert search(sandbox, "dental", appointmentId="D-9") == []
    trigger(sandbox, "dental", dental("D-9", "east"))
    assert [i["parameters"]["clinic"] for i in search(sandbox, "dental", appointmentId="D-9")] == ["east"]


def test_drift_controls_change_what_search_answers(sandbox: RunningSandbox) -> None:
    sandbox.post("/_sandbox/reset", {})
    trigger(sandbox, "dental", dental("D-20", "north"), dental("D-21", "north"))
    [first] = search(sandbox, "dental", appointmentId="D-20")

    copy = sandbox.post("/_sandbox/drift", {"action": "duplicate", "id": first["id"]})
    assert copy["id"] != first["id"] and copy["parameters"] == first["parameters"]
    assert sorted(i["id"] for i in search(sandbox, "dental", appointmentId="D-20")) == sorted([first["id"], copy["id"]])

    moved = sandbox.post("/_sandbox/drift", {"action": "edit", "id": first["id"],
                                             "parameters": {"appointmentDateTime": "2027-02-01 08:00:00"}})  # fmt: skip
    assert moved["parameters"]["appointmentDateTime"] == "2027-02-01 08:00:00"
    assert [i["id"] for i in search(sandbox, "dental", appointmentDateTime="2027-02-01 08:00:00")] == [first["id"]]
    assert [i["id"] for i in search(sandbox, "dental", appointmentDateTime="2027-01-05 09:30:00",
                                    appointmentId="D-20")] == [copy["id"]]  # fmt: skip

    assert sandbox.post("/_sandbox/drift", {"action": "delete", "id": copy["id"]}) == {"deleted": copy["id"]}
    assert [i["id"] for i in search(sandbox, "dental", appointmentId="D-20")] == [first["id"]]

    cancel = f"{sandbox.url}/chatbotapi/orgs/test-org/journeys/dental/instances/{first['id']}/execution"
    assert requests.delete(cancel, headers=AUTH, timeout=10).status_code == 204
    sandbox.post("/_sandbox/drift", {"action": "edit", "id": first["id"], "status": "InProgress"})
    assert [i["status"] for i in search(sandbox, "dental", appointmentId="D-20")] == ["InProgress"]
    assert len(search(sandbox, "dental", appointmentId="D-21")) == 1  # the other appointment untouched

    gone = requests.post(sandbox.url + "/_sandbox/drift", json={"action": "delete", "id": copy["id"]},
                         headers=sandbox.control, timeout=10)  # fmt: skip
    assert gone.status_code == 404 and "was not found" in gone.json()[0]
