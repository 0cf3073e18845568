"""`hl7bridge replay`: logged messages run again once the configuration is fixed.

The messages are received by a real service whose route cannot map them; then a service with the fixed
configuration runs on the same SQLite file while `python -m hl7bridge replay` queues the replays, and
the sandbox (its own process, over HTTP) shows what was triggered.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import RunningSandbox, RunningService, segments, start_service, wait_until
from .dispatch_support import (
    TOKEN,
    commands_of,
    commands_of_message,
    future,
    message_rows,
    query,
    sandbox_for_module,
    service_toml,
    settled,
    settled_message,
    siu,
)

START = future(days=30, hour=11, minute=15)


def fixed_toml(api_url: str) -> str:
    """The accepting route, now with defaults for the patient's name and phone."""
    config = service_toml(api_url, route_extra='content_errors = "accept"\n')
    name = 'template = "{PID-5.2} {PID-5.1}"\nrequired = true\n'
    phone = 'type = "phone"\n'
    assert config.count(name) == 1 and config.count(phone) == 1
    config = config.replace(name, name + 'default = "Valued Patient"\n')
    return config.replace(phone, phone + 'default = "5550000"\n')


@dataclass
class Setting:
    workdir: Path
    service: RunningService  # running with the fixed configuration
    fixed_config: Path
    noname_id: int
    nophone_id: int


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSandbox]:
    yield from sandbox_for_module(tmp_path_factory)


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory, sandbox: RunningSandbox) -> Iterator[Setting]:
    workdir = tmp_path_factory.mktemp("replay")
    broken = start_service(workdir, service_toml(sandbox.url, route_extra='content_errors = "accept"\n'), env=TOKEN)
    try:
        # No patient name: a content error, answered AA and kept as rejected.
        noname = segments(broken.request(siu("S12", "RP-NONAME", "A-RP-NONAME", START, family="", given="")))
        assert noname["MSA"][1] == "AA"
        row = message_row(broken, "RP-NONAME")
        assert row["status"] == "rejected" and "patientName" in row["error"]
        assert commands_of(broken, "RP-NONAME") == []
        # No phone: mapped (the phone is optional) but refused by the API, so dead-lettered.
        assert segments(broken.request(siu("S12", "RP-NOPHONE", "A-RP-NOPHONE", START, phone=None)))["MSA"][1] == "AA"
        (dead,) = settled(broken, "RP-NOPHONE")
        assert dead["status"] == "dead" and "phoneNumber" in dead["outcome"]
        # Another booking dead-lettered the same way, and then cancelled by the sender.
        assert segments(broken.request(siu("S12", "RP-STALE-1", "A-RP-STALE", START, phone=None)))["MSA"][1] == "AA"
        assert settled(broken, "RP-STALE-1")[0]["status"] == "dead"
        assert segments(broken.request(siu("S15", "RP-STALE-2", "A-RP-STALE", None)))["MSA"][1] == "AA"
        assert settled(broken, "RP-STALE-2")[0]["outcome"] == "nothing active to cancel"
    finally:
        broken.stop()
    (workdir / "broken.toml").write_text(service_toml(sandbox.url, route_extra='content_errors = "accept"\n'),
                                         encoding="utf-8")  # fmt: skip
    fixed_config = workdir / "fixed.toml"
    fixed_config.write_text(fixed_toml(sandbox.url), encoding="utf-8")
    service = start_service(workdir, fixed_toml(sandbox.url), env=TOKEN)
    yield Setting(workdir, service, fixed_config, row["id"], message_row(service, "RP-NOPHONE")["id"])
    service.stop()


def message_row(service: RunningService, control_id: str) -> dict:
    """The first message logged under a control id: the original, which its replays do not change."""
    return message_rows(service, control_id)[0]


def replay(setting: Setting, *args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hl7bridge", "replay", *args]
    cmd += ["--config", str(config or setting.fixed_config), "--database", setting.service.url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=setting.workdir)


def replays_of(service: RunningService, original_id: int) -> list[dict]:
    return query(service, "SELECT * FROM messages WHERE replay_of = ? ORDER BY id", original_id)


def expected_parameters(appointment: str, name: str = "ALICE TESTPATIENT", phone: str = "5550101") -> dict:
    return {
        "patientId": "MRN100",
        "patientName": name,
        "appointmentId": appointment,
        "appointmentDateTime": f"{START[:4]}-{START[4:6]}-{START[6:8]} 11:15:00",
        "phoneNumber": phone,
    }


def bulk_line(sandbox: RunningSandbox, out: str, appointment: str) -> tuple[str, dict]:
    """The one dry-run line naming the bulk endpoint for an appointment: (the text before the body, the body).

    Chosen by the appointment, so messages other tests left in the log do not matter."""
    prefix = f"POST {sandbox.url}/chatbotapi/external/orgs/test-org/journeys/reminders/instances/bulk "
    (line,) = [ln.strip() for ln in out.splitlines()
               if ln.strip().startswith("POST ") and "/bulk" in ln and f'"{appointment}"' in ln]  # fmt: skip
    assert line.startswith(prefix), line
    return prefix, json.loads(line[len(prefix) :])


# ---- the tests ---------------------------------------------------------------------------------------


def test_rejected_message_is_replayed_once_the_config_is_fixed(setting: Setting, sandbox: RunningSandbox) -> None:
    service, original = setting.service, setting.noname_id
    messages_before = len(query(service, "SELECT id FROM messages"))

    # Dry run: the exact call (patient data masked unless --phi), and nothing written or sent.
    masked = replay(setting, "--status", "rejected", "--dry-run")
    assert masked.returncode == 0, masked.stderr
    assert f"calls as they would go to {sandbox.url} (where the service started at " in masked.stdout
    assert "/instances/bulk " in masked.stdout and '"patientId": "M***"' in masked.stdout
    assert "MRN100" not in masked.stdout and "5550101" not in masked.stdout
    dry = replay(setting, "--status", "rejected", "--dry-run", "--phi")
    assert dry.returncode == 0, dry.stderr
    assert re.search(rf"^\[\d+/\d+\] message {original} \(S12 RP-NONAME\): would make:$", dry.stdout, re.M)
    _, body = bulk_line(sandbox, dry.stdout, "A-RP-NONAME")
    assert body == {
        "flowId": None,
        "timeZone": "America/Chicago",
        "instances": [{"parameters": expected_parameters("A-RP-NONAME", name="Valued Patient")}],
    }
    assert "search" not in dry.stdout and "DELETE" not in dry.stdout
    assert len(query(service, "SELECT id FROM messages")) == messages_before
    assert sandbox.instances(appointmentId="A-RP-NONAME") == []

    # The real replay: the running service (fixed configuration) dispatches it.
    done = replay(setting, "--status", "rejected")
    assert done.returncode == 0, done.stderr
    (new,) = replays_of(service, original)
    assert f"message {original} (S12 RP-NONAME): replayed as message {new['id']} (1 command(s) queued)" in done.stdout
    assert "[1/1] 1 replayed (1 command(s) queued), 0 superseded, 0 not replayable" in done.stderr
    assert "\r" not in done.stderr  # not a terminal: no progress line, the summary only
    assert new["status"] == "accepted" and new["control_id"] == "RP-NONAME" and new["peer"] == "replay"
    found = wait_until(lambda: sandbox.instances(appointmentId="A-RP-NONAME"), message="the replayed journey")
    assert found[0]["parameters"] == expected_parameters("A-RP-NONAME", name="Valued Patient")
    (cmd,) = settled_message(service, new["id"])
    assert cmd["status"] == "done" and cmd["outcome"] == "triggered"
    assert message_row(service, "RP-NONAME")["status"] == "rejected"  # the original stays as it was logged

    # Now the bridge remembers the journey: a dry run shows no call, a second replay triggers nothing.
    dry_again = replay(setting, str(original), "--dry-run")
    assert dry_again.returncode == 0, dry_again.stderr
    assert "no call: already triggered with these parameters" in dry_again.stdout
    again = replay(setting, str(original))
    assert again.returncode == 0, again.stderr
    first, second = replays_of(service, original)
    assert first["id"] == new["id"]
    (cmd,) = settled_message(service, second["id"])
    assert cmd["status"] == "done" and cmd["outcome"] == "already triggered with these parameters"
    assert len(sandbox.instances(appointmentId="A-RP-NONAME")) == 1
    assert len([c for c in sandbox.calls("bulk")
                if any(i["parameters"]["appointmentId"] == "A-RP-NONAME" for i in c["body"]["instances"])]) == 1  # fmt: skip


def test_dead_lettered_message_is_replayed_by_id(setting: Setting, sandbox: RunningSandbox) -> None:
    service, original = setting.service, setting.nophone_id
    (dead,) = commands_of_message(service, original)
    assert dead["status"] == "dead"

    unmasked_before = unmask_rows(service)
    masked = replay(setting, str(original), "--dry-run")
    assert masked.returncode == 0 and unmask_rows(service) == unmasked_before  # masked: nothing to audit
    dry = replay(setting, str(original), "--dry-run", "--phi", "--by", "finn")
    assert dry.returncode == 0, dry.stderr
    _, body = bulk_line(sandbox, dry.stdout, "A-RP-NOPHONE")
    assert body["instances"] == [{"parameters": expected_parameters("A-RP-NOPHONE", phone="5550000")}]
    # Patient data shown to an operator is audited, as a --phi export is: who, which messages, why.
    (entry,) = unmask_rows(service)[len(unmasked_before) :]
    assert (entry["actor"], entry["target"], json.loads(entry["ids"]), entry["reason"]) == (
        "finn", "message", [original], "replay dry run")  # fmt: skip

    done = replay(setting, str(original))
    assert done.returncode == 0, done.stderr
    (new,) = replays_of(service, original)
    found = wait_until(lambda: sandbox.instances(appointmentId="A-RP-NOPHONE"), message="the replayed journey")
    assert len(found) == 1 and found[0]["parameters"]["phoneNumber"] == "5550000"
    (cmd,) = settled_message(service, new["id"])
    assert cmd["status"] == "done" and cmd["outcome"] == "triggered"
    (old,) = commands_of_message(service, original)
    assert old["status"] == "replayed" and old["outcome"] == f"replayed as message {new['id']}"
    # It is no longer dead: a selection of the dead leaves it out.
    dead_now = replay(setting, "--status", "dead", "--dry-run")
    assert dead_now.returncode == 0, dead_now.stderr
    assert f"message {original} " not in dead_now.stdout


def test_replay_needs_a_selection(setting: Setting) -> None:
    result = replay(setting)
    assert result.returncode == 2
    assert "name message ids, or choose with --status" in result.stderr
    assert result.stdout == ""


def test_replay_of_an_unknown_id(setting: Setting) -> None:
    before = query(setting.service, "SELECT id FROM messages")
    result = replay(setting, "999999")
    assert result.returncode == 2
    assert "no message with id 999999" in result.stderr
    assert query(setting.service, "SELECT id FROM messages") == before


def test_replay_under_the_unfixed_config_changes_nothing(setting: Setting) -> None:
    service = setting.service
    before = query(service, "SELECT id FROM messages")
    result = replay(setting, str(setting.noname_id), config=setting.workdir / "broken.toml")
    assert result.returncode == 1  # every message selected had a problem
    assert f"message {setting.noname_id} (S12 RP-NONAME): still not dispatchable" in result.stdout
    assert "patientName" in result.stdout
    assert query(service, "SELECT id FROM messages") == before


def test_replayed_booking_of_a_since_cancelled_appointment_starts_no_journey(
    setting: Setting, sandbox: RunningSandbox
) -> None:
    """The booking is dead-lettered, then cancelled: replaying it would undo the cancel, so it is refused."""
    service = setting.service
    original = message_row(service, "RP-STALE-1")["id"]
    cancel = message_row(service, "RP-STALE-2")["id"]
    refused = f"message {original} (S12 RP-STALE-1): superseded by message {cancel} for the same appointment"
    before = query(service, "SELECT id FROM messages")
    for args in ((str(original), "--dry-run"), (str(original),)):
        result = replay(setting, *args)
        assert result.returncode == 0 and refused in result.stdout, (result.returncode, result.stdout, result.stderr)
        assert "not replayed" in result.stdout
    assert query(service, "SELECT id FROM messages") == before
    assert replays_of(service, original) == []
    (dead,) = commands_of_message(service, original)
    assert dead["status"] == "dead"  # left as it was: not marked replayed
    assert sandbox.instances(appointmentId="A-RP-STALE") == []


EDITOR = """
import os, sys
path = sys.argv[1]
with open(os.environ["EDIT_SEEN"], "a") as seen:
    seen.write(f"{path} {os.stat(path).st_mode & 0o777:o}\\n")
text = open(path).read()
open(path, "w").write({action})
"""


def editor(tmp_path: Path, name: str, action: str) -> dict[str, str]:
    script = tmp_path / f"{name}.py"
    script.write_text(EDITOR.replace("{action}", action), encoding="utf-8")
    return {"EDITOR": f"{sys.executable} {script}", "EDIT_SEEN": str(tmp_path / "seen.txt")}


def replay_with(setting: Setting, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "hl7bridge", "replay", *args, "--config", str(setting.fixed_config),
           "--database", setting.service.url]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=setting.workdir,
                          env={**os.environ, **env})  # fmt: skip


def unmask_rows(service: RunningService) -> list[dict]:
    return query(service, "SELECT * FROM audit WHERE action = 'unmask' ORDER BY id")


def audit_rows(service: RunningService) -> list[dict]:
    return query(service, "SELECT * FROM audit WHERE action = 'replay' ORDER BY id")


def test_replay_edit_runs_the_edited_copy_as_a_new_message(setting: Setting, tmp_path: Path) -> None:
    service = setting.service
    assert segments(service.request(siu("S12", "RP-EDIT", "A-RP-EDIT", START, family="MISSPELT")))["MSA"][1] == "AA"
    original = message_row(service, "RP-EDIT")
    env = editor(tmp_path, "fix", 'text.replace("MISSPELT", "CORRECTED")')
    done = replay_with(setting, env, str(original["id"]), "--edit", "--by", "erin")
    assert done.returncode == 0, done.stderr
    (new,) = replays_of(service, original["id"])
    assert "from the edited copy" in done.stdout and f"replayed as message {new['id']}" in done.stdout
    assert b"CORRECTED^ALICE" in new["raw"] and b"MISSPELT" not in new["raw"] and new["raw"].count(b"\r") == 4
    assert message_row(service, "RP-EDIT")["raw"] == original["raw"]  # the original never changes
    [(path, mode)] = [line.split() for line in (tmp_path / "seen.txt").read_text().splitlines()]
    assert mode == "600" and not Path(path).exists()
    entry = audit_rows(service)[-1]
    assert entry["actor"] == "erin" and json.loads(entry["ids"]) == [original["id"], new["id"]]
    assert json.loads(entry["details"]) == {"edited": True}


@pytest.mark.parametrize(("action", "says"), [("text", "was left unchanged"), ('""', "is empty")])
def test_replay_edit_left_unchanged_or_emptied_does_nothing(
    setting: Setting, tmp_path: Path, action: str, says: str
) -> None:
    service = setting.service
    control = f"RP-KEEP-{len(action)}"
    assert segments(service.request(siu("S12", control, f"A-{control}", START)))["MSA"][1] == "AA"
    original = message_row(service, control)
    before = (query(service, "SELECT count(*) AS n FROM messages")[0]["n"], len(audit_rows(service)))
    result = replay_with(setting, editor(tmp_path, "keep", action), str(original["id"]), "--edit")
    assert result.returncode == 0 and "nothing done: " in result.stderr and says in result.stderr, result.stderr
    assert (query(service, "SELECT count(*) AS n FROM messages")[0]["n"], len(audit_rows(service))) == before
    [(path, _mode)] = [line.split() for line in (tmp_path / "seen.txt").read_text().splitlines()]
    assert not Path(path).exists()


def test_replay_edit_needs_one_id_and_an_editor(setting: Setting) -> None:
    many = replay_with(setting, {}, "1", "2", "--edit")
    assert many.returncode == 2 and "--edit replays one message" in many.stderr
    none = replay_with(setting, {"EDITOR": ""}, str(setting.noname_id), "--edit")
    assert none.returncode == 2 and "set EDITOR" in none.stderr


def test_dry_run_names_the_url_the_service_dispatches_to(sandbox: RunningSandbox, tmp_path: Path) -> None:
    """Started with --api-url, the service dispatches elsewhere than the config says; replay must know."""
    config = service_toml("http://127.0.0.1:9")
    service = start_service(tmp_path, config, env=TOKEN, extra=["--api-url", sandbox.url])
    try:
        assert segments(service.request(siu("S15", "RP-URL", "A-RP-URL", None)))["MSA"][1] == "AA"
        original = message_row(service, "RP-URL")["id"]
        cmd = [sys.executable, "-m", "hl7bridge", "replay", str(original), "--config", str(service.config),
               "--database", service.url]  # fmt: skip
        dry = subprocess.run([*cmd, "--dry-run"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert f"calls as they would go to {sandbox.url} (where the service started at" in dry.stdout
        assert "127.0.0.1:9/" not in dry.stdout and f"POST {sandbox.url}/" in dry.stdout
        assert '"A-RP-URL"' not in dry.stdout and '"A***"' in dry.stdout  # the identifiers searched for, masked
        done = subprocess.run([*cmd, "--by", "sam"], capture_output=True, text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        (new,) = replays_of(service, original)
        (entry,) = audit_rows(service)
        assert entry["actor"] == "sam" and json.loads(entry["ids"]) == [original, new["id"]]
        assert json.loads(entry["details"]) == {"edited": False}
    finally:
        service.stop()
