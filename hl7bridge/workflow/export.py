"""Export messages for audits and vendor tickets: CSV, JSON Lines or the HL7 messages themselves.

An export streams in keyset batches (bounded memory, however many messages match) and masks patient data
unless asked for it; an export with patient data is an audit entry (its filters and count, never the data),
committed before the first record leaves.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.core.logs import masked_summary
from hl7bridge.hl7.phi import mask_segments
from hl7bridge.store import LIST_COLUMNS, messages
from hl7bridge.store.audit import AuditEntry, record
from hl7bridge.store.search import count, newest_id, stream

from .search import Filters, check

FORMATS = ("csv", "jsonl", "hl7")
_COLUMNS = (*LIST_COLUMNS, messages.c.appointment_key, messages.c.charset, messages.c.summary, messages.c.raw)
CSV_FIELDS = (
    "id", "received_at", "listener", "peer", "sending_application", "sending_facility", "control_id",
    "message_type", "event", "version", "status", "ack_code", "action", "route", "appointment_key",
    "error_location", "error", "duplicate_of", "replay_of", "patient_id", "patient_name", "start",
)  # fmt: skip
#: What makes a spreadsheet read a CSV cell as a formula (OWASP's CSV injection list).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
_SEGMENT_END = re.compile(r"\r\n|\r|\n")


@dataclass
class Export:
    """What an export will write: ``count`` messages (those up to id ``upto``), and the records to write.

    ``unindexed``: messages past the search index that were not searched (a search by key or words may miss
    them)."""

    engine: Engine
    filters: Filters
    format: str
    phi: bool
    count: int
    upto: int
    unindexed: int = 0

    def records(self) -> Iterator[str]:
        """Each record as text with its line end; CSV starts with its header."""
        if self.format == "csv":
            yield _csv_line(CSV_FIELDS)
        with self.engine.connect() as conn:
            for row in stream(conn, self.filters, _COLUMNS, self.upto):
                yield self._render(row)

    def _render(self, row: dict[str, Any]) -> str:
        raw, charset, summary_text = row.pop("raw"), row.pop("charset"), row.pop("summary")
        er7 = raw.decode(charset or "utf-8", errors="replace") if raw is not None else None
        if er7 is not None and not self.phi:
            er7 = mask_segments(er7)
        if self.format == "hl7":
            return "\r".join(s for s in _SEGMENT_END.split(er7 or "") if s) + "\r\n" if er7 else ""
        summary = json.loads(summary_text) if summary_text else None
        if summary is not None and not self.phi:
            summary = masked_summary(summary)
        row["received_at"] = datetime.fromtimestamp(row["received_at"], UTC).isoformat(timespec="milliseconds")
        if self.format == "jsonl":
            return json.dumps({**row, "summary": summary, "raw": er7}, ensure_ascii=False) + "\n"
        summary = summary or {}
        ids = summary.get("patient_ids") or [{}]
        names = summary.get("names") or [{}]
        row["patient_id"] = ids[0].get("value", "")
        row["patient_name"] = " ".join(n for n in (names[0].get("given"), names[0].get("family")) if n)
        row["start"] = summary.get("start") or ""
        return _csv_line(tuple("" if row.get(f) is None else row[f] for f in CSV_FIELDS))


def open_export(
    engine: Engine, filters: Filters, fmt: str, phi: bool, actor: str, channel: str = "cli", destination: str = ""
) -> Export:
    """Count what matches now (later arrivals are left out), and audit an export with patient data."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}")
    check(filters)
    with engine.connect() as conn:
        upto = newest_id(conn)
        total, unindexed = count(conn, filters, upto)
    if phi:
        details = {"format": fmt, "count": total, "filters": filters.described(), "upto_id": upto}
        if destination:
            details["to"] = destination
        with engine.begin() as conn:
            record(conn, AuditEntry(actor, channel, "export", "message", (), details=details))
    return Export(engine, filters, fmt, phi, total, upto, unindexed)


def _csv_line(values: tuple[Any, ...]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(tuple(_inert(v) for v in values))
    return out.getvalue()


def _inert(value: Any) -> Any:
    """A cell a spreadsheet will not run: text from the feed starting like a formula gets a leading ``'``."""
    return f"'{value}" if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value
