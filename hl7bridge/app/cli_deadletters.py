"""``hl7bridge dead-letters``: the formatting of ``workflow.deadletters``' results for a terminal or JSON.

``cli.py`` parses and checks the arguments and opens the log; this module only calls the workflow and prints.
Operator-given and API-given text is escaped (``core.logs.escape``), so one record stays one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.cli_format import print_table, when
from hl7bridge.core.logs import cap, escape
from hl7bridge.workflow import deadletters
from hl7bridge.workflow.deadletters import DeadLetter, Refusal

REASON_CHARS = 160


def run(args: argparse.Namespace, engine: Engine, actor: str, since: float | None) -> int:
    if args.dl_command == "list":
        return _list(engine, args, since)
    if args.dl_command == "retry":
        ids = None if args.all else args.ids
        result = deadletters.retry(engine, ids, actor, reason=args.reason or "", dry_run=args.dry_run)
        if args.json:
            return _json(result.to_json(), bool(result.refused))
        verb = "would queue" if result.dry_run else "queued"
        for letter in result.queued:
            print(f"{verb} {_describe(letter)}")
        _refusals(result.refused)
        if result.dry_run:
            print(f"{len(result.queued)} dead letter(s) would go back into the outbox (dry run: nothing changed)",
                  file=sys.stderr)  # fmt: skip
        elif result.queued:
            print(f"{len(result.queued)} dead letter(s) back in the outbox (audit entry {result.audit_id}); the running "
                  "service dispatches them (follow with 'hl7bridge log show MESSAGE')", file=sys.stderr)  # fmt: skip
        elif not result.refused:
            print("nothing to retry: no open dead letters", file=sys.stderr)
        return 1 if result.refused else 0
    result = deadletters.discard(engine, args.ids, actor, args.reason)
    if args.json:
        return _json(result.to_json(), bool(result.refused))
    for letter in result.discarded:
        print(f"discarded {_describe(letter)}")
    _refusals(result.refused)
    if result.discarded:
        print(f"{len(result.discarded)} dead letter(s) discarded by {escape(actor)} (audit entry {result.audit_id})",
              file=sys.stderr)  # fmt: skip
    return 1 if result.refused else 0


def _list(engine: Engine, args: argparse.Namespace, since: float | None) -> int:
    """A page, oldest first: ``--limit`` letters after ``--after``; the JSON is shaped as ``log list``'s."""
    found = deadletters.list_open(engine, since=since, route=args.route, limit=args.limit + 1, after=args.after)
    letters, more = found[: args.limit], len(found) > args.limit
    next_after = letters[-1].id if more else None
    if args.json:
        page = {"dead_letters": [dict(d.to_json(), since=when(d.since)) for d in letters], "more": more,
                "next_after": next_after}  # fmt: skip
        print(json.dumps(page, indent=2, ensure_ascii=False))
        return 0
    if not letters:
        print("(no open dead letters)", file=sys.stderr)
        return 0
    header = ("ID", "MESSAGE", "APPOINTMENT", "ROUTE", "KIND", "STATUS", "DEAD SINCE", "ATTEMPTS", "REASON")
    print_table(header, [
        tuple(escape(cap(str(cell), REASON_CHARS)) for cell in (d.id, d.message_id, d.appointment, d.route, d.kind,
                                                               d.status, when(d.since), d.attempts, d.reason))
        for d in letters
    ])  # fmt: skip
    print(f"{len(letters)} open dead letter(s) shown: 'hl7bridge dead-letters retry ID...' once the cause is fixed, "
          "or 'hl7bridge dead-letters discard ID... --reason TEXT'", file=sys.stderr)  # fmt: skip
    if more:
        print(f"(more remain: the next page is the same command with --after {next_after})", file=sys.stderr)
    return 0


def _describe(letter: DeadLetter) -> str:
    return escape(f"command {letter.id} ({letter.kind}, appointment {letter.appointment}, message {letter.message_id})")


def _refusals(refused: list[Refusal]) -> None:
    for refusal in refused:
        print(f"refused command {refusal.id}: {escape(refusal.reason)}")


def _json(data: Any, refused: bool) -> int:
    print(json.dumps(data, indent=2, ensure_ascii=False))
    return 1 if refused else 0
