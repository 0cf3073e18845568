"""What every command shares: its argument types (``--by``, ``--since``) and its output shapes (a local time, a
column table, the outbox line). ``cli.py`` and the ``cli_*`` modules import it; it imports none of them."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

from hl7bridge.core.checks import parse_duration
from hl7bridge.core.logs import local_time

#: ``--by`` at most: the audit log's actor is a name, not a document.
MAX_NAME_CHARS = 128


def since_arg(text: str) -> float:
    """An argparse ``type`` for ``--since DURATION``: the epoch seconds that long ago."""
    try:
        return time.time() - parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def operator_name(text: str) -> str:
    """An argparse ``type`` for ``--by``: who acted, as the audit log records it."""
    name = text.strip()
    if not 0 < len(name) <= MAX_NAME_CHARS or not name.isprintable():
        raise argparse.ArgumentTypeError(
            f"expected a name of 1 to {MAX_NAME_CHARS} printable characters, got {text[:40]!r}"
        )
    return name


def add_by(parser: argparse.ArgumentParser, verb: str) -> None:
    """``--by NAME``: who ``verb``, for the audit log (a bad name is a usage error, never the OS user instead)."""
    parser.add_argument(
        "--by", type=operator_name, metavar="NAME", help=f"who {verb}, for the audit log (default: the OS user)"
    )


#: An epoch time in the terminal's zone, to the second.
when = local_time


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last column, often long, is left unpadded."""
    table = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


def outbox_line(depth: int, oldest: float | None) -> str:
    return f"outbox: {depth} waiting" + (f", the oldest for {oldest:.0f} s" if oldest else "")
