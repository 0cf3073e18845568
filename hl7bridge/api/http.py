"""What every handler shares: the context it works in, the request as data, JSON replies and errors, bounded
bodies, and the checks of parameters (each error names its parameter).

Handlers never see a Twisted request: they get a ``Call`` (plain data, safe to read in a worker thread) and
return a ``Reply``, so the blocking work (database, password hashing) runs in the API's thread pool and only
the writing happens on the reactor.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy.engine import Engine
from twisted.python.threadpool import ThreadPool

from hl7bridge.core.checks import parse_duration
from hl7bridge.core.logs import RefusalLog
from hl7bridge.workflow.accounts import LoginLimiter, Principal, Session
from hl7bridge.workflow.config_diff import DiffReport
from hl7bridge.workflow.replay import Replayer

#: A request body is read up to this many bytes; a longer one is answered 413.
MAX_BODY = 64 * 1024
#: The routes that take a configuration (TOML text) read bodies up to this many bytes instead.
MAX_UPLOAD = 256 * 1024 + 16 * 1024
UPLOAD_PATHS = (b"/config-diff", b"/api/v1/config-diff")
#: Past this many bytes of one body the connection is closed: a client that ignores the limit is not read on.
MAX_DISCARD = 16 * MAX_BODY
#: Threads the API's blocking work runs in (a pool of its own: the service's is for the listeners).
POOL_THREADS = 4

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
}


@dataclass
class ApiContext:
    """What the API works with; built by ``app/service.py``."""

    engine: Engine
    pool: ThreadPool
    #: The same JSON as the health listener's ``/status``; callable from any thread (it reads on the reactor).
    status: Callable[[], dict[str, Any]]
    #: The CLI's own replayer, built by the service from its current configuration (``app.wiring.replayer_for``)
    #: with the options given (actor, channel, reason); None: replay is not offered.
    replayer: Callable[..., Replayer] | None = None
    #: The effective configuration, secrets redacted (``app.settings_view``); callable from any thread (the
    #: configuration is immutable, a reload swaps it whole). None: not offered.
    settings: Callable[[], dict[str, Any]] | None = None
    #: ``config diff`` against the running configuration (``app.config_diff.ServiceDiff``); None: not offered.
    config_diff: Callable[..., DiffReport] | None = None
    secure_cookies: bool = False
    limiter: LoginLimiter = field(default_factory=LoginLimiter)
    clock: Callable[[], float] = time.time
    session_idle: float = 1800.0
    session_absolute: float = 43200.0
    #: Counts each login by result: "ok", "failed", "throttled" (the service's ``hl7bridge_console_logins_total``).
    count_login: Callable[[str], None] = lambda result: None
    #: Failed and throttled logins, one line per peer a minute with the count (never a password or the name typed,
    #: which may be a password typed in the wrong field). None: not logged.
    login_log: RefusalLog | None = None


class ApiError(Exception):
    """An answer other than success: ``{"error": message, "field": parameter}`` with ``status``."""

    def __init__(self, status: int, message: str, parameter: str | None = None,
                 headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.parameter = parameter
        self.headers = headers or {}
        #: The call as far as it was authenticated, when it was: an error page then keeps the navigation (and
        #: the logout form) of who is logged in.
        self.call: Call | None = None

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": self.message}
        if self.parameter is not None:
            out["field"] = self.parameter
        return out


@dataclass
class Reply:
    status: int = 200
    #: JSON-able data, or ``bytes`` already encoded as ``content_type``.
    body: Any = None
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)

    def encoded(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if self.body is None and self.status == 204:
            return b""
        return json.dumps(self.body, ensure_ascii=False, separators=(",", ":")).encode()


def redirect(location: str) -> Reply:
    return Reply(303, b"", "text/plain; charset=utf-8", [("Location", location)])


@dataclass(frozen=True)
class Call:
    """One request as plain data, with who makes it (``principal``; None on a public route)."""

    ctx: ApiContext
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    peer: str
    principal: Principal | None = None
    session: Session | None = None

    @property
    def actor(self) -> str:
        assert self.principal is not None
        return self.principal.name

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def json(self) -> dict[str, Any]:
        """The body as a JSON object (an empty body is ``{}``)."""
        if not self.body.strip():
            return {}
        kind = (self.header("content-type") or "").split(";", 1)[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, "send the body as JSON (Content-Type: application/json)")
        try:
            data = json.loads(self.body, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise ApiError(400, f"{exc}: given twice in the body", str(exc)) from None
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the body is not valid JSON (UTF-8, nested at most a few hundred deep)") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object")
        return data

    def form(self) -> dict[str, str]:
        """An HTML form's fields (``application/x-www-form-urlencoded``); the first value of each."""
        kind = (self.header("content-type") or "").split(";", 1)[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            return {}
        try:
            fields = parse_qs(self.body.decode("utf-8"), keep_blank_values=True, max_num_fields=1000)
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "the form is not valid UTF-8 url-encoded data") from None
        return {k: v[0] for k, v in fields.items()}

    def arg(self, name: str) -> str | None:
        values = self.query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ApiError(400, f"{name}: give it once", name)
        return values[0]


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are each given once: parsers disagree on which of two ``reason``s counts."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key[:64])
        out[key] = value
    return out


# --- parameters --------------------------------------------------------------------------------------------


def text_arg(value: Any, name: str, *, max_chars: int = 1000, required: bool = False) -> str | None:
    """A string parameter; blank counts as not given (400 when ``required``)."""
    if value is not None and not isinstance(value, str):
        raise ApiError(400, f"{name}: expected a string", name)
    if value is None or not value.strip():
        if required:
            raise ApiError(400, f"{name}: required (and not blank)", name)
        return None
    if len(value) > max_chars:
        raise ApiError(400, f"{name}: at most {max_chars} characters", name)
    return value


def int_arg(value: Any, name: str, *, minimum: int = 1, maximum: int = 2**63 - 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit() and len(value) <= 19):
            raise ApiError(400, f"{name}: expected a whole number from {minimum} to {maximum}", name)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ApiError(400, f"{name}: expected a whole number from {minimum} to {maximum}", name)
    return value


def bool_arg(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if value in ("true", "1"):
        return True
    if value in ("false", "0"):
        return False
    raise ApiError(400, f"{name}: expected true or false", name)


def ids_arg(value: Any, name: str = "ids", *, limit: int = 10_000) -> list[int]:
    """A non-empty list of ids (whole numbers), at most ``limit``."""
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"{name}: expected a non-empty list of ids", name)
    if len(value) > limit:
        raise ApiError(400, f"{name}: at most {limit} ids at once", name)
    return [int_arg(v, name) for v in value]  # type: ignore[misc]


def since_arg(value: Any, name: str, now: float) -> float | None:
    """A time: epoch seconds, or a duration back from now (``30m``, ``12h``, ``7d``) as the CLI's ``--since``."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    if isinstance(value, str):
        try:
            return now - parse_duration(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if math.isfinite(number):
                return number
    raise ApiError(400, f"{name}: expected epoch seconds or a duration such as 30m, 12h, 7d", name)


def unknown_keys(data: dict[str, Any], known: set[str]) -> None:
    extra = sorted(set(data) - known)
    if extra:
        raise ApiError(400, f"{extra[0]}: unknown field (known: {', '.join(sorted(known))})", extra[0])
