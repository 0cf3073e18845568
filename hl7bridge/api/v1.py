"""``/api/v1``: the resources, each a thin handler over the operator functions the CLI calls
(``hl7bridge.workflow``), and the route table that dispatches to them and documents them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import cache
from typing import Any

from hl7bridge.api import auth, config_diff, openapi
from hl7bridge.api.http import (
    ApiError,
    Call,
    Reply,
    bool_arg,
    ids_arg,
    int_arg,
    since_arg,
    text_arg,
    unknown_keys,
)
from hl7bridge.api.routes import Param, Route
from hl7bridge.core.status import CommandStatus, MessageStatus, Permission, Role
from hl7bridge.store import audit, messages_for_replay, stats
from hl7bridge.workflow import accounts, deadletters
from hl7bridge.workflow.dashboard import MAX_MINUTES, dashboard
from hl7bridge.workflow.search import Filters, SearchError, search
from hl7bridge.workflow.timeline import Timeline, Unmask, UnmaskError, timeline

READ, UNMASK, ACT, ADMIN = Permission.READ, Permission.UNMASK, Permission.ACT, Permission.ADMIN
#: A page of the API holds at most this many rows (the CLI's bound is higher: it writes to a terminal or file).
MAX_PAGE = 1000
#: An operator's reason (audit log) at most.
MAX_REASON = 500
STATUSES = (*(s.value for s in MessageStatus), CommandStatus.DEAD.value)
KEY_FILTERS = ("appointment", "patient", "control_id", "sender")


# --- messages -----------------------------------------------------------------------------------------------


def get_messages(call: Call) -> Reply:
    """``log list``'s search: the same filters, the same keyset pages (newest first, ``before``)."""
    unknown_keys(dict.fromkeys(call.query), {"limit", "before", "since", "status", "event", "text", *KEY_FILTERS})
    values = {name: text_arg(call.arg(name), name, max_chars=200) for name in (*KEY_FILTERS, "event", "text")}
    for name in KEY_FILTERS:
        raw = call.arg(name)
        if raw is not None and not raw.strip():
            raise ApiError(400, f"{name}: needs a value (or leave it out)", name)
    status = call.arg("status") or None
    if status is not None and status not in STATUSES:
        raise ApiError(400, f"status: expected one of {', '.join(STATUSES)}", "status")
    since = since_arg(call.arg("since"), "since", call.ctx.clock())
    if values["text"] is not None and since is None:
        raise ApiError(400, "since: a text search needs a time window (e.g. since=7d); or search by patient, "
                            "appointment or control_id", "since")  # fmt: skip
    filters = Filters(status=status, since=since, **values)
    before = int_arg(call.arg("before"), "before")
    limit = int_arg(call.arg("limit"), "limit", maximum=MAX_PAGE) or 50
    try:
        page = search(call.ctx.engine, filters, before, limit)
    except SearchError as exc:
        raise ApiError(400, str(exc)) from None
    return Reply(200, page.as_json())


def get_message(call: Call) -> Reply:
    """The timeline, patient data masked."""
    return Reply(200, _timeline(call, None).to_json())


def post_unmask(call: Call) -> Reply:
    """The timeline unmasked, in this answer only; the reason is audited before anything is read."""
    data = call.json()
    unknown_keys(data, {"reason"})
    reason = text_arg(data.get("reason"), "reason", max_chars=MAX_REASON, required=True)
    assert reason is not None
    try:
        return Reply(200, _timeline(call, Unmask(call.actor, reason, _channel(call))).to_json())
    except UnmaskError as exc:
        raise ApiError(400, str(exc), "reason") from None


def _timeline(call: Call, unmask: Unmask | None) -> Timeline:
    message_id = int_arg(call.params["id"], "id")
    assert message_id is not None
    found = timeline(call.ctx.engine, message_id, unmask=unmask)
    if found is None:
        raise ApiError(404, f"no message with id {message_id}", "id")
    return found


# --- dead letters -------------------------------------------------------------------------------------------


def get_dead_letters(call: Call) -> Reply:
    unknown_keys(dict.fromkeys(call.query), {"since", "route", "after", "limit"})
    limit = int_arg(call.arg("limit"), "limit", maximum=MAX_PAGE) or 100
    found = deadletters.list_open(call.ctx.engine, since=since_arg(call.arg("since"), "since", call.ctx.clock()),
                                  route=text_arg(call.arg("route"), "route", max_chars=200), limit=limit + 1,
                                  after=int_arg(call.arg("after"), "after"))  # fmt: skip
    letters, more = found[:limit], len(found) > limit
    return Reply(200, {"dead_letters": [d.to_json(masked=True) for d in letters], "more": more,
                       "next_after": letters[-1].id if more else None})  # fmt: skip


def post_retry(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"ids", "all", "dry_run", "reason"})
    every = bool_arg(data.get("all"), "all")
    if every == ("ids" in data):
        raise ApiError(400, "ids: name the dead letters to retry, or send all: true (not both)", "ids")
    ids = None if every else ids_arg(data.get("ids"))
    reason = text_arg(data.get("reason"), "reason", max_chars=MAX_REASON) or ""
    result = deadletters.retry(call.ctx.engine, ids, call.actor, reason=reason,
                               dry_run=bool_arg(data.get("dry_run"), "dry_run"), channel=_channel(call))  # fmt: skip
    return Reply(200, result.to_json(masked=True))


def post_discard(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"ids", "reason"})
    ids = ids_arg(data.get("ids"))
    reason = text_arg(data.get("reason"), "reason", max_chars=MAX_REASON, required=True)
    assert reason is not None
    return Reply(
        200, deadletters.discard(call.ctx.engine, ids, call.actor, reason, channel=_channel(call)).to_json(masked=True)
    )


def _channel(call: Call) -> str:
    """The audit log's channel: the console's pages act as "console", scripts and the API as "api"."""
    return "api" if call.path.startswith("/api/") else "console"


# --- replay -------------------------------------------------------------------------------------------------

#: Messages one replay request may select: a larger selection is narrowed (``since``, ``event``) or sent in parts.
MAX_REPLAY = 500
REPLAY_STATUSES = (CommandStatus.DEAD.value, MessageStatus.REJECTED.value, CommandStatus.FAILED.value)


def post_replay(call: Call) -> Reply:
    """``hl7bridge replay``: by ids or a selection, dry run (calls masked) or real (audited, one entry a message)."""
    data = call.json()
    unknown_keys(data, {"ids", "filter", "dry_run", "reason"})
    if ("ids" in data) == ("filter" in data):
        raise ApiError(400, "ids: name the messages to replay, or give a filter (not both)", "ids")
    ids, status, since, event = None, None, None, None
    if "ids" in data:
        ids = ids_arg(data["ids"], limit=MAX_REPLAY)
    else:
        chosen = data["filter"]
        if not isinstance(chosen, dict):
            raise ApiError(400, 'filter: expected an object such as {"status": "dead", "since": "2h"}', "filter")
        unknown_keys(chosen, {"status", "since", "event"})
        status = chosen.get("status")
        if status not in REPLAY_STATUSES:
            raise ApiError(400, f"filter.status: expected one of {', '.join(REPLAY_STATUSES)}", "filter.status")
        since = since_arg(chosen.get("since"), "filter.since", call.ctx.clock())
        event = text_arg(chosen.get("event"), "filter.event", max_chars=16)
    dry_run = bool_arg(data.get("dry_run"), "dry_run")
    reason = text_arg(data.get("reason"), "reason", max_chars=MAX_REASON) or ""
    if call.ctx.replayer is None:
        raise ApiError(503, "replay is not available on this service")
    originals = messages_for_replay(call.ctx.engine, ids, status, since, event)
    if ids is not None:
        missing = sorted(set(ids) - {m["id"] for m in originals})
        if missing:
            raise ApiError(404, f"no message with id {', '.join(map(str, missing[:20]))}", "ids")
    if len(originals) > MAX_REPLAY:
        raise ApiError(400, f"filter: {len(originals)} messages match, more than {MAX_REPLAY} at once; narrow it "
                            "with since or event", "filter")  # fmt: skip
    replayer = call.ctx.replayer(actor=call.actor, channel=_channel(call), reason=reason)
    results = [replayer.replay(original, dry_run) for original in originals]
    counts = {"replayed": sum(1 for r in results if r.new_message_id is not None),
              "checked": sum(1 for r in results if dry_run and not r.problem),
              "skipped": sum(1 for r in results if r.skipped),
              "failed": sum(1 for r in results if r.problem and not r.skipped)}  # fmt: skip
    return Reply(200, {"dry_run": dry_run, "target": replayer.target.to_json(), "counts": counts,
                       "results": [r.to_json() for r in results]})  # fmt: skip


# --- stats, audit -------------------------------------------------------------------------------------------


def get_stats(call: Call) -> Reply:
    unknown_keys(dict.fromkeys(call.query), {"since"})
    return Reply(200, stats(call.ctx.engine, since_arg(call.arg("since"), "since", call.ctx.clock())))


def get_dashboard(call: Call) -> Reply:
    """The log's picture (``workflow.dashboard``) with the service's own state (``/status``: held or paused
    dispatch and why, connections), which only the running service knows."""
    unknown_keys(dict.fromkeys(call.query), {"minutes"})
    minutes = int_arg(call.arg("minutes"), "minutes", maximum=MAX_MINUTES) or 60
    picture = dashboard(call.ctx.engine, now=call.ctx.clock(), minutes=minutes).to_json()
    return Reply(200, {**picture, "service": call.ctx.status()})


def get_audit(call: Call) -> Reply:
    unknown_keys(dict.fromkeys(call.query), {"since", "action", "before", "limit"})
    limit = int_arg(call.arg("limit"), "limit", maximum=MAX_PAGE) or 100
    found = audit.entries(call.ctx.engine, since=since_arg(call.arg("since"), "since", call.ctx.clock()),
                          action=text_arg(call.arg("action"), "action", max_chars=64),
                          before=int_arg(call.arg("before"), "before"), limit=limit + 1)  # fmt: skip
    shown, more = found[:limit], len(found) > limit
    return Reply(200, {"entries": [asdict(e) for e in shown], "more": more,
                       "next_before": shown[-1].id if more else None})  # fmt: skip


# --- users --------------------------------------------------------------------------------------------------


def get_users(call: Call) -> Reply:
    return Reply(200, {"users": [u.to_json() for u in accounts.list_users(call.ctx.engine)]})


def post_users(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"name", "role", "password"})
    name = text_arg(data.get("name"), "name", max_chars=64, required=True)
    role = data.get("role")
    if role not in {r.value for r in Role}:
        raise ApiError(400, f"role: expected one of {', '.join(r.value for r in Role)}", "role")
    password = text_arg(data.get("password"), "password", max_chars=1024, required=True)
    assert name is not None and password is not None
    with _account_errors():
        accounts.add_user(call.ctx.engine, name, role, password, actor=call.actor, channel=_channel(call))
    return Reply(201, {"name": name, "role": role})


def delete_user(call: Call) -> Reply:
    with _account_errors():
        accounts.remove_user(call.ctx.engine, call.params["name"], actor=call.actor, channel=_channel(call))
    return Reply(204)


def post_user_token(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"label"})
    label = text_arg(data.get("label"), "label", max_chars=200) or ""
    with _account_errors():
        token = accounts.issue_token(call.ctx.engine, call.params["name"], actor=call.actor, channel=_channel(call),
                                     label=label)  # fmt: skip
    return Reply(201, {"name": call.params["name"], "token": token})


@contextmanager
def _account_errors() -> Iterator[None]:
    """``AccountError`` (its text says what to fix, never a password) as a 400; "no user" as a 404."""
    try:
        yield
    except accounts.AccountError as exc:
        text = str(exc)
        raise ApiError(404 if text.startswith("no user") else 400, text) from None


# --- session, status, the document --------------------------------------------------------------------------


def get_status(call: Call) -> Reply:
    """Runs on the reactor: the service's cached facts, judged as ``/status`` judges them."""
    return Reply(200, call.ctx.status())


def get_session(call: Call) -> Reply:
    return Reply(200, auth.whoami(call))


def get_settings(call: Call) -> Reply:
    """The configuration the service runs with (a reload included), secrets redacted."""
    if call.ctx.settings is None:
        raise ApiError(503, "the settings are not available on this service")
    return Reply(200, call.ctx.settings())


def get_openapi(call: Call) -> Reply:
    return Reply(200, _openapi())


@cache
def _openapi() -> dict[str, Any]:
    return openapi.document(ROUTES)


def _q(name: str, description: str, kind: str = "string", **extra: Any) -> Param:
    return Param(name, "query", kind, description, **extra)


def _b(name: str, description: str, kind: str = "string", **extra: Any) -> Param:
    return Param(name, "body", kind, description, **extra)


_SINCE = _q("since", "epoch seconds, or a duration back from now: 30m, 12h, 7d")
_REASON = _b("reason", f"why (kept in the audit log; at most {MAX_REASON} characters)")

ROUTES: list[Route] = [
    Route("POST", "/api/v1/session", auth.post_session, None, "Log in: sets the session cookie, answers the CSRF token",
          (_b("name", "user name", required=True), _b("password", "the user's password", required=True)),
          tag="session"),
    Route("GET", "/api/v1/session", get_session, READ, "Who is calling: name, role, permissions (and a session's "
          "CSRF token)", tag="session"),
    Route("DELETE", "/api/v1/session", auth.delete_session, None, "Log out: ends the session", session_only=True,
          responses={204: "Logged out"}, tag="session"),
    Route("GET", "/api/v1/messages", get_messages, READ, "Search messages, newest first, a page at a time (log list); "
          "no patient data", (
              _q("appointment", "placer or filler appointment id (SCH-1, SCH-2)"),
              _q("patient", "any patient identifier (PID-3)"), _q("control_id", "MSH-10"),
              _q("sender", "MSH-3, or MSH-3^MSH-4"),
              _q("text", "words of the names, reason, type, provider or place (needs since); word* for a prefix"),
              _q("status", "a message's status, or dead (an open dead letter)", enum=STATUSES),
              _q("event", "trigger event, e.g. S12"), _SINCE,
              _q("before", "the next page: next_before of the previous one", "integer"),
              _q("limit", f"1 to {MAX_PAGE} (default 50)", "integer")), tag="messages"),
    Route("GET", "/api/v1/messages/{id}", get_message, READ, "A message's timeline: received, raw, summary, ACK, "
          "commands with every API attempt, replays, audit entries; patient data masked",
          (Param("id", "path", "integer", "message id"),), tag="messages"),
    Route("POST", "/api/v1/messages/{id}/unmask", post_unmask, UNMASK, "The timeline with patient data, in this "
          "answer only; the reason is audited before anything is read", (
              Param("id", "path", "integer", "message id"),
              Param("reason", "body", "string", _REASON.description, required=True)), tag="messages"),
    Route("GET", "/api/v1/dead-letters", get_dead_letters, READ, "Open dead letters, oldest first, a page at a time",
          (_SINCE, _q("route", "the route's name"), _q("after", "the next page: next_after of the previous one",
           "integer"), _q("limit", f"1 to {MAX_PAGE} (default 100)", "integer")), tag="dead letters"),
    Route("POST", "/api/v1/dead-letters/retry", post_retry, ACT, "Put dead letters back into the outbox (audited)",
          (_b("ids", "command ids", "array", items="integer"), _b("all", "every open dead letter", "boolean"),
           _b("dry_run", "say what would be queued, change nothing", "boolean"), _REASON), tag="dead letters"),
    Route("POST", "/api/v1/dead-letters/discard", post_discard, ACT, "Settle dead letters unsent, with a reason "
          "(audited)", (_b("ids", "command ids", "array", items="integer", required=True),
                        Param("reason", "body", "string", _REASON.description, required=True)), tag="dead letters"),
    Route("POST", "/api/v1/replay", post_replay, ACT, "Run logged messages again through mapping and dispatch, or "
          "describe the calls (dry run, patient data masked); audited", (
              _b("ids", "message ids", "array", items="integer"),
              Param("filter", "body", "object", "a selection: status (dead, rejected, failed), since, event"),
              _b("dry_run", "describe the calls, change nothing", "boolean"), _REASON), tag="messages"),
    Route("GET", "/api/v1/stats", get_stats, READ, "Messages by status, event and ACK; outbox; dead letters; API "
          "calls (hl7bridge stats)", (_SINCE,), tag="service"),
    Route("GET", "/api/v1/status", get_status, READ, "The service's state (ok, degraded, failing) with reasons "
          "and facts, as the health listener's /status, the log's read when asked", tag="service"),
    Route("GET", "/api/v1/dashboard", get_dashboard, READ, "Messages per minute by ACK code, outbox, dead letters, "
          "listeners, totals, and the service's state", (_q("minutes", f"the window, 1 to {MAX_MINUTES} (default 60)",
          "integer"),), tag="service"),
    Route("GET", "/api/v1/audit", get_audit, READ, "The audit log, newest first, a page at a time",
          (_SINCE, _q("action", "e.g. unmask, retry, discard, replay"),
           _q("before", "the next page: next_before of the previous one", "integer"),
           _q("limit", f"1 to {MAX_PAGE} (default 100)", "integer")), tag="audit"),
    Route("GET", "/api/v1/users", get_users, ADMIN, "Users, their roles and token counts", tag="users"),
    Route("POST", "/api/v1/users", post_users, ADMIN, "Add a user (audited)",
          (_b("name", "1 to 64 of A-Z a-z 0-9 . _ @ -", required=True),
           _b("role", "viewer, operator or admin", required=True, enum=tuple(r.value for r in Role)),
           _b("password", "12 to 1024 characters", required=True)), responses={201: "Added"}, tag="users"),
    Route("DELETE", "/api/v1/users/{name}", delete_user, ADMIN, "Remove a user, its tokens and sessions (audited)",
          (Param("name", "path", description="the user's name"),), responses={204: "Removed"}, tag="users"),
    Route("POST", "/api/v1/users/{name}/tokens", post_user_token, ADMIN, "Issue an API token for a user: shown "
          "once (audited)", (Param("name", "path", description="the user's name"), _b("label", "what it is for")),
          responses={201: "Issued"}, tag="users"),
    Route("GET", "/api/v1/settings", get_settings, ADMIN, "The effective configuration (listeners, routes, mapping, "
          "dispatch, console, retention...), every secret redacted", tag="service"),
    config_diff.ROUTE,
    Route("GET", "/api/v1/openapi.json", get_openapi, None, "This document", blocking=False, tag="api"),
]  # fmt: skip
