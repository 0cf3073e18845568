"""Accounts benchmark: what authentication costs a request, and what a login costs.

Every JSON API or console request looks up its session (``session_of``) or token (``authenticate_token``): one
indexed read, plus a write at most once a minute. A login is one argon2id verify (64 MiB, argon2-cffi's defaults)
whether the name exists or not. Real SQLite file, no network:

    python bench/accounts.py [--requests 2000] [--logins 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hl7bridge.store import open_engine  # noqa: E402
from hl7bridge.workflow import accounts  # noqa: E402

PASSWORD = "benchmark passphrase"


def timed(label: str, count: int, call: Callable[[int], object]) -> None:
    took = []
    for i in range(count):
        start = time.perf_counter()
        call(i)
        took.append((time.perf_counter() - start) * 1000)
    took.sort()
    p95 = took[int(len(took) * 0.95) - 1] if len(took) >= 20 else took[-1]
    print(f"{label:44} n={count:<6} median {statistics.median(took):8.3f} ms   p95 {p95:8.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--logins", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_engine(f"sqlite:///{Path(tmp) / 'log.db'}")
        for i in range(50):
            accounts.add_user(engine, f"user{i}", "operator", PASSWORD, actor="bench")
        token = accounts.issue_token(engine, "user7", actor="bench")
        principal = accounts.check_password(engine, "user7", PASSWORD)
        assert principal is not None
        session = accounts.open_session(engine, principal)
        timed("session_of (no write: seen within a minute)", args.requests,
              lambda _i: accounts.session_of(engine, session.secret))  # fmt: skip
        timed("authenticate_token (no write)", args.requests, lambda _i: accounts.authenticate_token(engine, token))
        timed(
            "check_password, right password", args.logins, lambda _i: accounts.check_password(engine, "user7", PASSWORD)
        )
        timed(
            "check_password, unknown name",
            args.logins,
            lambda i: accounts.check_password(engine, f"nobody{i}", PASSWORD),
        )
        timed("open_session (audited login)", args.logins, lambda _i: accounts.open_session(engine, principal))


if __name__ == "__main__":
    main()
