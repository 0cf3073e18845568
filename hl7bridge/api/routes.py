"""The one route table: each route's method, path, handler, permission, summary and parameters. The server
dispatches by it and ``openapi.py`` describes the API from it, so the document cannot drift from what runs.

Console pages (``kind="page"``) join the same table: the same authentication, permissions and CSRF check,
but a page answers an unauthenticated visitor with a redirect to ``/login`` rather than 401.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hl7bridge.api.http import ApiError, Call, Reply
from hl7bridge.core.status import Permission

#: A path segment in ``{name}``: letters, digits and ``._@-`` (ids and user names), never a ``/``.
_SEGMENT = "[A-Za-z0-9._@-]{1,128}"
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


@dataclass(frozen=True)
class Param:
    """A documented parameter: ``where`` is ``path``, ``query`` or ``body`` (a JSON body's field)."""

    name: str
    where: str
    type: str = "string"
    description: str = ""
    required: bool = False
    #: For ``type="array"``: the items' type.
    items: str = "string"
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Callable[[Call], Reply]
    #: None: no credentials needed (the OpenAPI document, logging in).
    permission: Permission | None
    summary: str
    params: tuple[Param, ...] = ()
    #: "api" (JSON) or "page" (HTML, the console's).
    kind: str = "api"
    #: False: the handler runs on the reactor (it reads only in-memory state, such as ``/status``); else in the
    #: API's thread pool, as anything touching the database or hashing a password must.
    blocking: bool = True
    #: What a success answers, for the OpenAPI document.
    responses: dict[int, str] = field(default_factory=lambda: {200: "OK"})
    #: A session is required (not a bearer token): logging out.
    session_only: bool = False
    tag: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("api", "page"):
            raise ValueError(f"route {self.path}: kind must be 'api' or 'page'")
        names = _PLACEHOLDER.findall(self.path)
        declared = {p.name for p in self.params if p.where == "path"}
        if set(names) != declared:
            raise ValueError(f"route {self.method} {self.path}: path parameters {names} must be declared as Param")

    @property
    def pattern(self) -> re.Pattern[str]:
        return _compile(self.path)


def _compile(path: str) -> re.Pattern[str]:
    out, last = [], 0
    for m in _PLACEHOLDER.finditer(path):
        out.append(re.escape(path[last : m.start()]))
        out.append(f"(?P<{m[1]}>{_SEGMENT})")
        last = m.end()
    out.append(re.escape(path[last:]))
    return re.compile("".join(out) + r"\Z")


class Router:
    """Routes by method and path; the first route whose pattern matches wins. 404 for an unknown path, 405 (with
    ``Allow``) for a known path with another method."""

    def __init__(self, routes: Iterable[Route] = ()) -> None:
        self.routes: list[Route] = []
        self._compiled: list[tuple[Route, re.Pattern[str]]] = []
        self.add(routes)

    def add(self, routes: Iterable[Route]) -> None:
        for route in routes:
            if any(r.method == route.method and r.path == route.path for r in self.routes):
                raise ValueError(f"route {route.method} {route.path} is defined twice")
            self.routes.append(route)
            self._compiled.append((route, route.pattern))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for route, pattern in self._compiled:
            m = pattern.match(path)
            if m is None:
                continue
            if route.method == method or (method == "HEAD" and route.method == "GET"):
                return route, m.groupdict()
            allowed.append(route.method)
        if allowed:
            raise ApiError(405, f"{method} is not allowed here; use {', '.join(sorted(set(allowed)))}",
                           headers={"Allow": ", ".join(sorted(set(allowed)))})  # fmt: skip
        raise ApiError(404, f"no such resource: {path[:200]} (see /api/v1/openapi.json)")
