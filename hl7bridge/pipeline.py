"""Frame in, acknowledgment out: intake judges, the store commits, and only then is the answer released."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from twisted.internet import defer, threads

from . import strict
from .ack import Outcome
from .intake import Frame, Intake, Received
from .store import Writer, WriteRequest, WriteResult

log = logging.getLogger("hl7bridge.pipeline")


class Pipeline:
    """Runs on the reactor thread; blocking work goes to the writer thread or the thread pool."""

    def __init__(
        self,
        intake: Intake,
        writer: Writer,
        listener: str,
        strict_validation: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.intake = intake
        self.writer = writer
        self.listener = listener
        self.strict_validation = strict_validation
        self.clock = clock

    def handle(self, payload: bytes, peer: str) -> defer.Deferred[bytes | None]:
        """The bytes to send back for one frame (None: send nothing)."""
        frame = self.intake.read_frame(payload)
        return self._answer(frame, peer)

    def too_long(self, head: bytes, limit: int, peer: str) -> defer.Deferred[bytes | None]:
        return self._answer(Frame([self.intake.too_long(head, limit)]), peer)

    def _answer(self, frame: Frame, peer: str) -> defer.Deferred[bytes | None]:
        received_at = self.clock()
        pending = [self._process(r, peer, received_at) for r in frame.messages]
        if not frame.batch_header:
            return pending[0]
        gathered = defer.gatherResults(pending, consumeErrors=True)
        return gathered.addCallback(lambda acks: self.intake.batch_answer(frame, [a for a in acks if a]))

    def _process(self, received: Received, peer: str, received_at: float) -> defer.Deferred[bytes | None]:
        if self.strict_validation and received.outcome is Outcome.ACCEPT and received.event is not None:
            d = threads.deferToThread(strict.validate, received.text)

            def checked(problem: strict.Problem | None) -> defer.Deferred[bytes | None]:
                if problem is not None:
                    self.intake.strict_failed(received, problem)
                return self._store(received, peer, received_at)

            return d.addCallback(checked)
        return self._store(received, peer, received_at)

    def _store(self, received: Received, peer: str, received_at: float) -> defer.Deferred[bytes | None]:
        d: defer.Deferred[WriteResult] = defer.Deferred()
        row = received.row(self.listener, peer, received_at)
        self.writer.submit(WriteRequest(row, received.dedupe_key, d.callback))
        return d.addCallback(self._released, received)

    def _released(self, result: WriteResult, received: Received) -> bytes | None:
        if received.ack is None:
            return None
        if result.error is not None:
            ack = self.intake.failed_to_store(received, "the message log could not be written")
            return ack.payload if ack else None
        if result.duplicate_of is not None:
            log.info("message %s is a duplicate of %s; original ACK resent", result.message_id, result.duplicate_of)
            return result.original_ack
        return received.ack.payload
