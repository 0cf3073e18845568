"""Accounts on a real SQLite log: argon2id hashes, secrets kept only as hashes, what fails (wrong password, unknown or
removed user, revoked token, ended session), session lifetimes, the last admin, login throttling, the audit trail."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher
from sqlalchemy.engine import Engine

from hl7bridge.core.status import Permission, Role
from hl7bridge.store import accounts as account_store
from hl7bridge.store import audit, open_engine, purge
from hl7bridge.workflow import accounts
from hl7bridge.workflow.accounts import AccountError, LoginLimiter, Principal

PASSWORD = "correct horse battery staple"


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "log.db"


@pytest.fixture
def engine(path: Path) -> Engine:
    return open_engine(f"sqlite:///{path}")


def add(engine: Engine, name: str, role: str = "operator", password: str = PASSWORD) -> None:
    accounts.add_user(engine, name, role, password, actor="root")


def file_bytes(path: Path) -> bytes:
    """The log as it lies on disk: the database file and its write-ahead log."""
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def test_hashes_are_argon2id_and_no_secret_reaches_the_file(engine: Engine, path: Path) -> None:
    add(engine, "alice", "admin")
    token = accounts.issue_token(engine, "alice", actor="root", label="nightly export")
    principal = accounts.check_password(engine, "alice", PASSWORD)
    assert principal == Principal("alice", Role.ADMIN, "session")
    session = accounts.open_session(engine, principal)
    accounts.set_password(engine, "alice", "another long passphrase", actor="root")
    (stored,) = rows(path, "SELECT password_hash FROM users")
    assert stored[0].startswith("$argon2id$v=19$")
    engine.dispose()
    on_disk = file_bytes(path)
    secret = token.removeprefix("hb_")
    for value in (PASSWORD, "another long passphrase", token, secret, session.secret):
        assert value.encode() not in on_disk
    # What is kept instead is there: the test reads the right bytes.
    assert accounts._digest(secret).encode() in on_disk
    assert b"$argon2id$" in on_disk


def test_what_fails_to_authenticate(engine: Engine) -> None:
    add(engine, "alice")
    add(engine, "bob")
    assert accounts.check_password(engine, "alice", PASSWORD + "x") is None
    assert accounts.check_password(engine, "nobody", PASSWORD) is None
    assert accounts.check_password(engine, "not a name!", PASSWORD) is None
    assert accounts.check_password(engine, "alice", PASSWORD + "x" * 2000) is None
    token = accounts.issue_token(engine, "alice", actor="root")
    assert accounts.authenticate_token(engine, token) == Principal("alice", Role.OPERATOR, "token")
    for forged in (token[:-1], token.removeprefix("hb_"), "hb_", "", "hb_" + "A" * 500):
        assert accounts.authenticate_token(engine, forged) is None
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    assert accounts.session_of(engine, session.secret) is not None
    assert accounts.session_of(engine, session.secret[:-1]) is None

    accounts.remove_user(engine, "alice", actor="root")
    assert accounts.check_password(engine, "alice", PASSWORD) is None
    assert accounts.authenticate_token(engine, token) is None
    assert accounts.session_of(engine, session.secret) is None
    assert [u.name for u in accounts.list_users(engine)] == ["bob"]


def test_revoked_tokens_fail_and_others_stay(engine: Engine) -> None:
    add(engine, "alice")
    add(engine, "bob")
    first = accounts.issue_token(engine, "alice", actor="root")
    second = accounts.issue_token(engine, "alice", actor="root")
    kept = accounts.issue_token(engine, "bob", actor="root")
    assert first != second
    assert {u.name: u.tokens for u in accounts.list_users(engine)} == {"alice": 2, "bob": 1}
    assert accounts.revoke_tokens(engine, "alice", actor="root") == 2
    assert accounts.authenticate_token(engine, first) is None
    assert accounts.authenticate_token(engine, second) is None
    assert accounts.authenticate_token(engine, kept) == Principal("bob", Role.OPERATOR, "token")


def test_tokens_per_user_are_bounded(engine: Engine) -> None:
    add(engine, "alice")
    for _ in range(accounts.MAX_TOKENS_PER_USER):
        accounts.issue_token(engine, "alice", actor="root")
    with pytest.raises(AccountError, match="revoke"):
        accounts.issue_token(engine, "alice", actor="root")


def last_seen(path: Path) -> float:
    return rows(path, "SELECT last_seen_at FROM sessions")[0][0]


def test_sessions_end_when_idle_or_old_and_touch_at_most_once_a_minute(engine: Engine, path: Path) -> None:
    add(engine, "alice")
    alice = accounts.check_password(engine, "alice", PASSWORD)
    t0 = 1_000_000.0
    session = accounts.open_session(engine, alice, now=t0, idle=100.0, absolute=300.0)
    assert session.expires_at == t0 + 300.0 and session.csrf and session.csrf != session.secret
    assert accounts.session_of(engine, session.secret, now=t0 + 59) is not None
    assert last_seen(path) == t0  # not written: less than a minute
    assert accounts.session_of(engine, session.secret, now=t0 + 61) is not None
    assert last_seen(path) == t0 + 61
    for at in (t0 + 150, t0 + 211, t0 + 272):
        found = accounts.session_of(engine, session.secret, now=at)
        assert found is not None and found.csrf == session.csrf
    assert accounts.session_of(engine, session.secret, now=t0 + 300) is None  # absolute end, however used
    assert rows(path, "SELECT count(*) FROM sessions") == [(0,)]

    idle = accounts.open_session(engine, alice, now=t0, idle=100.0, absolute=300.0)
    assert accounts.session_of(engine, idle.secret, now=t0 + 50) is not None
    assert accounts.session_of(engine, idle.secret, now=t0 + 101) is None
    assert accounts.session_of(engine, idle.secret, now=t0 + 50) is None  # removed, not just refused


def test_a_password_change_ends_sessions_and_keeps_tokens(engine: Engine) -> None:
    add(engine, "alice")
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    token = accounts.issue_token(engine, "alice", actor="root")
    accounts.set_password(engine, "alice", "a brand new passphrase", actor="alice")
    assert accounts.session_of(engine, session.secret) is None
    assert accounts.check_password(engine, "alice", PASSWORD) is None
    assert accounts.check_password(engine, "alice", "a brand new passphrase") is not None
    assert accounts.authenticate_token(engine, token) is not None


def test_logins_past_the_cap_end_the_oldest_session(engine: Engine) -> None:
    add(engine, "alice")
    alice = accounts.check_password(engine, "alice", PASSWORD)
    opened = [accounts.open_session(engine, alice, now=1000.0 + i) for i in range(accounts.MAX_SESSIONS_PER_USER + 1)]
    assert accounts.session_of(engine, opened[0].secret, now=1100.0) is None
    assert all(accounts.session_of(engine, s.secret, now=1100.0) is not None for s in opened[1:])


def test_logout_ends_the_session(engine: Engine) -> None:
    add(engine, "alice")
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD), channel="console")
    accounts.close_session(engine, session.secret, channel="console")
    accounts.close_session(engine, session.secret, channel="console")  # again: nothing, no second entry
    assert accounts.session_of(engine, session.secret) is None
    assert [(e.action, e.actor, e.channel) for e in audit.entries(engine)][:2] == [
        ("logout", "alice", "console"),
        ("login", "alice", "console"),
    ]


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__()
        self.verified = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verified += 1
        return super().verify(hash, password)


def test_every_login_costs_one_verify_whether_the_name_exists_or_not(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    add(engine, "alice")
    hasher = CountingHasher()
    monkeypatch.setattr(accounts, "_HASHER", hasher)
    for name, password in (("alice", PASSWORD), ("alice", "wrong password!"), ("nobody", PASSWORD),
                           ("not a name!", PASSWORD), ("alice", PASSWORD * 100)):  # fmt: skip
        before = hasher.verified
        accounts.check_password(engine, name, password)
        assert hasher.verified == before + 1, name


def test_a_hash_with_older_parameters_is_replaced_at_login(engine: Engine, path: Path) -> None:
    add(engine, "alice")
    weak = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1).hash(PASSWORD)
    with engine.begin() as conn:
        account_store.set_password_hash(conn, "alice", weak, None)
    assert accounts.check_password(engine, "alice", PASSWORD) is not None
    (stored,) = rows(path, "SELECT password_hash FROM users")[0]
    assert stored != weak and not PasswordHasher().check_needs_rehash(stored)
    assert accounts.check_password(engine, "alice", PASSWORD) is not None


def test_the_last_admin_stays_while_other_users_exist(engine: Engine) -> None:
    add(engine, "root-admin", "admin")
    add(engine, "viewer1", "viewer")
    with pytest.raises(AccountError, match="last admin"):
        accounts.remove_user(engine, "root-admin", actor="root")
    with pytest.raises(AccountError, match="last admin"):
        accounts.set_role(engine, "root-admin", "operator", actor="root")
    accounts.set_role(engine, "viewer1", "admin", actor="root")
    accounts.remove_user(engine, "root-admin", actor="root")
    accounts.remove_user(engine, "viewer1", actor="root")  # the last user of all may go
    assert accounts.list_users(engine) == []


def test_a_role_change_holds_from_the_next_request(engine: Engine) -> None:
    add(engine, "admin", "admin")
    add(engine, "alice", "viewer")
    token = accounts.issue_token(engine, "alice", actor="root")
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    accounts.set_role(engine, "alice", Role.OPERATOR, actor="admin")
    assert accounts.authenticate_token(engine, token).role == Role.OPERATOR
    assert accounts.session_of(engine, session.secret).principal.role == Role.OPERATOR


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda e: accounts.add_user(e, "bad name", "viewer", PASSWORD, actor="r"), "user name is 1 to 64"),
        (lambda e: accounts.add_user(e, "x" * 65, "viewer", PASSWORD, actor="r"), "user name is 1 to 64"),
        (lambda e: accounts.add_user(e, "", "viewer", PASSWORD, actor="r"), "user name is 1 to 64"),
        (lambda e: accounts.add_user(e, "carol", "root", PASSWORD, actor="r"), "viewer, operator, admin"),
        (lambda e: accounts.add_user(e, "carol", "viewer", "short pass", actor="r"), "at least 12 characters (this one has 10)"),
        (lambda e: accounts.add_user(e, "carol", "viewer", "p" * 1025, actor="r"), "at most 1024"),
        (lambda e: accounts.add_user(e, "alice", "viewer", PASSWORD, actor="r"), "exists already"),
        (lambda e: accounts.set_password(e, "nobody", PASSWORD, actor="r"), "no user named 'nobody'"),
        (lambda e: accounts.remove_user(e, "nobody", actor="r"), "no user named 'nobody'"),
        (lambda e: accounts.issue_token(e, "nobody", actor="r"), "no user named 'nobody'"),
        (lambda e: accounts.issue_token(e, "alice", actor="r", label="a\nb"), "label"),
        (lambda e: accounts.revoke_tokens(e, "nobody", actor="r"), "no user named 'nobody'"),
    ],
)  # fmt: skip
def test_bad_input_says_what_to_fix(engine: Engine, call: Any, says: str) -> None:
    add(engine, "alice")
    with pytest.raises(AccountError, match=re.escape(says)) as refused:
        call(engine)
    assert PASSWORD not in str(refused.value) and "short pass" not in str(refused.value)


def test_roles_and_permissions() -> None:
    table = {role: {p for p in Permission if accounts.may(role, p)} for role in Role}
    assert table == {
        Role.VIEWER: {Permission.READ},
        Role.OPERATOR: {Permission.READ, Permission.UNMASK, Permission.ACT},
        Role.ADMIN: set(Permission),
    }
    assert accounts.may("operator", "act") and not accounts.may("nobody", "read") and not accounts.may("admin", "x")


def test_csrf_is_compared_with_the_sessions_own(engine: Engine) -> None:
    add(engine, "alice")
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    assert accounts.csrf_matches(session, session.csrf)
    assert not accounts.csrf_matches(session, session.csrf[:-1])
    assert not accounts.csrf_matches(session, "") and not accounts.csrf_matches(session, None)
    assert session.secret not in repr(session) and session.csrf not in repr(session)


def test_the_limiter_refuses_the_sixth_try_and_says_until_when() -> None:
    limiter = LoginLimiter()
    t0 = 5000.0
    for i in range(4):
        limiter.failed("alice", "10.0.0.1", t0 + i)
    assert limiter.retry_after("alice", "10.0.0.1", t0 + 4) is None
    limiter.failed("alice", "10.0.0.1", t0 + 4)
    assert limiter.retry_after("alice", "10.0.0.1", t0 + 5) == pytest.approx(899.0)
    assert limiter.retry_after("alice", "10.0.0.2", t0 + 5) == pytest.approx(899.0)  # the name, from anywhere
    assert limiter.retry_after("bob", "10.0.0.1", t0 + 5) == pytest.approx(899.0)  # the peer, for any name
    assert limiter.retry_after("bob", "10.0.0.2", t0 + 5) is None
    assert limiter.retry_after("alice", "10.0.0.1", t0 + 904) is None  # 15 minutes after the 5th failure


def test_the_limiter_counts_within_the_window_and_a_success_clears_the_name_only() -> None:
    limiter = LoginLimiter()
    for i in range(10):  # one failure every 4 minutes: never 5 within 15
        limiter.failed("alice", f"10.0.0.{i}", i * 240.0)
    assert limiter.retry_after("alice", "10.0.0.99", 2400.0) is None
    for i in range(4):
        limiter.failed(f"user{i}", "10.0.0.1", 3000.0 + i)
    limiter.succeeded("user0", "10.0.0.1")
    limiter.failed("user9", "10.0.0.1", 3010.0)
    assert limiter.retry_after("anyone", "10.0.0.1", 3011.0) is not None  # the peer's count was not reset


def test_the_limiter_forgets_the_oldest_past_its_bound() -> None:
    limiter = LoginLimiter(max_keys=100)
    for i in range(1000):
        limiter.failed(f"name{i}", f"peer{i}", 1.0)
    assert len(limiter._keys) == 100


def test_every_change_is_audited_without_secrets_and_the_chain_holds(engine: Engine) -> None:
    add(engine, "admin", "admin")
    add(engine, "alice")
    token = accounts.issue_token(engine, "alice", actor="admin", label="ci")
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    accounts.close_session(engine, session.secret)
    accounts.set_password(engine, "alice", "a brand new passphrase", actor="admin", channel="api")
    accounts.set_role(engine, "alice", "viewer", actor="admin")
    accounts.revoke_tokens(engine, "alice", actor="admin")
    accounts.remove_user(engine, "alice", actor="admin")
    found = list(reversed(audit.entries(engine)))
    assert [(e.action, e.actor, e.target, e.ids) for e in found] == [
        ("user-add", "root", "user", ("admin",)),
        ("user-add", "root", "user", ("alice",)),
        ("token-issue", "admin", "user", ("alice",)),
        ("login", "alice", "user", ("alice",)),
        ("logout", "alice", "user", ("alice",)),
        ("user-passwd", "admin", "user", ("alice",)),
        ("user-role", "admin", "user", ("alice",)),
        ("token-revoke", "admin", "user", ("alice",)),
        ("user-remove", "admin", "user", ("alice",)),
    ]
    assert found[5].channel == "api" and found[6].details == {"from": "operator", "to": "viewer"}
    text = json.dumps([e.__dict__ for e in found])
    for secret in (PASSWORD, "a brand new passphrase", token, token.removeprefix("hb_"), session.secret):
        assert secret not in text
    assert audit.verify(engine).problem == ""


def test_retention_leaves_accounts_alone(engine: Engine) -> None:
    add(engine, "alice")
    token = accounts.issue_token(engine, "alice", actor="root")
    purge(engine, time.time() + 86400)
    assert accounts.authenticate_token(engine, token) is not None
    assert accounts.check_password(engine, "alice", PASSWORD) is not None
