"""CPU cost of ingest: CPU seconds of the service (and of each of its threads) per 10,000 messages at a fixed
offered rate, for A/B comparisons of two checkouts on a shared machine.

    python bench/ingest_cpu.py [--root DIR]... [--rounds 3] [--rate 1000] [--seconds 10] [--json FILE]

Wall-clock throughput on a machine shared with other work is noisy; the CPU a fixed amount of work costs is not
(much). Each round starts ``python -m hl7bridge serve`` from each ``--root`` in turn (A, B, A, B...; that
checkout's code: the working directory and ``PYTHONPATH`` are the root), on a fresh SQLite log, offers ``--rate``
messages/s over 20 connections (open loop, ``bench/loadgen.py``) for ``--seconds``, then waits until the search
index has caught up (a checkout without one: at once), and reads the CPU the process and each thread used over
the whole run (``/proc/PID/task/TID/stat``). Threads are named by their Python names (``threading``), set as
the OS thread name by a small start-up shim, so the writer's share shows whatever the checkout calls it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import CLK_TCK, ROOT, Load, fixture_mix

#: Runs the service with every Python thread's name given to its OS thread (15 bytes, as Linux keeps), so
#: /proc/PID/task/TID/comm tells the threads apart in a checkout that does not name them itself.
SHIM = """
import ctypes, runpy, sys, threading
_prctl = ctypes.CDLL(None).prctl
_run = threading.Thread.run
def run(self):
    _prctl(15, self.name.encode()[:15], 0, 0, 0)
    _run(self)
threading.Thread.run = run
sys.argv = ["hl7bridge", *sys.argv[1:]]
runpy.run_module("hl7bridge", run_name="__main__", alter_sys=True)
"""


class Service:
    """``python -m hl7bridge serve`` from ``root``, with what ``ingest.Load`` reads of a server."""

    kind = "hl7bridge"

    def __init__(self, root: Path, workdir: Path) -> None:
        self.db = workdir / "bench.db"
        config = workdir / "bench.toml"
        config.write_text("[listeners.main]\nmax_connections_per_peer = 1000\n", encoding="utf-8")
        env = {k: v for k, v in os.environ.items() if k != "HL7BRIDGE_CONFIG"}
        env.update(PYTHONPATH=str(root), PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-c", SHIM, "serve", "--config", str(config), "--listen", "tcp:0:interface=127.0.0.1",
               "--database", f"sqlite:///{self.db}"]  # fmt: skip
        self.stderr = open(workdir / "service.stderr.log", "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self.stderr, env=env, cwd=root)
        self.pid = self.proc.pid
        self.port = self._wait_ready(workdir)

    def _wait_ready(self, workdir: Path) -> int:
        deadline = time.monotonic() + 60
        buf = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            buf += os.read(self.proc.stdout.fileno(), 4096)
            for line in buf.decode(errors="replace").splitlines():
                if "MLLP listening on" in line:
                    return int(line.split("listening on ", 1)[1].split(";", 1)[0].split(",")[0].rsplit(":", 1)[1])
        self.stop()
        raise SystemExit(f"the service did not start: {(workdir / 'service.stderr.log').read_text()[-2000:]}")

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def threads_cpu(self) -> dict[str, float]:
        """CPU seconds per thread name (threads of one name summed)."""
        out: dict[str, float] = {}
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                name = (task / "comm").read_text().strip()
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / CLK_TCK
        return out

    def written_bytes(self) -> int:
        """Bytes the process caused to be written to storage (``/proc/PID/io`` write_bytes): WAL and checkpoints."""
        for line in Path(f"/proc/{self.pid}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def rss_kb(self) -> int:
        return 0

    def threads(self) -> int:
        return len(list(Path(f"/proc/{self.pid}/task").iterdir()))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def _log_state(db: Path) -> tuple[int, int | None]:
    """(newest message id, how far the search index reaches; None without one): the index in the log (meta
    ``search_indexed_to``, up to schema 9) or in its own file beside it (``<log>.search``, from schema 10)."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        top = con.execute("SELECT coalesce(max(id), 0) FROM messages").fetchone()[0]
        row = con.execute("SELECT value FROM meta WHERE key = 'search_indexed_to'").fetchone()
        has_index = con.execute("SELECT 1 FROM sqlite_master WHERE name = 'search_keys'").fetchone()
    finally:
        con.close()
    if has_index:
        return top, int(row[0]) if row else 0
    index = Path(f"{db}.search")
    if not index.exists():
        return top, None
    con = sqlite3.connect(f"file:{index}?mode=ro", uri=True)
    try:
        row = con.execute("SELECT value FROM meta WHERE key = 'indexed_to'").fetchone()
        return top, int(row[0]) if row else 0
    finally:
        con.close()


def one_run(root: Path, rate: float, seconds: float, fixtures: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="hl7bridge-cpu-") as tmp:
        service = Service(root, Path(tmp))
        try:
            load = Load(service, fixtures, Path(tmp))
            load.run("count", 1, count=len(fixtures))  # imports, hl7apy tables, first pages
            time.sleep(1.5)
            rows0, _ = _log_state(service.db)
            cpu0, threads0, wall0 = service.cpu_s(), service.threads_cpu(), time.monotonic()
            written0 = service.written_bytes()
            res = load.run("open", 20, warmup=0.0, duration=seconds, rate=rate)
            settle = time.monotonic()
            while time.monotonic() - settle < 60:
                top, indexed = _log_state(service.db)
                if indexed is None or indexed >= top:
                    break
                time.sleep(0.1)
            catch_up = time.monotonic() - settle
            cpu1, threads1, wall1 = service.cpu_s(), service.threads_cpu(), time.monotonic()
            written = service.written_bytes() - written0
            rows = _log_state(service.db)[0] - rows0
        finally:
            service.stop()
    per10k = 10_000 / rows
    return {
        "messages": rows,
        "wall_s": round(wall1 - wall0, 2),
        "index_catch_up_s": round(catch_up, 2),
        "cpu_s_per_10k": round((cpu1 - cpu0) * per10k, 3),
        "written_mb_per_10k": round(written * per10k / 1e6, 1),
        "threads_cpu_s_per_10k": {
            name: round((cpu - threads0.get(name, 0.0)) * per10k, 3)
            for name, cpu in sorted(threads1.items(), key=lambda kv: -kv[1])
            if cpu - threads0.get(name, 0.0) > 0
        },
        "p50_ms": res["latency_ms"]["p50"],
        "p99_ms": res["latency_ms"]["p99"],
        "answered_per_s": res["msgs_per_s"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", action="append", type=Path, help="a checkout to measure (repeat for A/B)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s offered over 20 connections")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    roots = [r.resolve() for r in (args.root or [ROOT])]
    fixtures, _ = fixture_mix()
    runs: dict[str, list[dict]] = {str(r): [] for r in roots}
    for n in range(args.rounds):
        for root in roots:
            run = one_run(root, args.rate, args.seconds, fixtures)
            runs[str(root)].append(run)
            writer = {k: v for k, v in run["threads_cpu_s_per_10k"].items() if "hl7bridge-writ" in k}
            index = {k: v for k, v in run["threads_cpu_s_per_10k"].items() if "hl7bridge-inde" in k}
            print(f"round {n + 1} {root}: {run['cpu_s_per_10k']:.2f} CPU s/10k, writer {writer}, index {index}, "
                  f"written {run['written_mb_per_10k']} MB/10k, p99 {run['p99_ms']} ms, catch-up {run['index_catch_up_s']} s", flush=True)  # fmt: skip
    summary = {
        root: {
            "cpu_s_per_10k_median": statistics.median(r["cpu_s_per_10k"] for r in rs),
            "writer_cpu_s_per_10k_median": statistics.median(
                sum(v for k, v in r["threads_cpu_s_per_10k"].items() if "hl7bridge-writ" in k) for r in rs
            ),
            # The search index's own thread (from schema 10; 0 where the writer does the index's work).
            "index_cpu_s_per_10k_median": statistics.median(
                sum(v for k, v in r["threads_cpu_s_per_10k"].items() if "hl7bridge-inde" in k) for r in rs
            ),
            "written_mb_per_10k_median": statistics.median(r["written_mb_per_10k"] for r in rs),
            "p99_ms_median": statistics.median(r["p99_ms"] for r in rs),
        }
        for root, rs in runs.items()
    }
    print(json.dumps(summary, indent=2))
    if args.json:
        args.json.write_text(json.dumps({"rate": args.rate, "seconds": args.seconds, "summary": summary,
                                         "runs": runs}, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
