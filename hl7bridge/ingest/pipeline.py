"""Frame in, acknowledgment out: intake judges, the store commits, and only then is the answer released."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from twisted.internet import defer, threads
from twisted.python.failure import Failure

from hl7bridge import store
from hl7bridge.core.answers import CLOSE, Answer, Close
from hl7bridge.core.observer import NullObserver, Observer
from hl7bridge.core.status import SUCCEEDED, CommandStatus, MessageStatus
from hl7bridge.hl7 import strict
from hl7bridge.hl7.ack import Outcome
from hl7bridge.hl7.problems import APPLICATION_INTERNAL_ERROR, Problem
from hl7bridge.ingest.intake import Frame, Intake, Received
from hl7bridge.store import CommandUpdate, Job, Writer, WriteRequest, WriteResult

log = logging.getLogger("hl7bridge.pipeline")


class Verdicts(Protocol):
    """Where ``ack_mode = "dispatched"`` learns the API's verdict (the dispatcher)."""

    def wait_for(self, command_id: int, callback: Callable[[CommandUpdate], None]) -> None: ...

    def forget(self, command_id: int) -> None: ...


Reply = Callable[[Answer], None]
"""Takes the bytes to send back for one frame (None: send nothing; ``CLOSE``: nothing, and close the connection);
called once, on the reactor thread."""

READ_IN_THREAD_BYTES = 64 * 1024
"""Frames from this size on are read in the thread pool. Reading is linear in the size, but a crafted
1 MiB frame still costs a few hundred milliseconds that every other connection would wait for; a
normal message (1-4 KB) is read faster than a hop to a thread and back."""


class Pipeline:
    """Runs on the reactor thread; blocking work goes to the writer thread or the thread pool.

    Answers travel as plain callbacks rather than Deferreds: a message's way through here runs thousands
    of times a second on the thread that also reads every socket, and a Deferred chain per message cost
    several percent of it. Deferreds remain where they pay their way (strict validation, verdicts)."""

    def __init__(
        self,
        intake: Intake,
        writer: Writer,
        listener: str,
        *,
        strict_validation: bool = False,
        clock: Callable[[], float] = time.time,
        verdicts: Verdicts | None = None,
        reactor: Any = None,
        dispatch_timeout: float = 20.0,
        observer: Observer | None = None,
        read_in_thread_bytes: int = READ_IN_THREAD_BYTES,
    ) -> None:
        self.intake = intake
        self.writer = writer
        self.listener = listener
        self.strict_validation = strict_validation
        self.clock = clock
        self.verdicts = verdicts
        self.reactor = reactor
        self.dispatch_timeout = dispatch_timeout
        self.observer = observer or NullObserver()
        self.read_in_thread_bytes = read_in_thread_bytes
        #: Per peer with a frame being read in the thread pool: the frames that came after it, in order.
        self._behind: dict[str, deque[tuple[Callable[[], Frame], Reply, bool]]] = {}

    def handle(self, payload: bytes, peer: str, reply: Reply) -> None:
        """Judge one frame, store it, and reply once the store has committed."""
        self._in_order(peer, partial(self._read, payload, peer), reply, len(payload) >= self.read_in_thread_bytes)

    def too_long(self, head: bytes, limit: int, peer: str, reply: Reply) -> None:
        self._in_order(peer, lambda: Frame([self.intake.too_long(head, limit)]), reply, False)

    def _read(self, payload: bytes, peer: str) -> Frame:
        try:
            return self.intake.read_frame(payload)
        except Exception as exc:  # a reader bug must cost one AR, not the connection
            log.error("internal error while reading a frame from %s: %s (answered AR, logged)", peer,
                      exc.__class__.__name__)  # fmt: skip
            log.debug("reader failure", exc_info=True)
            return Frame([self.intake.failed_to_read(payload, exc)])

    def _in_order(self, peer: str, read: Callable[[], Frame], reply: Reply, in_thread: bool) -> None:
        """Read a frame (a large one in the thread pool) and hand it to the writer after the peer's earlier
        frames: the log's order, and so which of two equal messages is the original, stays arrival order."""
        behind = self._behind.get(peer)
        if behind is not None:
            behind.append((read, reply, in_thread))
        elif not in_thread:
            self._answer(read(), peer, reply)
        else:
            self._behind[peer] = deque()
            d = threads.deferToThread(read)
            d.addErrback(lambda failure: Frame([self.intake.failed_to_read(b"", failure.value)]))
            d.addCallback(self._read_in_thread, peer, reply)

    def _read_in_thread(self, frame: Frame, peer: str, reply: Reply) -> None:
        self._answer(frame, peer, reply)
        for read, later_reply, in_thread in self._behind.pop(peer):
            self._in_order(peer, read, later_reply, in_thread)

    def _answer(self, frame: Frame, peer: str, reply: Reply) -> None:
        try:
            self._store_frame(frame, peer, reply)
        except Exception:  # noqa: BLE001 - a bug past the reader: no answer rather than a stuck connection
            self._failed(Failure(), peer, reply)

    def _store_frame(self, frame: Frame, peer: str, reply: Reply) -> None:
        received_at = self.clock()
        if not frame.batch_header:
            self._process(frame.messages[0], peer, received_at, reply)
            return
        answers: list[Answer] = [None] * len(frame.messages)
        waiting = [len(frame.messages)]

        def answered(index: int, answer: Answer) -> None:
            answers[index] = answer
            waiting[0] -= 1
            if not waiting[0]:
                done = [a for a in answers if isinstance(a, bytes)]
                reply(CLOSE if CLOSE in answers else self.intake.batch_answer(frame, done))

        for index, received in enumerate(frame.messages):
            self._process(received, peer, received_at, partial(answered, index))

    def _process(self, received: Received, peer: str, received_at: float, reply: Reply) -> None:
        if self.strict_validation and received.outcome is Outcome.ACCEPT and received.event is not None:
            d = threads.deferToThread(strict.validate, received.text)

            def checked(problem: strict.Problem | None) -> None:
                if problem is not None:
                    self.intake.strict_failed(received, problem)
                self._store(received, peer, received_at, reply)

            d.addCallback(checked).addErrback(self._failed, peer, reply)
            return
        self._store(received, peer, received_at, reply)

    def _store(self, received: Received, peer: str, received_at: float, reply: Reply) -> None:
        row = received.row(self.listener, peer, received_at)

        def stored(result: WriteResult) -> None:
            try:
                answer = self._released(result, received)
                if isinstance(answer, defer.Deferred):
                    answer.addCallback(self._report, received, peer).addCallbacks(reply, self._failed,
                                                                                  errbackArgs=(peer, reply))  # fmt: skip
                    return
                answer = self._report(answer, received, peer)
            except Exception:  # noqa: BLE001 - whatever failed, the connection's later answers must not wait
                self._failed(Failure(), peer, reply)
                return
            reply(answer)

        self.writer.submit(WriteRequest(row, received.dedupe_key, stored, received.commands))

    def _failed(self, failure: Failure, peer: str, reply: Reply) -> None:
        """A bug past the reader: logged, and the sender gets no answer (it resends) instead of a stuck queue."""
        log.error("internal error while handling a frame from %s: %s", peer, failure.getErrorMessage())
        log.debug("%s", failure.getTraceback())
        reply(None)

    def _report(self, answer: Answer, received: Received, peer: str) -> Answer:
        """One metric and one log line per message; the line names ids, never patient data."""
        header = received.header
        if isinstance(answer, Close):
            self.observer.commit_unknown(self.listener)
            log.warning("%s from %s left unanswered and its connection closed: the database connection was lost "
                        "during its COMMIT, so it may or may not be logged; its resend will be deduplicated",
                        f"{header.message_type}^{header.event}" if header else "a message", peer,
                        extra={"control_id": header.control_id if header else None, "listener": self.listener})  # fmt: skip
            return answer
        code = _msa_code(answer)
        self.observer.message(
            self.listener, header.event if header else "", code, received.status == MessageStatus.DUPLICATE
        )
        level = logging.DEBUG if code in ("AA", "CA") or code == "" else logging.INFO
        if log.isEnabledFor(level):
            kind = f"{header.message_type}^{header.event}" if header else "unreadable"
            why = f": {received.problem.describe()}" if received.problem else ""
            log.log(level, "%s from %s answered %s (%s)%s", kind, peer, code or "nothing", received.status, why,
                    extra={"control_id": header.control_id if header else None, "listener": self.listener})  # fmt: skip
        return answer

    def _released(self, result: WriteResult, received: Received) -> Answer | defer.Deferred[bytes | None]:
        if received.ack is None:
            return None
        if result.outcome_unknown:
            return CLOSE
        if result.error is not None:
            ack = self.intake.failed_to_store(received, "the message log could not be written")
            return ack.payload if ack else None
        if result.duplicate_of is not None:
            received.status = MessageStatus.DUPLICATE
            log.info("duplicate of message %s; original ACK resent", result.duplicate_of,
                     extra={"message_id": result.message_id, "control_id": received.header.control_id})  # fmt: skip
            return result.original_ack
        if self.verdicts is not None and result.command_ids:
            return self._await_verdicts(result, received)
        return received.ack.payload

    def _await_verdicts(self, result: WriteResult, received: Received) -> defer.Deferred[bytes | None]:
        """ack_mode = "dispatched": AA once the API accepted, AE with its messages otherwise."""
        waits = []
        for command_id in result.command_ids:
            d: defer.Deferred[CommandUpdate] = defer.Deferred()
            self.verdicts.wait_for(command_id, lambda update, d=d: self.reactor.callFromThread(_fire, d, update))
            d.addTimeout(self.dispatch_timeout, self.reactor, onTimeoutCancel=self._timed_out(command_id))
            waits.append(d)
        gathered = defer.gatherResults(waits, consumeErrors=True)
        return gathered.addCallback(self._verdict, result, received)

    def _timed_out(self, command_id: int) -> Callable[[Any, float], CommandUpdate]:
        def on_timeout(_result: Any, timeout: float) -> CommandUpdate:
            self.verdicts.forget(command_id)
            return CommandUpdate(
                command_id, CommandStatus.FAILED, f"the Journeys API gave no verdict within {timeout:g} s"
            )

        return on_timeout

    def _verdict(
        self, updates: list[CommandUpdate], result: WriteResult, received: Received
    ) -> defer.Deferred[bytes | None]:
        """The ACK actually sent is committed to the log before it leaves (a resend then gets the same)."""
        failed = [u for u in updates if u.status not in SUCCEEDED]
        if not failed:
            ack, status, error = received.ack, MessageStatus.ACCEPTED, None
        else:
            text = "; ".join(u.outcome for u in failed)
            problem = Problem("MSH", APPLICATION_INTERNAL_ERROR, f"not delivered to the Journeys API: {text}")
            ack, status, error = (
                self.intake.answer(received, Outcome.ERROR, problem),
                MessageStatus.REJECTED,
                problem.text,
            )
        received.status = status
        if ack is None:
            return defer.succeed(None)
        message_id = result.message_id
        recorded: defer.Deferred[bytes | None] = defer.Deferred()

        def committed(_result: Any, failure: BaseException | None) -> None:
            if failure is not None:
                log.error("could not record the ACK sent: %s", failure, extra={"message_id": message_id})
            self.reactor.callFromThread(_fire, recorded, ack.payload)

        self.writer.submit_job(Job(lambda conn: store.record_ack(conn, message_id, ack, status, error), committed))
        return recorded


def _msa_code(answer: bytes | None) -> str:
    """MSA-1 of an answer we built ('' for none); for a batch answer, the first one."""
    if not answer:
        return ""
    at = answer.find(b"MSA")
    return answer[at + 4 : at + 6].decode("ascii", "replace") if at >= 0 else ""


def _fire(d: defer.Deferred, value: Any) -> None:
    if not d.called:
        d.callback(value)
