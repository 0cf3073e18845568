"""A real Journeys API emulator (Twisted web) for the demo, the tests, and users' own trials.

It implements the three endpoints of the MedChat pages (bulk trigger, search,
cancel on both documented paths), checks bearer tokens and scopes, validates
bodies the way the API answers (400 with an array of messages), keeps instances
so that search and cancel behave for real, and injects faults on demand.
``GET /_sandbox/calls`` and ``GET /_sandbox/instances`` show what arrived.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from twisted.internet import defer, endpoints, task
from twisted.web import resource, server

CREATE_SCOPE = "create.journey_instances"
READ_SCOPE = "read.journey_instances"
_DATETIME = re.compile(r"^\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}$")
_ROUTE = re.compile(
    r"^/chatbotapi(?P<external>/external)?/orgs/(?P<org>[^/]+)/journeys/(?P<bot>[^/]+)/instances"
    r"(?:/(?P<action>bulk|search)|/(?P<instance>[^/]+)/execution)$"
)


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


@dataclass
class SandboxState:
    org_id: str
    tokens: dict[str, frozenset[str]]
    journeys: dict[str, Journey]
    faults: Faults = field(default_factory=Faults)
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


class SandboxResource(resource.Resource):
    isLeaf = True

    def __init__(self, state: SandboxState, clock: Any) -> None:
        super().__init__()
        self.state = state
        self.clock = clock
        self.on_outage: Any = None

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

        def later() -> None:
            if not request._disconnected:
                request.write(out)
                request.finish()

        task.deferLater(self.clock, delay, later).addErrback(lambda _f: None)
        return server.NOT_DONE_YET

    def _log(self, request: server.Request, path: str, status: int | None, body: bytes | None, payload: Any) -> None:
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
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
        try:
            data = json.loads(body or b"null")
        except ValueError:
            return 400, ["The request body is not valid JSON"]
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
        try:
            data = json.loads(body or b"null")
            spec = data["filterSpecification"]
            if spec.get("type") != "AndSpecification":
                return 400, ["filterSpecification.type must be AndSpecification"]
            criteria = {}
            for item in spec["specifications"]:
                if item.get("type") != "JourneyParameterSpecification" or item.get("operator") != "equals":
                    return 400, ["only JourneyParameterSpecification with operator 'equals' is supported"]
                criteria[item["parameterName"]] = item["rightOperand"]
        except (ValueError, KeyError, TypeError, AttributeError):
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
        request.setHeader("Content-Type", "application/json")
        state = self.state
        method = request.method.decode()
        if path == "/_sandbox/calls" and method == "GET":
            return json.dumps(state.calls).encode()
        if path == "/_sandbox/instances" and method == "GET":
            return json.dumps(list(state.instances.values())).encode()
        if path == "/_sandbox/reset" and method == "POST":
            state.clear()
            state.faults = Faults()
            return b"{}"
        if path == "/_sandbox/faults" and method in ("POST", "PUT"):
            data = json.loads(request.content.read() or b"{}")
            outage = data.pop("outage", None)
            for key, value in data.items():
                if not hasattr(state.faults, key):
                    request.setResponseCode(400)
                    return json.dumps([f"unknown fault {key!r}"]).encode()
                setattr(state.faults, key, value)
            if outage:
                state.faults.outage_mode = outage["mode"]
                state.faults.outage_until = time.time() + float(outage["seconds"])
                if outage["mode"] == "refuse" and self.on_outage is not None:
                    self.on_outage(float(outage["seconds"]))
            return json.dumps(state.faults.__dict__).encode()
        if path == "/_sandbox/tokens" and method == "POST":
            data = json.loads(request.content.read() or b"{}")
            for token in data.get("revoke", []):
                state.tokens.pop(token, None)
            for token, scopes in data.get("add", {}).items():
                state.tokens[token] = frozenset(scopes)
            return json.dumps(sorted(len(t) for t in state.tokens)).encode()
        request.setResponseCode(404)
        return json.dumps([f"No such sandbox control: {method} {path}"]).encode()


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


class Sandbox:
    """The sandbox server: bind, stop, and close the port for "refuse" outages."""

    def __init__(self, reactor: Any, listen: str, state: SandboxState) -> None:
        self.reactor = reactor
        self.listen_description = listen
        self.state = state
        self.resource = SandboxResource(state, reactor)
        self.resource.on_outage = self._refuse_for
        self.site = server.Site(self.resource)
        self.site.displayTracebacks = False
        self.port: Any = None

    @defer.inlineCallbacks
    def start(self):
        endpoint = endpoints.serverFromString(self.reactor, self.listen_description)
        self.port = yield endpoint.listen(self.site)
        return self.port

    @property
    def url(self) -> str:
        host = self.port.getHost()
        return f"http://{host.host}:{host.port}"

    def _refuse_for(self, seconds: float) -> None:
        if self.port is None:
            return
        address = self.port.getHost()
        d = defer.maybeDeferred(self.port.stopListening)

        def reopen() -> None:
            endpoint = endpoints.TCP4ServerEndpoint(self.reactor, address.port, interface=address.host)
            endpoint.listen(self.site).addCallback(lambda p: setattr(self, "port", p))

        d.addCallback(lambda _: self.reactor.callLater(seconds, reopen))

    def stop(self) -> defer.Deferred:
        return defer.maybeDeferred(self.port.stopListening) if self.port else defer.succeed(None)
