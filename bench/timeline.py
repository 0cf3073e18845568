"""Dashboard and timeline benchmark on a log of a million messages.

    python bench/timeline.py [--messages 1000000] [--busy 180000] [--runs 50] [--database PATH] [--keep]

Fills a fresh log as ``bench/search.py`` does (30 days of realistic messages, the search index built), then adds a
busy last hour: ``--busy`` more messages (180,000: 50 a second) with ACK codes AA/AE/AR, two listeners, and for
each a done command with two API attempts (the timeline reads them), indexed and counted by ``search_index.catch_up`` as the
service does. Then it times ``workflow.dashboard.dashboard``
(the last 60 minutes, the console's dashboard) and ``workflow.timeline.timeline`` for random messages, masked and
unmasked (each unmask writes its audit entry first), and reports p50/p95 in milliseconds. ``--database PATH``
reuses a log filled before.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from search import _pct, fill, log_location

from hl7bridge.store import attempts, commands, messages, open_engine
from hl7bridge.store.search_index import catch_up
from hl7bridge.workflow.dashboard import dashboard
from hl7bridge.workflow.timeline import Unmask, timeline

RAW = (
    b"MSH|^~\\&|EPIC|MAIN|BRIDGE|X|20270101120000||SIU^S12^SIU_S12|C1|P|2.5.1\r"
    b"SCH|PL1^EPIC|FI1^EPIC|||||Follow-up^Follow-up|ROUTINE|30|min\r"
    b"TQ1|||||||20270315093000\r"
    b"PID|1||MRN0000001^^^HOSP^MR~EPI0000001^^^EPI^EPI||FAMILY0001^GIVEN001^Q||19800101|F|||12 Elm St^^Town^MA^01101"
    b"||(555)555-0101^PRN^CP\r"
    b"AIL|1||ROOM1^^^MAIN\r"
)


def busy_hour(url: str, count: int, seed: int = 5) -> float:
    """``count`` messages spread over the hour before now, each with a done command and two attempts."""
    rng = random.Random(seed)
    engine = open_engine(url, synchronous="OFF")
    now = time.time()
    began = time.monotonic()
    with engine.connect() as conn:
        first_id = (conn.exec_driver_sql("SELECT max(id) FROM messages").scalar() or 0) + 1
        first_command = (conn.exec_driver_sql("SELECT max(id) FROM commands").scalar() or 0) + 1
    batch = 5000
    for start in range(0, count, batch):
        rows, cmds, tries = [], [], []
        for n in range(start, min(start + batch, count)):
            code = rng.choices(["AA", "AE", "AR"], weights=[95, 4, 1])[0]
            at = now - 3600 + 3600 * n / count
            rows.append({"id": first_id + n, "received_at": at, "listener": rng.choice(["main", "east"]),
                         "peer": "10.0.0.5", "raw": RAW, "charset": "utf-8", "sending_application": "EPIC",
                         "sending_facility": "MAIN", "control_id": f"B{n:09d}", "message_type": "SIU", "event": "S12",
                         "version": "2.5.1", "appointment_key": f"MAIN|B{n}", "action": "book", "route": "main",
                         "summary": json.dumps({"names": [{"family": "FAMILY0001"}]}), "ack_code": code,
                         "ack_raw": b"MSH|^~\\&|BRIDGE\rMSA|" + code.encode() + b"|C1", "status": "accepted"
                         if code == "AA" else "rejected"})  # fmt: skip
            command_id = first_command + n
            cmds.append({"id": command_id, "message_id": first_id + n, "appointment_key": f"MAIN|B{n}", "kind": "book",
                         "route": "main", "chat_bot_id": "bot", "time_zone": "UTC",
                         "parameters": '{"firstName": "GIVEN001", "phone": "5555550101"}',
                         "identifiers": json.dumps({"appointmentId": f"B{n}"}), "status": "done", "next_attempt_at": at,
                         "created_at": at, "updated_at": at + 1, "attempts": 2})  # fmt: skip
            for k, (status, verdict) in enumerate(((503, "retryable"), (204, "success"))):
                tries.append({"command_id": command_id, "call_id": f"{n}-{k}", "at": at + k, "operation": "bulk",
                              "request_summary": "POST bulk chatBotId=bot instances=1", "status_code": status,
                              "verdict": verdict, "response_body": '{"message": "busy"}' if k == 0 else "",
                              "error": None, "duration_ms": 12.5})  # fmt: skip
        with engine.begin() as conn:
            conn.execute(messages.insert(), rows)
            conn.execute(commands.insert(), cmds)
            conn.execute(attempts.insert(), tries)
    catch_up(engine, 50_000)  # the service's indexer, caught up (it counts the dashboard's minutes too)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return round(time.monotonic() - began, 1)


def measure(url: str, runs: int) -> dict:
    engine = open_engine(url, create=False)
    rng = random.Random(3)
    with engine.connect() as conn:
        top = conn.exec_driver_sql("SELECT max(id) FROM messages").scalar()
    out: dict = {}
    for minutes in (60, 1440):
        took = []
        for _ in range(runs):
            began = time.perf_counter()
            shown = dashboard(engine, minutes=minutes)
            took.append((time.perf_counter() - began) * 1000)
        out[f"dashboard_{minutes}m"] = {"p50_ms": _pct(took, 50), "p95_ms": _pct(took, 95),
                                        "window_messages": shown.window_total}  # fmt: skip
    for name, unmask in (("timeline_masked", None), ("timeline_unmasked", Unmask("bench", "benchmark", "cli"))):
        took = []
        for _ in range(runs):
            message_id = rng.randint(1, top)
            began = time.perf_counter()
            timeline(engine, message_id, unmask=unmask)
            took.append((time.perf_counter() - began) * 1000)
        out[name] = {"p50_ms": _pct(took, 50), "p95_ms": _pct(took, 95)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--busy", type=int, default=180_000, help="messages in the last hour, on top")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--database", metavar="PATH", help="fill this file (or reuse it when it exists)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary log")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    path, tmp = log_location(args.database, "hl7bridge-timeline-")
    url = f"sqlite:///{path}"
    filled = None
    if not path.exists():
        print(f"filling {path} with {args.messages:,} messages and {args.busy:,} in the last hour", flush=True)
        filled = fill(url, args.messages)
        filled["busy_fill_s"] = busy_hour(url, args.busy)
        print(f"filled in {filled['fill_s'] + filled['busy_fill_s']:.0f} s; {path.stat().st_size / 2**20:.0f} MiB",
              flush=True)  # fmt: skip
    results = measure(url, args.runs)
    for name, figures in results.items():
        print(f"{name:20} p50 {figures['p50_ms']:7.2f} ms  p95 {figures['p95_ms']:7.2f} ms"
              + (f"  ({figures['window_messages']:,} messages in the window)" if "window_messages" in figures else ""))  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"filled": filled, "results": results}, indent=2) + "\n")
    if tmp and not args.keep:
        for name in os.listdir(tmp):
            os.unlink(Path(tmp) / name)
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
