"""A real Journeys API emulator (Twisted web) for the demo, the tests, and users' own trials.

It implements the three endpoints of the MedChat pages (bulk trigger, search,
cancel on both documented paths), checks bearer tokens and scopes, validates
bodies the way the API answers (400 with an array of messages), keeps instances
so that search and cancel behave for real, and injects faults on demand.
``GET /_sandbox/calls`` and ``GET /_sandbox/instances`` show what arrived. Those hold patient data
and ``/_sandbox/tokens`` grants API access, so every ``/_sandbox/`` path takes a control token of its
own (never an API token), and the sandbox binds to loopback unless the config allows more.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import tempfile
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.internet import defer, endpoints, task
from twisted.python.failure import Failure
from twisted.web import resource, server

from hl7bridge.core.checks import Check, choice, integer, nonempty, number, strings, table
from hl7bridge.mllp.tls import endpoint_fields

log = logging.getLogger("hl7bridge.sandbox")

CREATE_SCOPE = "create.journey_instances"
READ_SCOPE = "read.journey_instances"
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_ROUTE = re.compile(
    r"^/chatbotapi(?P<external>/external)?/orgs/(?P<org>[^/]+)/journeys/(?P<bot>[^/]+)/instances"
    r"(?:/(?P<action>bulk|search)|/(?P<instance>[^/]+)/execution)$"
)
#: Control bodies are a few settings; anything larger is a mistake, not a request to buffer.
MAX_CONTROL_BODY = 64 * 1024
MAX_TOKENS = 1000
MAX_TOKEN_LENGTH = 512
OUTAGE_MODES = ("refuse", "503", "timeout")
#: The faults an operator can set, in the config's [sandbox.faults] and through POST /_sandbox/faults.
FAULT_CHECKS: dict[str, Check] = {
    "error_rate": number(0, 1),
    "latency_ms": number(0, 600_000),
    "rate_limit_every": integer(0, 1_000_000_000),
    "retry_after": number(0, 86_400),
    "slow_every": integer(0, 1_000_000_000),
    "slow_seconds": number(0, 3_600),
}


def _parameters(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        problems.append(f"{key}: expected an object of parameter names to string values")
        return {}
    return value


#: The body of POST /_sandbox/drift.
DRIFT_CHECKS: dict[str, Check] = {
    "action": choice("delete", "duplicate", "edit"),
    "id": nonempty,
    "parameters": _parameters,
    "status": nonempty,
}
_LOOPBACK_INTERFACE = {"tcp": "127.0.0.1", "tcp6": "\\:\\:1"}


@dataclass(frozen=True)
class Journey:
    chat_bot_id: str
    name: str
    parameters: tuple[str, ...]
    datetime_parameters: tuple[str, ...] = ()
    instance_identifiers: tuple[str, ...] = ()
    subflows: tuple[str, ...] = ()


@dataclass
class Faults:
    """Injected failures. ``outage_mode``: "refuse" (port closed), "503", or "timeout" (no answer)."""

    error_rate: float = 0.0
    latency_ms: float = 0.0
    rate_limit_every: int = 0
    retry_after: float = 1.0
    slow_every: int = 0
    slow_seconds: float = 0.0
    outage_mode: str = ""
    outage_until: float = 0.0

    def outage(self, now: float) -> str:
        return self.outage_mode if self.outage_mode and now < self.outage_until else ""

    def describe(self, now: float) -> dict[str, Any]:
        """The faults in force, as ``GET /_sandbox/faults`` shows them (the outage with the seconds left)."""
        shown: dict[str, Any] = {name: getattr(self, name) for name in FAULT_CHECKS}
        mode = self.outage(now)
        shown["outage"] = {"mode": mode, "seconds": round(self.outage_until - now, 3)} if mode else None
        return shown


@dataclass(frozen=True)
class SandboxConfig:
    listen: str = "tcp:8080:interface=127.0.0.1"
    org_id: str = ""
    tokens: dict[str, frozenset[str]] = field(default_factory=dict)
    journeys: tuple[Journey, ...] = ()
    faults: Faults = field(default_factory=Faults)
    #: The token of /_sandbox/ (never an API token); empty: a random one at each start.
    control_token: str = field(default="", repr=False)
    control_token_file: str = "var/sandbox-control.token"
    allow_remote: bool = False
    #: The journey instances, kept from one run to the next (0600): the bridge's log remembers what it
    #: started, so a sandbox that forgot it at each restart contradicted the log. "": kept in memory only.
    state_file: str = "var/sandbox-state.json"


@dataclass
class SandboxState:
    org_id: str
    tokens: dict[str, frozenset[str]]
    journeys: dict[str, Journey]
    faults: Faults = field(default_factory=Faults)
    control_token: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    requests_seen: int = 0
    max_calls: int = 100_000
    _by_parameter: dict[tuple[str, str, str], list[str]] = field(default_factory=dict, repr=False)

    def record(self, entry: dict[str, Any]) -> None:
        self.calls.append(entry)
        if len(self.calls) > self.max_calls:
            del self.calls[: len(self.calls) - self.max_calls]

    def add(self, instance: dict[str, Any]) -> None:
        """Keep an instance, indexed by its parameter values: a long soak holds hundreds of thousands, and
        a search that scanned them all made the sandbox, not the bridge, the limit."""
        self.instances[instance["id"]] = instance
        bot = instance["chatBotId"]
        for name, value in instance["parameters"].items():
            self._by_parameter.setdefault((bot, name, value), []).append(instance["id"])

    def remove(self, instance_id: str) -> dict[str, Any]:
        instance = self.instances.pop(instance_id)
        for name, value in instance["parameters"].items():
            self._by_parameter[(instance["chatBotId"], name, value)].remove(instance_id)
        return instance

    def matching(self, bot: str, criteria: dict[str, str]) -> list[dict[str, Any]]:
        """Instances of ``bot`` whose parameters equal every criterion, oldest first."""
        if criteria:
            postings = [self._by_parameter.get((bot, k, v), ()) for k, v in criteria.items()]
            candidates = (self.instances[i] for i in min(postings, key=len))
        else:
            candidates = self.instances.values()
        return [
            i for i in candidates
            if i["chatBotId"] == bot and all(i["parameters"].get(k) == v for k, v in criteria.items())
        ]  # fmt: skip

    def clear(self) -> None:
        self.instances.clear()
        self._by_parameter.clear()
        self.calls.clear()

    def client_token(self) -> str | None:
        """An API token that can trigger and search: the one ``serve --sandbox`` dispatches with."""
        return next((t for t, scopes in self.tokens.items() if {CREATE_SCOPE, READ_SCOPE} <= scopes), None)

    def is_control(self, header: bytes | None) -> bool:
        """Whether an ``Authorization`` header carries the control token (compared in constant time)."""
        token = _bearer(header)
        return token is not None and hmac.compare_digest(token.encode(), self.control_token.encode())


class SandboxResource(resource.Resource):
    isLeaf = True

    def __init__(self, state: SandboxState, clock: Any) -> None:
        super().__init__()
        self.state = state
        self.clock = clock
        self.on_outage: Any = None
        faults = {"GET": self._get_faults, "POST": self._set_faults, "PUT": self._set_faults}
        self._controls: dict[str, dict[str, Any]] = {
            "/_sandbox/calls": {"GET": self._get_calls},
            "/_sandbox/instances": {"GET": self._get_instances},
            "/_sandbox/faults": faults,
            "/_sandbox/reset": {"POST": self._reset},
            "/_sandbox/tokens": {"POST": self._set_tokens},
            "/_sandbox/drift": {"POST": self._drift},
        }

    # -- dispatch -------------------------------------------------------------------------------
    def render(self, request: server.Request) -> bytes | int:
        path = request.path.decode("utf-8", errors="replace")
        if path.startswith("/_sandbox/"):
            return self._control(request, path)
        state = self.state
        state.requests_seen += 1
        faults = state.faults
        outage = faults.outage(time.time())
        delay = faults.latency_ms / 1000.0
        if faults.slow_every and state.requests_seen % faults.slow_every == 0:
            delay += faults.slow_seconds
        if outage == "refuse":
            # The port is closed for new connections; kept-alive ones are cut as well.
            self._log(request, path, None, None, "outage: connection refused")
            request.channel.transport.abortConnection()
            return server.NOT_DONE_YET
        if outage == "timeout":
            self._log(request, path, None, None, "outage: no answer")
            return server.NOT_DONE_YET
        if outage == "503":
            return self._finish(request, path, 503, ["Service unavailable (sandbox outage)"], None, delay)
        if faults.rate_limit_every and state.requests_seen % faults.rate_limit_every == 0:
            request.setHeader("Retry-After", str(int(faults.retry_after)))
            return self._finish(request, path, 429, ["Too many requests"], None, delay)
        if faults.error_rate and random.random() < faults.error_rate:
            return self._finish(request, path, 500, ["Internal error (sandbox fault injection)"], None, delay)
        body_bytes = request.content.read() if request.content else b""
        status, payload = self._api(request, path, body_bytes)
        return self._finish(request, path, status, payload, body_bytes, delay)

    def _finish(self, request: server.Request, path: str, status: int, payload: Any, body: bytes | None,
                delay: float) -> bytes | int:  # fmt: skip
        self._log(request, path, status, body, payload)
        out = b"" if payload is None else json.dumps(payload).encode()
        request.setResponseCode(status)
        if payload is not None:
            request.setHeader("Content-Type", "application/json")
        if delay <= 0:
            return out

        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def later() -> None:
            if not gone:
                request.write(out)
                request.finish()

        task.deferLater(self.clock, delay, later).addErrback(lambda _f: None)
        return server.NOT_DONE_YET

    def _log(self, request: server.Request, path: str, status: int | None, body: bytes | None, payload: Any) -> None:
        parsed, problem = _decode(body) if body else (None, "")
        if problem:
            parsed = body.decode("utf-8", errors="replace") if body else None
        self.state.record({
            "at": datetime.now(UTC).isoformat(),
            "method": request.method.decode(),
            "path": path,
            "status": status,
            "body": parsed,
            "response": payload,
        })  # fmt: skip

    # -- the API ----------------------------------------------------------------------------------
    def _api(self, request: server.Request, path: str, body: bytes) -> tuple[int, Any]:
        m = _ROUTE.match(path)
        method = request.method.decode()
        if not m:
            return 404, [f"No such endpoint: {method} {path}"]
        token = _bearer(request.getHeader(b"Authorization"))
        scopes = self.state.tokens.get(token or "")
        if scopes is None:
            return 401, ["Missing or invalid access token"]
        if m["org"] != self.state.org_id:
            return 403, [f"The access token is not valid for organization {m['org']}"]
        journey = self.state.journeys.get(m["bot"])
        action = m["action"]
        if action == "bulk" and method == "POST" and m["external"]:
            if CREATE_SCOPE not in scopes:
                return 403, [f"The access token lacks the {CREATE_SCOPE} scope"]
            return self._bulk(journey, m["bot"], body)
        if action == "search" and method == "POST" and m["external"]:
            if READ_SCOPE not in scopes:
                return 403, [f"The access token lacks the {READ_SCOPE} scope"]
            return self._search(journey, m["bot"], body)
        if m["instance"] and method == "DELETE":
            if CREATE_SCOPE not in scopes:
                return 403, [f"The access token lacks the {CREATE_SCOPE} scope"]
            return self._cancel(m["bot"], m["instance"])
        return 405, [f"{method} is not allowed on {path}"]

    def _bulk(self, journey: Journey | None, bot: str, body: bytes) -> tuple[int, Any]:
        if journey is None:
            return 400, [f"Journey '{bot}' was not found or is not published"]
        data, problem = _decode(body or b"null")
        if problem:
            return 400, [problem]
        if not isinstance(data, dict):
            return 400, ["The request body must be a JSON object"]
        errors: list[str] = []
        flow_id = data.get("flowId")
        zone = data.get("timeZone")
        instances = data.get("instances")
        if flow_id is not None and flow_id not in journey.subflows:
            errors.append(f"Subflow '{flow_id}' was not found on journey '{bot}'")
        if zone is None or zone == "":
            if journey.datetime_parameters:
                errors.append("timeZone is required because the journey has datetime parameters")
        else:
            try:
                ZoneInfo(str(zone))
            except (ZoneInfoNotFoundError, ValueError):
                errors.append(f"timeZone '{zone}' is not an IANA time zone")
        if not isinstance(instances, list) or not instances:
            errors.append("instances must be a non-empty array")
            return 400, errors
        expected = set(journey.parameters)
        for index, instance in enumerate(instances):
            params = instance.get("parameters") if isinstance(instance, dict) else None
            if not isinstance(params, dict):
                errors.append(f"instances[{index}].parameters must be an object")
                continue
            required = set(journey.instance_identifiers) if flow_id is not None else expected
            for name in sorted(required - params.keys()):
                errors.append(f"instances[{index}]: parameter '{name}' is missing")
            for name in sorted(params.keys() - expected):
                errors.append(f"instances[{index}]: parameter '{name}' is not a parameter of the journey")
            for name, value in params.items():
                if not isinstance(value, str):
                    errors.append(f"instances[{index}]: parameter '{name}' must be a string")
                elif not value.strip():
                    errors.append(f"instances[{index}]: parameter '{name}' is empty")
                elif name in journey.datetime_parameters and not _valid_datetime(value):
                    errors.append(f"instances[{index}]: parameter '{name}' is not a datetime (yyyy-MM-dd HH:mm:ss)")
        if errors:
            return 400, errors
        if flow_id is not None:
            for index, instance in enumerate(instances):
                ids = {k: instance["parameters"][k] for k in journey.instance_identifiers}
                targets = [i for i in self.state.matching(bot, ids) if i["status"] == "InProgress"]
                if not targets:
                    errors.append(f"instances[{index}]: no active instance matches {ids}")
                for target in targets:
                    target["lastStepExecuted"] = {"eventDateTime": _now(), "flowName": flow_id, "stepId": 1}
                    target.setdefault("subflows", []).append(flow_id)
            return (400, errors) if errors else (204, None)
        batch = str(uuid.uuid4())
        for instance in instances:
            iid = str(uuid.uuid4())
            self.state.add({
                "id": iid,
                "chatBotId": bot,
                "journeyBotName": journey.name,
                "createdDateTime": _now(),
                "startDateTime": _now(),
                "journeyBatchId": batch,
                "status": "InProgress",
                "timeZone": zone,
                "lastStepExecuted": {"eventDateTime": _now(), "flowName": "Flow 1", "stepId": 1},
                "parameters": dict(instance["parameters"]),
            })  # fmt: skip
        return 204, None

    def _search(self, journey: Journey | None, bot: str, body: bytes) -> tuple[int, Any]:
        if journey is None:
            return 400, [f"Journey '{bot}' was not found or is not published"]
        data, problem = _decode(body or b"null")
        if problem:
            return 400, [problem]
        try:
            spec = data["filterSpecification"]
            if spec.get("type") != "AndSpecification":
                return 400, ["filterSpecification.type must be AndSpecification"]
            criteria = {}
            for item in spec["specifications"]:
                if item.get("type") != "JourneyParameterSpecification" or item.get("operator") != "equals":
                    return 400, ["only JourneyParameterSpecification with operator 'equals' is supported"]
                name, value = item["parameterName"], item["rightOperand"]
                if not isinstance(name, str) or not isinstance(value, str):
                    return 400, ["parameterName and rightOperand must be strings"]
                criteria[name] = value
        except (KeyError, TypeError, AttributeError):
            return 400, ["The search body must hold filterSpecification with AndSpecification specifications"]
        include = bool(data.get("includeParameters"))
        found = []
        for instance in self.state.matching(bot, criteria):
            item = {k: v for k, v in instance.items() if k not in ("chatBotId", "timeZone", "subflows")}
            if not include:
                item.pop("parameters")
            found.append(item)
        return 200, found

    def _cancel(self, bot: str, instance_id: str) -> tuple[int, Any]:
        instance = self.state.instances.get(instance_id)
        if instance is None or instance["chatBotId"] != bot:
            return 404, [f"Journey instance '{instance_id}' was not found"]
        if instance["status"] == "InProgress":
            instance["status"] = "Cancelled"
            instance["cancelledDateTime"] = _now()
        return 204, None

    # -- control ----------------------------------------------------------------------------------
    def _control(self, request: server.Request, path: str) -> bytes:
        """The /_sandbox/ controls: each answers JSON, and a bad request gets 400 naming what is wrong."""
        request.setHeader("Content-Type", "application/json")
        if not self.state.is_control(request.getHeader(b"Authorization")):
            request.setHeader("WWW-Authenticate", 'Bearer realm="hl7bridge sandbox control"')
            return _answer(request, 401, ["Missing or wrong sandbox control token: send 'Authorization: Bearer "
                                          "<control token>' (printed at start; see sandbox.control_token_file)"])  # fmt: skip
        method = request.method.decode("latin-1")
        handlers = self._controls.get(path)
        if handlers is None:
            return _answer(request, 404, [f"No such sandbox control: {path}"])
        handler = handlers.get(method)
        if handler is None:
            request.setHeader("Allow", ", ".join(handlers))
            return _answer(request, 405, [f"{method} is not allowed on {path} (allowed: {', '.join(handlers)})"])
        body: dict[str, Any] = {}
        if method != "GET":
            body, problem = _control_body(request)
            if problem:
                return _answer(request, 400, [problem])
        status, payload = handler(body)
        return _answer(request, status, payload)

    def _get_calls(self, _body: dict[str, Any]) -> tuple[int, Any]:
        return 200, self.state.calls

    def _get_instances(self, _body: dict[str, Any]) -> tuple[int, Any]:
        return 200, list(self.state.instances.values())

    def _get_faults(self, _body: dict[str, Any]) -> tuple[int, Any]:
        return 200, self.state.faults.describe(time.time())

    def _set_faults(self, body: dict[str, Any]) -> tuple[int, Any]:
        """Set the given faults, all or none; ``outage`` is ``{"mode": ..., "seconds": ...}``."""
        problems: list[str] = []
        values = table(body, "faults", {**FAULT_CHECKS, "outage": _outage}, problems)
        if problems:
            return 400, problems
        outage = values.pop("outage", None)
        faults = replace(self.state.faults, **values)
        if outage is not None:
            faults.outage_mode = outage["mode"]
            faults.outage_until = time.time() + outage["seconds"]
        self.state.faults = faults
        if outage is not None and outage["mode"] == "refuse" and self.on_outage is not None:
            self.on_outage(outage["seconds"])
        return 200, faults.describe(time.time())

    def _reset(self, body: dict[str, Any]) -> tuple[int, Any]:
        if body:
            return 400, [f"reset takes no settings, got {', '.join(sorted(body))}"]
        self.state.clear()
        self.state.faults = Faults()
        return 200, {}

    def _set_tokens(self, body: dict[str, Any]) -> tuple[int, Any]:
        """``{"add": {TOKEN: [SCOPE, ...]}, "revoke": [TOKEN, ...]}``, applied all or none."""
        problems: list[str] = []
        values = table(body, "tokens", {"add": _token_grants, "revoke": _token_list}, problems)
        add: dict[str, frozenset[str]] = values.get("add", {})
        if any(hmac.compare_digest(t.encode(), self.state.control_token.encode()) for t in add):
            problems.append("tokens.add: the control token cannot be an API token")
        tokens = {t: s for t, s in self.state.tokens.items() if t not in set(values.get("revoke", ()))}
        tokens.update(add)
        if len(tokens) > MAX_TOKENS:
            problems.append(f"tokens.add: at most {MAX_TOKENS} tokens, this would make {len(tokens)}")
        if problems:
            return 400, problems
        self.state.tokens = tokens
        return 200, {"tokens": len(tokens)}

    def _drift(self, body: dict[str, Any]) -> tuple[int, Any]:
        """Make the API differ from what the bridge sent, as a real one may (an instance deleted by hand, a
        journey triggered twice, a start time changed in the console): ``{"action": "delete" | "duplicate" |
        "edit", "id": ID, "parameters": {NAME: VALUE}, "status": STATUS}`` (the last two for "edit")."""
        problems: list[str] = []
        values = table(body, "drift", DRIFT_CHECKS, problems)
        action, iid = values.get("action"), values.get("id")
        if action is None or iid is None:
            problems.append("drift: needs action and id")
        if action != "edit" and ("parameters" in values or "status" in values):
            problems.append("drift: parameters and status go with action 'edit' only")
        if problems:
            return 400, problems
        if iid not in self.state.instances:
            return 404, [f"Journey instance '{iid}' was not found"]
        if action == "delete":
            self.state.remove(iid)
            return 200, {"deleted": iid}
        if action == "duplicate":
            copy = dict(self.state.instances[iid], id=str(uuid.uuid4()), createdDateTime=_now(), startDateTime=_now())
            copy["parameters"] = dict(copy["parameters"])
            self.state.add(copy)
            return 200, copy
        instance = self.state.remove(iid)
        instance["parameters"] = {**instance["parameters"], **values.get("parameters", {})}
        instance["status"] = values.get("status", instance["status"])
        self.state.add(instance)
        return 200, instance


def _answer(request: server.Request, status: int, payload: Any) -> bytes:
    request.setResponseCode(status)
    return json.dumps(payload).encode()


def _control_body(request: server.Request) -> tuple[dict[str, Any], str]:
    """A control request's JSON object, or why it is not one."""
    raw = request.content.read(MAX_CONTROL_BODY + 1) if request.content else b""
    if len(raw) > MAX_CONTROL_BODY:
        return {}, f"the body is larger than {MAX_CONTROL_BODY} bytes"
    if not raw.strip():
        return {}, ""
    data, problem = _decode(raw)
    if problem:
        return {}, problem
    if not isinstance(data, dict):
        return {}, f"the body must be a JSON object, got {type(data).__name__}"
    return data, ""


def _decode(raw: bytes) -> tuple[Any, str]:
    """A body's JSON, or why it is none. NaN and Infinity are not JSON, and deep nesting (a RecursionError)
    is a bad request like any other, not a 500."""
    try:
        return json.loads(raw, parse_constant=_not_json), ""
    except (ValueError, RecursionError) as exc:
        return None, f"the body is not valid JSON: {str(exc).splitlines()[0][:200]}"


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")


def _outage(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, dict) or set(value) != {"mode", "seconds"}:
        problems.append(f'{key}: expected {{"mode": "refuse"|"503"|"timeout", "seconds": N}}, got {value!r}')
        return None
    before = len(problems)
    choice(*OUTAGE_MODES)(value["mode"], f"{key}.mode", problems)
    number(0, 86_400)(value["seconds"], f"{key}.seconds", problems)
    return None if len(problems) > before else {"mode": value["mode"], "seconds": float(value["seconds"])}


def _token_grants(value: Any, key: str, problems: list[str]) -> dict[str, frozenset[str]]:
    if not isinstance(value, dict):
        problems.append(f"{key}: expected an object of token to scopes, got {type(value).__name__}")
        return {}
    grants = {}
    for index, (token, scopes) in enumerate(value.items()):
        if _token_problem(token, f"{key}[{index}]", problems):
            continue
        before = len(problems)
        listed = strings(scopes, f"{key}[{index}].scopes", problems)
        if len(problems) == before:
            grants[token] = frozenset(listed)
    return grants


def _token_list(value: Any, key: str, problems: list[str]) -> tuple[str, ...]:
    if not isinstance(value, list):
        problems.append(f"{key}: expected a list of tokens, got {type(value).__name__}")
        return ()
    return tuple(t for t in value if not _token_problem(t, key, problems))


def _token_problem(token: Any, key: str, problems: list[str]) -> bool:
    """Whether ``token`` cannot be a bearer token (the problem is added, without the token itself)."""
    if isinstance(token, str) and 0 < len(token) <= MAX_TOKEN_LENGTH and token.isprintable() and " " not in token:
        return False
    problems.append(f"{key}: expected tokens of 1 to {MAX_TOKEN_LENGTH} printable characters without spaces")
    return True


def _bearer(header: bytes | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.decode("latin-1").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _valid_datetime(value: str) -> bool:
    if not _DATETIME.match(value):
        return False
    try:
        datetime.strptime(value, "%Y-%m-%d %H:%M:%S")
    except ValueError:
        return False
    return True


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def local_endpoint(description: str, allow_remote: bool) -> tuple[str, bool]:
    """The endpoint to bind, and whether other hosts can reach it.

    A tcp endpoint without ``interface=`` would take every interface; the sandbox takes loopback instead,
    since the bookings it holds are patient data. Any other interface needs ``allow_remote``.
    """
    fields, dangling = endpoint_fields(description)
    args = [] if dangling else [field for field in fields if "=" not in field]
    kwargs = {} if dangling else dict(field.split("=", 1) for field in fields if "=" in field)
    kind = args[0] if args else ""
    if kind not in _LOOPBACK_INTERFACE:
        raise ValueError(
            f"expected an endpoint such as 'tcp:8080:interface=127.0.0.1' (tcp: or tcp6:), got {description!r}"
        )
    position = 2 if kind == "tcp" else 3
    interface = kwargs.get("interface") or (args[position] if len(args) > position else "")
    if not interface:
        return f"{description}:interface={_LOOPBACK_INTERFACE[kind]}", False
    if _loopback(interface):
        return description, False
    if not allow_remote:
        raise ValueError(f"interface {interface} can be reached from other hosts, and the sandbox holds patient data: "
                         "listen on 127.0.0.1, or set [sandbox] allow_remote = true")  # fmt: skip
    return description, True


def _loopback(interface: str) -> bool:
    if interface == "localhost":
        return True
    try:
        return ipaddress.ip_address(interface).is_loopback
    except ValueError:
        return False


def write_secret(path: str, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only: created 0600 beside it, then moved into place,
    so that no one who could read an older file (or follows a link put there) sees the new value."""
    target = Path(path)
    target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(secret + "\n")
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class Sandbox:
    """The sandbox server: bind, stop, and close the port for "refuse" outages."""

    def __init__(self, reactor: Any, listen: str, state: SandboxState, allow_remote: bool = False,
                 control_token_file: str = "", token_generated: bool = True, state_file: str = "") -> None:  # fmt: skip
        self.reactor = reactor
        self.state_file = state_file
        self.listen_description = listen
        self.allow_remote = allow_remote
        self.control_token_file = control_token_file
        self.token_generated = token_generated
        self.state = state
        self.resource = SandboxResource(state, reactor)
        self.resource.on_outage = self._refuse_for
        self.site = server.Site(self.resource)
        self.site.displayTracebacks = False
        self.port: Any = None

    @classmethod
    def from_config(cls, reactor: Any, cfg: SandboxConfig, org_id: str, listen: str | None = None) -> Sandbox:
        """The sandbox the config describes (``listen`` overrides ``sandbox.listen``); a random control token
        when the config sets none."""
        state = SandboxState(cfg.org_id or org_id, dict(cfg.tokens), {j.chat_bot_id: j for j in cfg.journeys},
                             replace(cfg.faults), cfg.control_token or secrets.token_urlsafe(32))  # fmt: skip
        return cls(reactor, listen or cfg.listen, state, cfg.allow_remote, cfg.control_token_file,
                   token_generated=not cfg.control_token, state_file=cfg.state_file)  # fmt: skip

    @defer.inlineCallbacks
    def start(self):
        """Bind (loopback unless allowed otherwise), write the control token file, and say both in the log."""
        description, remote = local_endpoint(self.listen_description, self.allow_remote)
        if self.control_token_file:
            try:
                write_secret(self.control_token_file, self.state.control_token)
            except OSError as exc:
                raise OSError(f"cannot write the control token to {self.control_token_file}: {exc.strerror or exc} "
                              "(set sandbox.control_token_file, or \"\" to only log it)") from None  # fmt: skip
        self._load()
        endpoint = endpoints.serverFromString(self.reactor, description)
        self.port = yield endpoint.listen(self.site)
        if remote:
            log.warning("the sandbox listens on %s, reachable from other hosts (sandbox.allow_remote = true); "
                        "anyone with the control token can read the bookings it holds", self.url)  # fmt: skip
        where = f" (also in {self.control_token_file}, mode 0600)" if self.control_token_file else ""
        if self.token_generated:
            log.warning("sandbox control token for %s/_sandbox/%s: %s", self.url, where, self.state.control_token)
        else:
            log.info("sandbox control token for %s/_sandbox/: sandbox.control_token%s", self.url, where)
        return self.port

    @property
    def url(self) -> str:
        host = self.port.getHost()
        return f"http://[{host.host}]:{host.port}" if ":" in host.host else f"http://{host.host}:{host.port}"

    def _refuse_for(self, seconds: float) -> None:
        if self.port is None:
            return
        address = self.port.getHost()
        d = defer.maybeDeferred(self.port.stopListening)

        def reopen() -> None:
            kind = endpoints.TCP6ServerEndpoint if ":" in address.host else endpoints.TCP4ServerEndpoint
            endpoint = kind(self.reactor, address.port, interface=address.host)
            endpoint.listen(self.site).addCallback(lambda p: setattr(self, "port", p))

        d.addCallback(lambda _: self.reactor.callLater(seconds, reopen))

    def stop(self) -> defer.Deferred:
        """Close the port and keep the instances for the next run (``state_file``)."""
        port = self.port
        if port is None:
            return defer.succeed(None)
        if self.state_file:
            try:
                write_secret(self.state_file, json.dumps({"instances": list(self.state.instances.values())}))
            except OSError as exc:
                log.error("the sandbox's instances could not be kept in %s: %s", self.state_file, exc.strerror or exc)
        return defer.maybeDeferred(port.stopListening)

    def _load(self) -> None:
        """The instances a previous run kept; an unreadable file is set aside (logged), never fatal."""
        path = Path(self.state_file) if self.state_file else None
        if path is None or not path.exists():
            return
        try:
            kept = json.loads(path.read_text(encoding="utf-8"))["instances"]
            for instance in kept:
                self.state.add(instance)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.state.clear()
            log.error("the sandbox's kept instances in %s are unreadable (%s); starting without them", path,
                      exc.__class__.__name__)  # fmt: skip
            return
        log.info("sandbox: %d journey instance(s) kept from the previous run (%s)", len(kept), path)
