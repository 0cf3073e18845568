"""One MLLP frame to what must be stored and answered: decode, read, judge, prepare the ACK.

Pure and synchronous (no I/O): the pipeline stores what this returns and sends
the ACK only once the store has committed it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import orjson

from hl7bridge.core.status import MessageStatus
from hl7bridge.hl7 import charsets
from hl7bridge.hl7.ack import Ack, AckBuilder, Outcome, ack_code, now_stamp
from hl7bridge.hl7.er7 import DEFAULT_ENCODING, SEGMENT_SPLIT, Encoding, Er7Error, Er7Message, header_fields
from hl7bridge.hl7.problems import APPLICATION_INTERNAL_ERROR, REQUIRED_FIELD_MISSING, SEGMENT_SEQUENCE_ERROR, Problem
from hl7bridge.hl7.siu import AppointmentEvent, Feed, Header, MessageRejected, read_event
from hl7bridge.mapping.routing import Router
from hl7bridge.store import command_values, search_terms


@dataclass(slots=True)
class Received:
    """One message as judged by intake, ready for the log."""

    raw: bytes
    charset: str
    header: Header | None
    encoding: Encoding
    outcome: Outcome
    status: str
    event: AppointmentEvent | None = None
    problem: Problem | None = None
    ack: Ack | None = None
    note: str | None = None
    text: str = ""
    route: str | None = None
    commands: list[dict] = field(default_factory=list)

    @property
    def dedupe_key(self) -> tuple[str, str, str] | None:
        """(MSH-3, MSH-4, MSH-10) of an accepted message, the key for duplicate detection."""
        if self.header is None or self.outcome is not Outcome.ACCEPT:
            return None
        return (self.header.sender[0], self.header.sender[1], self.header.control_id)

    def row(self, listener: str, peer: str, received_at: float) -> dict:
        h = self.header
        event = self.event
        summary = event.summary() if event else None
        terms, words = search_terms(h.control_id if h else None, h.sender[0] if h else None, h.sender[1] if h else None,
                                    summary)  # fmt: skip
        return {
            "received_at": received_at,
            "listener": listener,
            "peer": peer,
            "raw": self.raw,
            "charset": self.charset,
            "sending_application": h.sender[0] if h else None,
            "sending_facility": h.sender[1] if h else None,
            "control_id": h.control_id if h else None,
            "message_type": h.message_type if h else None,
            "event": h.event if h else None,
            "version": h.version if h else None,
            "appointment_key": event.appointment_key if event else None,
            "action": event.action if event else None,
            "route": self.route,
            "note": self.note,
            "replay_of": None,
            "summary": orjson.dumps(summary).decode() if summary is not None else None,
            "ack_code": self.ack.code if self.ack else None,
            "ack_text": self.ack.text if self.ack else None,
            "ack_raw": self.ack.payload if self.ack else None,
            "status": self.status,
            "error": self.problem.text if self.problem else None,
            "error_location": self.problem.location if self.problem else None,
            "duplicate_of": None,
            "search_terms": terms,
            "search_text": words,
        }


@dataclass(slots=True)
class Frame:
    """What one MLLP frame held: one message, or a batch of them."""

    messages: list[Received]
    batch_header: list[str] = field(default_factory=list)
    batch_charset: str = "ascii"


class Intake:
    def __init__(
        self,
        feed: Feed,
        acks: AckBuilder,
        charset_fallback: tuple[str, ...] = ("utf-8",),
        router: Router | None = None,
        listener: str = "main",
        sync: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.feed = feed
        self.acks = acks
        self.charset_fallback = charset_fallback
        self.router = router
        self.listener = listener
        self.sync = sync
        self.clock = clock
        #: The ``configs`` row of the configuration this intake judges with, recorded with each command.
        self.config_id: int | None = None

    def read_frame(self, raw: bytes) -> Frame:
        decoded = charsets.decode(raw, self.charset_fallback)
        text = decoded.text.lstrip("\r\n\t ")
        if text.startswith(("FHS", "BHS")):
            return self._batch(text, decoded)
        return Frame([self.read_message(raw, decoded.text, decoded.charset, decoded.note)])

    def read_message(self, raw: bytes, text: str, charset: str, note: str | None = None) -> Received:
        try:
            msg = Er7Message.parse(text.lstrip("\r\n\t "), charset, self.feed.limits)
        except Er7Error as exc:
            header = _salvage_header(text)
            problem = Problem(exc.location, exc.code, str(exc), value=exc.value)
            return self._judged(
                raw, charset=charset, header=header, outcome=Outcome.REJECT, problem=problem, note=note, text=text
            )
        header = Header.of(msg)
        if header.message_type == "ACK":
            return Received(raw, charset, header, msg.encoding, Outcome.ACCEPT, MessageStatus.IGNORED,
                            note="an acknowledgment was received; it is logged, never answered", text=text)  # fmt: skip
        refusal = Outcome.REJECT  # a header we cannot answer as asked: AR; past it, an event we cannot take: AE
        try:
            header.check()
            refusal = Outcome.ERROR
            event = read_event(msg, header, self.feed)
        except MessageRejected as exc:
            return self._judged(raw, charset=charset, header=header, encoding=msg.encoding, outcome=refusal,
                                problem=exc.problem, note=note, text=text)  # fmt: skip
        if self.router is not None:
            return self._routed(raw, charset, header, msg, event, note, text)
        received = self._judged(
            raw, charset=charset, header=header, encoding=msg.encoding, outcome=Outcome.ACCEPT, note=note, text=text
        )
        received.event = event
        if event.action == "ignore":
            received.status = MessageStatus.IGNORED
        return received

    def _routed(
        self, raw: bytes, charset: str, header: Header, msg: Er7Message, event: AppointmentEvent,
        note: str | None, text: str,
    ) -> Received:  # fmt: skip
        """Route and map: the commands are stored with the message, in the same transaction."""
        now = self.clock()
        plan = self.router.plan(event, self.listener, self.feed.time_zone, now)
        notes = "; ".join(n for n in (note, plan.note) if n) or None
        refused = plan.problem is not None and not plan.accept_anyway
        received = self._judged(
            raw,
            charset=charset,
            header=header,
            encoding=msg.encoding,
            outcome=Outcome.ERROR if refused else Outcome.ACCEPT,
            problem=plan.problem if refused else None,
            note=notes,
            text=text,
        )
        received.event, received.route = event, plan.route
        if refused:
            return received
        if plan.problem is not None:
            # content_errors = "accept": AA to the sender, kept as rejected for operators to fix and replay.
            received.status = MessageStatus.REJECTED
            received.problem = plan.problem
        elif plan.status == MessageStatus.IGNORED:
            received.status = MessageStatus.IGNORED
        received.commands = [command_values(c, now, sync=self.sync, config_id=self.config_id) for c in plan.commands]
        if self.sync and received.commands:
            # ack_mode "dispatched": not accepted until the API says so (a resend meanwhile is processed anew).
            received.status = MessageStatus.PENDING
        return received

    def _judged(
        self,
        raw: bytes,
        *,
        charset: str,
        header: Header | None = None,
        encoding: Encoding = DEFAULT_ENCODING,
        outcome: Outcome,
        problem: Problem | None = None,
        note: str | None = None,
        text: str,
    ) -> Received:
        status = MessageStatus.ACCEPTED if outcome is Outcome.ACCEPT else MessageStatus.REJECTED
        received = Received(raw, charset, header, encoding, outcome, status, problem=problem, note=note, text=text)
        received.ack = self.answer(received, outcome, problem)
        return received

    def answer(self, received: Received, outcome: Outcome, problem: Problem | None, text: str = "") -> Ack | None:
        """The acknowledgment for an outcome, or None when MSH-15/16 ask for none."""
        code = ack_code(outcome, received.header)
        if code is None:
            return None
        if not text:
            text = "Message accepted" if problem is None else problem.text
        return self.acks.build(code, received.header, received.encoding, text, problem, received.charset)

    def failed_to_store(self, received: Received, reason: str) -> Ack | None:
        """AR/CR: the sender must resend; nothing was committed."""
        problem = Problem("MSH", APPLICATION_INTERNAL_ERROR, f"message not stored ({reason}); please resend")
        received.outcome = Outcome.REJECT
        return self.answer(received, Outcome.REJECT, problem)

    def too_long(self, head: bytes, limit: int) -> Received:
        """AR for a frame over the size limit, answered from its first bytes only."""
        decoded = charsets.decode(head, self.charset_fallback)
        header = _salvage_header(decoded.text)
        problem = Problem("MSH", APPLICATION_INTERNAL_ERROR, f"message exceeds the {limit}-byte limit; discarded")
        return self._judged(
            head,
            charset=decoded.charset,
            header=header,
            outcome=Outcome.REJECT,
            problem=problem,
            note="only the first bytes were kept",
            text=decoded.text,
        )

    def failed_to_read(self, raw: bytes, error: BaseException) -> Received:
        """AR for a frame the reader itself failed on (a bug, not bad input): answered and logged, not dropped
        with the connection and the answers still owed on it."""
        text = raw.decode("latin-1")
        header = _salvage_header(text)
        problem = Problem("MSH", APPLICATION_INTERNAL_ERROR,
                          f"internal error while reading the message ({error.__class__.__name__}); please report it")  # fmt: skip
        return self._judged(
            raw, charset="iso-8859-1", header=header, outcome=Outcome.REJECT, problem=problem, text=text
        )

    def strict_failed(self, received: Received, problem: Problem) -> None:
        received.outcome = Outcome.ERROR
        received.status = MessageStatus.REJECTED
        received.problem = problem
        received.ack = self.answer(received, Outcome.ERROR, problem)

    def _batch(self, text: str, decoded: charsets.Decoded) -> Frame:
        """Each message of the batch read on its own; a batch over the limit is refused whole, as one
        logged row, before any of its messages is read (each one read is held until the batch is answered)."""
        lines = [s for s in SEGMENT_SPLIT.split(text) if s.strip()]
        envelope = [s for s in lines if s[:3] in _ENVELOPE]
        limit = self.feed.limits.batch_messages
        count = sum(1 for line in lines if line.startswith("MSH"))
        if count > limit:
            problem = Problem("BHS", SEGMENT_SEQUENCE_ERROR,
                              f"the batch holds {count} messages, more than the {limit} accepted; send smaller batches")  # fmt: skip
            return Frame([self._batch_refused(text, decoded.charset, problem)], envelope, decoded.charset)
        messages: list[list[str]] = []
        for line in lines:
            if line[:3] in _ENVELOPE:
                continue
            if line.startswith("MSH") or not messages:
                messages.append([])
            messages[-1].append(line)
        out = []
        for segments in messages:
            body = "\r".join(segments) + "\r"
            out.append(self.read_message(body.encode(decoded.charset, errors="replace"), body, decoded.charset))
        if not out:
            problem = Problem("BHS", REQUIRED_FIELD_MISSING, "the batch holds no message")
            out.append(self._batch_refused(text, decoded.charset, problem))
        return Frame(out, envelope, decoded.charset)

    def _batch_refused(self, text: str, charset: str, problem: Problem) -> Received:
        """The whole batch refused, as one logged row."""
        raw = text.encode(charset, errors="replace")
        return self._judged(raw, charset=charset, outcome=Outcome.REJECT, problem=problem, text=text)

    def batch_answer(self, frame: Frame, acks: list[bytes]) -> bytes:
        """Acknowledgments of a batch, wrapped in a batch (and file) envelope of our own."""
        first = frame.batch_header[0] if frame.batch_header else "BHS|^~\\&"
        sep = first[3] if len(first) > 3 else "|"
        msh2 = first[4:].split(sep, 1)[0] if len(first) > 4 else "^~\\&"
        stamp, ctrl = now_stamp(), self.acks.control_id()
        has_file = any(s.startswith("FHS") for s in frame.batch_header)
        lines = [
            sep.join([name, msh2, self.acks.application, self.acks.facility, "", "", stamp, "", "", "", ctrl])
            for name in (("FHS", "BHS") if has_file else ("BHS",))
        ]
        body = "".join(a.decode(frame.batch_charset, errors="replace") for a in acks)
        out = "\r".join(lines) + "\r" + body + sep.join(["BTS", str(len(acks))]) + "\r"
        if has_file:
            out += sep.join(["FTS", "1"]) + "\r"
        return out.encode(frame.batch_charset, errors="replace")


_ENVELOPE = ("FHS", "BHS", "BTS", "FTS")


def _salvage_header(text: str) -> Header | None:
    """Best effort for messages that fail to parse: echo what MSH-10 etc. we can find."""
    head = SEGMENT_SPLIT.split(text.lstrip("\r\n\t "), 1)[0]
    if not head.startswith("MSH") or len(head) < 8:
        return None
    sep = head[3]
    fields = header_fields(head, sep)

    def at(n: int) -> str:
        return fields[n] if n < len(fields) else ""

    comp = at(2)[:1] or "^"
    if comp == sep:
        comp = "^"
    version = at(12).split(comp)[0].strip()
    return Header(
        sending_application=at(3),
        sending_facility=at(4),
        receiving_application=at(5),
        receiving_facility=at(6),
        sent_at="",
        message_type=at(9).split(comp)[0].strip().upper(),
        event="",
        control_id=at(10).strip(),
        processing_id=at(11).split(comp)[0],
        version=version if version.startswith("2.") and len(version) <= 5 else "",
        accept_ack_type=at(15).strip().upper(),
        application_ack_type=at(16).strip().upper(),
        charset_field="",
        sender=(at(3).split(comp)[0], at(4).split(comp)[0]),
    )
