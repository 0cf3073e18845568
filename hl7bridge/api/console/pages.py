"""The console's pages: server-rendered HTML over the same workflow functions as the CLI and the JSON API.

Each handler takes the router's ``Call`` (already authenticated, its permission and CSRF token checked by
``api.auth``) and returns a ``Reply``; they run in the API's thread pool, as every database call must. Bad
input is answered on the page it came from, with the message saying what to fix; patient data is masked
unless an operator unmasks one message with a reason, and then only in that one response.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from hl7bridge.api import auth, config_diff
from hl7bridge.api.http import ApiError, Call, Reply, int_arg, redirect, since_arg, text_arg
from hl7bridge.api.routes import Param, Route
from hl7bridge.core.status import MessageStatus, Permission, Role
from hl7bridge.store import audit
from hl7bridge.workflow import accounts, deadletters
from hl7bridge.workflow.accounts import AccountError, may
from hl7bridge.workflow.dashboard import dashboard
from hl7bridge.workflow.search import Filters, SearchError, search
from hl7bridge.workflow.timeline import Unmask, UnmaskError, timeline

from .templating import render

READ, UNMASK, ACT, ADMIN = Permission.READ, Permission.UNMASK, Permission.ACT, Permission.ADMIN
HTML = "text/html; charset=utf-8"
CHANNEL = "console"
#: Rows a listing shows per page.
PAGE_ROWS = 50
#: Dead letters one bulk action takes at most (a filter matching more takes the oldest this many).
BULK_MAX = 1000
#: The reason an operator gives for an unmask, a retry or a discard (the workflow's own limit for unmasks).
REASON_MAX = 500
NAV = (("/", "Dashboard", "d"), ("/messages", "Messages", "m"), ("/dead-letters", "Dead letters", "l"),
       ("/audit", "Audit", "a"), ("/config-diff", "Config diff", "c"), ("/users", "Users", "u"),
       ("/settings", "Settings", "s"))  # fmt: skip
#: The pages only an admin sees in the navigation.
ADMIN_PAGES = ("/config-diff", "/users", "/settings")
#: The console's stylesheet, script and icon, served at ``/static/``.
STATIC = Path(__file__).resolve().parent / "static"
STATUSES = ("", *(s.value for s in MessageStatus), "dead")


def page(call: Call | None, template: str, *, status: int = 200, current: str = "", notices: Iterable[tuple[str, str]] = (),
         headers: Sequence[tuple[str, str]] = (), **context: Any) -> Reply:  # fmt: skip
    """A whole page: the layout (navigation for the viewer's role, the CSRF token for its forms) around ``template``."""
    principal = call.principal if call is not None else None
    role = principal.role if principal is not None else None
    nav = [item for item in NAV if item[0] not in ADMIN_PAGES or (role is not None and may(role, ADMIN))]
    body = render(
        template, principal=principal, csrf=call.session.csrf if call is not None and call.session is not None else "", nav=nav,
        current=current, notices=list(notices),
        can_act=role is not None and may(role, ACT), can_unmask=role is not None and may(role, UNMASK),
        **context,
    )  # fmt: skip
    return Reply(status, body, HTML, list(headers))


def error_page(call: Call | None, status: int, message: str, headers: Sequence[tuple[str, str]] = ()) -> Reply:
    """An error as a page of the console (the router's 403, 404, 405, 413 for a page route come here too)."""
    heading = {400: "Check the request", 403: "Not allowed", 404: "Not found", 405: "Not allowed here",
               413: "Too large", 429: "Too many attempts", 503: "Not available"}.get(status, "Something went wrong")  # fmt: skip
    return page(call, "error.html", status=status, heading=heading, message=message, headers=headers)


def form_fields(call: Call) -> dict[str, list[str]]:
    """Every value of every field of a posted form (checkbox lists repeat a name), bounded as ``Call.form`` is."""
    kind = (call.header("content-type") or "").split(";", 1)[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        return {}
    try:
        return parse_qs(call.body.decode("utf-8"), keep_blank_values=True, max_num_fields=BULK_MAX + 20)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "the form is not valid UTF-8 url-encoded data") from None


def _one(fields: dict[str, list[str]], name: str) -> str:
    values = fields.get(name) or [""]
    return values[0]


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path of this site only (never ``//host`` or a scheme). Browsers drop tabs
    and line breaks from a URL, so ``/<tab>/host`` is ``//host`` to them: no whitespace or control character."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target or len(target) > 500:
        return "/"
    if any(c.isspace() or not c.isprintable() for c in target):
        return "/"
    return target


# --- logging in and out ----------------------------------------------------------------------------------------


def get_login(call: Call) -> Reply:
    target = _safe_next(call.arg("next"))
    if call.principal is not None and call.principal.via == "session":
        return redirect(target)
    return page(call, "login.html", next=target, name="")


def post_login(call: Call) -> Reply:
    fields = call.form()
    name = fields.get("name", "").strip()
    target = _safe_next(fields.get("next"))
    password = fields.get("password", "")
    if not name or not password or len(name) > 64 or len(password) > 1024:
        return page(call, "login.html", status=400, next=target, name=name[:64],
                    notices=[("error", "Enter your name and password.")])  # fmt: skip
    try:
        session = auth.login(call, name, password, CHANNEL)
    except ApiError as exc:
        text = (
            "Too many failed logins: wait a while, then try again." if exc.status == 429 else "Wrong name or password."
        )
        return page(call, "login.html", status=exc.status, next=target, name=name, notices=[("error", text)],
                    headers=list(exc.headers.items()))  # fmt: skip
    reply = redirect(target)
    reply.headers.append(("Set-Cookie", auth.cookie(call, session)))
    return reply


def post_logout(call: Call) -> Reply:
    assert call.session is not None
    accounts.close_session(call.ctx.engine, call.session.secret, channel=CHANNEL)
    reply = redirect("/login")
    reply.headers.append(("Set-Cookie", auth.expired_cookie(call)))
    return reply


# --- the dashboard ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    #: AA, AE, AR or other (CA, CE, CR count with their original-mode kin).
    kind: str
    title: str


@dataclass(frozen=True)
class Chart:
    """Messages per minute by ACK code as stacked bars, laid out here so the page needs no script."""

    width: int
    height: int
    bars: list[Bar]
    peak: int
    total: int
    #: (x, label) of the minutes labelled under the chart, counted back from the current one.
    ticks: list[tuple[float, str]]
    kinds: list[str]


CHART_KINDS = ("AA", "AE", "AR", "other")
_KIN = {"AA": "AA", "CA": "AA", "AE": "AE", "CE": "AE", "AR": "AR", "CR": "AR"}


def chart(per_minute: Sequence[tuple[float, dict[str, int]]], width: int = 1000, height: int = 140) -> Chart:
    """``per_minute``: (minute start, {ACK code: count}), oldest first."""
    step = width / max(1, len(per_minute))
    stacks = []
    for minute, counts in per_minute:
        merged = dict.fromkeys(CHART_KINDS, 0)
        for code, n in counts.items():
            merged[_KIN.get(code or "", "other")] += n
        stacks.append((minute, merged))
    peak = max((sum(m.values()) for _, m in stacks), default=0)
    scale = (height - 2) / peak if peak else 0.0
    bars: list[Bar] = []
    for i, (minute, merged) in enumerate(stacks):
        label = datetime.fromtimestamp(minute, UTC).strftime("%H:%M UTC")
        base = float(height)
        for kind in CHART_KINDS:
            if merged[kind]:
                h = max(1.0, merged[kind] * scale)
                base -= h
                bars.append(Bar(round(i * step + 1, 1), round(base, 1), round(max(1.0, step - 2), 1), round(h, 1),
                                kind, f"{label}: {merged[kind]} {kind}"))  # fmt: skip
    every = 10 if len(stacks) > 20 else max(1, len(stacks) // 4)
    last = len(stacks) - 1
    ticks = [(round(i * step, 1), "now" if i == last else f"−{last - i} min")
             for i in range(len(stacks)) if (last - i) % every == 0]  # fmt: skip
    total = sum(sum(m.values()) for _, m in stacks)
    return Chart(width, height, bars, peak, total, ticks, [k for k in CHART_KINDS if any(b.kind == k for b in bars)])


def get_dashboard(call: Call) -> Reply:
    now = call.ctx.clock()
    board = dashboard(call.ctx.engine, now=now)
    service = call.ctx.status()
    data = board.to_json()
    return page(call, "dashboard.html", current="/", board=data, service=service,
                chart=chart([(m["minute"], m["counts"]) for m in data["per_minute"]]))  # fmt: skip


# --- messages ------------------------------------------------------------------------------------------------

FILTER_NAMES = ("appointment", "patient", "control_id", "sender", "text", "status", "event", "since")


def _filters(call: Call, form: dict[str, str]) -> Filters:
    since = since_arg(form["since"] or None, "since", call.ctx.clock())
    values = {name: text_arg(form[name], name, max_chars=200) for name in FILTER_NAMES if name != "since"}
    if values["status"] and values["status"] not in STATUSES:
        raise ApiError(400, f"status: one of {', '.join(s for s in STATUSES if s)}", "status")
    return Filters(since=since, **values)


def get_messages(call: Call) -> Reply:
    form = {name: (call.arg(name) or "").strip() for name in (*FILTER_NAMES, "before")}
    context: dict[str, Any] = {"form": form, "statuses": STATUSES, "page": None, "older_url": ""}
    if call.arg("search") is None:
        return page(call, "messages.html", current="/messages", **context)
    try:
        before = int_arg(form["before"] or None, "before")
        found = search(call.ctx.engine, _filters(call, form), before, PAGE_ROWS)
    except (ApiError, SearchError) as exc:
        return page(call, "messages.html", status=400, current="/messages", notices=[("error", _said(exc))], **context)
    if found.more:
        kept = {k: v for k, v in form.items() if v and k != "before"}
        context["older_url"] = "/messages?" + urlencode({"search": "1", **kept, "before": found.next_before})
    context["page"] = found
    return page(call, "messages.html", current="/messages", **context)


def _said(exc: Exception) -> str:
    return exc.message if isinstance(exc, ApiError) else str(exc)


def _timeline_page(call: Call, message_id: int, unmask: Unmask | None = None, status: int = 200,
                   notices: Sequence[tuple[str, str]] = ()) -> Reply:  # fmt: skip
    found = timeline(call.ctx.engine, message_id, unmask=unmask)
    if found is None:
        return error_page(call, 404, f"There is no message {message_id} in the log.")
    data = found.to_json()
    shown = list(notices)
    if not data["masked"]:
        shown.append(("warn", "Patient data is shown in this page only, and your unmask is in the audit log. "
                              "Reloading or leaving shows it masked again."))  # fmt: skip
    return page(call, "message.html", status=status, current="/messages", t=data, notices=shown)


def get_message(call: Call) -> Reply:
    return _timeline_page(call, _message_id(call))


def post_unmask(call: Call) -> Reply:
    message_id = _message_id(call)
    reason = call.form().get("reason", "").strip()
    if not reason or len(reason) > REASON_MAX:
        return _timeline_page(call, message_id, status=400,
                              notices=[("error", f"Unmasking needs a reason (1 to {REASON_MAX} characters).")])  # fmt: skip
    try:
        return _timeline_page(call, message_id, Unmask(call.actor, reason, CHANNEL))
    except UnmaskError as exc:
        return _timeline_page(call, message_id, status=400, notices=[("error", str(exc))])


def _message_id(call: Call) -> int:
    value = int_arg(call.params["id"], "id")
    assert value is not None
    return value


# --- dead letters ----------------------------------------------------------------------------------------------


def _letters_filter(call: Call, form: dict[str, str]) -> tuple[float | None, str | None]:
    return since_arg(form.get("since") or None, "since", call.ctx.clock()), text_arg(
        form.get("route"), "route", max_chars=200
    )


def _keyset_page(rows: Sequence[Any], path: str, form: dict[str, str], key: str) -> tuple[Sequence[Any], str]:
    """A page of ``PAGE_ROWS`` from ``rows`` (read one more, to know), and the link to the next page: the same
    filters with ``key`` set to the last row's id; "" when nothing remains."""
    if len(rows) <= PAGE_ROWS:
        return rows, ""
    rows = rows[:PAGE_ROWS]
    kept = {k: v for k, v in form.items() if v and k != key}
    return rows, f"{path}?" + urlencode({**kept, key: rows[-1].id})


def get_dead_letters(call: Call, notices: Sequence[tuple[str, str]] = (), status: int = 200) -> Reply:
    form = {name: (call.arg(name) or "").strip() for name in ("since", "route", "after")}
    try:
        since, route = _letters_filter(call, form)
        after = int_arg(form["after"] or None, "after")
    except ApiError as exc:
        return page(call, "dead_letters.html", status=400, current="/dead-letters", form=form, letters=[],
                    more_url="", notices=[("error", exc.message)])  # fmt: skip
    letters = deadletters.list_open(call.ctx.engine, since=since, route=route, after=after, limit=PAGE_ROWS + 1)
    letters, more_url = _keyset_page(letters, "/dead-letters", form, "after")
    return page(call, "dead_letters.html", status=status, current="/dead-letters", form=form, letters=letters,
                more_url=more_url, notices=notices)  # fmt: skip


def _chosen_ids(fields: dict[str, list[str]], name: str = "ids") -> list[int]:
    out: list[int] = []
    for raw in fields.get(name, []):
        for part in raw.split(","):
            if part.strip():
                value = int_arg(part.strip(), name)
                assert value is not None
                out.append(value)
    if len(out) > BULK_MAX:
        raise ApiError(400, f"at most {BULK_MAX} dead letters at once", name)
    return sorted(set(out))


def post_preview(call: Call) -> Reply:
    """The dry run before any action: what a retry would queue (and refuse, and why), or what a discard would
    settle; the confirmation form carries exactly those ids, and asks for the reason."""
    fields = form_fields(call)
    verb, _, scope = _one(fields, "action").partition(":")
    if verb not in ("retry", "discard"):
        raise ApiError(400, "action: choose retry or discard", "action")
    form = {"since": _one(fields, "since"), "route": _one(fields, "route")}
    if scope == "filter":
        since, route = _letters_filter(call, form)
        letters = deadletters.list_open(call.ctx.engine, since=since, route=route, limit=BULK_MAX + 1)
        capped = len(letters) > BULK_MAX
        ids = [d.id for d in letters[:BULK_MAX]]
    else:
        ids = [int(scope)] if scope.isdigit() else _chosen_ids(fields)
        capped = False
    if not ids:
        return get_dead_letters(call, [("error", "Choose dead letters first (tick them, or act on the filter).")], 400)
    if verb == "retry":
        plan = deadletters.retry(call.ctx.engine, ids, call.actor, dry_run=True, channel=CHANNEL)
        chosen, refused = plan.queued, plan.refused
    else:
        open_ = {d.id: d for d in _open_by_id(call, ids)}
        chosen = [open_[i] for i in ids if i in open_]
        refused = [deadletters.Refusal(i, "not an open dead letter") for i in ids if i not in open_]
    return page(call, "dead_letters_confirm.html", current="/dead-letters", verb=verb, chosen=chosen,
                refused=refused, capped=capped, bulk_max=BULK_MAX, reason_max=REASON_MAX)  # fmt: skip


def _open_by_id(call: Call, ids: Sequence[int]) -> list[deadletters.DeadLetter]:
    """The open dead letters among ``ids`` (the list is walked in pages; it is bounded by the dead letters open)."""
    wanted, found, after = set(ids), [], None
    while True:
        batch = deadletters.list_open(call.ctx.engine, after=after, limit=BULK_MAX)
        found += [d for d in batch if d.id in wanted]
        if len(batch) < BULK_MAX or len(found) == len(wanted):
            return found
        after = batch[-1].id


def post_retry(call: Call) -> Reply:
    fields = form_fields(call)
    ids = _chosen_ids(fields)
    reason = _one(fields, "reason").strip()
    if not ids or len(reason) > REASON_MAX:
        raise ApiError(400, f"choose dead letters, and give a reason of at most {REASON_MAX} characters")
    done = deadletters.retry(call.ctx.engine, ids, call.actor, reason=reason, channel=CHANNEL)
    notices = []
    if done.queued:
        notices.append(("ok", f"Queued {len(done.queued)} dead letter(s) again (audit entry {done.audit_id}); "
                              "the running service sends them now."))  # fmt: skip
    notices += [("error", f"Command {r.id} not retried: {r.reason}") for r in done.refused]
    return get_dead_letters(call, notices)


def post_discard(call: Call) -> Reply:
    fields = form_fields(call)
    ids = _chosen_ids(fields)
    reason = _one(fields, "reason").strip()
    if not ids:
        raise ApiError(400, "choose dead letters to discard", "ids")
    if not reason or len(reason) > REASON_MAX:
        return get_dead_letters(call, [("error", f"Discarding needs a reason (1 to {REASON_MAX} characters).")], 400)
    done = deadletters.discard(call.ctx.engine, ids, call.actor, reason, channel=CHANNEL)
    notices = []
    if done.discarded:
        notices.append(("ok", f"Discarded {len(done.discarded)} dead letter(s) (audit entry {done.audit_id})."))
    notices += [("error", f"Command {r.id} not discarded: {r.reason}") for r in done.refused]
    return get_dead_letters(call, notices)


# --- the audit log ---------------------------------------------------------------------------------------------


def get_audit(call: Call) -> Reply:
    form = {name: (call.arg(name) or "").strip() for name in ("action", "since", "before")}
    try:
        since = since_arg(form["since"] or None, "since", call.ctx.clock())
        before = int_arg(form["before"] or None, "before")
        action = text_arg(form["action"], "action", max_chars=64)
    except ApiError as exc:
        return page(call, "audit.html", status=400, current="/audit", form=form, entries=[], older_url="",
                    notices=[("error", exc.message)])  # fmt: skip
    found = audit.entries(call.ctx.engine, since=since, action=action, before=before, limit=PAGE_ROWS + 1)
    found, older_url = _keyset_page(found, "/audit", form, "before")
    return page(call, "audit.html", current="/audit", form=form, entries=found, older_url=older_url)


# --- users (admin) ---------------------------------------------------------------------------------------------


def get_users(call: Call, notices: Sequence[tuple[str, str]] = (), status: int = 200, token: str = "",
              token_for: str = "") -> Reply:  # fmt: skip
    users = [u.to_json() for u in accounts.list_users(call.ctx.engine)]
    return page(call, "users.html", status=status, current="/users", users=users, roles=[r.value for r in Role],
                notices=notices, token=token, token_for=token_for)  # fmt: skip


def post_user(call: Call) -> Reply:
    fields = call.form()
    name, role, password = fields.get("name", "").strip(), fields.get("role", ""), fields.get("password", "")
    try:
        accounts.add_user(call.ctx.engine, name, Role(role) if role in set(Role) else role, password,  # type: ignore[arg-type]
                          actor=call.actor, channel=CHANNEL)  # fmt: skip
    except AccountError as exc:
        return get_users(call, [("error", str(exc))], 400)
    return get_users(call, [("ok", f"Added {name} ({role}).")])


def post_user_remove(call: Call) -> Reply:
    """Asks first (a removal ends the user's tokens and sessions at once); the confirmation posts ``confirm``."""
    name = call.params["name"]
    if call.form().get("confirm") != "yes":
        known = {u.name: u for u in accounts.list_users(call.ctx.engine)}
        if name not in known:
            return get_users(call, [("error", f"no user {name!r}")], 404)
        return page(call, "user_remove.html", current="/users", user=known[name].to_json())
    try:
        accounts.remove_user(call.ctx.engine, name, actor=call.actor, channel=CHANNEL)
    except AccountError as exc:
        return get_users(call, [("error", str(exc))], 400)
    return get_users(call, [("ok", f"Removed {name}, its tokens and its sessions.")])


def post_user_token(call: Call) -> Reply:
    name = call.params["name"]
    label = call.form().get("label", "").strip()[:100]
    try:
        secret = accounts.issue_token(call.ctx.engine, name, actor=call.actor, channel=CHANNEL, label=label)
    except AccountError as exc:
        return get_users(call, [("error", str(exc))], 400)
    return get_users(call, [("ok", f"A new token for {name}: copy it now, it is not shown again.")],
                     token=secret, token_for=name)  # fmt: skip


# --- settings (admin) ------------------------------------------------------------------------------------------


def get_settings(call: Call) -> Reply:
    if call.ctx.settings is None:
        return error_page(call, 503, "The settings are not available on this service.")
    shown = call.ctx.settings()
    source = shown.pop("source", "")
    return page(call, "settings.html", current="/settings", source=source, sections=list(shown.items()))


# --- config diff (admin) ---------------------------------------------------------------------------------------


def get_config_diff(call: Call) -> Reply:
    form = dict.fromkeys(("toml", "path", "route", "reason", "phi"), "") | {"since": "7d"}
    return page(call, "config_diff.html", current="/config-diff", form=form, report=None)


def post_config_diff(call: Call) -> Reply:
    fields = call.form()
    form = {k: fields.get(k, "") for k in ("toml", "path", "since", "route", "reason")}
    form["phi"] = "true" if fields.get("phi") else ""
    asked = {k: v for k, v in form.items() if v.strip()}
    try:
        report = config_diff.run(call, asked)
    except ApiError as exc:
        return page(call, "config_diff.html", status=exc.status, current="/config-diff", form=form, report=None,
                    notices=[("error", exc.message)])  # fmt: skip
    return page(call, "config_diff.html", current="/config-diff", form=form, report=config_diff.view(report))


# --- the routes ------------------------------------------------------------------------------------------------

_ID = (Param("id", "path", "integer", "message id", required=True),)
_NAME = (Param("name", "path", "string", "user name", required=True),)


def _page(method: str, path: str, handler: Any, permission: Permission | None, summary: str,
          params: tuple[Param, ...] = (), **extra: Any) -> Route:  # fmt: skip
    return Route(method, path, handler, permission, summary, params, kind="page", tag="console", **extra)


PAGES: list[Route] = [
    _page("GET", "/login", get_login, None, "The login form"),
    _page("POST", "/login", post_login, None, "Log in (form: name, password, next)"),
    _page("POST", "/logout", post_logout, None, "Log out", session_only=True),
    _page("GET", "/", get_dashboard, READ, "The dashboard"),
    _page("GET", "/messages", get_messages, READ, "The message browser (nothing is searched until asked)"),
    _page("GET", "/messages/{id}", get_message, READ, "A message's timeline, masked", _ID),
    _page("POST", "/messages/{id}/unmask", post_unmask, UNMASK, "The timeline unmasked, with a reason", _ID),
    _page("GET", "/dead-letters", get_dead_letters, READ, "The open dead letters"),
    _page("POST", "/dead-letters/preview", post_preview, ACT, "What a retry or discard would do (dry run)"),
    _page("POST", "/dead-letters/retry", post_retry, ACT, "Retry dead letters"),
    _page("POST", "/dead-letters/discard", post_discard, ACT, "Discard dead letters with a reason"),
    _page("GET", "/audit", get_audit, READ, "The audit log"),
    _page("GET", "/config-diff", get_config_diff, ADMIN, "What a new configuration would change (the form)"),
    _page("POST", "/config-diff", post_config_diff, ADMIN, "Run a config diff against the running configuration"),
    _page("GET", "/users", get_users, ADMIN, "Users and tokens"),
    _page("POST", "/users", post_user, ADMIN, "Add a user"),
    _page("POST", "/users/{name}/remove", post_user_remove, ADMIN, "Remove a user", _NAME),
    _page("POST", "/users/{name}/token", post_user_token, ADMIN, "Issue a token for a user", _NAME),
    _page("GET", "/settings", get_settings, ADMIN, "The effective configuration, secrets redacted"),
]
