"""``hl7bridge audit list|verify``: the operators' audit log for a terminal or JSON.

``cli.py`` parses the arguments and opens the log; this module reads ``store.audit`` and prints. Actors and
reasons are operator-typed text: escaped, so one entry stays one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict

from sqlalchemy.engine import Engine

from hl7bridge.core.logs import cap, escape
from hl7bridge.store import audit

REASON_CHARS = 120


def run(args: argparse.Namespace, engine: Engine, since: float | None, when: Callable[[float], str]) -> int:
    if args.audit_command == "verify":
        return _verify(engine, args.json, args.expect)
    found = audit.entries(engine, since=since, action=args.action, before=args.before, limit=args.limit + 1)
    more, shown = len(found) > args.limit, found[: args.limit]
    if args.json:
        print(json.dumps({"entries": [asdict(e) for e in shown], "more": more}, indent=2))
        return 0
    if not shown:
        print("no audit entries" + (" match" if since or args.action or args.before else ""))
        return 0
    print(f"{'ID':>6}  {'WHEN':25}  {'WHO':16} {'VIA':7} {'ACTION':12} {'ON':8} IDS / REASON")
    for e in shown:
        ids = ",".join(str(i) for i in e.ids[:10]) + (f",… ({len(e.ids)})" if len(e.ids) > 10 else "")
        reason = f"  “{cap(escape(e.reason), REASON_CHARS)}”" if e.reason else ""
        print(f"{e.id:>6}  {when(e.at):25}  {cap(escape(e.actor), 16):16} {e.channel:7} {e.action:12} "
              f"{e.target:8} {ids or '-'}{reason}")  # fmt: skip
    if more:
        print(f"more entries are older: add --before {shown[-1].id}")
    return 0


def _verify(engine: Engine, as_json: bool, expect: str | None) -> int:
    check = audit.verify(engine, expect=expect)
    if as_json:
        print(json.dumps({"intact": check.broken_at is None and not check.problem, **asdict(check)}))
    elif check.problem:
        print(f"audit log BROKEN after {check.checked} good entries: {check.problem}", file=sys.stderr)
    else:
        print(f"audit log intact: {check.checked} entries, each chained to the one before")
        print(f"head {check.head} (keep it elsewhere; 'audit verify --expect' checks it later)")
    return 1 if check.problem else 0
