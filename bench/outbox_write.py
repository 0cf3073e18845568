"""Outbox-write benchmark: how long the service's writer is busy with one write of a bulk call's outcomes.

A message that arrives while the writer runs a dispatcher write waits for it, so the write a dispatcher
hands over (``DispatchSettings.updates_per_write`` commands' outcomes) should fit in the writer's job slice.
Real writer path (``OutboxWrite`` in one transaction), real SQLite file, no network:

    python bench/outbox_write.py [--commands 20000] [--per-write 16]

Target: a write of ``--per-write`` bulk-trigger outcomes (status, attempt, appointment memory) takes at
most ``store.writer.JOB_SLICE`` (2 ms) at p99.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7bridge.mapping.routing import BOOK, Command  # noqa: E402
from hl7bridge.store import CommandUpdate, OutboxWrite, command_values, open_engine  # noqa: E402
from hl7bridge.store.schema import commands, messages  # noqa: E402
from hl7bridge.store.writer import JOB_SLICE  # noqa: E402


def outcome(command_id: int, now: float) -> CommandUpdate:
    """What a 204 to a bulk trigger gives each of its commands."""
    attempt = {"call_id": "bench", "at": now, "operation": "trigger", "request_summary": "POST … (100 instances)",
               "status_code": 204, "verdict": "ok", "response_body": "", "error": None, "duration_ms": 12.3}  # fmt: skip
    parameters = {"patientId": f"P{command_id}", "appointmentId": f"A{command_id}", "phoneNumber": "+15555550199"}
    memo = (f"bench|{command_id}", "reminders", "reminders", "active", parameters)
    return CommandUpdate(command_id, "done", "triggered", count_attempt=True, remember=memo, attempts=[attempt])


def timed_writes(engine, first: int, count: int, per_write: int, now: float) -> list[float]:
    took = []
    for start in range(first, first + count, per_write):
        write = OutboxWrite(now, updates=[outcome(i, now) for i in range(start, min(start + per_write, first + count))])
        with engine.begin() as conn:
            began = time.perf_counter()
            write(conn)
            took.append(time.perf_counter() - began)  # the job's part of a slice; the commit is the slice's
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", type=int, default=20000, help="commands in the outbox (half are written)")
    parser.add_argument("--per-write", type=int, default=16, help="outcomes per write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(f"sqlite:///{tmp}/bench.db")
        now = time.time()
        with engine.begin() as conn:
            conn.execute(messages.insert(), [{"received_at": now, "listener": "b", "peer": "b", "status": "pending"}]
                         * args.commands)  # fmt: skip
            conn.execute(commands.insert(), [
                command_values(Command(BOOK, "reminders", "reminders", "UTC", None, {}, {"appointmentId": f"A{i}"},
                                       f"bench|{i}", now + 86400), now) | {"message_id": i, "status": "in_flight"}
                for i in range(1, args.commands + 1)
            ])  # fmt: skip
        half = args.commands // 2
        timed_writes(engine, 1, min(1000, half), args.per_write, now)  # warm-up: statement caches, page cache
        took = timed_writes(engine, 1001, half - 1000, args.per_write, now)
        engine.dispose()
    took.sort()
    p50, p99 = statistics.median(took), took[int(len(took) * 0.99)]
    verdict = "PASS" if p99 <= JOB_SLICE else "FAIL"
    print(f"{len(took)} writes of {args.per_write} bulk-trigger outcomes into an outbox of {args.commands} commands")
    print(f"per write: p50 {p50 * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms, max {took[-1] * 1000:.2f} ms "
          f"(target p99 <= {JOB_SLICE * 1000:.0f} ms: {verdict}); per command {p50 / args.per_write * 1000:.3f} ms")  # fmt: skip
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
