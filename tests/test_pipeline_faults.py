"""A bug in the reader costs one AR, never the connection: the frame is answered and logged. A bug past the
reader costs that frame its answer (the sender resends), never the answers owed after it.

The fuzzer once found such a bug (a header cut short raised IndexError, and the connection was dropped with
the answers still owed on it). The reader is real here; one frame is made to hit an injected failure, since
no known input reaches one any more. Real writer, real SQLite file.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.hl7.siu import AppointmentEvent, Feed
from hl7bridge.ingest.intake import Intake, Received
from hl7bridge.ingest.pipeline import Pipeline
from hl7bridge.store import Writer, open_engine
from hl7bridge.store.schema import messages

from .dispatch_support import siu


class BrokenOnMarker(Intake):
    """The real reader, except that it fails the way a bug would on messages carrying ``ZZBUG``."""

    def read_message(self, raw: bytes, text: str, charset: str, note: str | None = None) -> Received:
        if "ZZBUG" in text:
            raise IndexError("string index out of range")
        return super().read_message(raw, text, charset, note)


def answers_for(
    tmp_path: Path, payloads: list[bytes], intake: type[Intake] = BrokenOnMarker
) -> tuple[list[bytes | None], list[tuple[str, str, str]]]:
    engine = open_engine(f"sqlite:///{tmp_path / 'log.db'}")
    writer = Writer(engine, lambda fn, *args: fn(*args))
    writer.start()
    pipeline = Pipeline(intake(Feed(ZoneInfo("UTC")), AckBuilder()), writer, "main")
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


class EventWithBrokenSummary(AppointmentEvent):
    __slots__ = ()

    def summary(self) -> dict:
        raise KeyError("start")


class BrokenPastTheReader(Intake):
    """The real reader; messages carrying ``ZZR|ROW`` then fail while their log row is built."""

    def read_message(self, raw: bytes, text: str, charset: str, note: str | None = None) -> Received:
        received = super().read_message(raw, text, charset, note)
        if "ZZR|ROW" in text and received.event is not None:
            received.event.__class__ = EventWithBrokenSummary
        return received


def test_a_failure_past_the_reader_costs_that_frame_its_answer_not_the_later_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = siu("S12", "PF-4", "A-PF-4", "20270105093000")
    broken = siu("S12", "PF-5", "A-PF-5", "20270105093000").replace(b"\rPID|", b"\rZZR|ROW\rPID|")
    after = siu("S12", "PF-6", "A-PF-6", "20270105093000")
    with caplog.at_level(logging.ERROR, logger="hl7bridge.pipeline"):
        answers, rows = answers_for(tmp_path, [good, broken, after], BrokenPastTheReader)

    assert b"MSA|AA|PF-4" in answers[0]
    assert answers[1] is None  # not stored, so not acknowledged: the sender resends it
    assert b"MSA|AA|PF-6" in answers[2]
    assert rows == [("PF-4", "accepted", "AA"), ("PF-6", "accepted", "AA")]
    assert "internal error while handling a frame from 127.0.0.1:1: 'start'" in caplog.text
