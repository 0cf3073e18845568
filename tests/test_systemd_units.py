"""The shipped systemd units: the directives that matter, `systemd-analyze verify`, and the exposure score.

The systemd-analyze tests need the `systemd` package (Debian/Ubuntu); PID 1 need not be systemd, as
both checks run offline. `security --offline` needs systemd >= 250.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hl7bridge.app.cli import build_parser
from hl7bridge.app.config import HealthConfig, ListenerConfig
from hl7bridge.app.service import DESCRIPTOR_BASE
from hl7bridge.dispatch.journeys import ApiSettings

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = UNITS / "hl7bridge.service"
SOCKET = UNITS / "hl7bridge.socket"
SOCKET_DROPIN = UNITS / "hl7bridge-socket-activation.conf"
TLS_DROPIN = UNITS / "hl7bridge-tls.conf"
POSTGRESQL_DROPIN = UNITS / "hl7bridge-postgresql.conf"
SHIPPED_BINARY = "/opt/hl7bridge/venv/bin/hl7bridge"
MAX_EXPOSURE = 3.0

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections to (key, value) lists in file order; keys repeat (ExecStart=, SystemCallFilter=, ...)."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a KEY=value line: {raw!r}"
        assert current is not None, f"{path.name}: {key} outside a section"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    """Every assignment of ``key``; an empty assignment resets the list, as systemd does."""
    out: list[str] = []
    for k, v in unit.get(section, []):
        if k == key:
            out = [] if v == "" else [*out, v]
    return out


def assigned(unit: Unit, section: str, key: str) -> list[str]:
    """Every raw assignment of ``key``, empty ones included."""
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


@pytest.fixture(scope="module")
def service() -> Unit:
    return parse_unit(SERVICE)


# --- the directives, in pure Python --------------------------------------------------------------


def test_service_lifecycle(service: Unit) -> None:
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "5",
        "KillSignal": "SIGTERM",
        "TimeoutStopSec": "30",
        "ExecReload": "/opt/hl7bridge/venv/bin/hl7bridge reload --pid $MAINPID --by systemd --config /etc/hl7bridge/hl7bridge.toml "
        "--database sqlite:////var/lib/hl7bridge/hl7bridge.db",
    }
    assert {key: one(service, "Service", key) for key in expected} == expected


def test_service_user_state_config_and_credential(service: Unit) -> None:
    expected = {
        "User": "hl7bridge",
        "Group": "hl7bridge",
        "StateDirectory": "hl7bridge",
        "StateDirectoryMode": "0700",
        "ConfigurationDirectory": "hl7bridge",
        "LoadCredential": "medchat-token:/etc/hl7bridge/medchat-token",
        "UMask": "0077",
    }
    assert {key: one(service, "Service", key) for key in expected} == expected
    assert not values(service, "Service", "DynamicUser")
    # The credential's name is the one the app looks for under $CREDENTIALS_DIRECTORY by default.
    assert one(service, "Service", "LoadCredential").split(":")[0] == ApiSettings().token_credential


def test_service_execstart_is_a_valid_serve_command(service: Unit) -> None:
    argv = shlex.split(one(service, "Service", "ExecStart"))
    assert argv == [
        SHIPPED_BINARY, "serve", "--config", "/etc/hl7bridge/hl7bridge.toml",
        "--database", "sqlite:////var/lib/hl7bridge/hl7bridge.db",
    ]  # fmt: skip
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config, args.database) == (
        "serve",
        "/etc/hl7bridge/hl7bridge.toml",
        "sqlite:////var/lib/hl7bridge/hl7bridge.db",
    )


def test_service_hardening(service: Unit) -> None:
    yes = [
        "NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
        "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups", "ProtectClock", "ProtectHostname",
        "RestrictNamespaces", "RestrictRealtime", "RestrictSUIDSGID", "LockPersonality", "MemoryDenyWriteExecute",
        "RemoveIPC", "PrivateUsers", "PrivateMounts",
    ]  # fmt: skip
    assert {key: one(service, "Service", key) for key in yes} == dict.fromkeys(yes, "yes")
    exact = {
        "ProtectSystem": "strict",
        "ProtectProc": "invisible",
        "ProcSubset": "pid",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "SystemCallArchitectures": "native",
        "DevicePolicy": "closed",
    }
    assert {key: one(service, "Service", key) for key in exact} == exact
    assert values(service, "Service", "SystemCallFilter") == ["@system-service", "~@privileged @resources"]


def test_service_bounds_its_descriptor_table(service: Unit) -> None:
    limit = one(service, "Service", "LimitNOFILE")
    assert limit.isdigit(), f"LimitNOFILE={limit}: expected one number (soft = hard), never infinity"
    needed = ListenerConfig("main").max_connections + HealthConfig().max_connections + DESCRIPTOR_BASE
    assert needed <= int(limit) <= 65536


def test_service_memory_is_bounded(service: Unit) -> None:
    """Whatever a peer sends, the service group cannot take the machine's memory (issue 22)."""
    assert {key: one(service, "Service", key) for key in ("MemoryHigh", "MemoryMax")} == {
        "MemoryHigh": "768M",
        "MemoryMax": "1G",
    }


def test_service_has_no_capabilities(service: Unit) -> None:
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert assigned(service, "Service", key) == [""], f"{key}= must be set, and empty"


def test_service_does_not_restrict_outbound_addresses(service: Unit) -> None:
    # The Journeys API is remote: an IP allow list would cut the dispatcher off.
    assert not assigned(service, "Service", "IPAddressDeny")
    assert not assigned(service, "Service", "IPAddressAllow")


def test_service_is_enabled_for_boot(service: Unit) -> None:
    assert values(service, "Install", "WantedBy") == ["multi-user.target"]


def test_socket_unit() -> None:
    unit = parse_unit(SOCKET)
    assert values(unit, "Socket", "ListenStream") == ["127.0.0.1:2575"]
    assert one(unit, "Socket", "Accept") == "no"
    assert one(unit, "Socket", "Service") == "hl7bridge.service"
    assert one(unit, "Socket", "FileDescriptorName")
    assert values(unit, "Install", "WantedBy") == ["sockets.target"]


def test_socket_activation_dropin_only_adds_the_systemd_listener(service: Unit) -> None:
    dropin = parse_unit(SOCKET_DROPIN)
    raw = assigned(dropin, "Service", "ExecStart")
    assert raw[0] == "", "the drop-in must clear ExecStart= before setting its own"
    argv = shlex.split(one(dropin, "Service", "ExecStart"))
    shipped = shlex.split(one(service, "Service", "ExecStart"))
    assert argv == [*shipped, "--listen", "systemd:domain=INET:index=0"]
    args = build_parser().parse_args(argv[1:])
    assert args.listen == ["systemd:domain=INET:index=0"]
    assert values(dropin, "Unit", "Requires") == ["hl7bridge.socket"]
    assert values(dropin, "Unit", "After") == ["hl7bridge.socket"]


def test_postgresql_dropin_only_leaves_the_database_to_the_configuration(service: Unit) -> None:
    """A ``--database`` argument would override ``[service] database``, the cluster's PostgreSQL URL."""
    dropin = parse_unit(POSTGRESQL_DROPIN)
    assert set(dropin) == {"Service"} and {k for k, _v in dropin["Service"]} == {"ExecStart", "ExecReload"}
    for key in ("ExecStart", "ExecReload"):
        assert assigned(dropin, "Service", key)[0] == "", f"the drop-in must clear {key}= before setting its own"
        shipped = shlex.split(one(service, "Service", key))
        argv = shlex.split(one(dropin, "Service", key))
        assert argv == shipped[: shipped.index("--database")] + shipped[shipped.index("--database") + 2 :]
        args = build_parser().parse_args([a.replace("$MAINPID", "1") for a in argv[1:]])
        assert args.database is None and args.config == "/etc/hl7bridge/hl7bridge.toml"


def test_tls_dropin_only_allows_write_execute_memory() -> None:
    assert parse_unit(TLS_DROPIN) == {"Service": [("MemoryDenyWriteExecute", "no")]}


# --- systemd-analyze ------------------------------------------------------------------------------


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian/Ubuntu package: systemd)")
    return path


def _systemd_version(tool: str) -> int:
    first = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    m = re.match(r"systemd (\d+)", first)
    return int(m[1]) if m else 0


def _existing_binary() -> str:
    """An executable to stand in for /opt/hl7bridge/venv/bin/hl7bridge, which is not installed here."""
    beside = Path(sys.executable).parent / "hl7bridge"
    return str(beside) if beside.exists() else (shutil.which("hl7bridge") or "/bin/true")


def _stage(tmp_path: Path, dropins: tuple[Path, ...] = ()) -> Path:
    """The units (and drop-ins) in tmp_path with ExecStart's binary replaced by an existing one."""
    binary = _existing_binary()
    for unit in (SERVICE, SOCKET):
        (tmp_path / unit.name).write_text(unit.read_text(encoding="utf-8").replace(SHIPPED_BINARY, binary))
    if dropins:
        directory = tmp_path / "hl7bridge.service.d"
        directory.mkdir()
        for dropin in dropins:
            (directory / dropin.name).write_text(dropin.read_text(encoding="utf-8").replace(SHIPPED_BINARY, binary))
    return tmp_path / SERVICE.name


def _verify(tool: str, *units: Path) -> None:
    result = subprocess.run([tool, "verify", *map(str, units)], capture_output=True, text=True, timeout=120)
    output = (result.stdout + result.stderr).strip()
    # Only lines about our units count: the host's own unit files may have warnings of their own.
    ours = [line for line in output.splitlines() if "hl7bridge" in line]
    assert result.returncode == 0 and not ours, output


@pytest.mark.parametrize(
    "dropins",
    [(), (SOCKET_DROPIN,), (TLS_DROPIN,), (SOCKET_DROPIN, TLS_DROPIN), (POSTGRESQL_DROPIN,)],
    ids=["plain", "socket-activation", "tls", "socket-activation+tls", "postgresql"],
)
def test_systemd_analyze_verify(tmp_path: Path, dropins: tuple[Path, ...]) -> None:
    tool = _systemd_analyze()
    service = _stage(tmp_path, dropins)
    _verify(tool, service, tmp_path / SOCKET.name)


def test_systemd_analyze_verify_catches_mistakes(tmp_path: Path) -> None:
    # The check above would be worthless if verify let a typo through.
    tool = _systemd_analyze()
    service = _stage(tmp_path)
    service.write_text(service.read_text().replace("ProtectHome=yes", "ProtectHome=yess\nProtectHomee=yes"))
    result = subprocess.run([tool, "verify", str(service)], capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert "ProtectHomee" in output and "yess" in output, output


_OVERALL = re.compile(r"Overall exposure level for (\S+): (\d+(?:\.\d+)?) (\w+)")


def exposure(tool: str, unit: Path) -> tuple[float, str]:
    if _systemd_version(tool) < 250:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    cmd = [tool, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(unit)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    m = _OVERALL.search(result.stdout)
    assert m, f"no overall exposure in the output of {shlex.join(cmd)}:\n{result.stdout}{result.stderr}"
    score, rating = float(m[2]), m[3]
    # --threshold is on the 0-100 scale: a non-zero exit means over MAX_EXPOSURE.
    assert result.returncode == 0, f"{shlex.join(cmd)} exited {result.returncode}: exposure {score} {rating}"
    return score, rating


def test_shipped_service_exposure_is_ok(tmp_path: Path) -> None:
    """The file exactly as shipped: systemd-analyze security --offline=true systemd/hl7bridge.service."""
    score, rating = exposure(_systemd_analyze(), SERVICE)
    assert score <= MAX_EXPOSURE and rating in ("OK", "SAFE", "PERFECT"), (score, rating)


@pytest.mark.parametrize("dropins", [(SOCKET_DROPIN,), (TLS_DROPIN,), (POSTGRESQL_DROPIN,)],
                         ids=["socket-activation", "tls", "postgresql"])  # fmt: skip
def test_service_exposure_with_dropins_is_ok(tmp_path: Path, dropins: tuple[Path, ...]) -> None:
    tool = _systemd_analyze()
    score, rating = exposure(tool, _stage(tmp_path, dropins))
    assert score <= MAX_EXPOSURE and rating in ("OK", "SAFE", "PERFECT"), (score, rating)
