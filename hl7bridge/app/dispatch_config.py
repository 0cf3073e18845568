"""Settings of the dispatch half: the API, dispatching, routes with their parameter mappings, the sandbox.

Validated like the rest of the configuration: every problem names its key and
what is expected; HL7 paths are checked against hl7apy's tables.
"""

from __future__ import annotations

import os
import re
from datetime import UTC, date, datetime, time
from typing import Any

from hl7bridge.core.checks import Check
from hl7bridge.core.checks import boolean as _bool
from hl7bridge.core.checks import choice as _choice
from hl7bridge.core.checks import nonempty as _nonempty
from hl7bridge.core.checks import number as _number
from hl7bridge.core.checks import string as _str
from hl7bridge.core.checks import strings as _strings
from hl7bridge.core.checks import table as _table
from hl7bridge.core.checks import unknown_settings as _unknown
from hl7bridge.core.checks import zone as _zone
from hl7bridge.dispatch.journeys import ApiSettings
from hl7bridge.dispatch.rules import DispatchSettings
from hl7bridge.hl7 import tables
from hl7bridge.hl7.er7 import Path
from hl7bridge.mapping.parameters import NAMED_VALUES, TYPES, Condition, ParameterSpec, is_named
from hl7bridge.mapping.routing import Criteria, Route, Router
from hl7bridge.testing.sandbox import FAULT_CHECKS, Faults, Journey, SandboxConfig, local_endpoint
from hl7bridge.workflow.reconcile import ReconcileSettings

# --- checks --------------------------------------------------------------------------------------


def _url(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        problems.append(f"{key}: expected an http(s) URL such as 'https://medchatapp.com', got {value!r}")
    return value


def _optional_url(value: Any, key: str, problems: list[str]) -> Any:
    return _url(value, key, problems) if value != "" else value


def _file(value: Any, key: str, problems: list[str]) -> Any:
    if value != "" and not (isinstance(value, str) and os.path.isfile(value)):
        problems.append(f"{key}: expected the path of a readable file (a PEM CA bundle), got {value!r}")
    return value


def _cancel_path(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or "{instanceId}" not in value or not value.startswith("/"):
        problems.append(f"{key}: expected a path starting with / that contains {{instanceId}}, got {value!r}")
        return value
    try:
        value.format(orgId="o", chatBotId="c", instanceId="i")
    except (KeyError, IndexError, ValueError):
        problems.append(f"{key}: only {{orgId}}, {{chatBotId}} and {{instanceId}} may appear in braces")
    return value


def _expiry(value: Any, key: str, problems: list[str]) -> str:
    """A TOML date or date-time, or the same as an ISO 8601 string; a date means 00:00 UTC that day, a time
    without an offset is UTC. Kept as ISO 8601 in UTC (``ApiSettings`` crosses to the child as JSON);
    ``""`` means not known."""
    if isinstance(value, str) and value:
        try:
            value = datetime.fromisoformat(value) if "T" in value or " " in value else date.fromisoformat(value)
        except ValueError:
            pass
    if value == "":
        return ""
    if isinstance(value, datetime):
        return (value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)).isoformat()
    if isinstance(value, date):
        return datetime.combine(value, time(), UTC).isoformat()
    problems.append(f"{key}: expected a date or date-time such as 2027-03-01 or 2027-03-01T12:00:00Z, got {value!r}")
    return ""


API_KEYS: dict[str, Check] = {
    "base_url": _url,
    "org_id": _str,
    "token_file": _str,
    "token_env": _str,
    "token_credential": _str,
    "cancel_path": _cancel_path,
    "connect_timeout": _number(0.1, 300),
    "read_timeout": _number(0.1, 600),
    "call_timeout": _number(0.1, 3600),
    "ca_file": _file,
    "proxy": _optional_url,
    "token_expires": _expiry,
}

DISPATCH_KEYS: dict[str, Check] = {
    "batch_size": _number(1, 1000, integer=True),
    "batch_window_ms": _number(0, 60_000, integer=True),
    "workers": _number(1, 64, integer=True),
    "retry_initial": _number(0.01, 3600),
    "retry_max": _number(0.1, 86_400),
    "auth_probe_interval": _number(0.1, 3600),
    "poll_interval": _number(0.1, 3600),
    "unrouted": _choice("ignore", "reject"),
    "run_in": _choice("process", "thread"),
}

RECONCILE_KEYS: dict[str, Check] = {
    "token_file": _str,
    "token_env": _str,
    "token_credential": _str,
    "calls_per_second": _number(0.01, 1000),
    "max_calls": _number(1, 10_000_000, integer=True),
    "page_size": _number(1, 10_000, integer=True),
    "retries": _number(0, 100, integer=True),
    "retry_after_max": _number(0, 3600),
}

CRITERIA_KEYS = ("sending_application", "sending_facility", "location", "department", "appointment_type", "provider")


def parse_api(data: Any, problems: list[str]) -> ApiSettings:
    return ApiSettings(**_table(data, "api", API_KEYS, problems))


def parse_reconcile(data: Any, problems: list[str]) -> ReconcileSettings:
    return ReconcileSettings(**_table(data, "reconcile", RECONCILE_KEYS, problems))


#: [dispatch] keys whose ``DispatchSettings`` field has another name, and the factor to its unit.
DISPATCH_FIELDS = {"batch_window_ms": ("batch_window", 0.001), "auth_probe_interval": ("probe_interval", 1.0)}


def parse_dispatch(data: Any, problems: list[str]) -> DispatchSettings:
    values = _table(data, "dispatch", DISPATCH_KEYS, problems)
    for key, (name, factor) in DISPATCH_FIELDS.items():
        if isinstance(values.get(key), int | float):
            values[name] = values.pop(key) * factor
        values.pop(key, None)
    return DispatchSettings(**values)


# --- routes ----------------------------------------------------------------------------------------


def _source_fields(sources: list[str]) -> set[tuple[str, int | None]]:
    """The (segment, field) pairs the sources read; a source that is no path was reported by ``_source``."""
    fields = set()
    for text in sources:
        if is_named(text):
            continue
        try:
            path = Path.parse(text)
        except ValueError:
            continue
        fields.add((path.segment, path.field))
    return fields


def _source(text: str, key: str, problems: list[str]) -> None:
    if is_named(text):
        return
    try:
        path = Path.parse(text)
    except ValueError:
        problems.append(f"{key}: {text!r} is neither an HL7 path (e.g. PID-3.1) nor a named value "
                        f"({', '.join(sorted(NAMED_VALUES))})")  # fmt: skip
        return
    reason = tables.check_path(path)
    if reason:
        problems.append(f"{key}: {text}: {reason}")


def _parameter(name: str, data: Any, key: str, problems: list[str]) -> ParameterSpec | None:
    if isinstance(data, str):
        data = {"source": data}
    if not isinstance(data, dict):
        problems.append(f"{key}: expected a table (source/where/template/constant/type/required/default)")
        return None
    _unknown(data, ("source", "where", "template", "constant", "type", "required", "default"), key, problems)
    sources = _strings(data.get("source", []), f"{key}.source", problems)
    for text in sources:
        _source(text, f"{key}.source", problems)
    template = data.get("template", "")
    if not isinstance(template, str):
        problems.append(f"{key}.template: expected a string such as '{{PID-5.2}} {{PID-5.1}}'")
        template = ""
    for placeholder in re.findall(r"\{([^{}]+)\}", template):
        _source(placeholder.strip(), f"{key}.template", problems)
    constant = data.get("constant")
    if constant is not None and not isinstance(constant, str):
        problems.append(f"{key}.constant: expected a string (the API takes strings only), got {constant!r}")
    given = [k for k in ("source", "template", "constant") if k in data]
    if len(given) != 1:
        problems.append(f"{key}: give exactly one of source, template or constant (found {', '.join(given) or 'none'})")
    kind = data.get("type", "text")
    if kind not in TYPES:
        problems.append(f"{key}.type: expected one of {', '.join(TYPES)}, got {kind!r}")
    where_data = data.get("where", {})
    conditions = []
    if not isinstance(where_data, dict):
        problems.append(f'{key}.where: expected a table such as {{ "PID-3.5" = "MR" }}')
        where_data = {}
    fields = _source_fields(sources)
    for path_text, wanted in where_data.items():
        try:
            path = Path.parse(path_text)
        except ValueError as exc:
            problems.append(f"{key}.where: {exc}")
            continue
        reason = tables.check_path(path)
        if reason:
            problems.append(f"{key}.where: {path_text}: {reason}")
        if path.component is None:
            problems.append(f"{key}.where: {path_text} must name a component, e.g. PID-3.5")
        if (path.segment, path.field) not in fields:
            problems.append(f"{key}.where: {path_text} is not a component of a source field ({', '.join(sources)})")
        values = _strings(wanted, f"{key}.where.{path_text}", problems)
        conditions.append(Condition(path, tuple(v.strip().upper() for v in values)))
    required = data.get("required", False)
    if not isinstance(required, bool):
        problems.append(f"{key}.required: expected true or false")
    default = data.get("default", "")
    if not isinstance(default, str):
        problems.append(f"{key}.default: expected a string")
    return ParameterSpec(name, sources, tuple(conditions), template, constant, kind, bool(required), str(default))


ROUTE_KEYS = {
    "name", "listeners", "match", "exclude", "chat_bot_id", "time_zone", "flow_id", "parameters",
    "instance_identifiers", "on_reschedule", "reschedule_flow_id", "on_noshow", "noshow_flow_id",
    "content_errors", "skip_started", "skip_statuses",
}  # fmt: skip


def _criteria(data: Any, key: str, problems: list[str]) -> Criteria:
    if data is None:
        return Criteria()
    if not isinstance(data, dict):
        problems.append(f"{key}: expected a table with any of {', '.join(CRITERIA_KEYS)}")
        return Criteria()
    values = {}
    for name, value in data.items():
        if name not in CRITERIA_KEYS:
            problems.append(f"{key}.{name}: unknown criterion (known: {', '.join(CRITERIA_KEYS)})")
            continue
        values[name] = _strings(value, f"{key}.{name}", problems)
    return Criteria(**values)


def parse_routes(data: Any, listeners: set[str], problems: list[str]) -> tuple[Route, ...]:
    if data is None:
        return ()
    if not isinstance(data, list):
        problems.append("routes: expected [[routes]] tables")
        return ()
    routes = []
    names: set[str] = set()
    for index, body in enumerate(data):
        if not isinstance(body, dict):
            problems.append(f"routes[{index}]: expected a table")
            continue
        name = body.get("name", f"route-{index + 1}")
        key = f"routes[{name}]"
        if name in names:
            problems.append(f"{key}.name: the name is used by another route")
        names.add(name)
        _unknown(body, ROUTE_KEYS, key, problems)
        _nonempty(body.get("chat_bot_id"), f"{key}.chat_bot_id", problems)
        _zone(body.get("time_zone", "UTC"), f"{key}.time_zone", problems)
        params_data = body.get("parameters")
        specs = []
        if not isinstance(params_data, dict) or not params_data:
            problems.append(f"{key}.parameters: expected [routes.parameters.NAME] tables, one per journey parameter")
        else:
            for pname, pdata in params_data.items():
                spec = _parameter(pname, pdata, f"{key}.parameters.{pname}", problems)
                if spec is not None:
                    specs.append(spec)
        identifiers = _strings(body.get("instance_identifiers", []), f"{key}.instance_identifiers", problems)
        if not identifiers:
            problems.append(f"{key}.instance_identifiers: name the parameter(s) that identify an instance, "
                            "e.g. ['appointmentId']")  # fmt: skip
        for ident in identifiers:
            if ident not in {s.name for s in specs}:
                problems.append(f"{key}.instance_identifiers: {ident!r} is not one of the route's parameters")
        route_listeners = _strings(body.get("listeners", []), f"{key}.listeners", problems)
        for listener in route_listeners:
            if listener not in listeners:
                problems.append(
                    f"{key}.listeners: no listener named {listener!r} (have: {', '.join(sorted(listeners))})"
                )
        reschedule = _choice("retrigger", "subflow")(body.get("on_reschedule", "retrigger"), f"{key}.on_reschedule",
                                                      problems)  # fmt: skip
        noshow = _choice("cancel", "ignore", "subflow")(body.get("on_noshow", "cancel"), f"{key}.on_noshow", problems)
        for mode, flow_key in ((reschedule, "reschedule_flow_id"), (noshow, "noshow_flow_id")):
            if mode == "subflow" and not body.get(flow_key):
                problems.append(f"{key}.{flow_key}: required when the route asks for a subflow")
        content = _choice("reject", "accept")(body.get("content_errors", "reject"), f"{key}.content_errors", problems)
        skip_started = _bool(body.get("skip_started", True), f"{key}.skip_started", problems)
        routes.append(
            Route(
                name=str(name),
                chat_bot_id=str(body.get("chat_bot_id", "")),
                time_zone=str(body.get("time_zone", "UTC")),
                parameters=tuple(specs),
                instance_identifiers=identifiers,
                flow_id=body.get("flow_id") or None,
                listeners=route_listeners,
                match=_criteria(body.get("match"), f"{key}.match", problems),
                exclude=_criteria(body.get("exclude"), f"{key}.exclude", problems),
                reschedule=reschedule,
                reschedule_flow_id=str(body.get("reschedule_flow_id", "")),
                noshow=noshow,
                noshow_flow_id=str(body.get("noshow_flow_id", "")),
                content_errors=content,
                skip_started=bool(skip_started),
                skip_statuses=_strings(body.get("skip_statuses", []), f"{key}.skip_statuses", problems),
            )
        )
    return tuple(routes)


def router(routes: tuple[Route, ...], dispatch: DispatchSettings) -> Router | None:
    return Router(routes, dispatch.unrouted) if routes else None


# --- sandbox -----------------------------------------------------------------------------------

JOURNEY_KEYS = ("chat_bot_id", "name", "parameters", "datetime_parameters", "instance_identifiers", "subflows")


def parse_sandbox(data: Any, problems: list[str]) -> SandboxConfig:
    if data is None:
        return SandboxConfig()
    if not isinstance(data, dict):
        problems.append("sandbox: expected a table")
        return SandboxConfig()
    _unknown(data, ("listen", "org_id", "tokens", "journeys", "faults", "control_token", "control_token_file",
                    "allow_remote", "state_file"), "sandbox", problems)  # fmt: skip
    tokens: dict[str, frozenset[str]] = {}
    for index, item in enumerate(data.get("tokens", [])):
        if not isinstance(item, dict) or not isinstance(item.get("token"), str) or not item["token"]:
            problems.append(f"sandbox.tokens[{index}]: expected {{ token = '...', scopes = [...] }}")
            continue
        tokens[item["token"]] = frozenset(_strings(item.get("scopes", []), f"sandbox.tokens[{index}].scopes", problems))
    journeys = []
    for index, item in enumerate(data.get("journeys", [])):
        key = f"sandbox.journeys[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{key}: expected a table")
            continue
        _unknown(item, JOURNEY_KEYS, key, problems)
        _nonempty(item.get("chat_bot_id"), f"{key}.chat_bot_id", problems)
        params = _strings(item.get("parameters", []), f"{key}.parameters", problems)
        dts = _strings(item.get("datetime_parameters", []), f"{key}.datetime_parameters", problems)
        ids = _strings(item.get("instance_identifiers", []), f"{key}.instance_identifiers", problems)
        for name in (*dts, *ids):
            if name not in params:
                problems.append(f"{key}: {name!r} is not in parameters")
        journeys.append(Journey(str(item.get("chat_bot_id", "")), str(item.get("name", item.get("chat_bot_id", ""))),
                                params, dts, ids, _strings(item.get("subflows", []), f"{key}.subflows", problems)))  # fmt: skip
    faults = Faults(**_table(data.get("faults", {}), "sandbox.faults", FAULT_CHECKS, problems))
    listen = _str(data.get("listen", SandboxConfig.listen), "sandbox.listen", problems)
    allow_remote = _bool(data.get("allow_remote", False), "sandbox.allow_remote", problems)
    if isinstance(listen, str) and isinstance(allow_remote, bool):
        try:
            local_endpoint(listen, allow_remote)
        except ValueError as exc:
            problems.append(f"sandbox.listen: {exc}")
    control = data.get("control_token", "")
    if control != "" and (not isinstance(control, str) or len(control) < 16 or not control.isprintable()
                          or " " in control):  # fmt: skip
        problems.append("sandbox.control_token: expected \"\" (a random token at each start) or at least 16 printable "
                        "characters without spaces")  # fmt: skip
    elif control in tokens:
        problems.append("sandbox.control_token: must differ from every sandbox.tokens token (it opens /_sandbox/ only)")
    token_file = _str(data.get("control_token_file", SandboxConfig.control_token_file), "sandbox.control_token_file",
                      problems)  # fmt: skip
    state_file = _str(data.get("state_file", SandboxConfig.state_file), "sandbox.state_file", problems)
    return SandboxConfig(listen, str(data.get("org_id", "")), tokens, tuple(journeys), faults, str(control),
                         str(token_file), allow_remote is True, str(state_file))  # fmt: skip
