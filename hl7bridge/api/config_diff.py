"""``config diff`` over HTTP, for admins: ``POST /api/v1/config-diff`` (JSON) and the console's ``/config-diff``.

The new configuration is TOML text (an upload: these two routes read bodies up to ``MAX_UPLOAD``) or a path in
the running configuration's directory; it is compared with the configuration the service runs, over the logged
messages of the window (``ApiContext.config_diff``, the CLI's own run). Parameter values are masked unless the
caller unmasks with a reason, which is audited before the answer is built.
"""

from __future__ import annotations

from typing import Any

from hl7bridge.api.http import ApiError, Call, Reply, bool_arg, since_arg, text_arg, unknown_keys
from hl7bridge.api.routes import Param, Route
from hl7bridge.core.status import Permission
from hl7bridge.workflow.config_diff import EXAMPLES, KINDS, DiffBusy, DiffRefused, DiffReport

#: The reason an unmask gives, at most (as the timeline's).
REASON_MAX = 500
#: A TOML text, at most (the routes' body limit leaves room for the form's other fields).
TOML_MAX = 256 * 1024


def run(call: Call, fields: dict[str, Any]) -> DiffReport:
    """The diff the fields ask for; ``ApiError`` (400, naming the field) for bad input."""
    if call.ctx.config_diff is None:
        raise ApiError(503, "config diff is not available on this service")
    toml = fields.get("toml") or None
    if toml is not None and (not isinstance(toml, str) or len(toml.encode("utf-8")) > TOML_MAX):
        raise ApiError(400, f"toml: expected the configuration's text, at most {TOML_MAX // 1024} KiB", "toml")
    path = text_arg(fields.get("path"), "path", max_chars=1000)
    since = since_arg(fields.get("since"), "since", call.ctx.clock())
    if since is None:
        raise ApiError(400, "since: required, e.g. 7d", "since")
    route = text_arg(fields.get("route"), "route", max_chars=64)
    phi = bool_arg(fields.get("phi"), "phi")
    reason = text_arg(fields.get("reason"), "reason", max_chars=REASON_MAX) or ""
    if phi and not reason:
        raise ApiError(400, "reason: say why you need the patient data (it is kept in the audit log)", "reason")
    channel = "api" if call.path.startswith("/api/") else "console"
    try:
        return call.ctx.config_diff(toml=toml, path=path, since=since, route=route, phi=phi, actor=call.actor,
                                    channel=channel, reason=reason)  # fmt: skip
    except DiffBusy as exc:
        raise ApiError(409, str(exc)) from None
    except DiffRefused as exc:
        field = "since" if str(exc).startswith("since:") else "path" if path else "toml"
        raise ApiError(400, str(exc), field) from None


def post_config_diff(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"toml", "path", "since", "route", "phi", "reason"})
    return Reply(200, run(call, data).to_json())


def _b(name: str, description: str, kind: str = "string", **extra: Any) -> Param:
    return Param(name, "body", kind, description, **extra)


ROUTE = Route("POST", "/api/v1/config-diff", post_config_diff, Permission.ADMIN,
              "What a new configuration would do differently to the logged messages of a window (ACK, command, "
              "parameter differences); nothing is sent. Parameter values masked unless phi (with a reason, audited)", (
                  _b("toml", f"the new configuration's TOML text (at most {TOML_MAX // 1024} KiB), or"),
                  _b("path", "a configuration file in the running configuration's directory"),
                  _b("since", "a duration such as 7d, or epoch seconds", required=True),
                  _b("route", "only differences of this route"), _b("phi", "show parameter values", "boolean"),
                  _b("reason", f"why, with phi (audited; at most {REASON_MAX} characters)")), tag="service")  # fmt: skip


def view(report: DiffReport) -> dict[str, Any]:
    """What the console's page shows of a report: the summary, the routes, and the first examples of each kind."""
    return {
        **{k: v for k, v in report.to_json().items() if k != "differences"},
        "examples": {kind: [d.to_json() | {"text": d.describe()} for d in report.examples(kind)] for kind in KINDS},
        "shown": EXAMPLES,
    }
