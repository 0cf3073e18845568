"""What every command shares: its argument types (``--by``, ``--since``) and its output shapes (a local time, a
column table, the outbox line). ``cli.py`` and the ``cli_*`` modules import it; it imports none of them."""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Sequence

from hl7bridge.core.logs import local_time

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = 100 * 366 * 86400.0
#: ``--by`` at most: the audit log's actor is a name, not a document.
MAX_NAME_CHARS = 128


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``; ValueError saying so otherwise."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"{text[:40]!r} is not a duration; use e.g. 90s, 30m, 12h, 7d or 2w")
    seconds = float(m[1]) * _UNITS[m[2]]
    if seconds > MAX_DURATION:
        raise ValueError(f"{text[:40]!r} is longer than 100 years; use e.g. 90s, 30m, 12h, 7d or 2w")
    return seconds


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
