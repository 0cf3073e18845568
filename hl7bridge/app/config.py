"""Settings: TOML in, validated dataclasses out; every error names the key and what is expected."""

from __future__ import annotations

import ipaddress
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path as FsPath
from typing import Any
from zoneinfo import ZoneInfo

from hl7bridge.app.dispatch_config import (
    parse_api,
    parse_dispatch,
    parse_reconcile,
    parse_routes,
    parse_sandbox,
)
from hl7bridge.core.checks import Check
from hl7bridge.core.checks import boolean as _bool
from hl7bridge.core.checks import choice as _choice
from hl7bridge.core.checks import integer as _int
from hl7bridge.core.checks import number as _number
from hl7bridge.core.checks import seconds as _seconds
from hl7bridge.core.checks import string as _str
from hl7bridge.core.checks import table as _section
from hl7bridge.core.checks import zone as _zone
from hl7bridge.dispatch.journeys import ApiSettings
from hl7bridge.dispatch.leader import DEFAULT_LEASE
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.hl7 import charsets, tables
from hl7bridge.hl7.er7 import DEFAULT_LIMITS, Limits, Path
from hl7bridge.hl7.siu import DEFAULT_START_SOURCES, Feed
from hl7bridge.mapping.routing import Route
from hl7bridge.mllp.tls import DEFAULT_CIPHERS, MIN_VERSIONS, TlsError, TlsSettings, context_for, endpoint_fields
from hl7bridge.testing.sandbox import SandboxConfig
from hl7bridge.workflow.reconcile import ReconcileSettings

DEFAULT_ENDPOINT = "tcp:2575:interface=127.0.0.1"
DEFAULT_DATABASE = "sqlite:///var/hl7bridge.db"


class ConfigError(ValueError):
    """One or more settings are wrong; ``str()`` lists each with the key and what is expected."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    endpoint: str = DEFAULT_ENDPOINT
    tls_client_ca: str = ""
    tls_client_names: tuple[str, ...] = ()
    tls_min_version: str = "1.2"
    tls_ciphers: str = DEFAULT_CIPHERS
    max_message_bytes: int = 1024 * 1024
    idle_timeout: float = 3600.0
    frame_timeout: float = 30.0
    max_connections: int = 200
    max_connections_per_peer: int = 32
    max_in_flight: int = 1000
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    lenient_framing: bool = True
    ack_mode: str = "stored"
    dispatch_timeout: float = 20.0
    time_zone: str = "UTC"
    start_sources: tuple[tuple[str, ...], ...] = DEFAULT_START_SOURCES
    charset_fallback: tuple[str, ...] = ("utf-8",)
    validation: str = "fast"
    max_segments: int = DEFAULT_LIMITS.segments
    max_repetitions: int = DEFAULT_LIMITS.repetitions
    max_components: int = DEFAULT_LIMITS.components
    max_subcomponents: int = DEFAULT_LIMITS.subcomponents
    max_batch_messages: int = DEFAULT_LIMITS.batch_messages

    def feed(self) -> Feed:
        limits = Limits(self.max_segments, self.max_repetitions, self.max_components, self.max_subcomponents,
                        self.max_batch_messages)  # fmt: skip
        return Feed(ZoneInfo(self.time_zone), self.start_sources, limits)

    def tls_settings(self) -> TlsSettings:
        return TlsSettings(self.tls_min_version, self.tls_ciphers, self.tls_client_ca, self.tls_client_names)

    def allows(self, host: str) -> bool:
        if not self.allow:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self.allow)


@dataclass(frozen=True)
class ServiceConfig:
    database: str = DEFAULT_DATABASE
    sqlite_synchronous: str = "FULL"
    application: str = "HL7BRIDGE"
    facility: str = ""
    log_level: str = "info"
    log_format: str = "text"
    log_phi: bool = False
    ack_phi: bool = False
    retention_days: int = 0
    integrity_check: str = "quick"
    #: Where ``serve`` keeps its pid for ``reload`` and ``dispatch now``; "" beside the SQLite log.
    pid_file: str = ""
    #: Seconds an elected dispatcher's lease lasts without renewal before a standby may take over.
    dispatch_lease: float = DEFAULT_LEASE
    #: This instance's name in ``status``; "": host:port of the first listener (``app.instance.default_name``).
    instance_name: str = ""


@dataclass(frozen=True)
class HealthConfig:
    listen: str = ""
    outbox_stuck_after: float = 900.0
    heartbeat_interval: float = 10.0
    max_connections: int = 16


@dataclass(frozen=True)
class ConsoleConfig:
    """The JSON API and console listener (``hl7bridge.api``); off while ``listen`` is empty."""

    listen: str = ""
    max_connections: int = 64
    #: A connection that sends no complete request for this long is closed.
    idle_timeout: float = 60.0
    #: A request not complete (its first line to its last byte) this long after it began is cut off.
    request_timeout: float = 30.0
    #: A session unused this long ends; none lasts longer than ``session_absolute``.
    session_idle: float = 1800.0
    session_absolute: float = 43200.0

    @property
    def tls(self) -> bool:
        return self.listen.split(":", 1)[0] == "ssl"

    def cleartext_warning(self) -> str | None:
        """A plain ``tcp:`` console reachable from other machines sends passwords and session cookies in clear."""
        parts, _ = endpoint_fields(self.listen)
        if parts[0] not in ("tcp", "tcp6"):
            return None
        interface = next((p.partition("=")[2] for p in parts[1:] if p.startswith("interface=")), "")
        try:
            if interface and ipaddress.ip_address(interface).is_loopback:
                return None
        except ValueError:
            pass
        return (f"console.listen {self.listen} serves plain http beyond this machine: passwords, session cookies and "
                "unmasked patient data cross the network unencrypted; use an ssl: endpoint (or a loopback interface "
                "behind a TLS proxy)")  # fmt: skip


@dataclass(frozen=True)
class Config:
    service: ServiceConfig = field(default_factory=ServiceConfig)
    listeners: tuple[ListenerConfig, ...] = (ListenerConfig("main"),)
    api: ApiSettings = field(default_factory=ApiSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    routes: tuple[Route, ...] = ()
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    reconcile: ReconcileSettings = field(default_factory=ReconcileSettings)
    console: ConsoleConfig = field(default_factory=ConsoleConfig)
    source: str = "(built-in defaults)"

    def with_overrides(
        self, listen: list[str] | None = None, database: str | None = None, api_url: str | None = None
    ) -> Config:
        """Operator overrides from the command line (validated like the file)."""
        cfg = self
        if database:
            cfg = replace(cfg, service=replace(cfg.service, database=database))
        if api_url:
            if not api_url.startswith(("http://", "https://")):
                raise ConfigError([f"--api-url {api_url}: expected an http(s) URL such as http://127.0.0.1:8080"])
            cfg = replace(cfg, api=replace(cfg.api, base_url=api_url))
        if listen:
            base = cfg.listeners[0] if cfg.listeners else ListenerConfig("main")
            problems: list[str] = []
            listeners = []
            for i, endpoint in enumerate(listen):
                name = base.name if i == 0 else f"{base.name}-{i + 1}"
                _check_endpoint(endpoint, f"--listen {endpoint}", problems)
                listeners.append(replace(base, name=name, endpoint=endpoint))
            if problems:
                raise ConfigError(problems)
            cfg = replace(cfg, listeners=tuple(listeners))
        return cfg


# --- validation ---------------------------------------------------------------------------------


def _cidrs(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, list):
        problems.append(f"{key}: expected a list of CIDR networks such as ['10.0.0.0/8'], got {value!r}")
        return ()
    out = []
    for item in value:
        try:
            out.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            problems.append(f"{key}: {item!r} is not an IP network (expected e.g. '10.1.2.0/24' or '::1/128')")
    return tuple(out)


def _charsets(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, list) or not value:
        problems.append(f"{key}: expected a non-empty list of character sets such as ['utf-8'], got {value!r}")
        return ("utf-8",)
    for item in value:
        if not isinstance(item, str) or charsets.codec_for(item) is None:
            problems.append(f"{key}: {item!r} is not a known character set (e.g. 'utf-8', 'iso-8859-1', '8859/1')")
    return tuple(value)


def _start_sources(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, list) or not value:
        problems.append(f"{key}: expected a non-empty list such as ['TQ1-7', 'SCH-11.4', 'AIS-4|AIL-6'], got {value!r}")
        return DEFAULT_START_SOURCES
    groups = []
    for item in value:
        if not isinstance(item, str):
            problems.append(f"{key}: {item!r} is not a string")
            continue
        group = tuple(p.strip() for p in item.split("|"))
        for text in group:
            try:
                path = Path.parse(text)
            except ValueError as exc:
                problems.append(f"{key}: {exc}")
                continue
            reason = tables.check_path(path)
            if reason:
                problems.append(f"{key}: {text}: {reason}")
                continue
            kinds = {tables.element(v, path).datatype for v in tables.SUPPORTED_VERSIONS
                     if tables.element(v, path) is not None}  # fmt: skip
            if not kinds & tables.TIMESTAMP_TYPES:
                problems.append(
                    f"{key}: {text} is not a date/time field (its datatype is {'/'.join(sorted(k or '?' for k in kinds))})"
                )
        groups.append(group)
    return tuple(groups)


def _endpoint(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str):
        problems.append(f"{key}: expected a Twisted endpoint string such as 'tcp:2575:interface=127.0.0.1'")
        return value
    _check_endpoint(value, key, problems)
    return value


def _check_endpoint(value: str, key: str, problems: list[str]) -> None:
    from twisted.internet import endpoints, reactor

    kind = value.split(":", 1)[0]
    if kind not in ("tcp", "tcp6", "ssl", "systemd", "unix"):
        problems.append(
            f"{key}: endpoint {value!r} must start with tcp:, tcp6:, ssl:, systemd: or unix: "
            "(e.g. 'tcp:2575:interface=127.0.0.1' or 'ssl:2575:privateKey=key.pem:certKey=cert.pem')"
        )
        return
    if kind == "systemd":
        # The sockets exist only once systemd passes them; check the syntax, not the descriptors.
        options = dict(part.partition("=")[::2] for part in value.split(":")[1:])
        if options.get("domain") not in ("INET", "INET6", "UNIX") or not options.get("index", "").isdigit():
            problems.append(f"{key}: expected e.g. 'systemd:domain=INET:index=0', got {value!r}")
        return
    try:
        endpoints.serverFromString(reactor, value)
    except Exception as exc:  # noqa: BLE001 - Twisted raises many kinds; all mean a bad string
        problems.append(f"{key}: endpoint {value!r} is not usable: {exc}")


_TLS_KEYS = ("tls_client_ca", "tls_client_names", "tls_min_version", "tls_ciphers")


def _check_tls(listener: ListenerConfig, prefix: str, problems: list[str]) -> None:
    """TLS settings need an ssl: endpoint. The context is built once here, so that a cipher list that
    selects nothing or an unusable key or CA file is reported at start, naming its key."""
    if any(p.startswith(f"{prefix}.") for p in problems):
        return
    if not listener.endpoint.startswith("ssl:"):
        defaults = ListenerConfig("")
        problems.extend(f"{prefix}.{key}: TLS settings need an ssl: endpoint"
                        for key in _TLS_KEYS if getattr(listener, key) != getattr(defaults, key))  # fmt: skip
        return
    if listener.tls_client_names and not listener.tls_client_ca:
        problems.append(f"{prefix}.tls_client_names: needs tls_client_ca (client certificates are asked for then)")
        return
    try:
        context_for(listener.endpoint, listener.tls_settings())
    except TlsError as exc:
        problems.append(f"{prefix}.{exc.key}: {exc}")


def _names(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append(f"{key}: expected a list of certificate names such as ['epic-feed.example.org'], got {value!r}")
        return ()
    return tuple(value)


def _ciphers(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key}: expected an OpenSSL cipher list such as {DEFAULT_CIPHERS!r}, got {value!r}")
        return DEFAULT_CIPHERS
    return value


SERVICE_KEYS: dict[str, Check] = {
    "database": _str,
    "sqlite_synchronous": _choice("FULL", "NORMAL", "EXTRA"),
    "application": _str,
    "facility": _str,
    "log_level": _choice("debug", "info", "warning", "error"),
    "log_format": _choice("text", "json"),
    "log_phi": _bool,
    "ack_phi": _bool,
    "retention_days": _int(0, 36500),
    "integrity_check": _choice("quick", "off"),
    "pid_file": _str,
    "dispatch_lease": _number(2.0, 600.0),
    "instance_name": _str,
}

HEALTH_KEYS: dict[str, Check] = {
    "listen": _str,
    "outbox_stuck_after": _seconds,
    "heartbeat_interval": _seconds,
    "max_connections": _int(1, 10_000),
}

CONSOLE_KEYS: dict[str, Check] = {
    "listen": _str,
    "max_connections": _int(1, 10_000),
    "idle_timeout": _seconds,
    "request_timeout": _seconds,
    "session_idle": _seconds,
    "session_absolute": _seconds,
}

LISTENER_KEYS: dict[str, Check] = {
    "endpoint": _endpoint,
    "tls_client_ca": _str,
    "tls_client_names": _names,
    "tls_min_version": _choice(*MIN_VERSIONS),
    "tls_ciphers": _ciphers,
    "max_message_bytes": _int(1024, 64 * 1024 * 1024),
    "idle_timeout": _seconds,
    "frame_timeout": _seconds,
    "max_connections": _int(1, 100_000),
    "max_connections_per_peer": _int(1, 100_000),
    "max_in_flight": _int(1, 100_000),
    "allow": _cidrs,
    "lenient_framing": _bool,
    "ack_mode": _choice("stored", "dispatched"),
    "dispatch_timeout": _seconds,
    "time_zone": _zone,
    "start_sources": _start_sources,
    "charset_fallback": _charsets,
    "validation": _choice("fast", "strict"),
    "max_segments": _int(10, 1_000_000),
    "max_repetitions": _int(1, 1_000_000),
    "max_components": _int(1, 1_000_000),
    "max_subcomponents": _int(1, 1_000_000),
    "max_batch_messages": _int(1, 1_000_000),
}


def parse(data: dict[str, Any], source: str = "(inline)") -> Config:
    problems: list[str] = []
    sections = ("service", "listeners", "api", "dispatch", "routes", "sandbox", "health", "reconcile", "console")
    for key in data:
        if key not in sections:
            problems.append(f"{key}: unknown section (known: {', '.join(sections)})")
    service = ServiceConfig(**_section(data.get("service", {}), "service", SERVICE_KEYS, problems))
    listeners_data = data.get("listeners", {"main": {}})
    listeners = []
    if not isinstance(listeners_data, dict) or not listeners_data:
        problems.append("listeners: expected at least one [listeners.NAME] table")
    else:
        for name, body in listeners_data.items():
            prefix = f"listeners.{name}"
            values = _section(body, prefix, LISTENER_KEYS, problems)
            listener = ListenerConfig(name=name, **values)
            _check_tls(listener, prefix, problems)
            listeners.append(listener)
    api = parse_api(data.get("api", {}), problems)
    dispatch = parse_dispatch(data.get("dispatch", {}), problems)
    routes = parse_routes(data.get("routes"), {lst.name for lst in listeners}, problems)
    sandbox = parse_sandbox(data.get("sandbox"), problems)
    health = HealthConfig(**_section(data.get("health", {}), "health", HEALTH_KEYS, problems))
    reconcile = parse_reconcile(data.get("reconcile", {}), problems)
    console = ConsoleConfig(**_section(data.get("console", {}), "console", CONSOLE_KEYS, problems))
    _check_console(console, problems)
    if health.listen:
        _check_endpoint(health.listen, "health.listen", problems)
    if health.heartbeat_interval <= 0:
        problems.append("health.heartbeat_interval: expected a number of seconds > 0")
    if routes and not api.org_id:
        problems.append("api.org_id: required when routes are configured (your MedChat organization id)")
    for listener in listeners:
        if listener.ack_mode == "dispatched" and not routes:
            problems.append(f"listeners.{listener.name}.ack_mode: 'dispatched' needs at least one [[routes]] table")
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return Config(service, tuple(listeners), api, dispatch, routes, sandbox, health, reconcile, console, source)


def _check_console(console: ConsoleConfig, problems: list[str]) -> None:
    if console.listen:
        _check_endpoint(console.listen, "console.listen", problems)
    if any(p.startswith("console.") for p in problems):
        return
    if console.tls:
        try:
            context_for(console.listen, TlsSettings())
        except TlsError as exc:
            problems.append(f"console.listen: {exc}")
    if console.idle_timeout <= 0:
        problems.append("console.idle_timeout: expected a number of seconds > 0")
    if console.request_timeout <= 0:
        problems.append("console.request_timeout: expected a number of seconds > 0")
    if console.session_idle <= 0:
        problems.append("console.session_idle: expected a number of seconds > 0")
    if console.session_absolute < console.session_idle:
        problems.append(f"console.session_absolute: expected at least session_idle ({console.session_idle:g} s), "
                        f"got {console.session_absolute:g}")  # fmt: skip


def load(path: str | FsPath | None) -> Config:
    if path is None:
        return Config()
    p = FsPath(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such configuration file (give --config PATH)"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read it: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: not valid TOML: {exc}"]) from None
    return parse(data, str(p))
