"""`hl7bridge config diff` benchmark: a week of 100,000 logged messages judged by two configurations.

    python bench/config_diff.py [--messages 100000] [--workers N] [--database PATH] [--keep]

Fills a fresh SQLite log through the real schema (``open_engine``) with the SIU fixtures of ``fixtures/siu``
and ``fixtures/demo`` (v2.3 to v2.8, Epic, Cerner, athena habits), each with a control id and an appointment id
of its own, received over the last 7 days (multi-row INSERTs, a bulk load, not the service's path; 1 in 50 has
its raw purged). Then it runs ``python -m hl7bridge config diff --since 7d --json`` with
``config/hl7bridge.example.toml`` as ``--against`` and a copy whose name rule is changed (``patientName`` is
``"{family_name}, {given_name}"``) as ``--config``, and reports the wall time, the messages compared and the
differences found. The issue's bar: 100,000 messages in 60 s or less on this 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hl7bridge.store import messages, open_engine

ROOT = Path(__file__).resolve().parent.parent

EXAMPLE = ROOT / "config" / "hl7bridge.example.toml"
NAME_RULE = 'template = "{given_name} {family_name}"'


def templates() -> list[str]:
    out = []
    for folder in ("siu", "demo"):
        for path in sorted((ROOT / "fixtures" / folder).glob("*.hl7")):
            text = path.read_bytes().decode("utf-8", errors="replace")
            if "|100000" in text or "APT1" in text:
                out.append(text)
    return out


def fill(url: str, total: int) -> None:
    engine = open_engine(url, synchronous="OFF")
    bodies = templates()
    now = time.time()
    start = now - 6.9 * 86400
    insert = messages.insert()
    batch = 5000
    for first in range(0, total, batch):
        rows = []
        for n in range(first, min(first + batch, total)):
            body = bodies[n % len(bodies)]
            # A control id and appointment of its own (the fixtures' ids are 1000000xx and APT1xxxx / F9xxxx).
            text = body.replace("|100000", f"|{n:09d}X", 1).replace("APT1", f"APT{n}-", 1).replace("F9", f"F{n}-", 1)
            rows.append({
                "received_at": start + (now - start - 60) * n / total, "listener": "main", "peer": "127.0.0.1",
                "raw": None if n % 50 == 49 else text.encode("utf-8"), "charset": "utf-8", "status": "accepted",
            })  # fmt: skip
        with engine.begin() as conn:
            conn.execute(insert, rows)
    engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--database", help="reuse (or keep) the log at this path")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-config-diff-"))
    database = Path(args.database) if args.database else workdir / "log.db"
    url = f"sqlite:///{database}"
    if not database.exists():
        began = time.monotonic()
        fill(url, args.messages)
        print(f"filled {args.messages} messages in {time.monotonic() - began:.1f} s", file=sys.stderr)
    example = EXAMPLE.read_text(encoding="utf-8")
    assert example.count(NAME_RULE) == 1
    new = workdir / "new.toml"
    new.write_text(example.replace(NAME_RULE, 'template = "{family_name}, {given_name}"'), encoding="utf-8")
    cmd = [sys.executable, "-m", "hl7bridge", "config", "diff", "--config", str(new), "--against", str(EXAMPLE),
           "--database", url, "--since", "7d", "--json"]  # fmt: skip
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    began = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONHASHSEED": "0"})
    seconds = time.monotonic() - began
    if done.returncode not in (0, 1):
        print(done.stderr, file=sys.stderr)
        return 1
    report = json.loads(done.stdout)
    result = {
        "messages_logged": args.messages,
        "compared": report["messages"],
        "skipped_purged": report["skipped_purged"],
        "changed_messages": report["changed_messages"],
        "summary": report["summary"],
        "seconds": round(seconds, 1),
        "messages_per_second": round((report["messages"] + report["skipped_purged"]) / seconds),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    if not args.keep and not args.database:
        for path in workdir.iterdir():
            path.unlink()
        workdir.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
