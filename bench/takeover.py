"""Takeover time across instances (issue 20): two ``serve`` processes on one PostgreSQL, the real sandbox.

    python bench/takeover.py [--rounds 3] [--lease 10]

Each round starts a fresh pair, lets the first lead, then kills it (``kill -9`` of its service: its dispatcher
follows within 0.2 s and its lock session ends) or stops it (``SIGSTOP`` of the service and its dispatcher: the
standby must wait out the lease by the database's clock, then end the stuck session). A message is sent to the
standby at once; the takeover time is from the signal to the sandbox's record of the first call the new leader
makes. Goal 5 s, limit 20 s.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import segments, start_sandbox, wait_until
from tests.dispatch_support import SANDBOX_TOML, future, settled, siu
from tests.pg import start_postgres
from tests.test_dispatch_process import children
from tests.test_instances import Pair


def one(kind: str, n: int, root: Path, server, sandbox, lease: float) -> float:
    workdir = root / f"{kind}-{n}"
    workdir.mkdir()
    pair = Pair(workdir, server.create_database(), sandbox, lease=lease)
    try:
        assert (
            segments(pair.a.request(siu("S12", f"T{kind}{n}-0", f"A-T{kind}{n}-0", future(days=10))))["MSA"][1] == "AA"
        )
        settled(pair.a, f"T{kind}{n}-0")
        pids = [pair.a.process.pid, *children(pair.a.process.pid)]
        died = time.time()
        if kind == "kill":
            pair.a.process.kill()
        else:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
        appointment = f"A-T{kind}{n}-1"
        assert segments(pair.b.request(siu("S12", f"T{kind}{n}-1", appointment, future(days=11))))["MSA"][1] == "AA"

        def first_call() -> float | None:
            for call in sandbox.calls():
                if appointment in str(call.get("body")):
                    return datetime.fromisoformat(call["at"]).timestamp()
            return None

        return wait_until(first_call, timeout=60, message="the new leader's first call") - died
    finally:
        pair.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lease", type=float, default=10.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hl7bridge-takeover-"))
    server = start_postgres()
    sandbox = start_sandbox(root, SANDBOX_TOML)
    try:
        for kind in ("kill", "stop"):
            times = [one(kind, n, root, server, sandbox, args.lease) for n in range(args.rounds)]
            print(f"{'SIGKILL' if kind == 'kill' else 'SIGSTOP'} (lease {args.lease:g} s): takeover "
                  f"median {statistics.median(times):.2f} s, max {max(times):.2f} s over {len(times)} round(s)")  # fmt: skip
    finally:
        sandbox.stop()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
