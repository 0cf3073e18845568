"""The console listener's Twisted ``Site``: ``/api/v1/…`` and the console pages through one router, ``/static/…``
from the console's files; security headers on every answer, bodies bounded, blocking work in the API's pool.

A request's life: the route is matched and the origin checked on the reactor; authentication, the permission,
CSRF and the handler run in the thread pool (a handler marked ``blocking=False`` runs back on the reactor);
the reply is written on the reactor, unless the client went away meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from twisted.internet import threads
from twisted.python.failure import Failure
from twisted.web import http, resource, server, static

from hl7bridge.api import auth
from hl7bridge.api.console.pages import error_page
from hl7bridge.api.http import (
    MAX_BODY,
    MAX_DISCARD,
    MAX_UPLOAD,
    SECURITY_HEADERS,
    UPLOAD_PATHS,
    ApiContext,
    ApiError,
    Call,
    Reply,
    redirect,
)
from hl7bridge.api.routes import Route, Router
from hl7bridge.core.logs import escape

log = logging.getLogger("hl7bridge.api")

#: Where the console's pages send a visitor who is not logged in.
LOGIN_PAGE = "/login"
#: A query string holds at most this many fields (every filter of a search is a dozen).
MAX_QUERY_FIELDS = 100
#: On an ``ssl:`` console: browsers use https only, for a year.
HSTS = "max-age=31536000"
#: ``/static/``'s caching; every other answer is ``no-store`` (``SECURITY_HEADERS``).
STATIC_CACHE = "public, max-age=3600"


class BoundedRequest(server.Request):
    """Keeps at most ``MAX_BODY`` bytes of a body in memory (Twisted spools bodies of any size to disk and
    parses forms itself); the handler then answers 413. A client that sends far past the limit is cut off."""

    too_large = False
    _received = 0
    limit = MAX_BODY
    #: The handlers read forms themselves (``Call.form``), after the size check.
    _parsePOSTFormSubmission = False

    def gotLength(self, length: int | None) -> None:
        # Called once the headers are read, before this request has its path: the channel's request line has it.
        path = getattr(self.channel, "_path", b"").split(b"?", 1)[0]
        self.limit = MAX_UPLOAD if path in UPLOAD_PATHS else MAX_BODY
        self.too_large = length is not None and length > self.limit
        super().gotLength(0 if self.too_large else length)

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > self.limit:
            self.too_large = True
        if self._received > MAX_DISCARD:
            self.channel.transport.abortConnection()
            return
        if not self.too_large:
            super().handleContentChunk(data)


class DeadlineChannel(http.HTTPChannel):
    """An HTTP/1.1 channel that gives each request ``request_timeout`` seconds from its first line to its last byte.

    The idle timeout restarts with every byte, so a client dripping a header line a minute (slowloris) would hold
    its connection, and one of ``max_connections``, for ever."""

    request_timeout = 30.0
    _deadline: Any = None

    def lineReceived(self, line: bytes) -> None:
        if self._deadline is None and line:
            self._deadline = self.callLater(self.request_timeout, self._too_slow)
        super().lineReceived(line)

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self.transport.abortConnection()


class Dispatcher(resource.Resource):
    """Every path but ``/static/``: matched against the route table."""

    isLeaf = True

    def __init__(self, ctx: ApiContext, router: Router, reactor: Any) -> None:
        super().__init__()
        self.ctx = ctx
        self.router = router
        self.reactor = reactor

    def render(self, request: server.Request) -> Any:
        route: Route | None = None
        try:
            method = request.method.decode("ascii")
            url = urlsplit(request.uri.decode("utf-8"))
            route, params = self.router.match(method, url.path)
            if getattr(request, "too_large", False):
                raise ApiError(413, f"the body is larger than {getattr(request, 'limit', MAX_BODY) // 1024} KiB")
            headers = _headers(request)
            if not auth.same_origin(
                headers.get("origin"), headers.get("host"), request.isSecure(), headers.get("sec-fetch-site")
            ):
                raise ApiError(403, "cross-origin request refused (the Origin header names another site)")
            query = parse_qs(url.query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
        except ApiError as exc:
            self._write(request, route, _error_reply(route, exc))
            return server.NOT_DONE_YET
        except UnicodeDecodeError:
            self._write(request, route, _error_reply(route, ApiError(400, "the request line is not valid UTF-8")))
            return server.NOT_DONE_YET
        except ValueError:
            message = f"the query has more than {MAX_QUERY_FIELDS} fields"
            self._write(request, route, _error_reply(route, ApiError(400, message)))
            return server.NOT_DONE_YET
        peer = getattr(request.getClientAddress(), "host", "") or ""
        call = Call(self.ctx, method, url.path, params, query, headers, request.content.read(), peer)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _failure: gone.append(True))
        d = threads.deferToThreadPool(self.reactor, self.ctx.pool, _prepare, route, call)
        if not route.blocking:
            d.addCallback(lambda ready: route.handler(ready) if isinstance(ready, Call) else ready)
        d.addCallbacks(lambda reply: reply, lambda failure: _failed(route, failure, call.path))
        d.addCallback(lambda reply: None if gone else self._write(request, route, reply))
        d.addErrback(lambda failure: log.error("api: writing the answer failed: %s", failure.getErrorMessage()))
        return server.NOT_DONE_YET

    def _write(self, request: server.Request, route: Route | None, reply: Reply) -> None:
        request.setResponseCode(reply.status)
        request.setHeader("Content-Type", reply.content_type)
        for name, value in reply.headers:
            request.responseHeaders.addRawHeader(name, value)
        if getattr(request, "too_large", False):
            request.setHeader("Connection", "close")
        body = reply.encoded()
        request.setHeader("Content-Length", str(len(body)))
        request.setHeader("Server", "hl7bridge")
        if request.method != b"HEAD":
            request.write(body)
        request.finish()


def _prepare(route: Route, call: Call) -> Call | Reply:
    """In the pool: authenticate and authorize; then run a blocking handler (a non-blocking one gets the call)."""
    ready = auth.authorize(call, route)
    if not route.blocking:
        return ready
    try:
        return route.handler(ready)
    except ApiError as exc:
        exc.call = exc.call or ready
        raise


def _failed(route: Route, failure: Failure, path: str = "") -> Reply:
    if failure.check(ApiError):
        return _error_reply(route, failure.value, path)
    # The type and the route only: an exception's text may quote what a message carries.
    log.error("api: %s %s failed: %s", route.method, route.path, failure.type.__name__)
    return _error_reply(route, ApiError(500, "internal error; the service log has its type"))


def _error_reply(route: Route | None, exc: ApiError, path: str = "") -> Reply:
    headers = list(exc.headers.items())
    if route is not None and route.kind == "page":
        if exc.status == 401:
            # Back to the page asked for after logging in; an ended session's cookie is cleared (else /login,
            # which reads it too, would send the browser round again).
            reply = redirect(LOGIN_PAGE + (f"?{urlencode({'next': path})}" if path and path != "/" else ""))
            reply.headers.extend(h for h in headers if h[0] == "Set-Cookie")
            return reply
        return error_page(exc.call, exc.status, exc.message, headers)
    return Reply(exc.status, exc.body(), headers=headers)


def _headers(request: server.Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, values in request.requestHeaders.getAllRawHeaders():
        key = name.decode("latin-1").lower()
        joiner = "; " if key == "cookie" else ", "
        out[key] = joiner.join(v.decode("latin-1") for v in values)
    return out


class Root(resource.Resource):
    """``/static/…`` from the console's directory, the rest through the router; security headers on both."""

    def __init__(self, dispatcher: Dispatcher, static_dir: Path | None) -> None:
        super().__init__()
        self.dispatcher = dispatcher
        self.static = static.File(str(static_dir)) if static_dir is not None and static_dir.is_dir() else None
        if self.static is not None:
            self.static.directoryListing = lambda: resource.NoResource("no listing")  # type: ignore[method-assign]

    def getChildWithDefault(self, path: bytes, request: server.Request) -> resource.Resource:
        _security_headers(request)
        if path == b"static" and self.static is not None and request.method in (b"GET", b"HEAD"):
            # The stylesheet, script and icon hold no patient data: a browser may keep them for an hour.
            request.setHeader("Cache-Control", STATIC_CACHE)
            return self.static
        request.postpath.insert(0, request.prepath.pop())
        return self.dispatcher

    def render(self, request: server.Request) -> Any:
        _security_headers(request)
        return self.dispatcher.render(request)


def _security_headers(request: server.Request) -> None:
    for name, value in SECURITY_HEADERS.items():
        request.setHeader(name, value)
    if request.isSecure():
        # Over TLS, the browser is to come back only over TLS (a session cookie is never sent in clear).
        request.setHeader("Strict-Transport-Security", HSTS)


def access_line(timestamp: str, request: server.Request) -> str:
    """Twisted's access log line (shown with ``log_level = "debug"``) without the query string: searches carry
    patient ids and names there (``?patient=…``), which never go into a log."""
    path, _, query = request.uri.partition(b"?")
    shown = escape(path[:200].decode("utf-8", "backslashreplace")) + ("?…" if query else "")
    peer = getattr(request.getClientAddress(), "host", "-")
    return (f'{peer} - - {timestamp} "{escape(request.method.decode("latin-1"))} {shown}" {request.code} '
            f"{request.sentLength or '-'}")  # fmt: skip


def build_site(ctx: ApiContext, routes: Iterable[Route], reactor: Any, *, idle_timeout: float = 60.0,
               request_timeout: float = 30.0, static_dir: Path | None = None) -> server.Site:  # fmt: skip
    site = server.Site(Root(Dispatcher(ctx, Router(routes), reactor), static_dir), timeout=idle_timeout,
                       logFormatter=access_line)  # fmt: skip
    site.protocol = type("ConsoleChannel", (DeadlineChannel,), {"request_timeout": request_timeout})
    site.requestFactory = BoundedRequest
    site.displayTracebacks = False
    site.noisy = False
    return site
