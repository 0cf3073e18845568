"""Hostile shapes: answer time against size for each crafted shape, and another connection's worst ACK latency
meanwhile, over real MLLP sockets against ``hl7bridge serve`` (the test route, PID-3 chosen by ``where``).

    python bench/hostile_shapes.py [--sizes 131072,262144,524288,1000000] [--rounds 3] [--limits default,lifted]

"default" runs the listener's default limits (most shapes are refused AR after a scan); "lifted" raises them
so that every shape is read whole, which shows the reading itself growing linearly. Meanwhile a second
connection sends valid messages one after the other; its worst ACK latency while the crafted message is in
the service is the figure that says whether one message holds up the others. It also times one send of
5,000 and one of 21,000 empty frames (each answered AR). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7bridge.testing.client import BlockingClient  # noqa: E402
from tests.conftest import free_port, segments  # noqa: E402
from tests.dispatch_support import service_toml, siu  # noqa: E402
from tests.reliability.hostile import CRAFTED, crafted  # noqa: E402

START = "20300105093000"
LIFTED = "\n".join(f"{key} = 1000000" for key in ("max_segments", "max_repetitions", "max_components",
                                                   "max_subcomponents"))  # fmt: skip


class Other:
    """A second connection sending valid messages back to back, recording each ACK's latency."""

    def __init__(self, port: int) -> None:
        self.client = BlockingClient("127.0.0.1", port, timeout=60)
        self.latencies: list[tuple[float, float]] = []  # (sent at, latency)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            n += 1
            sent = time.monotonic()
            answer = segments(self.client.request(siu("S23", f"OTHER-{n}", f"OTHER-APPT-{n}", START)))
            if answer["MSA"][1] != "AA":
                raise AssertionError(f"the other connection got {answer['MSA']}")
            self.latencies.append((sent, time.monotonic() - sent))
            time.sleep(0.002)

    def worst_between(self, began: float, ended: float) -> float:
        """The worst latency of the messages that were in the service at any time in [began, ended]."""
        return max((lat for sent, lat in self.latencies if sent <= ended and sent + lat >= began), default=0.0)


def run(limits: str, sizes: list[int], rounds: int) -> list[dict]:
    workdir = Path(tempfile.mkdtemp(prefix="hostile-shapes-"))
    port = free_port()
    config = workdir / "hl7bridge.toml"
    config.write_text(service_toml("http://127.0.0.1:9", listener_extra=LIFTED if limits == "lifted" else ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "hl7bridge", "serve", "--config", str(config), "--database",
         f"sqlite:///{workdir / 'log.db'}", "--listen", f"tcp:{port}:interface=127.0.0.1"],
        cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    rows = []
    try:
        if "listening" not in process.stdout.readline():
            raise SystemExit("the service did not start")
        other = Other(port)
        other.thread.start()
        time.sleep(0.5)
        with BlockingClient("127.0.0.1", port, timeout=120) as client:
            for shape in CRAFTED:
                for size in sizes:
                    times, worst, code, where = [], 0.0, "", ""
                    for r in range(rounds):
                        payload = crafted(shape, size, f"{shape[:4].upper()}-{size}-{r}", START)
                        began = time.monotonic()
                        answer = segments(client.request(payload))
                        ended = time.monotonic()
                        time.sleep(0.05)  # the other connection's message in flight at the end gets answered
                        times.append(ended - began)
                        worst = max(worst, other.worst_between(began, ended))
                        code = answer["MSA"][1]
                        where = answer.get("ERR", ["", "", ""])[2].split("^")
                        where = "-".join(p for p in (where[0], where[2] if len(where) > 2 else "") if p)
                    rows.append({"shape": shape, "bytes": len(payload), "limits": limits,
                                 "answer": f"{code} {where}".strip(), "median_s": statistics.median(times),
                                 "max_s": max(times), "other_worst_s": worst})  # fmt: skip
                    print(f"  {rows[-1]}", file=sys.stderr)
            for frames in (5_000, 21_000):  # empty frames in one send (a 64 KiB read holds 21,000)
                began = time.monotonic()
                client.sock.sendall(b"\x0b\x1c\r" * frames)
                codes = {segments(client.receive())["MSA"][1] for _ in range(frames)}
                ended = time.monotonic()
                time.sleep(0.05)
                rows.append({"shape": f"{frames:,} empty frames in one send", "bytes": 3 * frames, "limits": limits,
                             "answer": "/".join(sorted(codes)), "median_s": ended - began, "max_s": ended - began,
                             "other_worst_s": other.worst_between(began, ended)})  # fmt: skip
        other.stop.set()
        other.thread.join(10)
        rows.append({"shape": "(none: the other connection alone)", "bytes": 0, "limits": limits, "answer": "",
                     "median_s": 0.0, "max_s": 0.0,
                     "other_worst_s": max(lat for _s, lat in other.latencies[:20])})  # fmt: skip
    finally:
        process.terminate()
        process.wait(30)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| shape | size (bytes) | limits | answer | answer time median / max (ms) | other connection's worst ACK (ms) |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        if not r["bytes"]:
            continue
        lines.append(f"| {r['shape']} | {r['bytes']:,} | {r['limits']} | {r['answer']} | "
                     f"{r['median_s'] * 1000:.0f} / {r['max_s'] * 1000:.0f} | {r['other_worst_s'] * 1000:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="131072,262144,524288,1000000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limits", default="default,lifted")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for limits in args.limits.split(","):
        rows += run(limits, sizes, args.rounds)
    print(table(rows))
    print("\nShapes: " + "; ".join(f"{name}: {what}" for name, (what, _where) in CRAFTED.items()))


if __name__ == "__main__":
    main()
