"""Dispatch benchmark: API calls per 1,000 new appointments in a burst, and ACK-to-API delay at a trickle.

Runs the real service and the sandbox (each its own process) on loopback:

    python bench/dispatch.py [--burst 1000] [--trickle 100] [--rate 5] [--out docs/performance.md]

Targets: <= 12 bulk calls per 1,000 appointments (batch_size 100), p99 delay from ACK to the API call
<= 0.5 s at a trickle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7bridge.testing.client import BlockingClient  # noqa: E402
from tests.conftest import RunningSandbox, free_port, start_sandbox  # noqa: E402
from tests.dispatch_support import SANDBOX_TOML, service_toml, siu  # noqa: E402

MARKER_START = "<!-- dispatch-bench:start -->"
MARKER_END = "<!-- dispatch-bench:end -->"


def spawn(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "hl7bridge", *args], cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})})  # fmt: skip
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"could not start: {' '.join(args)}")
    return process


def start_time(offset_days: int) -> str:
    return (datetime.now() + timedelta(days=offset_days)).strftime("%Y%m%d093000")


def burst(port: int, sandbox: RunningSandbox, count: int, connections: int) -> dict:
    before = len(sandbox.get("/_sandbox/calls"))
    per = count // connections
    when = start_time(30)
    payloads = [[siu("S12", f"B{n}-{i}", f"BURST-{n}-{i}", when) for i in range(per)] for n in range(connections)]

    def sender(n: int) -> None:
        with BlockingClient("127.0.0.1", port) as client:
            for payload in payloads[n]:
                client.request(payload)

    started = time.monotonic()
    threads = [threading.Thread(target=sender, args=(n,)) for n in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acked = time.monotonic() - started
    total = per * connections
    while True:
        calls = sandbox.get("/_sandbox/calls")[before:]
        bulk = [c for c in calls if c["path"].endswith("/bulk") and c["status"] == 204]
        delivered = sum(len(c["body"]["instances"]) for c in bulk)
        if delivered >= total or time.monotonic() - started > 120:
            break
        time.sleep(0.2)
    return {
        "appointments": total,
        "delivered": delivered,
        "bulk_calls": len(bulk),
        "batch_sizes": [len(c["body"]["instances"]) for c in bulk],
        "calls_per_1000": round(len(bulk) * 1000 / max(total, 1), 1),
        "all_api_calls": len(calls),
        "seconds_to_ack_all": round(acked, 2),
        "seconds_to_deliver_all": round(time.monotonic() - started, 2),
    }


def trickle(port: int, sandbox: RunningSandbox, count: int, rate: float) -> dict:
    before = len(sandbox.get("/_sandbox/calls"))
    acked_at: dict[str, float] = {}
    with BlockingClient("127.0.0.1", port) as client:
        for i in range(count):
            appointment = f"TRICKLE-{i}"
            client.request(siu("S12", f"T-{i}", appointment, start_time(31)))
            acked_at[appointment] = time.time()
            time.sleep(1.0 / rate)
    deadline = time.monotonic() + 30
    delays: list[float] = []
    while time.monotonic() < deadline:
        calls = sandbox.get("/_sandbox/calls")[before:]
        seen = {}
        for call in calls:
            if call["path"].endswith("/bulk") and call["status"] == 204:
                at = datetime.fromisoformat(call["at"]).timestamp()
                for instance in call["body"]["instances"]:
                    seen.setdefault(instance["parameters"]["appointmentId"], at)
        if len(seen) >= count:
            delays = [seen[a] - acked_at[a] for a in acked_at]
            break
        time.sleep(0.2)
    delays.sort()
    return {
        "messages": count,
        "rate_per_s": rate,
        "delivered": len(delays),
        "p50_s": round(statistics.median(delays), 3) if delays else None,
        "p99_s": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3) if delays else None,
        "max_s": round(delays[-1], 3) if delays else None,
    }


def report(results: dict, command: str) -> str:
    b, t = results["burst"], results["trickle"]
    ok_calls = b["calls_per_1000"] <= 12 and b["delivered"] == b["appointments"]
    ok_delay = t["p99_s"] is not None and t["p99_s"] <= 0.5
    return "\n".join([
        MARKER_START,
        "## Dispatch",
        "",
        f"Command: `{command}` (service and sandbox as separate processes on loopback; "
        "batch_size 100, batch_window_ms 200, durable log on).",
        "",
        "| measure | value | target | |",
        "| --- | --- | --- | --- |",
        f"| bulk calls per 1,000 new appointments (burst of {b['appointments']}) | {b['calls_per_1000']} "
        f"({b['bulk_calls']} calls, {b['delivered']} delivered) | <= 12 | {'PASS' if ok_calls else 'FAIL'} |",
        f"| delay ACK -> API call at {t['rate_per_s']:g} msg/s, p50 / p99 / max | {t['p50_s']} / {t['p99_s']} / "
        f"{t['max_s']} s | p99 <= 0.5 s | {'PASS' if ok_delay else 'FAIL'} |",
        f"| burst: all ACKed / all delivered | {b['seconds_to_ack_all']} s / {b['seconds_to_deliver_all']} s | | |",
        "",
        MARKER_END,
    ])  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burst", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--trickle", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0)
    parser.add_argument("--out", type=Path, help="update this Markdown file's dispatch section")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="hl7bridge-dispatch-bench-"))
    port = free_port()
    sandbox = start_sandbox(work, SANDBOX_TOML)
    config = service_toml(sandbox.url).replace("batch_window_ms = 100", "batch_window_ms = 200")
    config = config.replace("retry_initial = 0.2", "retry_initial = 1.0")
    (work / "bridge.toml").write_text(config)
    service = spawn(["serve", "--config", "bridge.toml", "--listen", f"tcp:{port}:interface=127.0.0.1"], work,
                    {"TEST_API_TOKEN": "test-token"})  # fmt: skip
    try:
        results = {
            "burst": burst(port, sandbox, args.burst, args.connections),
            "trickle": trickle(port, sandbox, args.trickle, args.rate),
        }
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)
        sandbox.stop()
    command = "python bench/dispatch.py" + (f" --burst {args.burst}" if args.burst != 1000 else "")
    print(json.dumps(results, indent=2))
    section = report(results, command)
    print(section)
    out_dir = ROOT / "bench" / "results"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "dispatch-latest.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.out:
        text = args.out.read_text() if args.out.exists() else "# Performance\n"
        if MARKER_START in text:
            head, _, rest = text.partition(MARKER_START)
            _, _, tail = rest.partition(MARKER_END)
            text = head + section + tail
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
