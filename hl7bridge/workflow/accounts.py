"""Accounts for the console and the JSON API: users with a role, API tokens, console sessions, login throttling.

- Passwords are hashed with argon2id (argon2-cffi's ``PasswordHasher``, its defaults: memory-hard, 64 MiB a hash)
  and rehashed at login when those defaults change. A login for a name that does not exist costs the same one
  verify (against a dummy hash), so timing does not tell which names exist.
- Token and session secrets are ``secrets.token_urlsafe(32)``; the log keeps only their SHA-256 and looks them up
  by it, so neither the database nor the time a lookup takes tells a secret. A token is shown once, as
  ``hb_<secret>``.
- Sessions end when idle for ``idle`` seconds or ``absolute`` seconds after login, whichever comes first, and
  when the password changes or the user is removed. ``session_of`` writes ``last_seen_at`` at most once a minute:
  a write per request would contend with ingest's writer for SQLite's lock.
- Every change (user add/remove/role/passwd, token issue/revoke) and every login and logout is audited in its own
  transaction; an entry names the user, never a password, token or session secret.
- The last admin cannot be removed or demoted while other users exist: the console would be left with users and
  nobody to manage them (the CLI could still, but the console's own admin would be locked out by a click).
  Removing the very last user is allowed: no accounts means the console lets nobody in.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.engine import Engine

from hl7bridge.core.status import Permission, Role
from hl7bridge.store import accounts as store
from hl7bridge.store.audit import AuditEntry, record

NAME_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 1024
TOKEN_PREFIX = "hb_"
#: The longest token or session secret looked up at all (ours are 43 characters; 46 with the prefix).
MAX_SECRET_CHARS = 128
MAX_LABEL_CHARS = 128
#: Tokens a user may hold, and live sessions (logging in past it ends the oldest): bounded tables.
MAX_TOKENS_PER_USER = 20
MAX_SESSIONS_PER_USER = 10
#: ``list_users`` at most.
MAX_USERS_LISTED = 10_000
#: ``session_of`` and ``authenticate_token`` record use at most this often (seconds).
TOUCH_EVERY = 60.0

_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.OPERATOR: frozenset({Permission.READ, Permission.UNMASK, Permission.ACT}),
    Role.ADMIN: frozenset(Permission),
}
_HASHER = PasswordHasher()


class AccountError(ValueError):
    """What to fix, in one line; never holds a password or secret."""


def may(role: Role | str, permission: Permission | str) -> bool:
    """viewer: read (patient data masked); operator: read, unmask with a reason, act; admin: everything."""
    try:
        return Permission(permission) in _PERMISSIONS[Role(role)]
    except ValueError:
        return False


@dataclass(frozen=True)
class Principal:
    """Who makes a request: an account's name and role, and how it proved it (``token``, ``session`` or ``cli``)."""

    name: str
    role: Role
    via: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role.value, "via": self.via}


@dataclass(frozen=True)
class Session:
    """A console session: ``secret`` goes into the cookie and nowhere else; ``csrf`` into forms and the
    ``X-CSRF-Token`` header; ``expires_at`` is the absolute end (epoch seconds; idleness may end it sooner)."""

    secret: str
    csrf: str
    expires_at: float
    principal: Principal

    def __repr__(self) -> str:
        return f"Session(principal={self.principal!r}, expires_at={self.expires_at!r})"


@dataclass(frozen=True)
class UserInfo:
    name: str
    role: str
    created_at: float
    password_changed_at: float
    last_login_at: float | None
    #: How many API tokens the user holds.
    tokens: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def csrf_matches(session: Session, given: str | None) -> bool:
    """Whether a request's CSRF token is its session's, compared in constant time."""
    return bool(given) and hmac.compare_digest(session.csrf.encode(), str(given).encode())


# --- users ---------------------------------------------------------------------------------------


def add_user(engine: Engine, name: str, role: Role | str, password: str, *, actor: str, channel: str = "cli") -> None:
    check_name(name)
    chosen = _role(role)
    hashed = _HASHER.hash(_checked_password(password))
    now = time.time()
    with engine.begin() as conn:
        store.take_write_lock(conn)
        if store.user_row(conn, name) is not None:
            raise AccountError(f"a user named {name!r} exists already (to change its password: hl7bridge user passwd)")
        store.insert_user(conn, name, chosen.value, hashed, now)
        record(conn, AuditEntry(actor, channel, "user-add", "user", (name,), details={"role": chosen.value}))


def set_password(engine: Engine, name: str, password: str, *, actor: str, channel: str = "cli") -> None:
    """A new password; the user's sessions end (whoever held one must log in with it). API tokens stay."""
    check_name(name)
    hashed = _HASHER.hash(_checked_password(password))
    with engine.begin() as conn:
        store.take_write_lock(conn)
        _existing(conn, name)
        store.set_password_hash(conn, name, hashed, time.time())
        ended = store.delete_sessions(conn, name)
        record(conn, AuditEntry(actor, channel, "user-passwd", "user", (name,), details={"sessions_ended": ended}))


def set_role(engine: Engine, name: str, role: Role | str, *, actor: str, channel: str = "cli") -> None:
    """Change a user's role; it holds from the user's next request (sessions and tokens read it each time)."""
    check_name(name)
    chosen = _role(role)
    with engine.begin() as conn:
        store.take_write_lock(conn)
        row = _existing(conn, name)
        if row.role == chosen:
            return
        if row.role == Role.ADMIN:
            _keep_an_admin(conn, name, "demote")
        store.set_role(conn, name, chosen.value)
        record(conn, AuditEntry(actor, channel, "user-role", "user", (name,),
                                details={"from": row.role, "to": chosen.value}))  # fmt: skip


def remove_user(engine: Engine, name: str, *, actor: str, channel: str = "cli") -> None:
    """Remove the user, its API tokens and its sessions."""
    check_name(name)
    with engine.begin() as conn:
        store.take_write_lock(conn)
        row = _existing(conn, name)
        if row.role == Role.ADMIN:
            _keep_an_admin(conn, name, "remove")
        tokens, ended = store.delete_user(conn, name)
        record(conn, AuditEntry(actor, channel, "user-remove", "user", (name,),
                                details={"role": row.role, "tokens": tokens, "sessions_ended": ended}))  # fmt: skip


def list_users(engine: Engine) -> list[UserInfo]:
    with engine.connect() as conn:
        rows = store.list_users(conn, MAX_USERS_LISTED)
    return [UserInfo(r.name, r.role, r.created_at, r.password_changed_at, r.last_login_at, int(r.tokens)) for r in rows]


def check_password(engine: Engine, name: str, password: str) -> Principal | None:
    """The user, when ``password`` is theirs; None otherwise. Every call costs one argon2 verify, whether the
    name exists or not. A hash made with older parameters is replaced by one with the current ones."""
    dummy = _dummy_hash()
    row = None
    if isinstance(name, str) and NAME_PATTERN.fullmatch(name):
        with engine.connect() as conn:
            row = store.user_row(conn, name)
    given = password[:MAX_PASSWORD_CHARS] if isinstance(password, str) else ""
    stored = row.password_hash if row is not None else dummy
    matched = _verify(stored, given)
    if row is None or not matched or given != password:
        return None
    if _needs_rehash(stored):
        rehashed = _HASHER.hash(given)
        with engine.begin() as conn:
            store.set_password_hash(conn, row.name, rehashed, None)
    return Principal(row.name, Role(row.role), "session")


# --- tokens --------------------------------------------------------------------------------------


def issue_token(engine: Engine, name: str, *, actor: str, channel: str = "cli", label: str = "") -> str:
    """A new API token for ``name``, as shown to its holder (``hb_<secret>``): shown once, only its SHA-256 kept."""
    check_name(name)
    if len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise AccountError(f"a token's label takes at most {MAX_LABEL_CHARS} printable characters")
    secret = secrets.token_urlsafe(32)
    with engine.begin() as conn:
        store.take_write_lock(conn)
        _existing(conn, name)
        if store.count_tokens(conn, name) >= MAX_TOKENS_PER_USER:
            raise AccountError(f"{name!r} holds {MAX_TOKENS_PER_USER} API tokens, the most a user may: revoke them "
                               "(hl7bridge user revoke) and issue the ones still needed")  # fmt: skip
        token_id = store.insert_token(conn, name, _digest(secret), label, time.time())
        record(conn, AuditEntry(actor, channel, "token-issue", "user", (name,),
                                details={"token_id": token_id, "label": label}))  # fmt: skip
    return TOKEN_PREFIX + secret


def revoke_tokens(engine: Engine, name: str, *, actor: str, channel: str = "cli") -> int:
    """Revoke every API token of ``name``; how many there were."""
    check_name(name)
    with engine.begin() as conn:
        store.take_write_lock(conn)
        _existing(conn, name)
        revoked = store.delete_tokens(conn, name)
        record(conn, AuditEntry(actor, channel, "token-revoke", "user", (name,), details={"revoked": revoked}))
    return revoked


def authenticate_token(engine: Engine, secret: str, *, now: float | None = None) -> Principal | None:
    """The token's user, for the token as its holder sends it after ``Bearer`` (``hb_<secret>``); None when it
    is not a live token. Records its use at most once a minute."""
    if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX) or len(secret) > MAX_SECRET_CHARS:
        return None
    now = time.time() if now is None else now
    with engine.connect() as conn:
        row = store.token_by_digest(conn, _digest(secret[len(TOKEN_PREFIX) :]))
    if row is None:
        return None
    if row.last_used_at is None or now - row.last_used_at >= TOUCH_EVERY:
        with engine.begin() as conn:
            store.touch_token(conn, row.id, now)
    return Principal(row.name, Role(row.role), "token")


# --- sessions ------------------------------------------------------------------------------------


def open_session(
    engine: Engine,
    principal: Principal,
    *,
    now: float | None = None,
    idle: float = 1800.0,
    absolute: float = 43200.0,
    channel: str = "api",
) -> Session:
    """Log ``principal`` in (audited ``login``): a new session, for a user that still exists. Past
    ``MAX_SESSIONS_PER_USER`` live sessions, the oldest ends; ended sessions of anyone are cleared here."""
    if not (0 < idle <= absolute):
        raise AccountError("a session's idle time must be positive and no longer than its absolute lifetime")
    now = time.time() if now is None else now
    secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    with engine.begin() as conn:
        store.take_write_lock(conn)
        row = _existing(conn, principal.name)
        store.prune_sessions(conn, now)
        live = store.live_sessions(conn, row.name)
        for digest in live[: max(0, len(live) - MAX_SESSIONS_PER_USER + 1)]:
            store.delete_session(conn, digest)
        store.insert_session(conn, _digest(secret), row.name, csrf, now, idle, now + absolute)
        store.set_last_login(conn, row.name, now)
        record(conn, AuditEntry(row.name, channel, "login", "user", (row.name,), details={"via": principal.via}))
    return Session(secret, csrf, now + absolute, Principal(row.name, Role(row.role), "session"))


def session_of(engine: Engine, secret: str, *, now: float | None = None) -> Session | None:
    """The live session of a cookie's secret; None when there is none (never was, ended, expired, idle too long;
    an expired one is removed). ``last_seen_at`` is written at most once a minute."""
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_CHARS:
        return None
    now = time.time() if now is None else now
    digest = _digest(secret)
    with engine.connect() as conn:
        row = store.session_by_digest(conn, digest)
    if row is None:
        return None
    if now >= row.expires_at or now - row.last_seen_at > row.idle_seconds:
        with engine.begin() as conn:
            store.delete_session(conn, digest)
        return None
    if now - row.last_seen_at >= TOUCH_EVERY:
        with engine.begin() as conn:
            store.touch_session(conn, digest, now)
    return Session(secret, row.csrf, row.expires_at, Principal(row.name, Role(row.role), "session"))


def close_session(engine: Engine, secret: str, *, channel: str = "api") -> None:
    """Log out (audited ``logout``); a secret that names no session changes nothing."""
    if not isinstance(secret, str) or not 0 < len(secret) <= MAX_SECRET_CHARS:
        return
    with engine.begin() as conn:
        name = store.delete_session(conn, _digest(secret))
        if name is not None:
            record(conn, AuditEntry(name, channel, "logout", "user", (name,)))


# --- login throttling ----------------------------------------------------------------------------


#: A name or peer as the limiter keeps it: longer ones are not names, nor addresses, and must not cost memory.
_KEY_CHARS = 128


class LoginLimiter:
    """Failed logins, in memory, per name and per peer: after ``failures`` within ``window`` seconds, that name
    (or peer) is refused for ``lockout`` seconds. A success clears its name's count, not its peer's: one valid
    account must not reset a peer guessing at others. At most ``max_keys`` names and peers are tracked (the
    least recently failed are forgotten first), so a flood of names cannot grow it without bound."""

    def __init__(
        self, *, failures: int = 5, window: float = 900.0, lockout: float = 900.0, max_keys: int = 10_000
    ) -> None:
        self.failures, self.window, self.lockout, self.max_keys = failures, window, lockout, max_keys
        self._lock = threading.Lock()
        #: key -> (failure times within the window, refused until)
        self._keys: OrderedDict[tuple[str, str], tuple[deque[float], float]] = OrderedDict()

    @staticmethod
    def _keys_of(name: str, peer: str) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("name", str(name)[:_KEY_CHARS]), ("peer", str(peer)[:_KEY_CHARS])

    def retry_after(self, name: str, peer: str, now: float) -> float | None:
        """Seconds until a login for ``name`` from ``peer`` is taken again (for ``Retry-After``); None: now."""
        with self._lock:
            until = max(self._keys.get(key, ((), 0.0))[1] for key in self._keys_of(name, peer))
        return until - now if until > now else None

    def failed(self, name: str, peer: str, now: float) -> None:
        with self._lock:
            for key in self._keys_of(name, peer):
                times, until = self._keys.pop(key, (deque(), 0.0))
                while times and times[0] <= now - self.window:
                    times.popleft()
                times.append(now)
                if len(times) >= self.failures:
                    times.clear()
                    until = now + self.lockout
                self._keys[key] = (times, until)
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)

    def succeeded(self, name: str, peer: str) -> None:
        with self._lock:
            self._keys.pop(self._keys_of(name, peer)[0], None)


# --- helpers -------------------------------------------------------------------------------------


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@functools.cache
def _dummy_hash() -> str:
    """What an unknown name's password is checked against: made with the current parameters, so its verify costs
    what a real one does."""
    return _HASHER.hash(secrets.token_urlsafe(16))


def _verify(stored: str, password: str) -> bool:
    try:
        return _HASHER.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return False


def _needs_rehash(stored: str) -> bool:
    try:
        return _HASHER.check_needs_rehash(stored)
    except (InvalidHashError, ValueError):
        return False


def check_name(name: str) -> None:
    """Refuse a name that breaks the rules, saying them (before asking for a password)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise AccountError(f"a user name is 1 to 64 of A-Z a-z 0-9 . _ @ -, not {str(name)[:70]!r}")


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AccountError(f"a role is one of {', '.join(r.value for r in Role)}, not {str(role)[:40]!r}") from None


def _checked_password(password: str) -> str:
    if not isinstance(password, str) or len(password) < MIN_PASSWORD_CHARS:
        got = len(password) if isinstance(password, str) else 0
        raise AccountError(f"a password needs at least {MIN_PASSWORD_CHARS} characters (this one has {got})")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"a password takes at most {MAX_PASSWORD_CHARS} characters (this one has {len(password)})")
    return password


def _existing(conn: Any, name: str) -> Any:
    row = store.user_row(conn, name)
    if row is None:
        raise AccountError(f"no user named {name!r} (see hl7bridge user list)")
    return row


def _keep_an_admin(conn: Any, name: str, verb: str) -> None:
    if store.count_admins(conn) <= 1 and store.count_users(conn) > 1:
        raise AccountError(f"{name!r} is the last admin and other users remain: make another user admin first "
                           f"(hl7bridge user role NAME admin), then {verb} {name!r}")  # fmt: skip
