"""Several instances on one log: the elected dispatcher's row (epoch, lease) and the instances' heartbeats.

Times here are the database's clock (epoch seconds), never an instance's: the instances' clocks may differ, and a
lease or a heartbeat compared across machines must be read on one clock.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import Float, cast, func, literal_column, select, text
from sqlalchemy.dialects.postgresql import OID
from sqlalchemy.exc import OperationalError

from hl7bridge.core.status import CommandStatus
from hl7bridge.store.schema import (
    APPLICATION_NAME,
    DISPATCH_LOCK_KEY,
    WRITER_IDLE_IN_TRANSACTION_MS,
    StoreError,
    commands,
    dispatch_leader,
    get_meta,
    instances,
    set_meta,
    try_session_lock,
)

#: The channel the writer notifies when a group created commands (PostgreSQL): the leader LISTENs on it.
OUTBOX_CHANNEL = "hl7bridge_outbox"
#: ``meta`` key: when ``hl7bridge dispatch now`` was last asked (epoch seconds), on any instance: a holding or
#: paused leader, wherever it runs, reads it at its next poll and probes at once.
DISPATCH_NOW_KEY = "dispatch_now_at"
#: The session lock a housekeeping pass holds on PostgreSQL where no dispatcher elects one (a log without routes).
HOUSEKEEPING_LOCK_KEY = DISPATCH_LOCK_KEY + 1
#: ``meta`` key: when the last retention pass on the log started (epoch seconds), whichever instance ran it.
RETENTION_PASSED_KEY = "retention_passed_at"
#: The leader's row is the only one (``id`` 1).
_ROW = 1
#: Instances whose heartbeat is older than this many seconds are removed.
FORGET_AFTER = 86400.0
#: How long a new leader waits for the row (PostgreSQL) before it ends the sessions holding it: a dispatcher write
#: of a stopped instance holds it ``FOR SHARE`` (``check_epoch``) in a transaction that does not end by itself.
CLAIM_LOCK_WAIT = "2s"
#: Claims tried before the caller gives up (its process exits and the service starts another).
CLAIM_TRIES = 5
#: Seconds a transaction holding locks may wait on its client before another instance ends its session: as long as
#: the server lets a writer's transaction sit idle (``WRITER_IDLE_IN_TRANSACTION_MS``).
STALLED_AFTER_S = WRITER_IDLE_IN_TRANSACTION_MS / 1000
#: PostgreSQL's ``lock_not_available``: ``lock_timeout`` ran out.
_LOCK_NOT_AVAILABLE = "55P03"


class StaleEpoch(StoreError):
    """A write of a dispatcher that is no longer the leader: refused, so it can never overwrite the new one's."""


@dataclass(frozen=True)
class Leader:
    epoch: int
    instance: str
    backend_pid: int | None
    renewed_at: float
    lease: float
    #: Seconds since the last renewal, by the database's clock.
    age: float


@dataclass(frozen=True)
class InstanceRow:
    id: str
    name: str
    host: str
    pid: int
    version: str
    started_at: float
    heartbeat_at: float
    last_message_at: float | None
    lease: float
    #: Seconds since the last heartbeat, by the database's clock.
    age: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def db_clock(conn: Any) -> Any:
    """The database's clock as epoch seconds (an SQL expression)."""
    if conn.dialect.name == "postgresql":
        return cast(func.extract("epoch", func.clock_timestamp()), Float)
    return literal_column("((julianday('now') - 2440587.5) * 86400.0)", Float)


def claim_leadership(conn: Any, instance: str, lease: float) -> int:
    """Record the caller (which holds the dispatcher's lock) as the leader under a new epoch; the epoch.
    Commits: from here on, the old leader's writes are refused. On PostgreSQL a claim that waits longer than
    ``CLAIM_LOCK_WAIT`` for the row ends the sessions holding it (the deposed leader's instance, stopped inside a
    fenced write: that write is refused anyway) and tries again."""
    if conn.dialect.name != "postgresql":
        return _claim(conn, instance, lease)
    for _ in range(CLAIM_TRIES - 1):
        try:
            return _claim(conn, instance, lease)
        except OperationalError as error:
            if getattr(error.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            _end_row_holders(conn)
    return _claim(conn, instance, lease)


def _claim(conn: Any, instance: str, lease: float) -> int:
    now = db_clock(conn)
    pid = func.pg_backend_pid() if conn.dialect.name == "postgresql" else None
    with conn.begin():
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = '{CLAIM_LOCK_WAIT}'")
        epoch = conn.execute(select(dispatch_leader.c.epoch).where(dispatch_leader.c.id == _ROW).with_for_update())
        current = epoch.scalar()
        values = {"instance": instance, "backend_pid": pid, "renewed_at": now, "lease": lease}
        if current is None:
            conn.execute(dispatch_leader.insert().values(id=_ROW, epoch=1, **values))
            return 1
        conn.execute(dispatch_leader.update().where(dispatch_leader.c.id == _ROW).values(epoch=current + 1, **values))
        return int(current) + 1


def _end_row_holders(conn: Any) -> int:
    """End the other sessions holding the leader's row for a write (``FOR SHARE``, ``FOR UPDATE``, ``UPDATE``: only
    dispatcher writes, claims and renewals do; a plain read is left alone); how many."""
    holders = (
        select(func.pg_terminate_backend(literal_column("pid")))
        .select_from(text("pg_locks"))
        .where(text("relation = 'dispatch_leader'::regclass AND granted AND pid <> pg_backend_pid()"))
        .where(text("mode IN ('RowShareLock', 'RowExclusiveLock')"))
    )
    ended = sum(1 for (done,) in conn.execute(holders) if done)
    conn.commit()
    return ended


def renew_leadership(conn: Any, epoch: int) -> bool:
    """Renew the lease; False: another leader has taken over (the row's epoch is not ``epoch``)."""
    with conn.begin():
        done = conn.execute(
            dispatch_leader.update()
            .where(dispatch_leader.c.id == _ROW)
            .where(dispatch_leader.c.epoch == epoch)
            .values(renewed_at=db_clock(conn))
        )
        return done.rowcount == 1


@dataclass(frozen=True)
class StalledSession:
    """A session ``end_stalled_sessions`` ended: where its client was, and how long it had kept the server waiting."""

    pid: int
    client: str
    stalled_s: float


#: hl7bridge's sessions on this database in a transaction that holds locks (a transaction id: it wrote or locked
#: rows; a reader's, an export pausing between batches, has none), waiting on their client.
_STALLED_SQL = f"""
SELECT pid, coalesce(host(client_addr) || ':' || client_port, 'local') AS client,
       extract(epoch FROM clock_timestamp() - state_change)::float AS stalled_s, pg_terminate_backend(pid) AS ended
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = '{APPLICATION_NAME}' AND pid <> pg_backend_pid()
  AND backend_xid IS NOT NULL AND wait_event_type = 'Client' AND wait_event = 'ClientRead'
  AND state_change < clock_timestamp() - make_interval(secs => %(after)s)
"""


def end_stalled_sessions(conn: Any, after: float = STALLED_AFTER_S) -> list[StalledSession]:
    """End hl7bridge's sessions on this PostgreSQL log whose transaction holds locks and has waited on its client
    for ``after`` seconds: a stopped or hung process (SIGSTOP, a paused VM) whose row and key locks hold up every
    other instance's writer, and so the new leader's. The server's ``idle_in_transaction_session_timeout`` ends
    such a transaction only when it is idle after a Sync; one stopped in the middle of a pipeline (statements sent,
    the Sync not yet) counts as active, and nothing else ends it until the process runs again. Its COMMIT then
    fails: no ACK, and the resend is deduplicated. Needs the same role as those sessions', or
    ``pg_signal_backend``. Commits; the sessions ended."""
    rows = conn.exec_driver_sql(_STALLED_SQL, {"after": after}).all()
    conn.commit()
    return [StalledSession(pid, client, round(stalled, 1)) for pid, client, stalled, ended in rows if ended]


def current_leader(conn: Any) -> Leader | None:
    row = conn.execute(
        select(dispatch_leader, (db_clock(conn) - dispatch_leader.c.renewed_at).label("age")).where(
            dispatch_leader.c.id == _ROW
        )
    ).first()
    if row is None:
        return None
    m = row._mapping
    return Leader(int(m["epoch"]), m["instance"], m["backend_pid"], m["renewed_at"], m["lease"], float(m["age"]))


def end_session(conn: Any, backend_pid: int) -> bool:
    """End a PostgreSQL session (a stuck leader's lock connection), which frees its advisory lock; only if that
    session holds the dispatcher's lock (a pid the server has since given to another session is left alone).
    Needs the same role as that session's, or membership in ``pg_signal_backend``."""
    held = (
        select(literal_column("pid"))
        .select_from(text("pg_locks"))
        .where(text("locktype = 'advisory' AND granted AND classid = 0 AND objsubid = 1"))
        .where(literal_column("objid") == cast(DISPATCH_LOCK_KEY, OID))
        .where(literal_column("pid") == backend_pid)
    )
    ended = bool(conn.execute(select(func.pg_terminate_backend(backend_pid)).where(held.exists())).scalar())
    conn.commit()
    return ended


def check_epoch(conn: Any, epoch: int) -> None:
    """Fencing, inside a dispatcher write's transaction: refuse it unless ``epoch`` is the leader's. On PostgreSQL
    the row is read ``FOR SHARE``, so no new leader can claim it before this transaction ends."""
    found = conn.execute(
        select(dispatch_leader.c.epoch).where(dispatch_leader.c.id == _ROW).with_for_update(read=True)
    ).scalar()
    if found != epoch:
        raise StaleEpoch(f"the write of dispatcher epoch {epoch} is refused: epoch {found} leads now")


def notify_outbox(conn: Any) -> None:
    """Wake the leader, wherever it runs (PostgreSQL delivers it on commit, once per transaction and payload)."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(OUTBOX_CHANNEL, "")))


def ask_dispatch_now(conn: Any, at: float) -> None:
    """Ask the leader, wherever it runs, to dispatch now: the marker it reads, and a wake (PostgreSQL's NOTIFY,
    delivered on commit; on SQLite its next poll)."""
    set_meta(conn, DISPATCH_NOW_KEY, repr(at))
    notify_outbox(conn)


def dispatch_now_asked(conn: Any) -> float:
    """When ``dispatch now`` was last asked (0: never)."""
    value = get_meta(conn, DISPATCH_NOW_KEY)
    return float(value) if value else 0.0


def leader_name(conn: Any) -> str | None:
    """The leading instance's name (None: no dispatcher leads yet, or its instance's row is gone)."""
    return conn.execute(
        select(instances.c.name).join(dispatch_leader, dispatch_leader.c.instance == instances.c.id)
    ).scalar()


def listen_outbox(conn: Any) -> None:
    conn.exec_driver_sql(f"LISTEN {OUTBOX_CHANNEL}")
    conn.commit()


def register_instance(conn: Any, row: dict[str, Any]) -> None:
    """This instance's row at its start. A row of the same name is its predecessor (a crashed or killed run of it,
    which left its row): replaced, so a restart does not leave a "down" instance behind."""
    conn.execute(instances.delete().where(instances.c.name == row["name"]).where(instances.c.id != row["id"]))
    beat(conn, row)


def beat(conn: Any, row: dict[str, Any]) -> None:
    """The instance's heartbeat (its row again if it was removed meanwhile); rows silent for ``FORGET_AFTER`` go."""
    now = db_clock(conn)
    conn.execute(instances.delete().where(instances.c.heartbeat_at < now - FORGET_AFTER))
    last = row["last_message_at"]
    done = conn.execute(
        instances.update()
        .where(instances.c.id == row["id"])
        .values(heartbeat_at=now, last_message_at=func.coalesce(last, instances.c.last_message_at))
    )
    if done.rowcount == 0:
        conn.execute(instances.insert().values(**row, heartbeat_at=now))


def instance_rows(conn: Any) -> list[InstanceRow]:
    rows = conn.execute(
        select(instances, (db_clock(conn) - instances.c.heartbeat_at).label("age")).order_by(instances.c.started_at)
    )
    return [InstanceRow(**{k: v for k, v in r._mapping.items()}) for r in rows]


def in_flight(conn: Any) -> int:
    """Commands the leader has in flight (sent, or about to be, and not yet answered)."""
    return int(conn.execute(select(func.count()).where(commands.c.status == CommandStatus.IN_FLIGHT)).scalar() or 0)


def forget_instance(conn: Any, instance_id: str) -> None:
    conn.execute(instances.delete().where(instances.c.id == instance_id))


def try_housekeeping_lock(conn: Any) -> bool:
    """The housekeeping session lock on a PostgreSQL log, if it is free."""
    return try_session_lock(conn, HOUSEKEEPING_LOCK_KEY)


def release_housekeeping_lock(conn: Any) -> None:
    conn.execute(select(func.pg_advisory_unlock(HOUSEKEEPING_LOCK_KEY)))
    conn.commit()


def retention_passed_at(conn: Any) -> float | None:
    value = get_meta(conn, RETENTION_PASSED_KEY)
    return float(value) if value else None


def record_retention_pass(conn: Any, at: float) -> None:
    set_meta(conn, RETENTION_PASSED_KEY, repr(at))
