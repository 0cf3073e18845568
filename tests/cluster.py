"""Several ``hl7bridge serve`` instances on one PostgreSQL log behind a real HAProxy, on loopback: the harness of
the cluster reliability scenarios (tests/reliability/test_cluster.py) and of ``bench/cluster.py``.

A cluster is a PostgreSQL database (``tests/pg.py``), one sandbox process that every instance dispatches to,
N bridges (``support.Bridge``: their own MLLP, health and var directories, the same database URL) and HAProxy
configured from ``config/haproxy.example.cfg``, the file operators copy. Every wait here is bounded.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hl7bridge.app.config import HealthConfig
from tests.conftest import ROOT, RunningSandbox
from tests.pg import PostgresServer
from tests.reliability.support import (
    Bridge,
    Ledger,
    bridge_config,
    child_pids,
    delivered_order,
    health_toml,
    is_subsequence,
    journey_check,
    log_check,
    pg_query,
    sandbox_process,
    wait_for,
)

TEMPLATE = ROOT / "config" / "haproxy.example.cfg"
#: Command statuses of work not finished yet.
OPEN_STATUSES = ("pending", "in_flight")
#: What a takeover's figures say of a command that settled last, or not at all.
COMMAND_FACTS = "id, kind, appointment_key, status, attempts, uncertain, outcome, updated_at, next_attempt_at"


def restart_port() -> int:
    """A free loopback port below the ephemeral range (32768 and up on Linux), for an instance that is killed and
    started again on it: a port from the ephemeral range may meanwhile become the local end of one of the many
    outgoing connections here (senders, HAProxy, the pools), and the restart could not bind it."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


def haproxy_binary() -> str | None:
    return shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if os.path.exists(p)), None)


def haproxy_config(template: str, front_port: int, servers: list[tuple[int, int]], stats_socket: Path) -> str:
    """The example configuration for loopback: its ``defaults`` and its ``listen`` section's balancing and check
    lines as shipped, a foreground ``global`` with an admin socket, and one ``server`` per (MLLP port, health
    port)."""
    sections = re.split(r"(?m)^(?=\S)", template)
    kept = [s for s in sections if s.startswith(("defaults", "listen"))]
    assert len(kept) == 2, "config/haproxy.example.cfg lost its defaults or listen section"
    defaults, listen = kept
    defaults = re.sub(r"(?m)^\s*log .*\n|^\s*option (tcplog|dontlognull)\n", "", defaults)
    lines = [line for line in listen.splitlines() if not re.match(r"\s*(bind|server)\s", line)]
    lines.insert(1, f"    bind 127.0.0.1:{front_port}")
    lines += [f"    server bridge{n} 127.0.0.1:{mllp} check port {health}"
              for n, (mllp, health) in enumerate(servers, start=1)]  # fmt: skip
    glob = f"global\n    maxconn 4000\n    stats socket {stats_socket} mode 600 level admin\n\n"
    return glob + defaults.rstrip() + "\n\n" + "\n".join(lines) + "\n"


@dataclass
class HAProxy:
    """A foreground ``haproxy`` (``-db``) and its admin socket."""

    workdir: Path
    port: int = field(default_factory=restart_port)
    process: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.workdir / "admin.sock"

    def start(self, servers: list[tuple[int, int]]) -> None:
        binary = haproxy_binary()
        assert binary, "haproxy is not installed (Debian package: haproxy; .ci/run installs it)"
        config = self.workdir / "haproxy.cfg"
        config.write_text(haproxy_config(TEMPLATE.read_text(encoding="utf-8"), self.port, servers, self.socket_path))
        checked = subprocess.run([binary, "-c", "-q", "-f", str(config)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        log = (self.workdir / "haproxy.log").open("ab")
        self.process = subprocess.Popen([binary, "-db", "-f", str(config)], stdout=log, stderr=log)
        log.close()
        wait_for(self.socket_path.exists, 15, "HAProxy's admin socket")

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(str(self.socket_path))
            s.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def server_states(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (``UP``, ``DOWN``, ``UP 1/2``...)."""
        rows = self.command("show stat").splitlines()
        header = rows[0].lstrip("# ").split(",")
        name, status = header.index("svname"), header.index("status")
        return {f[name]: f[status] for f in (r.split(",") for r in rows[1:] if r)
                if f[name] not in ("FRONTEND", "BACKEND")}  # fmt: skip

    def wait_up(self, names: list[str] | None = None, timeout: float = 30) -> None:
        def up() -> bool:
            states = self.server_states()
            return all(states.get(n) == "UP" for n in (names or list(states)))

        wait_for(up, timeout, "HAProxy to see the instances UP", interval=0.1)

    def wait_down(self, names: list[str] | None = None, timeout: float = 30) -> None:
        def down() -> bool:
            states = self.server_states()
            return all(states.get(n, "").startswith("DOWN") for n in (names or list(states)))

        wait_for(down, timeout, "HAProxy to take the instances out", interval=0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGUSR1)  # soft stop
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class Cluster:
    """The running cluster: ``bridges[i]`` is instance ``bridge{i+1}`` in HAProxy."""

    postgres: PostgresServer
    url: str
    sandbox: RunningSandbox
    bridges: list[Bridge]
    proxy: HAProxy

    @property
    def port(self) -> int:
        """Where senders connect: HAProxy."""
        return self.proxy.port

    def query(self, sql: str, *args: Any) -> list[tuple]:
        return pg_query(self.url, sql, *args)

    def open_commands(self) -> set[int]:
        return {r[0] for r in self.query("SELECT id FROM commands WHERE status IN ('pending', 'in_flight')")}

    def wait_drained(self, timeout: float) -> float:
        began = time.monotonic()
        wait_for(lambda: not self.open_commands(), timeout, "the outbox to drain", interval=0.2)
        return round(time.monotonic() - began, 2)

    @property
    def one_dispatcher(self) -> bool:
        """Whether one instance's dispatcher works at a time (this release: a lock) or every instance's does."""
        from hl7bridge.store import schema

        return hasattr(schema, "DISPATCH_LOCK_KEY")

    def dispatching(self) -> Bridge | None:
        """The instance whose dispatcher holds the log's dispatch lock, found through the lock holder's client
        port; None when no instance holds it, or when every instance dispatches (``one_dispatcher`` false)."""
        from hl7bridge.store import schema

        if not self.one_dispatcher:
            return None
        key = schema.DISPATCH_LOCK_KEY
        rows = self.query("SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                          "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = ? AND l.objid = ?",
                          key >> 32, key & 0xFFFFFFFF)  # fmt: skip
        ports = {r[0] for r in rows}
        for bridge in self.bridges:
            if bridge.alive() and ports & client_ports([bridge.pid, *child_pids(bridge.pid)]):
                return bridge
        return None

    def takeover_after_kill(self, victim: Bridge, timeout: float,
                            after_kill: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """SIGKILL ``victim``: ``takeover_after``."""
        return self.takeover_after(victim.kill, timeout, after_kill)

    def takeover_after(self, fail: Callable[[], Any], timeout: float,
                       after: Callable[[], Any] | None = None) -> dict[str, Any]:  # fmt: skip
        """``fail`` an instance (kill it, stop it) and measure how long until the first and until every command
        open at that moment is settled (sent and answered, found by a search, or annihilated) by the others: the
        first says when dispatching resumed, every one includes working off the backlog built meanwhile."""
        before = self.open_commands()
        killed_at = time.monotonic()
        fail()
        if after is not None:
            after()
        settled_at: dict[int, float] = {}

        def settled() -> bool:
            left = before & self.open_commands()
            now = round(time.monotonic() - killed_at, 2)
            settled_at.update((c, now) for c in before - left if c not in settled_at)
            return not left

        try:
            wait_for(settled, timeout, "the commands open at the failure", 0.05)
        except AssertionError as exc:
            left = self.query(f"SELECT {COMMAND_FACTS} FROM commands WHERE id = ANY(?) ORDER BY id",
                              sorted(before & self.open_commands()))  # fmt: skip
            raise AssertionError(f"{exc}; still open (of {len(before)}): {left[:10]}, now {time.time():.1f}") from None
        took = round(time.monotonic() - killed_at, 2)
        last = sorted(settled_at, key=settled_at.__getitem__)[-3:]
        slowest = self.query(f"SELECT {COMMAND_FACTS} FROM commands WHERE id = ANY(?) ORDER BY id", last)
        return {"open_at_death": len(before), "resumed_s": min(settled_at.values(), default=took), "takeover_s": took,
                "last_settled": [[settled_at[row[0]], *row] for row in slowest]}  # fmt: skip

    def checks(self, ledger: Ledger) -> dict[str, Any]:
        """The log and the sandbox against what the senders were told AA (``support.journey_check``), and each
        appointment's triggers in the order sent."""
        instances = self.sandbox.get("/_sandbox/instances")
        calls = self.sandbox.get("/_sandbox/calls")
        order = delivered_order(calls)
        out_of_order = [a for a in ledger.acked if not is_subsequence(order.get(a, []), ledger.sequence(a))]
        return {
            "log": log_check(self.bridges[0], ledger.controls),
            "journeys": journey_check(ledger, instances, calls),
            "out_of_order": len(out_of_order),
            "out_of_order_examples": out_of_order[:10],
            "api_calls": len(calls),
        }

    def stop(self) -> None:
        self.proxy.stop()
        for bridge in self.bridges:
            bridge.stop()
        self.sandbox.stop()


def client_ports(pids: list[int]) -> set[int]:
    """The local TCP ports of the IPv4/IPv6 sockets these processes hold (from /proc)."""
    inodes: set[str] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


#: ``cluster(routes=False)``: the ingest benchmark's configuration (no route, so nothing to dispatch; every
#: connection comes from 127.0.0.1, so the per-peer cap is lifted) with a health listener probing at the service's
#: default interval (the tests' 0.2 s was 10 writes and 10 outbox reads a second across two instances).
INGEST_ONLY = "[listeners.main]\nmax_connections_per_peer = 1000\n"
INGEST_HEARTBEAT = HealthConfig.heartbeat_interval


@contextlib.contextmanager
def cluster(root: Path, postgres: PostgresServer, instances: int, routes: bool = True,
            **config: Any) -> Iterator[Cluster]:  # fmt: skip
    """A started cluster of ``instances`` bridges in ``root`` (a fresh database of ``postgres``), HAProxy seeing
    each UP; everything stopped however the block ends. ``config``: ``support.bridge_config``'s settings;
    ``routes=False``: ``INGEST_ONLY`` instead."""
    url = postgres.create_database()
    (root / "sandbox").mkdir(parents=True)
    sandbox = sandbox_process(root / "sandbox")
    bridges: list[Bridge] = []
    proxy = HAProxy(root)
    running = Cluster(postgres, url, sandbox, bridges, proxy)
    try:
        for n in range(instances):
            workdir = root / f"bridge{n + 1}"
            workdir.mkdir()
            health = restart_port()
            text = (
                bridge_config(sandbox.url, health, **config)
                if routes
                else INGEST_ONLY + health_toml(health, INGEST_HEARTBEAT)
            )
            bridge = Bridge(workdir, text, port=restart_port(), health_port=health, log_url=url)
            bridges.append(bridge)
        # The first creates the schema; the others start together, as a fleet does.
        bridges[0].start()
        starting = [threading.Thread(target=b.start) for b in bridges[1:]]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join(timeout=120)
        assert all(b.alive() for b in bridges), "an instance did not start"
        proxy.start([(b.port, b.health_port or 0) for b in bridges])
        proxy.wait_up()
        yield running
    finally:
        running.stop()
