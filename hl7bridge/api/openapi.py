"""The OpenAPI 3.1 document of ``/api/v1``, generated from the route table (``routes.py``), so it lists exactly
what the server dispatches, with each route's permission."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from hl7bridge import __version__
from hl7bridge.api.routes import Param, Route

_ERROR = {"$ref": "#/components/schemas/Error"}
_PHRASES = {400: "Bad input (the field names the parameter)", 401: "No valid credentials",
            403: "The role lacks the permission, a CSRF token is missing, or the origin is foreign",
            404: "Not found", 413: "Body over 64 KiB", 429: "Too many failed logins (see Retry-After)"}  # fmt: skip


def _schema(param: Param) -> dict[str, Any]:
    if param.type == "array":
        return {"type": "array", "items": {"type": param.items}}
    out: dict[str, Any] = {"type": param.type}
    if param.enum:
        out["enum"] = list(param.enum)
    return out


def _operation(route: Route) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": route.summary,
        "operationId": _operation_id(route),
        "tags": [route.tag or "api"],
    }
    if route.permission is None and not route.session_only:
        op["security"] = []
    else:
        permission = route.permission.value if route.permission is not None else "a session"
        op["description"] = f"Needs the permission `{permission}`."
        op["x-permission"] = permission
    parameters = [
        {"name": p.name, "in": p.where, "required": p.required or p.where == "path", "description": p.description,
         "schema": _schema(p)}
        for p in route.params if p.where in ("path", "query")
    ]  # fmt: skip
    if parameters:
        op["parameters"] = parameters
    body = [p for p in route.params if p.where == "body"]
    if body:
        schema: dict[str, Any] = {"type": "object", "properties": {
            p.name: {**_schema(p), "description": p.description} for p in body}}  # fmt: skip
        required = [p.name for p in body if p.required]
        if required:
            schema["required"] = required
        op["requestBody"] = {"required": bool(required), "content": {"application/json": {"schema": schema}}}
    responses: dict[str, Any] = {}
    for code, text in route.responses.items():
        responses[str(code)] = {"description": text}
        if code != 204:
            responses[str(code)]["content"] = {"application/json": {"schema": {}}}
    codes = [400]
    if route.permission is not None or route.session_only:
        codes += [401, 403]
    if "{" in route.path:
        codes.append(404)
    if route.method in ("POST", "PUT", "PATCH"):
        codes.append(413)
    if route.path == "/api/v1/session" and route.method == "POST":
        codes += [401, 429]
    for code in codes:
        responses.setdefault(str(code), {"description": _PHRASES[code],
                                         "content": {"application/json": {"schema": _ERROR}}})  # fmt: skip
    op["responses"] = responses
    return op


def _operation_id(route: Route) -> str:
    words = re.sub(r"[{}]", "", route.path.removeprefix("/api/v1/")).replace("-", "_").split("/")
    return route.method.lower() + "_" + "_".join(w for w in words if w) if words != [""] else route.method.lower()


def document(routes: Iterable[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if route.kind != "api":
            continue
        paths.setdefault(route.path, {})[route.method.lower()] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "hl7bridge operator API",
            "version": __version__,
            "description": "Operators' functions of hl7bridge, as the CLI offers them. Patient data is masked "
            'unless unmasked with a reason (audited). Errors are {"error": ..., "field": ...}.',
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `hl7bridge user token NAME` (hb_…).",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": "hb_session",
                    "description": "From POST /api/v1/session; state changes also need X-CSRF-Token.",
                },
            },
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
                    "required": ["error"],
                }
            },
        },
        "security": [{"bearer": []}, {"session": []}],
    }
