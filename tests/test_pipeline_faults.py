"""A bug in the reader costs one AR, never the connection: the frame is answered and logged.

The fuzzer once found such a bug (a header cut short raised IndexError, and the connection was dropped with
the answers still owed on it). The reader is real here; one frame is made to hit an injected failure, since
no known input reaches one any more. Real writer, real SQLite file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import select

from hl7bridge.ack import AckBuilder
from hl7bridge.intake import Intake, Received
from hl7bridge.pipeline import Pipeline
from hl7bridge.siu import Feed
from hl7bridge.store import Writer, open_engine
from hl7bridge.store.schema import messages

from .dispatch_support import siu


class BrokenOnMarker(Intake):
    """The real reader, except that it fails the way a bug would on messages carrying ``ZZBUG``."""

    def read_message(self, raw: bytes, text: str, charset: str, note: str | None = None) -> Received:
        if "ZZBUG" in text:
            raise IndexError("string index out of range")
        return super().read_message(raw, text, charset, note)


def answers_for(tmp_path: Path, payloads: list[bytes]) -> tuple[list[bytes | None], list[tuple[str, str, str]]]:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    pipeline = Pipeline(BrokenOnMarker(Feed(ZoneInfo("UTC")), AckBuilder()), writer, "main")
    answers: list[bytes | None] = [None] * len(payloads)
    done = threading.Semaphore(0)
    for index, payload in enumerate(payloads):

        def keep(answer: bytes | None, index: int = index) -> None:
            answers[index] = answer
            done.release()

        pipeline.handle(payload, "127.0.0.1:1", keep)
    for _ in payloads:
        assert done.acquire(timeout=10)
    writer.stop()
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(select(messages.c.control_id, messages.c.status, messages.c.ack_code))]
    engine.dispose()
    return answers, rows


def test_a_reader_failure_is_answered_ar_and_logged(tmp_path: Path) -> None:
    good = siu("S12", "PF-1", "A-PF-1", "20270105093000")
    broken = siu("S12", "PF-2", "A-PF-2", "20270105093000").replace(b"\rPID|", b"\rZZBUG|1\rPID|")
    after = siu("S12", "PF-3", "A-PF-3", "20270105093000")
    answers, rows = answers_for(tmp_path, [good, broken, after])

    assert b"MSA|AA|PF-1" in answers[0]
    assert b"MSA|AR|PF-2|internal error while reading the message (IndexError)" in answers[1]
    assert b"\rERR|" in answers[1]
    assert b"MSA|AA|PF-3" in answers[2]
    assert rows == [("PF-1", "accepted", "AA"), ("PF-2", "rejected", "AR"), ("PF-3", "accepted", "AA")]
