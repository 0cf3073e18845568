"""The frictions an operator met (issue 18): each fixed at the root, each guarded here."""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import requests

from hl7bridge.ops import control

from .conftest import (
    EXAMPLE_SERVED,
    FIXTURES,
    RunningSandbox,
    RunningService,
    free_port,
    segments,
    start_sandbox,
    start_service,
    wait_until,
)
from .dispatch_support import (
    SANDBOX_TOML,
    TOKEN,
    attempts_of,
    commands_of,
    future,
    message_row,
    query,
    service_toml,
    settled,
    siu,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "config" / "hl7bridge.example.toml").read_text(encoding="utf-8")


def cli(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)  # fmt: skip


def held_port() -> socket.socket:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


# --- a port conflict names the setting that chooses that port ------------------------------------------------


def test_a_port_conflict_names_the_setting_of_the_port_that_is_taken(tmp_path: Path) -> None:
    with held_port() as holder:
        port = holder.getsockname()[1]
        health = tmp_path / "health.toml"
        health.write_text(f'[health]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
        result = cli("serve", "--config", str(health), "--listen", "tcp:0:interface=127.0.0.1",
                     "--database", f"sqlite:///{tmp_path}/h.db", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert "already in use" in result.stderr and "health.listen" in result.stderr
        assert "--listen" not in result.stderr, "the health port is not chosen by --listen"

        result = cli("serve", "--listen", f"tcp:{port}:interface=127.0.0.1", "--database",
                     f"sqlite:///{tmp_path}/l.db", cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2
        assert "listeners.main.endpoint (or serve --listen)" in result.stderr

        result = cli("sandbox", "--listen", f"tcp:{port}:interface=127.0.0.1", "--config",
                     str(ROOT / "config" / "hl7bridge.example.toml"), cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2
        assert "sandbox.listen (or sandbox --listen)" in result.stderr and "Traceback" not in result.stderr


# --- check-config checks the routes against the journeys -----------------------------------------------------


def test_check_config_checks_each_routes_parameters_against_its_journey(tmp_path: Path) -> None:
    good = cli("check-config", "--config", str(ROOT / "config" / "hl7bridge.example.toml"), cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert "route reminders fits journey 'appointment-reminders'" in good.stdout
    # The example maps phoneNumber without required/default: a message without a phone sends it empty.
    assert "routes[reminders].parameters.phoneNumber" in good.stdout

    drifted = EXAMPLE.replace("[routes.parameters.phoneNumber]", "[routes.parameters.mobile]").replace(
        'on_reschedule = "retrigger"\nreschedule_flow_id = ""',
        'on_reschedule = "subflow"\nreschedule_flow_id = "moved"',
    )
    assert drifted.count("mobile") == 1 and 'reschedule_flow_id = "moved"' in drifted
    config = tmp_path / "drifted.toml"
    config.write_text(drifted, encoding="utf-8")
    bad = cli("check-config", "--config", str(config), cwd=tmp_path)
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert any("routes[reminders].parameters.mobile: not a parameter of journey 'appointment-reminders'" in line
               for line in lines), bad.stderr  # fmt: skip
    assert any("routes[reminders].parameters: journey 'appointment-reminders' needs parameter 'phoneNumber'" in line
               for line in lines), bad.stderr  # fmt: skip
    assert any("routes[reminders].reschedule_flow_id: journey 'appointment-reminders' has no subflow 'moved'" in line
               for line in lines), bad.stderr  # fmt: skip
    assert "fits" not in bad.stdout


# --- send prints the ACK's text as HL7 means it, escapes decoded ---------------------------------------------


def test_send_prints_the_ack_text_decoded(tmp_path: Path) -> None:
    # ack_phi echoes the offending value, which holds HL7 delimiters: the ACK carries it escaped (\T\, \F\).
    running = start_service(tmp_path, config_text="[service]\nack_phi = true\n")
    try:
        booking = (FIXTURES / "demo" / "01_s12_book_A.hl7").read_bytes()
        bad = tmp_path / "bad_start.hl7"
        bad.write_bytes(booking.replace(b"TQ1|1||||||20270914093000", b"TQ1|1||||||2027\\T\\09\\F\\14"))
        result = running.cli("send", "--to", f"127.0.0.1:{running.port}", str(bad), check=False)
    finally:
        running.stop()
    assert result.returncode == 1
    line = result.stdout.strip()
    assert line.startswith("AE ") and "TQ1-7" in line, line
    assert "(sent: '2027&09|14')" in line, line
    assert "\\T\\" not in line and "\\F\\" not in line


# --- shell completion -----------------------------------------------------------------------------------------


def bash_completes(script: str, *words: str) -> list[str]:
    """What bash offers after ``words`` (the last one being completed), from the printed script."""
    line = " ".join(words)
    probe = (f"{script}\nCOMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE='{line}'; COMP_POINT={len(line)}\n"
             "_shtab_hl7bridge; printf '%s\\n' \"${COMPREPLY[@]}\"\n")  # fmt: skip
    result = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def test_completion_prints_scripts_that_complete_commands_and_options(tmp_path: Path) -> None:
    bash = cli("completion", "bash", cwd=tmp_path)
    assert bash.returncode == 0, bash.stderr
    assert "check-config" in bash_completes(bash.stdout, "hl7bridge", "check-")
    assert set(bash_completes(bash.stdout, "hl7bridge", "log", "")) >= {"list", "show"}
    assert "--older-than" in bash_completes(bash.stdout, "hl7bridge", "purge", "--o")
    zsh = cli("completion", "zsh", cwd=tmp_path)
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef hl7bridge")
    assert "check-config" in zsh.stdout
    bad = cli("completion", "fish", cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


# --- hl7bridge reload: a service started by hand, through the same path as systemd's ExecReload -------------


def audit_actions(database: Path) -> list[tuple[str, str, str]]:
    with sqlite3.connect(database) as conn:
        return conn.execute("SELECT actor, action, target FROM audit ORDER BY id").fetchall()


def test_reload_reaches_a_service_started_by_hand_and_refuses_a_bad_config(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    service = start_service(tmp_path, service_toml(sandbox.url, dispatch_extra='unrouted = "reject"'), env=TOKEN)
    reload = ("reload", "--config", str(service.config), "--database", service.url, "--by", "ana")
    try:
        pid_file = service.database.with_suffix(".pid")
        pid, started = pid_file.read_text().split()
        assert int(pid) == service.process.pid and started == control.start_time(service.process.pid)
        assert stat.S_IMODE(pid_file.stat().st_mode) == 0o600
        with service.client() as client:
            assert (
                segments(client.request(siu("S12", "RL-1", "A-RL-1", future(), facility="NEWSITE")))["MSA"][1] == "AA"
            )
            narrowed = service.config.read_text().replace(
                'instance_identifiers = ["appointmentId"]',
                'instance_identifiers = ["appointmentId"]\n[routes.match]\nsending_facility = ["OTHER"]\n',
                1,
            )
            service.config.write_text(narrowed)
            done = service.cli(*reload)
            assert f"reload sent to the service (pid {service.process.pid})" in done.stdout
            wait_until(lambda: segments(client.request(siu("S12", f"RL-{time.time()}", "A-RL-2", future(),
                                                           facility="NEWSITE")))["MSA"][1] == "AE",
                       message="the narrowed route to apply")  # fmt: skip

            service.config.write_text(narrowed.replace("batch_size = 100", "batch_size = 'many'"))
            refused = service.cli(*reload, check=False)
            assert refused.returncode == 2
            assert "dispatch.batch_size" in refused.stderr
            assert "reload refused; the running service keeps its configuration" in refused.stderr
            assert "Traceback" not in refused.stderr
            # Still the narrowed routes: OTHER is routed, NEWSITE is not.
            assert segments(client.request(siu("S12", "RL-3", "A-RL-3", future(), facility="OTHER")))["MSA"][1] == "AA"
    finally:
        output = service.stop()
        sandbox.stop()
    assert "configuration reloaded" in output
    assert audit_actions(service.database) == [("ana", "reload", "service")]
    assert not pid_file.exists(), "the pid file outlived the service"
    service.config.write_text(narrowed)
    gone = service.cli(*reload, check=False)
    assert gone.returncode == 3 and "no running service" in gone.stderr


# --- the demo reruns after a restart --------------------------------------------------------------------------


def demo_service(workdir: Path, sandbox_port: int) -> RunningService:
    config = EXAMPLE_SERVED
    return start_service(workdir, config, extra=["--sandbox", "--sandbox-listen",
                                                 f"tcp:{sandbox_port}:interface=127.0.0.1"])  # fmt: skip


def journeys(workdir: Path, sandbox_port: int) -> list[tuple[str, str, str]]:
    token = (workdir / "var" / "sandbox-control.token").read_text().strip()
    found = requests.get(f"http://127.0.0.1:{sandbox_port}/_sandbox/instances",
                         headers={"Authorization": f"Bearer {token}"}, timeout=10).json()  # fmt: skip
    return sorted(
        (i["parameters"]["appointmentId"], i["parameters"]["appointmentDateTime"], i["status"]) for i in found
    )


ACTIVE_END = [("DEMOAPPT-A", "2027-09-21 10:00:00", "InProgress"), ("DEMOAPPT-C", "2027-09-16 14:00:00", "InProgress")]


def settled_journeys(service: RunningService, workdir: Path, sandbox_port: int) -> list[tuple[str, str, str]] | None:
    """The sandbox's journeys once the outbox is empty. Which ones were cancelled depends on timing (a booking
    still unsent when its move or cancel arrives is annihilated, never sent), which journeys are active does not."""
    if json.loads(service.cli("stats", "--json").stdout)["outbox"]["depth"]:
        return None
    found = journeys(workdir, sandbox_port)
    return found if [j for j in found if j[2] == "InProgress"] == ACTIVE_END else None


def test_the_demo_reruns_after_a_restart(tmp_path: Path) -> None:
    sandbox_port = free_port()
    demo = str(FIXTURES / "demo")
    service = demo_service(tmp_path, sandbox_port)
    try:
        sent = service.cli("send", "--to", f"127.0.0.1:{service.port}", demo)
        assert sent.stdout.count("AA ") == 6
        first_end = wait_until(lambda: settled_journeys(service, tmp_path, sandbox_port), timeout=30.0,
                               message="the demo's journeys")  # fmt: skip
        assert {j[2] for j in first_end} <= {"InProgress", "Cancelled"}
    finally:
        service.stop()

    service = demo_service(tmp_path, sandbox_port)
    try:
        # The sandbox kept its journeys across the restart, as the log kept the appointments it started.
        assert journeys(tmp_path, sandbox_port) == first_end
        # The same files again are the same messages: answered with their first ACK, nothing triggered.
        again = service.cli("send", "--to", f"127.0.0.1:{service.port}", demo)
        assert again.stdout.count("AA ") == 6
        assert [m["status"] for m in service.log("--status", "duplicate")] == ["duplicate"] * 6
        # With fresh control ids the story plays again: A booked and moved, B booked and cancelled, C unchanged.
        rerun = service.cli("send", "--fresh-ids", "--to", f"127.0.0.1:{service.port}", demo)
        assert rerun.stdout.count("AA ") == 6
        now = wait_until(lambda: settled_journeys(service, tmp_path, sandbox_port), timeout=30.0,
                         message="the rerun's journeys")  # fmt: skip
    finally:
        service.stop()
    # The rerun cancelled the first run's A and C before triggering them anew (C's resend is unchanged): more
    # journeys than before, the same two active, every other one cancelled.
    assert len(now) > len(first_end) and {j[2] for j in now} == {"InProgress", "Cancelled"}
    assert stat.S_IMODE((tmp_path / "var" / "sandbox-state.json").stat().st_mode) == 0o600


# --- the dispatcher: ids in its log lines, true retry text, dispatch now, the probe after an outage ----------


def dispatch_bridge(workdir: Path, sandbox: RunningSandbox, retry: str) -> RunningService:
    toml = service_toml(sandbox.url).replace("retry_initial = 0.2\nretry_max = 1.0\nauth_probe_interval = 0.5", retry)
    assert retry in toml
    return start_service(workdir, toml, env=TOKEN)


def test_a_dead_letter_line_names_the_message_id_that_log_show_takes(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    service = start_service(tmp_path, service_toml(sandbox.url), env=TOKEN)
    try:
        # A message without commands first, so the message id and the command id differ.
        assert segments(service.request(siu("S23", "DL-0", "A-DL-0", future())))["MSA"][1] == "AA"
        # No phone: mapped (optional) but refused by the API, so dead-lettered.
        assert segments(service.request(siu("S12", "DL-1", "A-DL-1", future(), phone=None)))["MSA"][1] == "AA"
        (command,) = settled(service, "DL-1")
        assert command["status"] == "dead"
        message_id = message_row(service, "DL-1")["id"]
        assert message_id != command["id"], "the test needs the two ids to differ"
    finally:
        output = service.stop()
        sandbox.stop()
    (line,) = [line for line in output.splitlines() if "dead-lettered" in line]
    assert f"message_id={message_id}" in line and f"command_id={command['id']}" in line, line
    assert f"hl7bridge log show {message_id}" in line, line


def test_a_retry_says_when_as_a_time_and_log_show_reads_it_live(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    service = dispatch_bridge(tmp_path, sandbox, "retry_initial = 300\nretry_max = 600\nauth_probe_interval = 300")
    try:
        sandbox.faults(outage={"mode": "503", "seconds": 600})
        assert segments(service.request(siu("S12", "RT-1", "A-RT-1", future())))["MSA"][1] == "AA"
        (command,) = wait_until(lambda: [c for c in commands_of(service, "RT-1") if c["attempts"]],
                                message="the first failed attempt")  # fmt: skip
        shown = service.cli("log", "show", str(command["message_id"])).stdout
    finally:
        service.stop()
        sandbox.stop()
    assert "retrying in" not in command["outcome"], command["outcome"]
    assert re.match(r"retrying; the attempt at \d\d:\d\d:\d\d failed: Service unavailable", command["outcome"]), (
        command["outcome"]
    )
    due = datetime.fromtimestamp(command["next_attempt_at"]).astimezone().isoformat(timespec="seconds")
    assert f"next attempt at {due}" in shown, shown


def test_dispatch_now_sends_what_waits_at_once_and_is_audited(tmp_path: Path) -> None:
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    # Backoffs of minutes: without 'dispatch now' nothing is tried again within the test.
    service = dispatch_bridge(tmp_path, sandbox, "retry_initial = 300\nretry_max = 600\nauth_probe_interval = 300")
    controls = [f"NOW-{i}" for i in range(4)]
    try:
        sandbox.faults(outage={"mode": "503", "seconds": 600})
        with service.client() as client:
            for i, control in enumerate(controls):
                assert (
                    segments(client.request(siu("S12", control, f"A-NOW-{i}", future(days=30 + i))))["MSA"][1] == "AA"
                )
        wait_until(lambda: all(c["attempts"] for control in controls for c in commands_of(service, control)),
                   timeout=30, message="every booking to meet the outage")  # fmt: skip
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        time.sleep(1.0)
        assert not sandbox.instances(), "retried before 'dispatch now'"
        done = service.cli("dispatch", "now", "--database", service.url, "--config", str(service.config), "--by", "ana")
        leader = f"{socket.gethostname()}:{service.port}"
        assert f"4 waiting command(s) made due; the dispatcher of instance {leader} dispatches now" in done.stdout
        for control in controls:
            assert settled(service, control)[0]["status"] == "done"
        for i in range(len(controls)):
            assert len(sandbox.instances(appointmentId=f"A-NOW-{i}")) == 1
    finally:
        output = service.stop()
        sandbox.stop()
    assert "dispatch now" in output
    assert audit_actions(service.database) == [("ana", "dispatch-now", "command")]


def test_a_held_queue_probes_the_api_every_probe_interval_not_on_a_growing_backoff(tmp_path: Path) -> None:
    """After an outage the backlog waited for its probe's next try, on a backoff grown to retry_max (~65 s in the
    operator's case). Held, the probe is one call: it is tried every auth_probe_interval, so the backlog drains
    soon after the API returns."""
    sandbox = start_sandbox(tmp_path, SANDBOX_TOML)
    service = dispatch_bridge(tmp_path, sandbox, "retry_initial = 0.2\nretry_max = 600\nauth_probe_interval = 0.5")
    controls = [f"PROBE-{i}" for i in range(6)]
    try:
        sandbox.faults(outage={"mode": "503", "seconds": 600})
        with service.client() as client:
            for i, control in enumerate(controls):
                assert (
                    segments(client.request(siu("S12", control, f"A-PROBE-{i}", future(days=30 + i))))["MSA"][1] == "AA"
                )
        head = commands_of(service, controls[0])[0]["id"]
        # By its eighth attempt the head's backoff would be 0.2 x 2^7 s, jittered to 12.8-25.6 s.
        wait_until(lambda: len(attempts_of(service, head)) >= 8, timeout=60, message="the probe's eighth attempt")
        (row,) = query(service, "SELECT next_attempt_at FROM commands WHERE id = ?", head)
        last = max(a["at"] for a in attempts_of(service, head))
        sandbox.faults(outage={"mode": "503", "seconds": 0})
        for control in controls:
            assert settled(service, control, timeout=30)[0]["status"] == "done"
    finally:
        service.stop()
        sandbox.stop()
    # Scheduling, not speed: the next probe was set at most one probe interval after the last failure.
    # (Slack for the moments between the attempt being stamped and the retry scheduled; unfixed it was 6.4 s or more.)
    assert row["next_attempt_at"] - last <= 0.5 + 0.25, (row["next_attempt_at"], last)


def test_systemd_reloads_through_hl7bridge_reload_with_the_service_own_config_and_log() -> None:
    unit = (ROOT / "systemd" / "hl7bridge.service").read_text(encoding="utf-8").splitlines()
    (start,) = [line.split("=", 1)[1].split() for line in unit if line.startswith("ExecStart=")]
    (reload,) = [line.split("=", 1)[1].split() for line in unit if line.startswith("ExecReload=")]
    assert reload[:2] == [start[0], "reload"]

    def option(words: list[str], name: str) -> str:
        return words[words.index(name) + 1]

    for name in ("--config", "--database"):
        assert option(reload, name) == option(start, name), name
    assert option(reload, "--pid") == "$MAINPID", "systemd knows the pid: no pid file needed"


def test_reload_refuses_a_config_whose_routes_do_not_fit_their_journeys(tmp_path: Path) -> None:
    """check-config's verdict is reload's: a mapping the journey would refuse is not sent to the service."""
    config = EXAMPLE_SERVED
    service = start_service(tmp_path, config, extra=["--sandbox", "--sandbox-listen", f"tcp:{free_port()}"])
    try:
        service.config.write_text(config.replace("[routes.parameters.phoneNumber]", "[routes.parameters.mobile]"))
        refused = service.cli("reload", "--config", str(service.config), "--database", service.url, check=False)
    finally:
        output = service.stop()
    assert refused.returncode == 2
    assert "journey mismatch: routes[reminders].parameters.mobile" in refused.stderr
    assert "reload refused; the running service keeps its configuration" in refused.stderr
    assert "configuration reloaded" not in output and "reload refused" not in output
