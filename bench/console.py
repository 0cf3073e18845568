"""Console benchmark: the JSON API's searches and dashboard over loopback HTTP, on a log of a million messages.

    python bench/console.py [--messages 1000000] [--queries 200] [--database PATH] [--json PATH]

Fills a log with ``bench/search.py``'s filler (or reuses ``--database PATH`` filled before), starts the real
service on it (``hl7bridge serve`` in its own process, the console listener on loopback, no routes), makes a
viewer with a token, and asks ``GET /api/v1/messages`` by appointment, control id and patient (``--queries``
random values each, one keep-alive connection, as a script would) and ``GET /api/v1/dashboard``. It reports
each request's p50/p95 in milliseconds as the client sees it: HTTP, authentication (a token lookup), the thread
pool hop, the search and the JSON. Goals: searches p95 <= 50 ms, the dashboard <= 200 ms.

Then the console's pages as a browser gets them (an operator's session cookie, the HTML rendered server-side):
``/`` (the dashboard page: ``workflow.dashboard``, the service's status and the chart), ``/messages`` searched by
appointment, and a message's timeline page. ``--busy N`` first adds N messages to the last hour (``bench/timeline.py``'s
``busy_hour``: 180,000 is 50 a second), the dashboard's worst case.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
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

from hl7bridge.store import open_engine
from hl7bridge.workflow import accounts

PASSWORD = "benchmark password 1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path: Path, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    config = workdir / "bench.toml"
    config.write_text(f'[service]\nintegrity_check = "off"\n\n[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\n')
    cmd = [sys.executable, "-m", "hl7bridge", "serve", "--config", str(config), "--database", f"sqlite:///{path}",
           "--listen", f"tcp:{_free_port()}:interface=127.0.0.1"]  # fmt: skip
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir)
    line = process.stdout.readline() if process.stdout else ""
    if "listening" not in line:
        process.wait(timeout=10)
        raise SystemExit(f"the service did not start: {line}{process.stderr.read() if process.stderr else ''}")
    return process, port


def token_for(url: str) -> str:
    engine = open_engine(url, create=False)
    try:
        name = f"bench{int(time.time())}"
        accounts.add_user(engine, name, "viewer", PASSWORD, actor="bench")
        return accounts.issue_token(engine, name, actor="bench", label="bench/console.py")
    finally:
        engine.dispose()


def measure(port: int, token: str, total: int, queries: int) -> list[dict]:
    patients = max(total * 3 // 20, 10)
    rng = random.Random(13)
    scenarios = {
        "appointment": lambda: {"appointment": f"PL{rng.randrange(patients) * 3 // 2:07d}"},
        "control_id": lambda: {"control_id": f"C{rng.randrange(total):09d}"},
        "patient": lambda: {"patient": f"EPI{rng.randrange(patients):07d}"},
    }
    session = requests.Session()
    session.trust_env = False
    session.headers["Authorization"] = f"Bearer {token}"
    base = f"http://127.0.0.1:{port}/api/v1"
    out = []

    def timed(path: str, params: dict[str, str] | None = None) -> tuple[float, requests.Response]:
        began = time.perf_counter()
        answer = session.get(base + path, params=params, timeout=30)
        took = (time.perf_counter() - began) * 1000
        if answer.status_code != 200:
            raise SystemExit(f"GET {path} answered {answer.status_code}: {answer.text[:200]}")
        return took, answer

    for _ in range(5):  # warm the connection, the pool's threads and SQLite's cache a little
        timed("/messages", scenarios["control_id"]())
    for name, make in scenarios.items():
        times, rows = [], 0
        for _ in range(queries):
            took, answer = timed("/messages", make())
            times.append(took)
            rows += len(answer.json()["messages"])
        out.append({"request": f"GET /api/v1/messages?{name}=…", "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95),
                    "max_ms": round(max(times), 2), "rows_per_page": round(rows / queries, 1), "queries": queries})  # fmt: skip
    times = [timed("/dashboard")[0] for _ in range(max(queries // 4, 10))]
    out.append({"request": "GET /api/v1/dashboard", "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95),
                "max_ms": round(max(times), 2), "queries": len(times)})  # fmt: skip
    for row in out:
        print(f"{row['request']:40} p50 {row['p50_ms']:7.2f} ms  p95 {row['p95_ms']:7.2f} ms  max {row['max_ms']:7.2f} ms",
              flush=True)  # fmt: skip
    return out


def measure_pages(port: int, url: str, total: int, queries: int) -> list[dict]:
    """The console's pages over one keep-alive connection with an operator's session."""
    engine = open_engine(url, create=False)
    try:
        name = f"pages{int(time.time())}"
        accounts.add_user(engine, name, "operator", PASSWORD, actor="bench")
    finally:
        engine.dispose()
    session = requests.Session()
    session.trust_env = False
    base = f"http://127.0.0.1:{port}"
    login = session.post(base + "/login", data={"name": name, "password": PASSWORD}, allow_redirects=False, timeout=30)
    if login.status_code != 303:
        raise SystemExit(f"logging in answered {login.status_code}: {login.text[:200]}")
    patients = max(total * 3 // 20, 10)
    rng = random.Random(17)
    pages = {
        "GET / (dashboard page)": lambda: "/",
        "GET /messages?appointment=… (page)": lambda: (
            f"/messages?search=1&appointment=PL{rng.randrange(patients) * 3 // 2:07d}"
        ),
        "GET /messages/ID (timeline page)": lambda: f"/messages/{rng.randrange(1, total)}",
    }
    out = []
    for request, make in pages.items():
        times = []
        for _ in range(max(queries // 4, 10)):
            began = time.perf_counter()
            answer = session.get(base + make(), timeout=30)
            times.append((time.perf_counter() - began) * 1000)
            if answer.status_code != 200:
                raise SystemExit(f"{request} answered {answer.status_code}: {answer.text[:200]}")
        out.append({"request": request, "p50_ms": _pct(times, 50), "p95_ms": _pct(times, 95),
                    "max_ms": round(max(times), 2), "queries": len(times), "bytes": len(answer.content)})  # fmt: skip
        print(f"{request:40} p50 {out[-1]['p50_ms']:7.2f} ms  p95 {out[-1]['p95_ms']:7.2f} ms  max {out[-1]['max_ms']:7.2f} ms",
              flush=True)  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=200, help="random values per search")
    parser.add_argument("--database", metavar="PATH", help="fill this file (or reuse it when it exists)")
    parser.add_argument("--busy", type=int, default=0, help="messages added to the last hour of a new log")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="hl7bridge-console-bench-"))
    path = Path(args.database) if args.database else tmp / "log.db"
    url = f"sqlite:///{path}"
    filled = None
    if not path.exists():
        print(f"filling {path} with {args.messages:,} messages", flush=True)
        filled = fill(url, args.messages)
        if args.busy:
            filled["busy_fill_s"] = busy_hour(url, args.busy)
        print(f"filled in {filled['fill_s']} s; {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    token = token_for(url)
    process, port = start(path, tmp)
    try:
        results = measure(port, token, args.messages, args.queries)
        results += measure_pages(port, url, args.messages, args.queries)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
    if args.json:
        figures = {"messages": args.messages, "filled": filled, "cpus": os.cpu_count(), "results": results}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)  # the service's working directory (and the log, unless --database)
    worst = max(r["p95_ms"] for r in results if "/api/v1/messages" in r["request"])
    dashboard = next(r["p95_ms"] for r in results if "dashboard" in r["request"])
    page = next(r["p95_ms"] for r in results if "dashboard page" in r["request"])
    print(
        f"searches: worst p95 {worst:.1f} ms (goal <= 50 ms); dashboard p95 {dashboard:.1f} ms, its page "
        f"{page:.1f} ms (goal <= 200 ms)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
