"""Search benchmark: `log list`'s filters on a log of a million messages.

    python bench/search.py [--messages 1000000] [--queries 100] [--database PATH] [--keep]
    python bench/search.py --postgres --messages 200000     # on a throwaway PostgreSQL cluster (tests/pg.py)
    python bench/search.py --url postgresql+psycopg://user@host/db   # an empty PostgreSQL database, filled

Fills a fresh SQLite log through the real schema (``open_engine``) with messages of a realistic shape: 30 days, 40 senders, 150,000 patients
with two PID-3 identifiers each, an appointment per patient and a half (booked, then modified, moved or
cancelled), 2,000 family names, 2 % rejected and 1 % ignored. Rows go in with multi-row INSERTs, 5,000 per
transaction (a bulk load, not the service's path; the search terms are computed as intake computes them, and
``search_index.catch_up`` indexes them into the index file as the service's index thread does, in batches). Then, for each filter, it runs ``workflow.search.search``
(a page of 50, newest first) for ``--queries`` random values, and the second page of each (``before`` the
first page's last id), and reports p50/p95 in milliseconds. ``--database PATH`` reuses a log filled before.
On PostgreSQL (``--url``, ``--postgres``) each batch is indexed as the writer indexes it there
(``index_messages``, in the rows' transaction), and the plans are PostgreSQL's ``EXPLAIN``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hl7bridge.store import messages, open_engine, search_terms
from hl7bridge.store.schema import index_messages
from hl7bridge.store.search_index import catch_up
from hl7bridge.workflow.search import Filters, explain, search

DAYS = 30
SENDERS = [(f"APP{i:02d}", f"FAC{i % 7}") for i in range(40)]
FAMILIES = [f"FAMILY{i:04d}" for i in range(2000)]
GIVEN = [f"GIVEN{i:03d}" for i in range(300)]
REASONS = ["Follow-up", "Annual physical", "Consultation", "Vaccination", "Post-op check", "Imaging review"]
LOCATIONS = [f"Clinic {c}" for c in "ABCDEFGHIJKLMNOP"]
EVENTS = ["S12"] * 60 + ["S13"] * 10 + ["S14"] * 15 + ["S15"] * 10 + ["S26"] * 5


def log_location(database: str | None, prefix: str) -> tuple[Path, str | None]:
    """The log to fill or reuse: ``--database`` when given, else a new temporary directory's (returned too, for
    removal afterwards)."""
    if database:
        return Path(database), None
    tmp = tempfile.mkdtemp(prefix=prefix)
    return Path(tmp) / "log.db", tmp


def fill(url: str, total: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    engine = open_engine(url, synchronous="OFF")
    patients = max(total * 3 // 20, 10)
    now = time.time()
    start = now - DAYS * 86400
    began = time.monotonic()
    batch = 5000
    raw = ("MSH|^~\\&|" + "X" * 900).encode()
    insert = messages.insert().returning(messages.c.id, sort_by_parameter_order=True)
    for first in range(0, total, batch):
        rows = []
        for n in range(first, min(first + batch, total)):
            patient = rng.randrange(patients)
            appointment = patient * 3 // 2 + rng.randrange(2)
            app, fac = SENDERS[patient % len(SENDERS)]
            event = rng.choice(EVENTS)
            status = "rejected" if rng.random() < 0.02 else "ignored" if rng.random() < 0.01 else "accepted"
            summary = {
                "event": event,
                "placer_appointment_id": f"PL{appointment:07d}",
                "filler_appointment_id": f"FI{appointment:07d}",
                "patient_ids": [
                    {"value": f"MRN{patient:07d}", "type_code": "MR", "authority": "HOSP"},
                    {"value": f"EPI{patient:07d}", "type_code": "EPI", "authority": "EPI"},
                ],
                "names": [
                    {
                        "family": FAMILIES[patient % len(FAMILIES)],
                        "given": GIVEN[patient % len(GIVEN)],
                        "middle": "",
                        "name_type": "L",
                    }
                ],
                "reason": rng.choice(REASONS),
                "appointment_type": "Office visit",
                "provider_name": f"Dr {FAMILIES[(patient * 7) % len(FAMILIES)]}",
                "location": rng.choice(LOCATIONS),
                "department": "Outpatient",
            }
            terms, words = search_terms(f"C{n:09d}", app, fac, summary)
            rows.append({
                "received_at": start + (n / total) * DAYS * 86400,
                "listener": "main", "peer": "10.0.0.5", "raw": raw, "charset": "utf-8",
                "sending_application": app, "sending_facility": fac, "control_id": f"C{n:09d}",
                "message_type": "SIU", "event": event, "version": "2.5.1",
                "appointment_key": f"{fac}|FI{appointment:07d}", "action": "book", "route": "main", "note": None,
                "replay_of": None, "summary": json.dumps(summary), "ack_code": "AA" if status == "accepted" else "AE",
                "ack_text": None, "ack_raw": b"MSH|ACK", "status": status, "error": None, "error_location": None,
                "duplicate_of": None, "purged_at": None, "search_terms": terms, "search_text": words,
            })  # fmt: skip
        with engine.begin() as conn:
            index_messages(conn, list(conn.execute(insert, rows).scalars()), rows)
        if first and first % 100_000 == 0:
            print(f"  {first:,} messages ({time.monotonic() - began:.0f} s)", flush=True)
    if engine.dialect.name == "sqlite":
        catch_up(engine, 50_000)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)" if engine.dialect.name == "sqlite" else "ANALYZE")
    return {"messages": total, "patients": patients, "fill_s": round(time.monotonic() - began, 1)}


def scenarios(total: int) -> dict[str, Callable[[random.Random], Filters]]:
    patients = max(total * 3 // 20, 10)
    now = time.time()

    def patient(r: random.Random) -> int:
        return r.randrange(patients)

    return {
        "--appointment": lambda r: Filters(appointment=f"PL{patient(r) * 3 // 2:07d}"),
        "--patient": lambda r: Filters(patient=f"EPI{patient(r):07d}"),
        "--control-id": lambda r: Filters(control_id=f"C{r.randrange(total):09d}"),
        "--sender APP": lambda r: Filters(sender=r.choice(SENDERS)[0]),
        "--sender APP^FAC": lambda r: Filters(sender="^".join(r.choice(SENDERS))),
        "--sender --status rejected": lambda r: Filters(sender=r.choice(SENDERS)[0], status="rejected"),
        "--sender --event S26 --since 7d": lambda r: Filters(
            sender=r.choice(SENDERS)[0], event="S26", since=now - 7 * 86400
        ),
        "--patient --event S12": lambda r: Filters(patient=f"MRN{patient(r):07d}", event="S12"),
        "--text FAMILY --since 1d": lambda r: Filters(text=r.choice(FAMILIES), since=now - 86400),
        "--text FAMILY --since 30d": lambda r: Filters(text=r.choice(FAMILIES), since=now - 30 * 86400),
        "--text REASON --since 1d": lambda r: Filters(text=r.choice(REASONS).split()[0], since=now - 86400),
        "--text FAMILY --sender --since 7d": lambda r: Filters(
            text=r.choice(FAMILIES), sender=r.choice(SENDERS)[0], since=now - 7 * 86400
        ),
        "--status rejected": lambda r: Filters(status="rejected"),
        "--status rejected --since 1d": lambda r: Filters(status="rejected", since=now - 86400),
        "(no filter)": lambda r: Filters(),
    }


def measure(url: str, total: int, queries: int) -> list[dict]:
    engine = open_engine(url, create=False)
    rng = random.Random(11)
    out = []
    for name, make in scenarios(total).items():
        first, second, found = [], [], 0
        for _ in range(queries):
            filters = make(rng)
            began = time.perf_counter()
            page = search(engine, filters)
            first.append((time.perf_counter() - began) * 1000)
            found += len(page.rows)
            if page.more:
                began = time.perf_counter()
                search(engine, filters, before=page.next_before)
                second.append((time.perf_counter() - began) * 1000)
        plan = explain(engine, make(rng))
        out.append({"filter": name, "p50_ms": _pct(first, 50), "p95_ms": _pct(first, 95),
                    "page2_p50_ms": _pct(second, 50), "page2_p95_ms": _pct(second, 95),
                    "rows_per_page": round(found / queries, 1), "plan": plan})  # fmt: skip
        print(f"{name:36} p50 {out[-1]['p50_ms']:7.2f} ms  p95 {out[-1]['p95_ms']:7.2f} ms  "
              f"page 2 p95 {out[-1]['page2_p95_ms']:7.2f} ms  rows {out[-1]['rows_per_page']:5.1f}  "
              f"plan: {' / '.join(plan)}", flush=True)  # fmt: skip
    return out


def ingest_cost(rounds: int, count: int, group: int = 20, batch: int | None = None) -> dict:
    """What the search index adds to the ingest hot path, per message: the intake's Python work (``search_terms``),
    the writer's CPU for the two extra columns, and the indexer's batches (``search_index.index_batch`` into the
    log's index file, ``batch`` messages a batch, as the service's index thread runs them; here in the caller's
    thread between groups, so the wall time includes them). The real ``Writer`` takes
    the real intake's rows of the SIU fixtures (unique control ids) in groups of ``group`` (20: as from 20
    connections; 1: one connection, a commit each), into a fresh log, with the terms and indexed, or without
    either, in alternating rounds. CPU (all threads) and wall time, both per message."""
    import threading

    from hl7bridge.app.config import load
    from hl7bridge.app.wiring import intake_for
    from hl7bridge.store import Writer, WriteRequest
    from hl7bridge.store.search_index import BATCH

    batch = batch or BATCH
    config = load(None)
    intake = intake_for(config, config.listeners[0])
    fixtures = sorted((Path(__file__).resolve().parent.parent / "fixtures" / "siu").glob("*.hl7"))
    received = [m for f in fixtures for m in intake.read_frame(f.read_bytes()).messages if m.header is not None]
    bare = []
    for n in range(count):
        row = dict(received[n % len(received)].row("main", "127.0.0.1", time.time()), control_id=f"COST-{n}")
        bare.append(dict(row, search_terms=None, search_text=None))
    indexed = [dict(row) for row in bare]
    began = time.process_time()
    for row in indexed:
        summary = json.loads(row["summary"]) if row["summary"] else None
        row["search_terms"], row["search_text"] = search_terms(row["control_id"], row["sending_application"],
                                                               row["sending_facility"], summary)  # fmt: skip
    intake_us = (time.process_time() - began) / count * 1e6
    figures: dict[str, list[float]] = {"with": [], "without": []}
    walls: dict[str, list[float]] = {"with": [], "without": []}
    with tempfile.TemporaryDirectory(prefix="hl7bridge-ingest-cost-") as tmp:
        for number in range(rounds):
            for side in ("without", "with") if number % 2 else ("with", "without"):
                engine = open_engine(f"sqlite:///{tmp}/{side}-{number}.db")
                rows = indexed if side == "with" else bare
                writer = Writer(engine, lambda fn, *a: fn(*a))
                writer.start()
                began, wall = time.process_time(), time.perf_counter()
                for first in range(0, count, group):
                    done = threading.Semaphore(0)
                    chunk = rows[first : first + group]
                    for row in chunk:
                        writer.submit(WriteRequest(row, None, lambda _r, d=done: d.release()))
                    for _ in chunk:
                        done.acquire()
                    end = first + len(chunk)
                    if side == "with" and (end % batch < group or end == count):
                        catch_up(engine, batch, once=True)
                figures[side].append((time.process_time() - began) / count * 1e6)
                walls[side].append((time.perf_counter() - wall) / count * 1e6)
                writer.stop()
                engine.dispose()
    out: dict = {side: round(statistics.median(values), 1) for side, values in figures.items()}
    out["writer_added_us"] = round(out["with"] - out["without"], 1)
    out["wall_added_us"] = round(statistics.median(walls["with"]) - statistics.median(walls["without"]), 1)
    out["intake_us"] = round(intake_us, 1)
    out["rounds"] = {side: [round(v, 1) for v in values] for side, values in figures.items()}
    out["wall_rounds"] = {side: [round(v, 1) for v in values] for side, values in walls.items()}
    return out


def _pct(values: list[float], pct: int) -> float:
    if not values:
        return 0.0
    if len(values) == 1:
        return round(values[0], 2)
    return round(statistics.quantiles(values, n=100, method="inclusive")[pct - 1], 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100, help="random values per filter")
    parser.add_argument("--database", metavar="PATH", help="fill this file (or reuse it when it exists)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary log")
    parser.add_argument("--url", metavar="URL", help="fill and search this empty PostgreSQL database instead")
    parser.add_argument("--postgres", action="store_true", help="as --url, on a throwaway PostgreSQL cluster")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    parser.add_argument("--ingest-cost", action="store_true",
                        help="instead: CPU per message the index adds to the writer (with vs without, alternating)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6, help="--ingest-cost: rounds of each side")
    parser.add_argument("--groups", type=int, nargs="+", default=[20, 1], help="--ingest-cost: group sizes")
    parser.add_argument("--index-batch", type=int, default=None, metavar="N",
                        help="--ingest-cost: messages an index job (default: the service's)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.ingest_cost:
        for group in args.groups:
            cost = ingest_cost(rounds=args.rounds, count=20_000 if group > 1 else 4_000, group=group,
                               batch=args.index_batch)  # fmt: skip
            print(f"groups of {group}: writer and indexer CPU {cost['with']} us a message with the search index, "
                  f"{cost['without']} us without (+{cost['writer_added_us']} us CPU, +{cost['wall_added_us']} us wall), "
                  f"and {cost['intake_us']} us in intake (search_terms); medians of {len(cost['rounds']['with'])} "
                  f"alternating rounds: {cost['rounds']}; wall: {cost['wall_rounds']}", flush=True)  # fmt: skip
        return 0
    if args.url or args.postgres:
        return _on_postgres(args)
    path, tmp = log_location(args.database, "hl7bridge-search-")
    url = f"sqlite:///{path}"
    filled = None
    if not path.exists():
        print(f"filling {path} with {args.messages:,} messages", flush=True)
        filled = fill(url, args.messages)
        print(f"filled in {filled['fill_s']} s; {path.stat().st_size / 2**20:.0f} MiB", flush=True)
    results = measure(url, args.messages, args.queries)
    if args.json:
        Path(args.json).write_text(json.dumps({"filled": filled, "results": results}, indent=2) + "\n")
    if tmp and not args.keep:
        for name in os.listdir(tmp):
            os.unlink(Path(tmp) / name)
        os.rmdir(tmp)
    worst = max(r["p95_ms"] for r in results)
    print(f"worst p95 {worst:.1f} ms (goal <= 50 ms)")
    return 0


def _on_postgres(args: argparse.Namespace) -> int:
    """Fill ``--url`` (or a database of a throwaway cluster, ``--postgres``) and measure the same filters."""
    server = None
    url = args.url
    if not url:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from tests.pg import start_postgres

        server = start_postgres()
        url = server.create_database()
    try:
        print(f"filling {url} with {args.messages:,} messages", flush=True)
        filled = fill(url, args.messages)
        print(f"filled in {filled['fill_s']} s", flush=True)
        results = measure(url, args.messages, args.queries)
        if args.json:
            Path(args.json).write_text(json.dumps({"database": "postgresql", "filled": filled, "results": results},
                                                  indent=2) + "\n")  # fmt: skip
        print(f"worst p95 {max(r['p95_ms'] for r in results):.1f} ms (goal <= 50 ms)")
    finally:
        if server is not None:
            server.stop()
            shutil.rmtree(server.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
