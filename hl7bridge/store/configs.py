"""Which configuration produced what (``configs``, schema 9), and the logged messages ``config diff`` reads."""

from __future__ import annotations

from typing import Any

from sqlalchemy import and_, func, select
from sqlalchemy.engine import Connection

from .schema import RELOAD_OUTCOME_KEY, RUNNING_CONFIG_KEY, configs, get_meta, messages, set_meta


def register_config(conn: Connection, digest: str, path: str, mtime: float | None, now: float) -> int:
    """The id of the ``configs`` row for this digest, path and mtime, added when it is new."""
    found = _config_id(conn, digest, path, mtime)
    if found is None:
        conn.execute(configs.insert().values(digest=digest, path=path, mtime=mtime, loaded_at=now))
        found = _config_id(conn, digest, path, mtime)
    assert found is not None
    return found


def _config_id(conn: Connection, digest: str, path: str, mtime: float | None) -> int | None:
    same_mtime = configs.c.mtime.is_(None) if mtime is None else configs.c.mtime == mtime
    return conn.execute(
        select(configs.c.id).where(configs.c.digest == digest, configs.c.path == path, same_mtime)
    ).scalar()


def config_row(conn: Connection, config_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(configs).where(configs.c.id == config_id)).first()
    return dict(row._mapping) if row is not None else None


def set_running_config(conn: Connection, config_id: int, at: float) -> None:
    """The service runs this configuration from now on (its start, or a reload applied)."""
    set_meta(conn, RUNNING_CONFIG_KEY, str(config_id))
    set_meta(conn, RELOAD_OUTCOME_KEY, f"applied {at!r} {config_id}")


def set_reload_refused(conn: Connection, at: float, reason: str) -> None:
    set_meta(conn, RELOAD_OUTCOME_KEY, f"refused {at!r} {reason}"[:256])


def running_config(conn: Connection) -> dict[str, Any] | None:
    """The ``configs`` row the service last recorded running, or None."""
    value = get_meta(conn, RUNNING_CONFIG_KEY)
    return config_row(conn, int(value)) if value and value.isdigit() else None


def reload_outcome(conn: Connection) -> tuple[str, float, str] | None:
    """The last reload's ``(outcome, at, rest)``: ``applied`` and the config id, or ``refused`` and the reason."""
    value = get_meta(conn, RELOAD_OUTCOME_KEY)
    if not value:
        return None
    outcome, at, rest = ([*value.split(" ", 2), "", ""])[:3]
    try:
        return outcome, float(at), rest
    except ValueError:
        return None


def window(conn: Connection, since: float) -> tuple[int, int] | None:
    """The first and last message ids received since ``since`` (ids grow with time), or None when there is none."""
    first = conn.execute(select(func.min(messages.c.id)).where(messages.c.received_at >= since)).scalar()
    if first is None:
        return None
    last = conn.execute(select(func.max(messages.c.id))).scalar()
    return int(first), int(last)


#: What ``config diff`` reads of a message: duplicates and replays are left out (a duplicate is answered with its
#: original's ACK, a replay repeats its original).
_ORIGINALS = and_(messages.c.duplicate_of.is_(None), messages.c.replay_of.is_(None))
_COLUMNS = (messages.c.id, messages.c.received_at, messages.c.listener, messages.c.raw)


def originals_after(conn: Connection, after: int, last: int, limit: int) -> list[tuple[int, float, str, bytes | None]]:
    """The next ``limit`` original messages with ``after < id <= last``, oldest first (one keyset page)."""
    rows = conn.execute(
        select(*_COLUMNS)
        .where(messages.c.id > after, messages.c.id <= last, _ORIGINALS)
        .order_by(messages.c.id)
        .limit(limit)
    ).all()
    return [(int(r.id), float(r.received_at), str(r.listener), r.raw) for r in rows]
