"""A real PostgreSQL for the tests: Debian's server binaries, a cluster in a temporary directory, one fresh
database per test.

The cluster is started once per session (``initdb``, ``pg_ctl start`` on a free loopback port, its Unix socket
in the same temporary directory), with ``fsync`` and ``synchronous_commit`` on as in production, and stopped
at the end. PostgreSQL refuses to run as root: as root, the cluster belongs to the unprivileged ``postgres``
user that Debian's package creates (else ``nobody``), and its commands run through ``runuser -u USER --``.
Under ``CI`` a missing PostgreSQL fails the tests that need it (``.ci/run`` installs the ``postgresql``
package); elsewhere they are skipped.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

#: The role the tests connect as (trusted on loopback and the socket only: this cluster lives for one run).
ROLE = "hl7bridge"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_binaries() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: on PATH, else the newest of Debian's /usr/lib/postgresql/N/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return versions[-1].parent if versions else None


def _unprivileged_user() -> str | None:
    """The account the server runs as when the tests run as root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root, and neither a postgres nor a nobody account exists to run PostgreSQL as")


@dataclass
class PostgresServer:
    """A running cluster: ``url(name)`` is a SQLAlchemy URL for a database in it."""

    bin: Path
    root: Path
    port: int
    user: str | None
    _numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.root / "data"

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if self.user else []
        result = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {result.returncode}: {result.stdout}{result.stderr}")
        return result

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{ROLE}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run one statement outside a transaction (``CREATE DATABASE`` needs that); its rows."""
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=ROLE, dbname=database, autocommit=True) as conn:
            cur = conn.execute(sql)
            return cur.fetchall() if cur.description else []

    def create_database(self) -> str:
        """A new, empty database; its URL. From template0: nothing another test left in template1 comes along."""
        name = f"t{os.getpid()}_{next(self._numbers)}"
        self.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8'")
        return self.url(name)

    def stop(self, mode: str = "fast") -> None:
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def start(self) -> None:
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=on "
                   "-c synchronous_commit=on -c max_connections=300 -c shared_buffers=64MB")  # fmt: skip
        self.run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                 "-w", "-t", "60", "start")  # fmt: skip


def start_postgres() -> PostgresServer:
    binaries = server_binaries()
    if binaries is None:
        raise FileNotFoundError("initdb")
    user = _unprivileged_user()
    # Not under pytest's basetemp: that is 0700 root's, and the server's own user must reach its directory.
    root = Path(tempfile.mkdtemp(prefix="hl7bridge-pg-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    os.chmod(root, 0o700)
    server = PostgresServer(binaries, root, free_port(), user)
    server.run(str(binaries / "initdb"), "-D", str(server.data), "-U", ROLE, "--auth=trust", "-E", "UTF8",
               "--locale=C", "--no-sync")  # fmt: skip
    server.start()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL cluster for the whole run; skipped (failed under CI) when the server is not installed."""
    if server_binaries() is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is missing under CI: .ci/run installs Debian's postgresql package")
        pytest.skip("PostgreSQL is not installed (Debian/Ubuntu package: postgresql)")
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def own_postgres(postgres: PostgresServer) -> Iterator[PostgresServer]:
    """A cluster of the test's own, to crash (``stop("immediate")``) and restart without disturbing the session's
    (which it needs only to be skipped, or failed under CI, as that one is when PostgreSQL is missing)."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop("immediate")
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """A fresh, empty database of the session's cluster."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The log's URL, once on a SQLite file and once on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'log.db'}"
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def any_service(tmp_path: Path, database_url: str) -> Iterator[Any]:
    """A fresh service (``conftest.RunningService``) on each kind of log: a SQLite file, then PostgreSQL."""
    from .conftest import start_service

    running = start_service(tmp_path, log_url=database_url)
    yield running
    running.stop()
