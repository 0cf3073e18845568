"""Start-up integrity check benchmark: what ``service.integrity_check = "quick"`` adds to ``hl7bridge serve``.

Builds a message log of about ``--megabytes`` with the real schema (messages of ~2 KB), then times
``serve`` from exec to its "listening" line with the check off and on (the file then sits in the page
cache; for a cold read run ``sync; echo 3 > /proc/sys/vm/drop_caches`` as root before ``--reuse``):

    python bench/startup_check.py [--megabytes 1024] [--path /tmp/hl7bridge-big.db] [--reuse]

Not part of ``make bench``: building 1 GB takes a minute and the disk's speed decides the cold figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert  # noqa: E402

from hl7bridge.store import messages, open_engine  # noqa: E402

RAW = b"MSH|^~\\&|EPIC|HOSP|HL7BRIDGE|FAC|20260101120000||SIU^S12|C|P|2.5\rSCH|" + b"x" * 1700 + b"\r"


def build(path: Path, megabytes: int) -> int:
    path.unlink(missing_ok=True)
    engine = open_engine(f"sqlite:///{path}", "OFF")
    count = 0
    while path.stat().st_size < megabytes * 2**20:
        rows = [{"received_at": time.time(), "listener": "main", "peer": "10.0.0.1:5000", "raw": RAW,
                 "control_id": f"C{count + i}", "message_type": "SIU", "event": "S12", "version": "2.5",
                 "appointment_key": f"EPIC|HOSP|A{count + i}", "summary": '{"x": "' + "y" * 300 + '"}',
                 "ack_code": "AA", "status": "accepted"} for i in range(5000)]  # fmt: skip
        with engine.begin() as conn:
            conn.execute(insert(messages), rows)
        count += len(rows)
    engine.dispose()
    return count


def start(path: Path, check: str) -> tuple[float, str]:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as config:
        config.write(f'[service]\nintegrity_check = "{check}"\n')
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "hl7bridge", "serve", "--config", config.name, "--database", f"sqlite:///{path}",
         "--listen", "tcp:0:interface=127.0.0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    process.stdout.readline()  # type: ignore[union-attr]
    took = time.monotonic() - began
    process.terminate()
    stderr = process.communicate(timeout=60)[1]
    os.unlink(config.name)
    checked = next((line.split("INFO ", 1)[-1] for line in stderr.splitlines() if "checked in" in line), "")
    return took, checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--path", type=Path, default=Path(tempfile.gettempdir()) / "hl7bridge-big.db")
    parser.add_argument("--reuse", action="store_true", help="time an existing file instead of building one")
    args = parser.parse_args()
    if not args.reuse:
        print(f"built {build(args.path, args.megabytes):,} messages in {args.path.stat().st_size / 2**20:.0f} MB")
    for check in ("quick", "off", "quick"):
        took, checked = start(args.path, check)
        print(f"integrity_check = {check:5}: listening after {took:5.2f} s  {checked}")


if __name__ == "__main__":
    main()
