"""Console page benchmark: the dashboard page (and a message search and a timeline page) over real HTTP from the
running service, on a log of a million messages.

    python bench/console_pages.py [--messages 1000000] [--busy 180000] [--runs 50] [--database PATH] [--keep]

Fills a fresh log as ``bench/timeline.py`` does (``bench/search.py``'s 30 days, then a busy last hour of
``--busy`` messages), starts ``hl7bridge serve`` on it with the console on loopback, logs in as an operator, and
times whole pages as a browser gets them (session cookie, HTML rendered server-side): ``/`` (the dashboard: per
minute counts of the last hour, outbox, dead letters, the service's status), ``/messages`` searched by
appointment, and ``/messages/ID``. Reports p50/p95 in milliseconds. ``--database PATH`` reuses a log filled before.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search import _pct, fill
from timeline import busy_hour

from hl7bridge.core.status import Role
from hl7bridge.store import open_engine
from hl7bridge.workflow import accounts

PASSWORD = "benchmark password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(workdir: Path, url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    config = workdir / "bench.toml"
    config.write_text(f'[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\n', encoding="utf-8")
    cmd = [sys.executable, "-m", "hl7bridge", "serve", "--config", str(config), "--database", url,
           "--listen", f"tcp:{free_port()}:interface=127.0.0.1"]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=workdir)
    if "listening" not in (process.stdout.readline() if process.stdout else ""):
        raise SystemExit("the service did not start")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            requests.get(base + "/login", timeout=2)
            return process, base
        except requests.ConnectionError:
            time.sleep(0.2)
    raise SystemExit("the console did not answer")


def timed(http: requests.Session, url: str, runs: int) -> dict:
    took = []
    for _ in range(runs):
        began = time.perf_counter()
        answer = http.get(url, timeout=30)
        took.append((time.perf_counter() - began) * 1000)
        assert answer.status_code == 200, (url, answer.status_code)
    return {"p50_ms": _pct(took, 50), "p95_ms": _pct(took, 95), "bytes": len(answer.content)}


def measure(url: str, runs: int, workdir: Path) -> dict:
    engine = open_engine(url, create=False)
    try:
        accounts.add_user(engine, "bench", Role.OPERATOR, PASSWORD, actor="bench")
    except accounts.AccountError:
        pass
    with engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM messages").scalar()
        keys = [r[0] for r in conn.exec_driver_sql(
            "SELECT appointment_key FROM messages WHERE id > ? AND appointment_key IS NOT NULL LIMIT 200",
            (top - 500_000,))]  # fmt: skip
    engine.dispose()
    process, base = serve(workdir, url)
    try:
        http = requests.Session()
        login = http.post(base + "/login", data={"name": "bench", "password": PASSWORD}, allow_redirects=False)
        assert login.status_code == 303, login.text
        rng = random.Random(11)
        out = {"dashboard": timed(http, base + "/", runs)}
        appointment = rng.choice(keys).split("|", 1)[-1]
        out["messages_by_appointment"] = timed(http, f"{base}/messages?search=1&appointment={appointment}", runs)
        out["timeline"] = timed(http, f"{base}/messages/{rng.randint(1, top)}", runs)
        return out
    finally:
        process.terminate()
        process.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--busy", type=int, default=180_000, help="messages in the last hour, on top")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--database", metavar="PATH", help="fill this file (or reuse it when it exists)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary log")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="hl7bridge-console-"))
    path = Path(args.database) if args.database else tmp / "log.db"
    url = f"sqlite:///{path}"
    filled = None
    if not path.exists():
        print(f"filling {path} with {args.messages:,} messages and {args.busy:,} in the last hour", flush=True)
        filled = fill(url, args.messages)
        filled["busy_fill_s"] = busy_hour(url, args.busy)
    results = measure(url, args.runs, tmp)
    for name, figures in results.items():
        print(
            f"{name:24} p50 {figures['p50_ms']:7.2f} ms  p95 {figures['p95_ms']:7.2f} ms  ({figures['bytes']:,} bytes)"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"filled": filled, "results": results}, indent=2) + "\n")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    elif not args.database:
        print(f"kept {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
