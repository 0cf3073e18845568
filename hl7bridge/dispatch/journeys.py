"""The MedChat Journeys API client: bulk trigger, search, cancel, and what each failure means.

Blocking (``requests``); callers run it off the reactor thread. The token is
sent, never logged, and never part of a request summary.
"""

from __future__ import annotations

import email.utils
import heapq
import ipaddress
import itertools
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.util import parse_url

from hl7bridge import __version__

DEFAULT_CANCEL_PATH = "/chatbotapi/external/orgs/{orgId}/journeys/{chatBotId}/instances/{instanceId}/execution"
ACTIVE_STATUSES = frozenset({"InProgress", "Pending", "Scheduled", "Running", "Waiting", "Active", "Created"})
#: The most of an answer that is read: the API documents small JSON answers, and a bigger (or endless) one
#: must not take the dispatcher's memory.
MAX_BODY = 4 * 1024 * 1024
READ_CHUNK = 64 * 1024
#: What is kept of the API's text: the body in the attempt log, each message, how many, and a whole reason
#: (it reaches outcomes, the pause state, /healthz and the ACK in ``dispatched`` mode).
BODY_CHARS = 4000
MESSAGE_CHARS = 300
MAX_MESSAGES = 20
REASON_CHARS = 1000
#: Control characters (C0, DEL, C1, line separators) and lone surrogates: escaped in anything the API says.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
#: Ids from the API go into a URL path as one segment; anything else is refused rather than encoded.
_PLAIN_ID = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]{0,199}")
NOT_JSON = object()
LATE = "answer not complete within api.call_timeout"


class Verdict(Enum):
    SUCCESS = "success"
    REJECTED = "rejected"
    RETRYABLE = "retryable"
    AUTH = "auth"
    #: An answer that is not what the API documents (a redirect, an interim 1xx, a 2xx of the wrong status
    #: or shape): retried with backoff, and dead-lettered after a few, never taken for success.
    MALFORMED = "malformed"


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
        """Whether a failed call may still have done its work (no answer after sending, an interim 1xx or a
        2xx of the wrong shape, or 500/502/504)."""
        if self.status is None:
            return self.reached
        return self.status < 300 or self.status in (500, 502, 504)

    @property
    def reason(self) -> str:
        """Why the call failed, in one bounded line (the API's messages, else the error, else the status)."""
        return ("; ".join(self.messages) or self.error or f"HTTP {self.status}")[:REASON_CHARS]


class _Deadlines:
    """Shuts down the connection of a call still under way at its deadline: a drip of headers or body
    passes every per-read timeout. One thread serves all calls; entries of finished calls are emptied and
    dropped when their time comes."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[socket.socket]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, deadline: float, sock: socket.socket) -> list[socket.socket]:
        entry = [sock]
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), entry))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="hl7bridge-api-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return entry

    def disarm(self, entry: list[socket.socket]) -> None:
        with self._cond:
            entry.clear()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._cond.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, entry = heapq.heappop(self._heap)
                for sock in entry:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass


_DEADLINES = _Deadlines()
#: The deadline of the call this thread is making, and its armed entry.
_CALL = threading.local()


class _Armed:
    """A connection that, once its request is sent, is shut down at the deadline of the call in this thread."""

    sock: socket.socket | None

    def getresponse(self) -> Any:
        deadline = getattr(_CALL, "deadline", None)
        if deadline is not None and self.sock is not None:
            _CALL.armed = _DEADLINES.arm(deadline, self.sock)
        return super().getresponse()  # type: ignore[misc]


class _Connection(_Armed, HTTPConnection):
    pass


class _TlsConnection(_Armed, HTTPSConnection):
    pass


class _Pool(HTTPConnectionPool):
    ConnectionCls = _Connection


class _TlsPool(HTTPSConnectionPool):
    ConnectionCls = _TlsConnection


_POOLS = {"http": _Pool, "https": _TlsPool}


class _Adapter(requests.adapters.HTTPAdapter):
    """Pools whose connections keep the call's deadline, direct or through the proxy."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **kwargs)
        manager.pool_classes_by_scheme = _POOLS
        return manager


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


@dataclass(frozen=True)
class ApiSettings:
    """The ``[api]`` section, as the config builds it, the child process receives it and the client uses it."""

    base_url: str = "https://medchatapp.com"
    org_id: str = ""
    token_file: str = ""
    token_env: str = "HL7BRIDGE_API_TOKEN"
    token_credential: str = "medchat-token"
    cancel_path: str = DEFAULT_CANCEL_PATH
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    #: The deadline of a whole call (``read_timeout`` bounds each read only: a drip could last forever).
    call_timeout: float = 60.0
    #: A CA bundle to trust instead of the system's (pins the API's CA).
    ca_file: str = ""
    #: The only proxy used: the environment (HTTPS_PROXY, .netrc, REQUESTS_CA_BUNDLE) is ignored.
    proxy: str = ""
    #: When the token expires, ISO 8601 in UTC as the config normalised it ("" = not known); ``/status``
    #: turns degraded 14 days ahead.
    token_expires: str = ""

    def tokens(self) -> TokenSource:
        return TokenSource(self.token_file, self.token_env, self.token_credential)

    def token_expiry(self) -> datetime | None:
        return datetime.fromisoformat(self.token_expires) if self.token_expires else None


@dataclass
class JourneysClient:
    """One pooled session per client; safe to share between threads for independent calls."""

    api: ApiSettings
    tokens: TokenSource
    session: requests.Session = field(default_factory=requests.Session)
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = self.api.base_url.rstrip("/")
        self.session.trust_env = False
        if self.api.proxy:
            self.session.proxies = {"http": self.api.proxy, "https": self.api.proxy}
        if self.api.ca_file:
            self.session.verify = self.api.ca_file
        self.session.headers["User-Agent"] = f"hl7bridge/{__version__} (+HL7 v2 SIU to MedChat Journeys)"
        self.session.headers["Accept"] = "application/json"
        # Compressed answers would grow past MAX_BODY after the limit was checked.
        self.session.headers["Accept-Encoding"] = "identity"
        adapter = _Adapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def _journey_url(self, chat_bot_id: str, suffix: str) -> str:
        return (f"{self.base_url}/chatbotapi/external/orgs/{_segment(self.api.org_id)}/journeys/{_segment(chat_bot_id)}"
                f"/instances{suffix}")  # fmt: skip

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
        """Raises ``ValueError`` for an instance id that is not one plain path segment."""
        if not _PLAIN_ID.fullmatch(instance_id) or instance_id.strip(".") == "":
            raise ValueError("an instance id that is not plain letters, digits and -._~")
        path = self.api.cancel_path.format(orgId=_segment(self.api.org_id), chatBotId=_segment(chat_bot_id),
                                       instanceId=instance_id)  # fmt: skip
        return "DELETE", self.base_url + path, None

    def trigger(
        self, chat_bot_id: str, flow_id: str | None, time_zone: str, instances: list[dict[str, str]]
    ) -> ApiResult:
        method, url, body = self.trigger_request(chat_bot_id, flow_id, time_zone, instances)
        summary = f"POST bulk chatBotId={chat_bot_id} flowId={flow_id} timeZone={time_zone} instances={len(instances)}"
        return self._call("trigger", method, url, summary, body, _no_content)

    def search(self, chat_bot_id: str, parameters: dict[str, str]) -> ApiResult:
        method, url, body = self.search_request(chat_bot_id, parameters)
        summary = f"POST search chatBotId={chat_bot_id} by {','.join(parameters)}"
        return self._call("search", method, url, summary, body, _instances)

    def cancel(self, chat_bot_id: str, instance_id: str) -> ApiResult:
        summary = f"DELETE instance {api_text(instance_id, limit=200)}"
        try:
            method, url, _ = self.cancel_request(chat_bot_id, instance_id)
        except ValueError as exc:
            return ApiResult("cancel", Verdict.MALFORMED, None, summary, "", 0.0, (f"not sent: {exc}",),
                             error=f"not sent: {exc}", reached=False)  # fmt: skip
        result = self._call("cancel", method, url, summary, None, _no_content)
        if result.status == 404:
            # Already gone: the goal of a cancel is reached.
            return ApiResult(result.operation, Verdict.SUCCESS, 404, result.request_summary, result.response_body,
                             result.duration_ms, ("instance not found; counted as cancelled",))  # fmt: skip
        return result

    def _call(self, operation: str, method: str, url: str, summary: str, body: Any,
              expect: Callable[[int, Any], str | None]) -> ApiResult:  # fmt: skip
        """One request, read within ``MAX_BODY`` and ``call_timeout``, and judged against what the API
        documents for it (``expect`` names what is wrong with a 2xx answer, or None)."""
        started = time.monotonic()
        try:
            token = self.tokens.read()
        except TokenError as exc:
            return ApiResult(operation, Verdict.AUTH, None, summary, "", 0.0, (str(exc),), error=str(exc))
        escaped = self._outside_base(url)
        if escaped:
            return ApiResult(operation, Verdict.MALFORMED, None, summary, "", 0.0, (escaped,), error=escaped,
                             reached=False)  # fmt: skip
        deadline = _CALL.deadline = started + self.api.call_timeout
        try:
            response = self.session.request(
                method,
                url,
                json=body,
                headers={"Authorization": f"Bearer {token}"},
                timeout=(self.api.connect_timeout, self.api.read_timeout),
                allow_redirects=False,
                stream=True,
            )
            try:
                raw, cut = _read_body(response, deadline)
            finally:
                response.close()
            if response.status_code < 200:
                # The final answer may still be on its way on that connection, which urllib3 has already
                # pooled (the interim answer was read to its end): drop every pooled connection, or the next
                # call could be answered with this call's final answer.
                self.session.close()
        except (requests.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError) as exc:
            return self._failed(operation, summary, started, f"connect timeout: {_short(exc, token)}", reached=False)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if time.monotonic() >= deadline:
                return self._failed(operation, summary, started, LATE)
            if isinstance(exc, (requests.Timeout, urllib3.exceptions.TimeoutError)):
                return self._failed(operation, summary, started, f"timeout: {exc.__class__.__name__}")
            if isinstance(exc, requests.ConnectionError):
                refused = "NewConnectionError" in repr(exc) or "refused" in str(exc).lower()
                return self._failed(operation, summary, started, f"connection error: {_short(exc, token)}",
                                    reached=not refused)  # fmt: skip
            return self._failed(operation, summary, started, f"request error: {_short(exc, token)}")
        finally:
            armed = getattr(_CALL, "armed", None)
            if armed is not None:
                _DEADLINES.disarm(armed)
            _CALL.deadline = _CALL.armed = None
        duration = (time.monotonic() - started) * 1000
        status = response.status_code
        if cut:
            return self._failed(operation, summary, started, cut)
        text = raw.decode("utf-8", errors="replace")
        body_text = api_text(text, token, BODY_CHARS)
        data = _json(text)
        messages = tuple(api_text(m, token) for m in _messages(data, text)[:MAX_MESSAGES])
        retry_after = _retry_after(response.headers.get("Retry-After"))
        wrong = None
        if status < 200:
            wrong = f"an interim {status} answer and no final one"
        elif status < 300:
            wrong = expect(status, data)
        elif status < 400:
            location = api_text(response.headers.get("Location", ""), token)
            wrong = f"redirected ({status}) to {location or 'nowhere'}; redirects are not followed"
        if wrong is not None:
            return ApiResult(operation, Verdict.MALFORMED, status, summary, body_text, duration, (wrong,),
                             retry_after, error=wrong)  # fmt: skip
        if status < 300:
            verdict = Verdict.SUCCESS
        elif status in (401, 403):
            verdict = Verdict.AUTH
        elif status in (408, 429) or status >= 500:
            verdict = Verdict.RETRYABLE
        else:
            verdict = Verdict.REJECTED
        return ApiResult(operation, verdict, status, summary, body_text, duration, messages, retry_after,
                         data if verdict is Verdict.SUCCESS else None)  # fmt: skip

    def _outside_base(self, url: str) -> str:
        """Why a built URL must not be requested: once its dot segments are resolved it is not under the
        configured base, or a ``?`` or ``#`` cuts its path; '' when it stays under the base."""
        base, built = parse_url(self.base_url), parse_url(url)
        prefix = (base.path or "").rstrip("/") + "/"
        same = (built.scheme, built.host, built.port) == (base.scheme, base.host, base.port)
        if same and (built.path or "").startswith(prefix) and not built.query and not built.fragment:
            return ""
        return "not sent: the request's URL leaves the configured base_url"

    def _failed(self, operation: str, summary: str, started: float, error: str, reached: bool = True) -> ApiResult:
        duration = (time.monotonic() - started) * 1000
        return ApiResult(operation, Verdict.RETRYABLE, None, summary, "", duration, (error,), error=error,
                         reached=reached)  # fmt: skip


def _read_body(response: requests.Response, deadline: float) -> tuple[bytes, str]:
    """The body, read one socket read at a time so the deadline holds against a drip; with why it was cut
    short ('' when whole). The connection is closed when the body was not read to its end."""
    parts: list[bytes] = []
    size = 0
    while chunk := response.raw.read1(READ_CHUNK, decode_content=False):
        size += len(chunk)
        if size > MAX_BODY:
            response.raw.close()
            return b"", f"answer larger than {MAX_BODY // (1024 * 1024)} MiB; not read further"
        if time.monotonic() > deadline:
            response.raw.close()
            return b"", LATE
        parts.append(chunk)
    if time.monotonic() > deadline:  # cut short by the deadline's shutdown
        return b"", LATE
    body = b"".join(parts)
    response._content, response._content_consumed = body, True  # read here, so the connection is reused
    return body, ""


def _json(text: str) -> Any:
    """The body's JSON; ``NOT_JSON`` when it is not (nesting too deep counts), None when there is none."""
    if not text:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return NOT_JSON


def _no_content(status: int, data: Any) -> str | None:
    return None if status == 204 else f"expected 204 No Content, got {status}"


def _instances(status: int, data: Any) -> str | None:
    """The search answer: 200 and a JSON array of instance objects (an id string, a status string and a
    parameters object of strings, where present)."""
    if status != 200:
        return f"expected 200 and an array of instances, got {status}"
    if not isinstance(data, list):
        return f"expected an array of instances, got {_kind(data)}"
    for item in data:
        if not isinstance(item, dict):
            return f"expected an array of instances, got an array holding {_kind(item)}"
        parameters = item.get("parameters", {})
        if not isinstance(item.get("id", ""), str) or not isinstance(item.get("status", ""), str):
            return "an instance whose id or status is not a string"
        if not isinstance(parameters, dict) or not all(isinstance(v, str) for v in parameters.values()):
            return "an instance whose parameters are not an object of strings"
    return None


def holds(instance: dict[str, Any], parameters: dict[str, str]) -> bool:
    """Whether an instance the API returned carries these parameter values: an API that ignores a search's
    filter must not make another appointment's journey count (or be cancelled)."""
    held = instance.get("parameters") or {}
    return all(held.get(k) == v for k, v in parameters.items())


def _kind(data: Any) -> str:
    if data is NOT_JSON:
        return "a body that is not JSON"
    return {dict: "an object", list: "an array", str: "a string", type(None): "no body"}.get(type(data), "a value")


def plain_http_outside_loopback(base_url: str) -> bool:
    """Whether the token and patient data would cross a network unencrypted."""
    url = parse_url(base_url)
    if url.scheme != "http":
        return False
    if url.host == "localhost":
        return False
    try:
        return not ipaddress.ip_address((url.host or "").strip("[]")).is_loopback
    except ValueError:
        return True


def _segment(value: str) -> str:
    """A configured id as one path segment."""
    return quote(value, safe="")


def api_text(text: str, token: str = "", limit: int = MESSAGE_CHARS) -> str:
    """Text from the API as it may be logged, stored, encoded and echoed: the token redacted, control
    characters and lone surrogates escaped (a forged log line, a terminal escape, a JSON encoder that
    refuses it), and cut to ``limit``."""
    if token:
        text = _token_pattern(token).sub("[token]", text[: (limit + len(token)) * 6])
    text = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text[: limit * 6])
    return text if len(text) <= limit else text[: limit - 3] + "..."


@lru_cache(maxsize=4)
def _token_pattern(token: str) -> re.Pattern[str]:
    """The token as is or JSON-escaped, character by character (``\\/``, ``\\u002f``, ``\\"``): an API that
    echoes the request's header in a JSON error writes it so, and the raw body is what gets stored."""
    forms = []
    for char in token:
        escapes = {re.escape(char), re.escape(json.dumps(char)[1:-1]), rf"\\u(?i:{ord(char):04x})"}
        if char == "/":
            escapes.add(r"\\/")
        forms.append("(?:" + "|".join(sorted(escapes)) + ")")
    return re.compile("".join(forms))


def _messages(data: Any, text: str) -> list[str]:
    if isinstance(data, list):
        return [str(m)[: MESSAGE_CHARS * 6] for m in data[:MAX_MESSAGES]]
    if isinstance(data, dict):
        for key in ("errors", "messages", "message", "title", "detail"):
            value = data.get(key)
            if isinstance(value, list):
                return [str(v)[: MESSAGE_CHARS * 6] for v in value[:MAX_MESSAGES]]
            if isinstance(value, str):
                return [value]
            if isinstance(value, dict):
                return [f"{k}: {str(v)[: MESSAGE_CHARS * 6]}" for k, v in list(value.items())[:MAX_MESSAGES]]
    return [text[:MESSAGE_CHARS]] if text else []


def _retry_after(value: str | None) -> float | None:
    """Seconds the API asks to wait, finite and not negative (the dispatcher caps it at retry_max)."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value) if len(value) < 16 else 1e15
    try:
        seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
    except (TypeError, ValueError, OverflowError, IndexError):
        return None
    return max(0.0, seconds) if math.isfinite(seconds) else None


def _short(exc: BaseException, token: str = "") -> str:
    return api_text(str(exc), token, 200)


def summary_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
