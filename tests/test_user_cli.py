"""``hl7bridge user …`` as a real subprocess on a real SQLite log: what it prints, what it refuses (one line,
exit 2, never the password), the password read from standard input or typed twice on a terminal, and the audit."""

from __future__ import annotations

import json
import os
import select
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from hl7bridge.store import audit, open_engine
from hl7bridge.workflow import accounts

PASSWORD = "  spaced out passphrase  "


@pytest.fixture
def url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'log.db'}"
    open_engine(url).dispose()
    return url


@pytest.fixture
def engine(url: str) -> Engine:
    return open_engine(url, create=False)


def user(url: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hl7bridge", "user", *args, "--database", url],
                          input=stdin, capture_output=True, text=True, timeout=60)  # fmt: skip


def refused(done: subprocess.CompletedProcess[str], says: str) -> None:
    assert done.returncode == 2, done
    assert done.stdout == "" and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert says in done.stderr, done.stderr


def test_add_list_token_and_the_password_is_the_line_less_its_newline(url: str, engine: Engine) -> None:
    done = user(url, "add", "alice", "--role", "admin", "--password-stdin", "--by", "ops-lead", stdin=PASSWORD + "\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, "added user alice (admin)\n", "")
    done = user(url, "add", "bob", "--role", "viewer", "--password-stdin", stdin=PASSWORD + "\r\n")
    assert done.returncode == 0
    assert accounts.check_password(engine, "alice", PASSWORD) is not None  # spaces kept
    assert accounts.check_password(engine, "alice", PASSWORD.strip()) is None
    assert accounts.check_password(engine, "bob", PASSWORD) is not None

    issued = user(url, "token", "alice", "--label", "nightly export")
    assert issued.returncode == 0 and issued.stdout.count("\n") == 1
    token = issued.stdout.split()[-1]
    assert token.startswith("hb_") and accounts.authenticate_token(engine, token).name == "alice"

    listed = json.loads(user(url, "list", "--json").stdout)["users"]
    assert [(u["name"], u["role"], u["tokens"], u["last_login_at"]) for u in listed] == [
        ("alice", "admin", 1, None),
        ("bob", "viewer", 0, None),
    ]
    table = user(url, "list").stdout.splitlines()
    assert table[0].split() == ["NAME", "ROLE", "CREATED", "LAST", "LOGIN", "TOKENS"]
    assert table[1].split()[:2] == ["alice", "admin"] and table[1].split()[-2:] == ["never", "1"]
    entries = audit.entries(engine)
    assert [(e.action, e.actor, e.channel) for e in reversed(entries)][:1] == [("user-add", "ops-lead", "cli")]


def test_refusals_are_one_line_exit_2_and_never_echo_the_password(url: str, engine: Engine) -> None:
    refused(user(url, "add", "carol", "--role", "viewer", "--password-stdin", stdin="too short\n"),
            "a password needs at least 12 characters (this one has 9)")  # fmt: skip
    assert accounts.list_users(engine) == []
    refused(
        user(url, "add", "carol", "--role", "viewer", "--password-stdin", stdin=""), "no password on standard input"
    )
    refused(user(url, "add", "carol", "--role", "viewer", stdin=PASSWORD + "\n"), "--password-stdin")
    refused(user(url, "add", "carol", "--role", "viewer", "--password-stdin", stdin="x" * 5000 + "\n"), "at most 1024")
    # The name is checked before a password is read.
    refused(user(url, "add", "bad name", "--role", "viewer", "--password-stdin", stdin=""), "a user name is 1 to 64")
    refused(user(url, "add", "carol", "--role", "root", "--password-stdin", stdin=PASSWORD), "invalid choice: 'root'")
    refused(user(url, "token", "nobody"), "no user named 'nobody'")
    refused(user(url, "remove", "nobody"), "no user named 'nobody'")
    assert user(url, "add", "carol", "--role", "admin", "--password-stdin", stdin=PASSWORD).returncode == 0
    done = user(url, "add", "carol", "--role", "viewer", "--password-stdin", stdin="another secret passphrase\n")
    refused(done, "exists already")
    assert "another secret passphrase" not in done.stderr
    missing = subprocess.run([sys.executable, "-m", "hl7bridge", "user", "list", "--database", url + ".none"],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    refused(missing, "there is no message log")


def test_passwd_role_revoke_remove_and_the_last_admin(url: str, engine: Engine) -> None:
    for name, role in (("root1", "admin"), ("alice", "operator")):
        assert user(url, "add", name, "--role", role, "--password-stdin", stdin=PASSWORD).returncode == 0
    session = accounts.open_session(engine, accounts.check_password(engine, "alice", PASSWORD))
    token = user(url, "token", "alice").stdout.split()[-1]

    done = user(url, "passwd", "alice", "--password-stdin", stdin="a whole new passphrase\n")
    assert done.returncode == 0 and "sessions have ended" in done.stdout
    assert accounts.session_of(engine, session.secret) is None
    assert accounts.check_password(engine, "alice", "a whole new passphrase") is not None
    assert accounts.authenticate_token(engine, token) is not None

    assert user(url, "revoke", "alice").stdout == "revoked 1 API token(s) of alice\n"
    assert accounts.authenticate_token(engine, token) is None

    refused(user(url, "remove", "root1"), "last admin")
    refused(user(url, "role", "root1", "viewer"), "last admin")
    assert user(url, "role", "alice", "admin").stdout == "alice is now admin\n"
    assert user(url, "remove", "root1").returncode == 0
    assert [u.name for u in accounts.list_users(engine)] == ["alice"]
    assert accounts.check_password(engine, "root1", PASSWORD) is None

    actions = [e.action for e in reversed(audit.entries(engine))]
    assert actions == ["user-add", "user-add", "login", "token-issue", "user-passwd", "token-revoke", "user-role",
                       "user-remove"]  # fmt: skip
    verified = subprocess.run([sys.executable, "-m", "hl7bridge", "audit", "verify", "--database", url],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert verified.returncode == 0 and "audit log intact: 8 entries" in verified.stdout


def _read_until(fd: int, wanted: bytes, deadline: float) -> bytes:
    seen = b""
    while wanted not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no {wanted!r} prompt; got {seen!r}"
        chunk = os.read(fd, 1024)
        assert chunk, f"ended before the {wanted!r} prompt; got {seen!r}"
        seen += chunk
    return seen


@pytest.mark.parametrize(("again", "code"), [(PASSWORD, 0), ("something else entirely", 2)])
def test_on_a_terminal_the_password_is_typed_twice(url: str, engine: Engine, again: str, code: int) -> None:
    primary, secondary = os.openpty()
    with subprocess.Popen([sys.executable, "-m", "hl7bridge", "user", "add", "dora", "--role", "viewer",
                           "--database", url], stdin=secondary, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          start_new_session=True) as child:  # fmt: skip
        os.close(secondary)
        deadline = time.monotonic() + 30
        try:
            _read_until(child.stderr.fileno(), b"password: ", deadline)
            os.write(primary, PASSWORD.encode() + b"\n")
            _read_until(child.stderr.fileno(), b"again: ", deadline)
            os.write(primary, again.encode() + b"\n")
            assert child.wait(30) == code
        finally:
            os.close(primary)
        rest = child.stderr.read().decode()
    assert PASSWORD not in rest
    if code:
        assert "the two passwords differ" in rest and accounts.list_users(engine) == []
    else:
        assert accounts.check_password(engine, "dora", PASSWORD) is not None


def test_a_locked_log_is_exit_3_and_nothing_changes(url: str, engine: Engine, tmp_path: Path) -> None:
    assert user(url, "add", "alice", "--role", "admin", "--password-stdin", stdin=PASSWORD).returncode == 0
    holder = sqlite3.connect(tmp_path / "log.db", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        done = user(url, "token", "alice")
    finally:
        holder.close()
    assert done.returncode == 3 and "database is locked" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and accounts.list_users(engine)[0].tokens == 0
