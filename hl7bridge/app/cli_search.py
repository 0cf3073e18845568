"""``log list``'s filters and ``log export``: argument parsing and output only; the work is in
``hl7bridge.workflow.search`` and ``hl7bridge.workflow.export``. ``cli.py`` opens the log and passes it in, as
for the other ``cli_*`` modules (no import cycle)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hl7bridge.app.cli_format import add_by, since_arg
from hl7bridge.core.logs import escape
from hl7bridge.core.status import CommandStatus, MessageStatus
from hl7bridge.workflow.search import Filters, unindexed_note


def add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--status", choices=[*(status.value for status in MessageStatus), CommandStatus.DEAD.value],
                        help="a message's status, or dead: messages with an open dead letter")  # fmt: skip
    parser.add_argument("--since", type=since_arg, metavar="DURATION", help="received within, e.g. 30m, 12h, 7d")
    parser.add_argument("--event", metavar="S12")
    parser.add_argument("--appointment", metavar="ID", help="placer or filler appointment id (SCH-1, SCH-2)")
    parser.add_argument("--patient", metavar="ID", help="any patient identifier (PID-3)")
    parser.add_argument("--control-id", metavar="X", help="MSH-10")
    parser.add_argument("--sender", metavar="APP[^FACILITY]", help="MSH-3, or MSH-3 and MSH-4")
    parser.add_argument("--text", metavar="WORDS",
                        help="words of the names, reason, type, provider or place (needs --since); word* for a prefix")  # fmt: skip


class ExportRefused(ValueError):
    """An export that cannot be written as asked; the message says what to change."""


def filters_from(args: argparse.Namespace) -> Filters:
    return Filters(
        status=args.status,
        event=args.event,
        since=args.since,
        appointment=args.appointment,
        patient=args.patient,
        control_id=args.control_id,
        sender=args.sender,
        text=args.text,
    )


def more_line(next_before: int | None) -> str:
    return f"(more match: the next page is the same command with --before {next_before})"


def add_export_parser(
    log_sub: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    from hl7bridge.workflow.export import FORMATS

    export = with_config(log_sub.add_parser("export", help="write matching messages as CSV, JSON Lines or HL7"))
    add_filters(export)
    export.add_argument("--format", choices=FORMATS, default="jsonl")
    export.add_argument("--phi", action="store_true", help="patient data unmasked (recorded in the audit log)")
    add_by(export, "exports")
    export.add_argument(
        "--output", "-o", metavar="FILE", help="write here (created 0600; must not exist) instead of stdout"
    )
    export.set_defaults(func=handler)


def export(args: argparse.Namespace, engine: Any, actor: str, filters: Filters) -> int:
    """Write the export to ``--output`` (created 0600, never over an existing file) or stdout."""
    from hl7bridge.workflow.export import open_export

    target = Path(args.output) if args.output else None
    try:
        out = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600) if target else None
    except FileExistsError:
        raise ExportRefused(f"{target} exists; name a new file (an export never overwrites one)") from None
    except OSError as exc:
        raise ExportRefused(f"cannot create {target}: {exc.strerror}") from None
    written = False
    try:
        result = open_export(engine, filters, args.format, args.phi, actor,
                             destination=str(target.resolve()) if target else "stdout")  # fmt: skip
        with open(out, "w", encoding="utf-8", newline="") if out is not None else _stdout() as sink:
            out = None
            for record in result.records():
                sink.write(record)
        written = True
    finally:
        if out is not None:
            os.close(out)
        if target is not None and not written:
            # A failed export leaves no file: neither a partial one nor one that refuses the rerun ("exists").
            target.unlink(missing_ok=True)
    where = f" to {escape(str(target))}" if target else ""
    print(f"exported {result.count} message(s){where} as {args.format}"
          + ("" if args.phi else " (patient data masked; --phi exports it, audited)"), file=sys.stderr)  # fmt: skip
    if note := unindexed_note(result.unindexed):
        print(note, file=sys.stderr)
    return 0


def _stdout() -> Any:
    """stdout for a ``with`` block, left open after it."""
    import contextlib

    return contextlib.nullcontext(sys.stdout)
