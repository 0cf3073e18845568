"""The accounts' queries and updates: users, API tokens and console sessions (``workflow.accounts`` holds the
rules, the hashing and the audit entries).

Secrets never reach these functions: tokens and sessions are found by the SHA-256 of their secret, users carry an
argon2id hash. Writes that check something first (the last admin, a name taken) begin with
``take_write_lock``, so the check and the change commit as one.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.engine import Connection

from hl7bridge.core.status import Role

from .deadletters import take_write_lock
from .schema import api_tokens, sessions, users

__all__ = [
    "count_admins",
    "count_tokens",
    "count_users",
    "delete_session",
    "delete_sessions",
    "delete_tokens",
    "delete_user",
    "insert_session",
    "insert_token",
    "insert_user",
    "list_users",
    "live_sessions",
    "prune_sessions",
    "session_by_digest",
    "set_last_login",
    "set_password_hash",
    "set_role",
    "take_write_lock",
    "token_by_digest",
    "touch_session",
    "touch_token",
    "user_row",
]


def user_row(conn: Connection, name: str) -> Any | None:
    return conn.execute(select(users).where(users.c.name == name)).first()


def insert_user(conn: Connection, name: str, role: str, password_hash: str, now: float) -> None:
    conn.execute(insert(users).values(name=name, role=role, password_hash=password_hash, created_at=now,
                                      password_changed_at=now, last_login_at=None))  # fmt: skip


def set_password_hash(conn: Connection, name: str, password_hash: str, changed_at: float | None) -> None:
    """A new hash; ``changed_at`` None: the same password rehashed with current parameters, not a change."""
    values: dict[str, Any] = {"password_hash": password_hash}
    if changed_at is not None:
        values["password_changed_at"] = changed_at
    conn.execute(update(users).where(users.c.name == name).values(values))


def set_role(conn: Connection, name: str, role: str) -> None:
    conn.execute(update(users).where(users.c.name == name).values(role=role))


def set_last_login(conn: Connection, name: str, now: float) -> None:
    conn.execute(update(users).where(users.c.name == name).values(last_login_at=now))


def delete_user(conn: Connection, name: str) -> tuple[int, int]:
    """Remove the user with its tokens and sessions (the foreign keys cascade too; this does not rely on them):
    how many tokens and sessions went with it."""
    tokens = delete_tokens(conn, name)
    ended = delete_sessions(conn, name)
    conn.execute(delete(users).where(users.c.name == name))
    return tokens, ended


def count_users(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users)).scalar_one())


def count_admins(conn: Connection) -> int:
    return int(conn.execute(select(func.count()).select_from(users).where(users.c.role == Role.ADMIN)).scalar_one())


def list_users(conn: Connection, limit: int) -> list[Any]:
    """Every user in name order with its count of API tokens (``tokens``)."""
    tokens = (select(api_tokens.c.user_name, func.count().label("tokens")).group_by(api_tokens.c.user_name)
              .subquery())  # fmt: skip
    query = (
        select(users.c.name, users.c.role, users.c.created_at, users.c.password_changed_at, users.c.last_login_at,
               func.coalesce(tokens.c.tokens, 0).label("tokens"))
        .select_from(users.outerjoin(tokens, tokens.c.user_name == users.c.name))
        .order_by(users.c.name).limit(limit)
    )  # fmt: skip
    return list(conn.execute(query).all())


def insert_token(conn: Connection, name: str, digest: str, label: str, now: float) -> int:
    done = conn.execute(insert(api_tokens).values(user_name=name, secret_sha256=digest, label=label, created_at=now))
    return int(done.inserted_primary_key[0])


def count_tokens(conn: Connection, name: str) -> int:
    query = select(func.count()).select_from(api_tokens).where(api_tokens.c.user_name == name)
    return int(conn.execute(query).scalar_one())


def delete_tokens(conn: Connection, name: str) -> int:
    return int(conn.execute(delete(api_tokens).where(api_tokens.c.user_name == name)).rowcount)


def token_by_digest(conn: Connection, digest: str) -> Any | None:
    """The token (``id``, ``last_used_at``) and its user (``name``, ``role``), by the SHA-256 of its secret."""
    query = (select(api_tokens.c.id, api_tokens.c.last_used_at, users.c.name, users.c.role)
             .join(users, users.c.name == api_tokens.c.user_name).where(api_tokens.c.secret_sha256 == digest))  # fmt: skip
    return conn.execute(query).first()


def touch_token(conn: Connection, token_id: int, now: float) -> None:
    conn.execute(update(api_tokens).where(api_tokens.c.id == token_id).values(last_used_at=now))


def insert_session(
    conn: Connection, digest: str, name: str, csrf: str, now: float, idle: float, expires_at: float
) -> None:
    conn.execute(insert(sessions).values(secret_sha256=digest, user_name=name, csrf=csrf, created_at=now,
                                         last_seen_at=now, idle_seconds=idle, expires_at=expires_at))  # fmt: skip


def session_by_digest(conn: Connection, digest: str) -> Any | None:
    """The session (``csrf``, ``last_seen_at``, ``idle_seconds``, ``expires_at``) and its user (``name``,
    ``role``), by the SHA-256 of its secret."""
    query = (select(sessions.c.csrf, sessions.c.last_seen_at, sessions.c.idle_seconds, sessions.c.expires_at,
                    users.c.name, users.c.role)
             .join(users, users.c.name == sessions.c.user_name).where(sessions.c.secret_sha256 == digest))  # fmt: skip
    return conn.execute(query).first()


def touch_session(conn: Connection, digest: str, now: float) -> None:
    conn.execute(update(sessions).where(sessions.c.secret_sha256 == digest).values(last_seen_at=now))


def delete_session(conn: Connection, digest: str) -> str | None:
    """End one session; the name of its user (None: there was no such session)."""
    name = conn.execute(select(sessions.c.user_name).where(sessions.c.secret_sha256 == digest)).scalar()
    if name is not None:
        conn.execute(delete(sessions).where(sessions.c.secret_sha256 == digest))
    return name


def delete_sessions(conn: Connection, name: str) -> int:
    return int(conn.execute(delete(sessions).where(sessions.c.user_name == name)).rowcount)


def prune_sessions(conn: Connection, now: float) -> int:
    """Remove the sessions that have ended, idle or not (a small table: the per-user cap bounds it)."""
    ended = (sessions.c.expires_at <= now) | (sessions.c.last_seen_at + sessions.c.idle_seconds < now)
    return int(conn.execute(delete(sessions).where(ended)).rowcount)


def live_sessions(conn: Connection, name: str) -> list[str]:
    """The user's sessions (their digests), oldest first."""
    query = select(sessions.c.secret_sha256).where(sessions.c.user_name == name).order_by(sessions.c.created_at)
    return list(conn.execute(query).scalars())
