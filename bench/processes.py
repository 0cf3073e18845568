"""Would intake in several processes reach 3,000 msg/s? Independent services side by side, measured.

Starts N services (``python -m hl7bridge serve``, built-in defaults) on one SQLite log or, with
``--separate``, on a log each (no shared write lock: the upper bound for process parallelism), then runs
``bench/loadgen.py`` closed loop against them, the connections split evenly, one generator per service.
Prints the rate, the CPU of every service thread and the machine's CPU split during the measured window:

    python bench/processes.py --services 1
    python bench/processes.py --services 2
    python bench/processes.py --services 2 --separate

Results of 2026-11-23 are in docs/performance.md ("Several intake processes?").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ingest import BENCH, CLK_TCK, ROOT, Server, fixture_mix


def machine_cpu() -> list[int]:
    """The machine's CPU ticks by kind (user, nice, system, idle, iowait, irq, softirq, ...)."""
    with open("/proc/stat") as stat:
        return [int(v) for v in stat.readline().split()[1:]]


def thread_cpu(pids: list[int]) -> dict[tuple[int, str], int]:
    """CPU ticks (user + system) per thread of the given processes."""
    out = {}
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            out[(pid, tid)] = int(fields[11]) + int(fields[12])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=2)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--separate", action="store_true", help="a log per service instead of one shared log")
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--seconds", type=float, default=12.0)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="hl7bridge-processes-"))
    services = []
    for i in range(args.services):
        (workdir / f"s{i}").mkdir()
        services.append(Server("hl7bridge", workdir / f"s{i}", None if args.separate else workdir / "shared.db"))
    fixtures, _excluded = fixture_mix()
    start_at = time.monotonic() + 1.0
    generators = []
    for i, service in enumerate(services):
        spec = {"host": "127.0.0.1", "port": service.port, "mode": "closed", "fixtures": fixtures,
                "tag": f"P{int(time.time())}s{i}n", "connections": list(range(i, args.connections, args.services)),
                "start_at": start_at, "warmup": args.warmup, "duration": args.seconds,
                "lat_file": str(workdir / f"lat{i}.bin"), "timeout": 10.0}  # fmt: skip
        generators.append(subprocess.Popen([sys.executable, str(BENCH / "loadgen.py"), json.dumps(spec)],
                                           stdout=subprocess.PIPE, text=True, cwd=ROOT))  # fmt: skip
    window: dict = {}

    def sample() -> None:
        time.sleep(max(0.0, start_at + args.warmup + 0.5 - time.monotonic()))
        pids = [s.pid for s in services]
        cpu0, threads0, t0 = machine_cpu(), thread_cpu(pids), time.monotonic()
        time.sleep(args.seconds - 1.0)
        cpu1, threads1, t1 = machine_cpu(), thread_cpu(pids), time.monotonic()
        window.update(cpu=[b - a for a, b in zip(cpu0, cpu1, strict=False)], seconds=t1 - t0,
                      threads={k: v - threads0.get(k, 0) for k, v in threads1.items()})  # fmt: skip

    sampler = threading.Thread(target=sample)
    sampler.start()
    done = 0
    for generator in generators:
        result = json.loads(generator.communicate()[0].strip().splitlines()[-1])
        done += result["done_in_window"]
    sampler.join()
    for service in services:
        service.stop()
    total = sum(window["cpu"])
    split = {name: round(100 * window["cpu"][i] / total) for i, name in ((0, "user"), (2, "system"), (3, "idle"),
                                                                       (4, "iowait"), (6, "softirq"))}  # fmt: skip
    log = "separate logs" if args.separate else "one shared log"
    print(f"{args.services} service(s), {log}, {args.connections} connections: {done / args.seconds:,.0f} msg/s")
    for (pid, tid), ticks in sorted(window["threads"].items()):
        share = 100 * ticks / CLK_TCK / window["seconds"]
        if share >= 1:
            print(f"  service pid {pid} thread {tid}: {share:.0f} % of a core")
    print(f"  machine CPU (% of both cores): {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
