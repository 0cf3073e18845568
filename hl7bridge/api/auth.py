"""Who makes a request, and whether they may: a bearer token (scripts) or the session cookie (browsers), the
CSRF check for a cookie's state-changing requests, the same-origin check, logging in and out, and the
throttle on failed logins.

Everything here that reads the database or hashes runs in the API's thread pool (``server.py`` calls it from
there).
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import Any

from hl7bridge.api.http import ApiError, Call, Reply, text_arg, unknown_keys
from hl7bridge.api.routes import Route
from hl7bridge.core.status import Permission
from hl7bridge.workflow.accounts import (
    Principal,
    Session,
    authenticate_token,
    check_password,
    close_session,
    csrf_matches,
    may,
    open_session,
    session_of,
)

COOKIE = "hb_session"
CSRF_HEADER = "x-csrf-token"
#: The form field a console page posts its CSRF token in.
CSRF_FIELD = "csrf"
TOKEN_PREFIX = "hb_"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def same_origin(origin: str | None, host: str | None, secure: bool, fetch_site: str | None = None) -> bool:
    """A request without ``Origin`` (not from a browser's cross-site context) or from this server's own origin.

    Under ``Referrer-Policy: no-referrer`` Chromium sends ``Origin: null`` with a form its own page posts; then
    the browser's ``Sec-Fetch-Site`` must say ``same-origin`` (a sandboxed or foreign page says otherwise)."""
    if origin is None:
        return True
    if origin == "null":
        return fetch_site == "same-origin"
    if not host:
        return False
    return origin == f"{'https' if secure else 'http'}://{host}"


def _bearer(call: Call) -> str | None:
    header = call.header("authorization")
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not credentials.strip():
        raise ApiError(401, "Authorization: expected 'Bearer hb_…' (a token from 'hl7bridge user token NAME')",
                       headers={"WWW-Authenticate": 'Bearer realm="hl7bridge"'})  # fmt: skip
    return credentials.strip()


def session_cookie(call: Call) -> str | None:
    raw = call.header("cookie")
    if not raw:
        return None
    cookies: SimpleCookie = SimpleCookie()
    try:
        cookies.load(raw)
    except CookieError:
        return None
    morsel = cookies.get(COOKIE)
    return morsel.value if morsel is not None and morsel.value else None


def identify(call: Call) -> tuple[Principal | None, Session | None]:
    """The principal behind the request's credentials (a bearer token first), or (None, None). A token or cookie
    that is sent but not valid is 401 (an expired session too), never an anonymous request."""
    token = _bearer(call)
    if token is not None:
        principal = authenticate_token(call.ctx.engine, token)
        if principal is None:
            raise ApiError(401, "the token is not valid (revoked, or its user removed): ask an admin for a new one",
                           headers={"WWW-Authenticate": 'Bearer realm="hl7bridge", error="invalid_token"'})  # fmt: skip
        return principal, None
    secret = session_cookie(call)
    if secret is not None:
        session = session_of(call.ctx.engine, secret, now=call.ctx.clock())
        if session is None:
            raise ApiError(401, "the session has ended: log in again", headers={"Set-Cookie": expired_cookie(call)})
        return session.principal, session
    return None, None


def authorize(call: Call, route: Route) -> Call:
    """The call with its principal, once it may run ``route``; raises 401, 403 (naming the permission) otherwise."""
    public = route.permission is None and not route.session_only
    try:
        principal, session = identify(call)
    except ApiError:
        if not public:
            raise
        # A stale cookie or token must not stand between a visitor and the login form (or its post).
        principal, session = None, None
    call = Call(**{**call.__dict__, "principal": principal, "session": session})
    if public:
        return call
    if principal is None:
        raise ApiError(401, "log in (POST /api/v1/session) or send Authorization: Bearer hb_…",
                       headers={"WWW-Authenticate": 'Bearer realm="hl7bridge"'})  # fmt: skip
    if route.session_only and session is None:
        raise ApiError(400, "no session to end: this request carries a bearer token, not the session cookie")
    try:
        if session is not None and call.method in UNSAFE_METHODS:
            check_csrf(call, session)
        if route.permission is not None and not may(principal.role, route.permission):
            raise ApiError(403, f"this needs the permission {route.permission.value!r}, which the role "
                                f"{principal.role.value!r} of {principal.name!r} does not have")  # fmt: skip
    except ApiError as exc:
        exc.call = call
        raise
    return call


def check_csrf(call: Call, session: Session) -> None:
    """A cookie comes with every request a browser makes, whoever's page made it: a state change must also carry
    the session's CSRF token, which only this server's own pages (and the login answer) know."""
    sent = call.header(CSRF_HEADER)
    if sent is None:
        sent = call.form().get(CSRF_FIELD)
    if not csrf_matches(session, sent):
        raise ApiError(403, "missing or wrong CSRF token: send the session's csrf in the X-CSRF-Token header")


def cookie(call: Call, session: Session) -> str:
    secure = "; Secure" if call.ctx.secure_cookies else ""
    max_age = max(0, int(session.expires_at - call.ctx.clock()))
    return f"{COOKIE}={session.secret}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Strict{secure}"


def expired_cookie(call: Call) -> str:
    secure = "; Secure" if call.ctx.secure_cookies else ""
    return f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict{secure}"


def login(call: Call, name: str, password: str, channel: str = "api") -> Session:
    """A new session for ``name``, or 401; 429 with Retry-After while that name or peer is throttled. The
    answer is the same for an unknown name and a wrong password."""
    ctx = call.ctx
    now = ctx.clock()
    wait = ctx.limiter.retry_after(name, call.peer, now)
    if wait is not None:
        ctx.count_login("throttled")
        if ctx.login_log is not None:
            ctx.login_log.warn(("throttled", call.peer), "login refused from %s: too many failed logins (%s)",
                               call.peer, channel)  # fmt: skip
        raise ApiError(429, "too many failed logins: wait before trying again",
                       headers={"Retry-After": str(max(1, int(wait + 0.999)))})  # fmt: skip
    principal = check_password(ctx.engine, name, password)
    if principal is None:
        ctx.limiter.failed(name, call.peer, now)
        ctx.count_login("failed")
        if ctx.login_log is not None:
            ctx.login_log.warn(("failed", call.peer), "login failed from %s: wrong name or password (%s)", call.peer,
                               channel)  # fmt: skip
        raise ApiError(401, "wrong name or password")
    ctx.limiter.succeeded(name, call.peer)
    ctx.count_login("ok")
    return open_session(
        ctx.engine, principal, now=now, idle=ctx.session_idle, absolute=ctx.session_absolute, channel=channel
    )


# --- the session resource ------------------------------------------------------------------------------------


def post_session(call: Call) -> Reply:
    data = call.json()
    unknown_keys(data, {"name", "password"})
    name = text_arg(data.get("name"), "name", max_chars=64, required=True)
    password = text_arg(data.get("password"), "password", max_chars=1024, required=True)
    assert name is not None and password is not None
    session = login(call, name, password)
    body = {"name": session.principal.name, "role": session.principal.role.value, "csrf": session.csrf,
            "expires_at": session.expires_at}  # fmt: skip
    return Reply(200, body, headers=[("Set-Cookie", cookie(call, session))])


def delete_session(call: Call) -> Reply:
    assert call.session is not None  # authorize: session_only
    close_session(call.ctx.engine, call.session.secret)
    return Reply(204, None, headers=[("Set-Cookie", expired_cookie(call))])


def whoami(call: Call) -> dict[str, Any]:
    assert call.principal is not None
    out: dict[str, Any] = {"name": call.principal.name, "role": call.principal.role.value, "via": call.principal.via,
                           "permissions": [p.value for p in Permission if may(call.principal.role, p)]}  # fmt: skip
    if call.session is not None:
        out["csrf"] = call.session.csrf
        out["expires_at"] = call.session.expires_at
    return out
