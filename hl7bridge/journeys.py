"""The MedChat Journeys API client: bulk trigger, search, cancel, and what each failure means.

Blocking (``requests``); callers run it off the reactor thread. The token is
sent, never logged, and never part of a request summary.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import requests

from . import __version__

DEFAULT_CANCEL_PATH = "/chatbotapi/external/orgs/{orgId}/journeys/{chatBotId}/instances/{instanceId}/execution"
ACTIVE_STATUSES = frozenset({"InProgress", "Pending", "Scheduled", "Running", "Waiting", "Active", "Created"})


class Verdict(Enum):
    SUCCESS = "success"
    REJECTED = "rejected"
    RETRYABLE = "retryable"
    AUTH = "auth"


@dataclass(frozen=True)
class ApiResult:
    """One HTTP exchange, classified, with what the log needs to explain it."""

    operation: str
    verdict: Verdict
    status: int | None
    request_summary: str
    response_body: str
    duration_ms: float
    messages: tuple[str, ...] = ()
    retry_after: float | None = None
    data: Any = None
    error: str = ""
    reached: bool = True

    @property
    def ok(self) -> bool:
        return self.verdict is Verdict.SUCCESS

    @property
    def maybe_processed(self) -> bool:
        """Whether a failed call may still have done its work (no answer after sending, or 500/502/504)."""
        if self.status is None:
            return self.reached
        return self.status in (500, 502, 504)


class TokenError(RuntimeError):
    """No token could be read; the message says where it was looked for."""


@dataclass(frozen=True)
class TokenSource:
    """Where the bearer token comes from: a file, an environment variable, or a systemd credential."""

    file: str = ""
    env: str = ""
    credential: str = ""

    def read(self) -> str:
        tried = []
        if self.credential:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if directory:
                path = Path(directory) / self.credential
                if path.is_file():
                    return _clean(path.read_text(encoding="utf-8"), str(path))
                tried.append(f"systemd credential {self.credential!r} (not in {directory})")
            else:
                tried.append(f"systemd credential {self.credential!r} ($CREDENTIALS_DIRECTORY unset)")
        if self.env:
            value = os.environ.get(self.env)
            if value:
                return _clean(value, f"${self.env}")
            tried.append(f"${self.env} (unset)")
        if self.file:
            try:
                return _clean(Path(self.file).read_text(encoding="utf-8"), self.file)
            except OSError as exc:
                tried.append(f"{self.file} ({exc.strerror})")
        raise TokenError("no API token: looked in " + (", ".join(tried) or "nothing (set api.token_file, "
                                                              "api.token_env or api.token_credential)"))  # fmt: skip


def _clean(value: str, where: str) -> str:
    token = value.strip()
    if not token or any(c.isspace() for c in token):
        raise TokenError(f"the API token in {where} is empty or contains spaces")
    return token


@dataclass
class JourneysClient:
    """One pooled session per client; safe to share between threads for independent calls."""

    base_url: str
    org_id: str
    tokens: TokenSource
    cancel_path: str = DEFAULT_CANCEL_PATH
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.base_url = self.base_url.rstrip("/")
        self.session.headers["User-Agent"] = f"hl7bridge/{__version__} (+HL7 v2 SIU to MedChat Journeys)"
        self.session.headers["Accept"] = "application/json"
        adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _journey_url(self, chat_bot_id: str, suffix: str) -> str:
        return f"{self.base_url}/chatbotapi/external/orgs/{self.org_id}/journeys/{chat_bot_id}/instances{suffix}"

    def trigger_request(
        self, chat_bot_id: str, flow_id: str | None, time_zone: str, instances: list[dict[str, str]]
    ) -> tuple[str, str, dict[str, Any]]:
        body = {"flowId": flow_id, "timeZone": time_zone, "instances": [{"parameters": p} for p in instances]}
        return "POST", self._journey_url(chat_bot_id, "/bulk"), body

    def search_request(self, chat_bot_id: str, parameters: dict[str, str]) -> tuple[str, str, dict[str, Any]]:
        specifications = [
            {
                "type": "JourneyParameterSpecification",
                "parameterName": name,
                "operator": "equals",
                "rightOperand": value,
            }
            for name, value in parameters.items()
        ]
        body = {
            "filterSpecification": {"type": "AndSpecification", "specifications": specifications},
            "includeParameters": True,
        }
        return "POST", self._journey_url(chat_bot_id, "/search"), body

    def cancel_request(self, chat_bot_id: str, instance_id: str) -> tuple[str, str, None]:
        path = self.cancel_path.format(orgId=self.org_id, chatBotId=chat_bot_id, instanceId=instance_id)
        return "DELETE", self.base_url + path, None

    def trigger(
        self, chat_bot_id: str, flow_id: str | None, time_zone: str, instances: list[dict[str, str]]
    ) -> ApiResult:
        method, url, body = self.trigger_request(chat_bot_id, flow_id, time_zone, instances)
        summary = f"POST bulk chatBotId={chat_bot_id} flowId={flow_id} timeZone={time_zone} instances={len(instances)}"
        return self._call("trigger", method, url, summary, body)

    def search(self, chat_bot_id: str, parameters: dict[str, str]) -> ApiResult:
        method, url, body = self.search_request(chat_bot_id, parameters)
        return self._call("search", method, url, f"POST search chatBotId={chat_bot_id} by {','.join(parameters)}", body)

    def cancel(self, chat_bot_id: str, instance_id: str) -> ApiResult:
        method, url, _ = self.cancel_request(chat_bot_id, instance_id)
        result = self._call("cancel", method, url, f"DELETE instance {instance_id}", None)
        if result.status == 404:
            # Already gone: the goal of a cancel is reached.
            return ApiResult(result.operation, Verdict.SUCCESS, 404, result.request_summary, result.response_body,
                             result.duration_ms, ("instance not found; counted as cancelled",))  # fmt: skip
        return result

    def _call(self, operation: str, method: str, url: str, summary: str, body: Any) -> ApiResult:
        started = time.monotonic()
        try:
            token = self.tokens.read()
        except TokenError as exc:
            return ApiResult(operation, Verdict.AUTH, None, summary, "", 0.0, (str(exc),), error=str(exc))
        try:
            response = self.session.request(
                method,
                url,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=(self.connect_timeout, self.read_timeout),
            )
        except requests.ConnectTimeout as exc:
            return self._failed(operation, summary, started, f"connect timeout: {_short(exc)}", reached=False)
        except requests.Timeout as exc:
            return self._failed(operation, summary, started, f"timeout: {exc.__class__.__name__}")
        except requests.ConnectionError as exc:
            refused = "NewConnectionError" in repr(exc) or "refused" in str(exc).lower()
            return self._failed(operation, summary, started, f"connection error: {_short(exc)}", reached=not refused)
        except requests.RequestException as exc:
            return self._failed(operation, summary, started, f"request error: {_short(exc)}")
        duration = (time.monotonic() - started) * 1000
        text = response.text[:4000]
        status = response.status_code
        data = None
        if text:
            try:
                data = response.json()
            except ValueError:
                data = None
        messages = _messages(data, text)
        if 200 <= status < 300:
            verdict = Verdict.SUCCESS
        elif status in (401, 403):
            verdict = Verdict.AUTH
        elif status in (408, 429) or status >= 500:
            verdict = Verdict.RETRYABLE
        else:
            verdict = Verdict.REJECTED
        return ApiResult(operation, verdict, status, summary, text, duration, messages,
                         _retry_after(response.headers.get("Retry-After")), data)  # fmt: skip

    def _failed(self, operation: str, summary: str, started: float, error: str, reached: bool = True) -> ApiResult:
        duration = (time.monotonic() - started) * 1000
        return ApiResult(operation, Verdict.RETRYABLE, None, summary, "", duration, (error,), error=error,
                         reached=reached)  # fmt: skip


def _messages(data: Any, text: str) -> tuple[str, ...]:
    if isinstance(data, list):
        return tuple(str(m) for m in data)
    if isinstance(data, dict):
        for key in ("errors", "messages", "message", "title", "detail"):
            value = data.get(key)
            if isinstance(value, list):
                return tuple(str(v) for v in value)
            if isinstance(value, str):
                return (value,)
            if isinstance(value, dict):
                return tuple(f"{k}: {v}" for k, v in value.items())
    return (text[:300],) if text else ()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(exc: BaseException) -> str:
    text = str(exc)
    return (text[:200] + "...") if len(text) > 200 else text


def summary_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
