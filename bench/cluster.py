"""Two hl7bridge instances on one PostgreSQL behind HAProxy (issue 20): msg/s together and ACK latency over 20
connections, through HAProxy and directly (to see HAProxy's cost), one instance alone for comparison, where the
CPU went, and how long the instances left take to settle a SIGKILLed instance's open commands.

    python bench/cluster.py                # 15 s windows, 5 takeovers
    python bench/cluster.py --quick        # 5 s windows, 3 takeovers

Everything runs on this machine, as the tests do (``tests/cluster.py``): a throwaway PostgreSQL cluster from
Debian's binaries (``fsync`` and ``synchronous_commit`` on), the sandbox, the instances, HAProxy configured from
``config/haproxy.example.cfg``, and ``bench/loadgen.py`` (the ingest benchmark's generator and fixtures; the
instances have no route for the throughput runs, as in ``bench/ingest.py``). The takeover runs use the tests'
route and senders (4 connections, 15 msg/s each), and kill the dispatching instance while a trigger is under way.
Raw figures go to ``bench/results/cluster-latest.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ingest import CLK_TCK, Load, code_under_test, cpu_by_process, fixture_mix, machine  # noqa: E402

from tests.cluster import Cluster, cluster  # noqa: E402
from tests.pg import PostgresServer, start_postgres  # noqa: E402
from tests.reliability.support import Engine, Stream, child_pids, rss_kb, sending, trigger_under_way  # noqa: E402

CONNECTIONS = 20


class Instances:
    """The instances (with their dispatcher children) as ``bench.ingest.Load`` sees one server."""

    kind = "hl7bridge"

    def __init__(self, running: Cluster, port: int, which: list[int]) -> None:
        self.port = port
        self.bridges = [running.bridges[i] for i in which]
        self.pid = self.bridges[0].pid

    def pids(self) -> list[int]:
        return [p for b in self.bridges for p in (b.pid, *child_pids(b.pid))]

    def cpu_s(self) -> float:
        ticks = cpu_by_process()
        return sum(ticks.get(p, ("", 0))[1] for p in self.pids()) / CLK_TCK

    def rss_kb(self) -> int:
        return sum(rss_kb(p) or 0 for p in self.pids())

    def threads(self) -> int:
        return 0


def cpu_shares(before: dict, after: dict, seconds: float) -> dict[str, float]:
    """Percent of one core per process name over a window (postgres backends, python, haproxy...)."""
    shares: Counter = Counter()
    for pid, (name, ticks) in after.items():
        shares[name] += ticks - before.get(pid, (name, 0))[1]
    return {n: round(100.0 * t / CLK_TCK / seconds, 1) for n, t in shares.most_common(8) if t > 0}


def commits(running: Cluster) -> int:
    return running.query("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")[0][0]


def throughput(running: Cluster, fixtures: list[str], workdir: Path, window: float) -> dict:
    """Closed loop, 20 connections: through HAProxy, directly (10 per instance), and to one instance alone."""
    out: dict = {}
    runs = {
        "haproxy_2_instances": [(Instances(running, running.port, [0, 1]), CONNECTIONS)],
        "direct_2_instances": [(Instances(running, b.port, [i]), CONNECTIONS // 2) for i, b in
                               enumerate(running.bridges)],
        "direct_1_instance": [(Instances(running, running.bridges[0].port, [0]), CONNECTIONS)],
    }  # fmt: skip
    for name, targets in runs.items():
        results: list[dict] = [{} for _ in targets]
        commits0, cpu0, began = commits(running), cpu_by_process(), time.monotonic()

        def drive(n: int, target: Instances, connections: int) -> None:
            results[n] = Load(target, fixtures, workdir).run("closed", connections, warmup=1.0, duration=window)  # noqa: B023

        threads = [threading.Thread(target=drive, args=(n, t, c)) for n, (t, c) in enumerate(targets)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.monotonic() - began
        messages = sum(r["measured_messages"] for r in results)
        out[name] = {
            "msgs_per_s": round(sum(r["msgs_per_s"] for r in results), 1),
            "ack_p50_ms": max(r["latency_ms"]["p50"] for r in results),
            "ack_p99_ms": max(r["latency_ms"]["p99"] for r in results),
            "ack_codes": dict(sum((Counter(r["ack_codes"]) for r in results), Counter())),
            "instances_cpu_pct_of_one_core": round(sum(r["server_cpu_pct_of_one_core"] for r in results), 1),
            "machine_busy_pct_of_one_core": max(r["machine_busy_pct_of_one_core"] for r in results),
            "cpu_by_process_pct_of_one_core": cpu_shares(cpu0, cpu_by_process(), seconds),
            "commits_per_s": round((commits(running) - commits0) / seconds, 1),
            "messages_in_window": messages,
        }
        print(f"{name}: {out[name]}", flush=True)
    return out


def takeovers(postgres: PostgresServer, root: Path, count: int) -> dict:
    """SIGKILL the dispatching instance ``count`` times under a steady feed; seconds until its open commands are
    settled by the other."""
    found = []
    with cluster(root, postgres, 2) as running:
        running.sandbox.faults(latency_ms=30)
        engines = [Engine(running.port, timeout=5.0, reconnect_after_nak=True) for _ in range(4)]
        streams = [Stream(f"BT{i}", seed=100 + i) for i in range(4)]
        with sending(engines, streams, time.monotonic() + 600, 15.0) as load:
            for _ in range(count):
                time.sleep(2.0)
                victim = running.dispatching() or running.bridges[0]
                trigger_under_way(running.sandbox, 1_500)
                took = running.takeover_after_kill(victim, 60, lambda: running.sandbox.faults(latency_ms=30))
                found.append(took)
                print(f"takeover: {took}", flush=True)
                victim.start()
                running.proxy.wait_up()
            load.stop.set()
    seconds = [t["takeover_s"] for t in found]
    resumed = [t["resumed_s"] for t in found]
    return {"runs": found, "median_s": statistics.median(seconds), "max_s": max(seconds),
            "resumed_median_s": statistics.median(resumed), "resumed_max_s": max(resumed)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 s windows, 3 takeovers")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "cluster-latest.json"))
    args = parser.parse_args(argv)
    window, count = (5.0, 3) if args.quick else (15.0, 5)
    fixtures, _excluded = fixture_mix()
    postgres = start_postgres()
    result: dict = {
        "started_at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python bench/cluster.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "code_under_test": code_under_test(),
        "loadavg_at_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
    }
    try:
        with tempfile.TemporaryDirectory(prefix="hl7bridge-cluster-") as tmp:
            with cluster(Path(tmp) / "ingest", postgres, 2, routes=False) as running:
                Load(Instances(running, running.port, [0, 1]), fixtures, Path(tmp)).run("count", 1, count=len(fixtures))
                result["throughput"] = throughput(running, fixtures, Path(tmp), window)
            result["takeover"] = takeovers(postgres, Path(tmp) / "takeover", count)
    finally:
        postgres.stop()
        shutil.rmtree(postgres.root, ignore_errors=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw figures: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
