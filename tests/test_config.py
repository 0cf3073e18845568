"""Settings validation: every problem names the key and says what is expected; the CLI never traces back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hl7bridge.app.config import ConfigError, load, parse

from .conftest import ROOT


def problems(text: str, tmp_path: Path) -> list[str]:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    return info.value.problems


def test_example_config_is_valid_and_complete() -> None:
    cfg = load(ROOT / "config" / "hl7bridge.example.toml")
    text = (ROOT / "config" / "hl7bridge.example.toml").read_text()
    from hl7bridge.app.config import CONSOLE_KEYS, LISTENER_KEYS, SERVICE_KEYS
    from hl7bridge.app.dispatch_config import API_KEYS, RECONCILE_KEYS

    for key in [*LISTENER_KEYS, *SERVICE_KEYS, *API_KEYS, *RECONCILE_KEYS, *CONSOLE_KEYS]:
        assert f"\n{key} = " in text, f"{key} is not documented in the example config"
    assert cfg.listeners[0].endpoint == "tcp:2575:interface=127.0.0.1"
    assert cfg.console.listen == "tcp:8081:interface=127.0.0.1"


def test_console_is_off_unless_configured_and_checked_naming_the_key(tmp_path: Path) -> None:
    assert parse({}).console.listen == ""
    found = problems("[console]\nlisten = 'http:80'\nmax_connections = 0\nsession_idle = 600\n"
                     "session_absolute = 60\nidle_timeout = 0\nsecret = 1\n", tmp_path)  # fmt: skip
    text = "\n".join(found)
    for needle in ("console.listen: endpoint 'http:80' must start with tcp:", "console.max_connections: expected an "
                   "integer from 1", "console.secret: unknown setting"):  # fmt: skip
        assert needle in text, text
    found = problems("[console]\nsession_idle = 600\nsession_absolute = 60\nidle_timeout = 0\nrequest_timeout = 0\n",
                     tmp_path)  # fmt: skip
    text = "\n".join(found)
    assert "console.session_absolute: expected at least session_idle (600 s)" in text
    assert "console.idle_timeout: expected a number of seconds > 0" in text
    assert "console.request_timeout: expected a number of seconds > 0" in text


@pytest.mark.parametrize(
    ("listen", "warned"),
    [("tcp:8081:interface=127.0.0.1", False), ("tcp6:8081:interface=\\:\\:1", False), ("tcp:8081", True),
     ("tcp:8081:interface=0.0.0.0", True), ("ssl:8443:privateKey=k.pem", False), ("unix:/run/hb.sock", False)],
)  # fmt: skip
def test_a_cleartext_console_beyond_loopback_is_warned_about(listen: str, warned: bool) -> None:
    from hl7bridge.app.config import ConsoleConfig

    warning = ConsoleConfig(listen=listen).cleartext_warning()
    assert (warning is not None) == warned
    if warned:
        assert "use an ssl: endpoint" in warning


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[service]\ndatabse = 'x'\n", "service.databse: unknown setting"),
        ("[listeners.a]\nmax_message_bytes = -5\n", "listeners.a.max_message_bytes: expected an integer from 1024"),
        ("[listeners.a]\nmax_message_bytes = 'big'\n", "expected an integer, got 'big'"),
        ("[listeners.a]\ntime_zone = 'Mars/Base'\n", "listeners.a.time_zone: expected an IANA time zone"),
        ("[listeners.a]\nendpoint = 'tcp:abc'\n", "listeners.a.endpoint: endpoint 'tcp:abc' is not usable"),
        ("[listeners.a]\nendpoint = 'http:80'\n", "must start with tcp:"),
        ("[listeners.a]\nallow = ['10.0.0.0/33']\n", "is not an IP network"),
        ("[listeners.a]\nstart_sources = ['PID-5']\n", "PID-5 is not a date/time field"),
        ("[listeners.a]\nstart_sources = ['TQ1-99']\n", "TQ1 has 14 fields"),
        ("[listeners.a]\ncharset_fallback = ['klingon']\n", "'klingon' is not a known character set"),
        ("[listeners.a]\nlenient_framing = 'yes'\n", "expected true or false"),
        ("[listeners.a]\nidle_timeout = -1\n", "expected a number of seconds"),
        ("[listeners.a]\nvalidation = 'paranoid'\n", "expected one of 'fast', 'strict'"),
        ("[listners.a]\n", "listners: unknown section"),
        ("[api]\nca_file = '/no/such/ca.pem'\n", "api.ca_file: expected the path of a readable file"),
        ("[api]\nproxy = 'socks://x'\n", "api.proxy: expected an http(s) URL"),
        ("[api]\ncall_timeout = 0\n", "api.call_timeout: expected a number"),
        ("[reconcile]\ncalls_per_second = 0\n", "reconcile.calls_per_second: expected a number from 0.01"),
        ("[reconcile]\nmax_calls = 1.5\n", "reconcile.max_calls: expected an integer, got 1.5"),
        ("[reconcile]\ntoken = 'x'\n", "reconcile.token: unknown setting"),
        ("[service\n", "not valid TOML"),
    ],
)
def test_each_problem_names_the_key(tmp_path: Path, text: str, needle: str) -> None:
    found = problems(text, tmp_path)
    assert any(needle in p for p in found), found


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    found = problems("[listeners.a]\nmax_connections = 0\ntime_zone = 'x'\nfoo = 1\n", tmp_path)
    assert len(found) == 3


def test_a_source_that_is_no_path_beside_a_where_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    example = (ROOT / "config" / "hl7bridge.example.toml").read_text()
    broken = example.replace('source = ["PID-3.1", "patient_id"]', 'source = ["NOT A PATH", "patient_id"]', 1)
    assert broken != example
    found = problems(broken, tmp_path)
    assert any("routes" in p and "NOT A PATH" in p for p in found), found


def test_parse_accepts_several_listeners() -> None:
    cfg = parse({"listeners": {"a": {"endpoint": "tcp:0"}, "b": {"endpoint": "tcp:0", "allow": ["10.0.0.0/8"]}}})
    assert [lst.name for lst in cfg.listeners] == ["a", "b"]
    assert cfg.listeners[1].allows("10.1.2.3") and not cfg.listeners[1].allows("192.0.2.1")
    assert cfg.listeners[1].allows("::ffff:10.0.0.1")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "hl7bridge", *args], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_check_config_cli(tmp_path: Path) -> None:
    ok = run_cli("check-config", "--config", str(ROOT / "config" / "hl7bridge.example.toml"), cwd=tmp_path)
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[listeners.main]\nmax_connections = 'many'\n")
    result = run_cli("check-config", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert "listeners.main.max_connections: expected an integer" in result.stderr
    assert "Traceback" not in result.stderr
    missing = run_cli("check-config", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such configuration file" in missing.stderr


def test_serve_refuses_bad_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[listeners.main]\ntime_zone = 'Nowhere/Land'\n")
    result = run_cli("serve", "--config", str(bad), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "listeners.main.time_zone" in result.stderr


def test_serve_port_in_use_and_unwritable_database(tmp_path: Path) -> None:
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_cli("serve", "--listen", f"tcp:{port}:interface=127.0.0.1",
                         "--database", f"sqlite:///{tmp_path}/x.db", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2
    assert "already in use" in result.stderr and "Traceback" not in result.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    result = run_cli("serve", "--database", f"sqlite:///{blocked}/sub/x.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot create the database file" in result.stderr and "Traceback" not in result.stderr


def test_dispatch_lease_and_poll_are_checked_naming_the_key(tmp_path: Path) -> None:
    assert (parse({}).service.dispatch_lease, parse({}).dispatch.poll_interval) == (4.0, 1.0)
    found = "\n".join(problems("[service]\ndispatch_lease = 1\ninstance_name = 3\n[dispatch]\npoll_interval = 0\n",
                               tmp_path))  # fmt: skip
    for needle in ("service.dispatch_lease: expected a number from 2.0 to 600.0, got 1", "service.instance_name: "
                   "expected a string", "dispatch.poll_interval: expected a number from 0.1 to 3600"):  # fmt: skip
        assert needle in found, found
