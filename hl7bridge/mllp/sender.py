"""``hl7bridge send``: an MLLP client over any Twisted client endpoint (TCP or TLS)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet import defer, endpoints
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure

from hl7bridge.hl7 import charsets
from hl7bridge.hl7.er7 import SEGMENT_SPLIT, Encoding, Er7Error, Segment, header_fields
from hl7bridge.mllp.framing import MLLPReceiver, frame


@dataclass(frozen=True)
class Reply:
    name: str
    code: str
    text: str
    payload: bytes | None


class _Client(MLLPReceiver):
    MAX_LENGTH = 16 * 1024 * 1024

    def __init__(self) -> None:
        self.waiting: defer.Deferred[bytes] | None = None
        self.closed: defer.Deferred[None] = defer.Deferred()

    def frameReceived(self, payload: bytes) -> None:
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            d.callback(payload)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.waiting is not None:
            d, self.waiting = self.waiting, None
            why = "the server closed the connection before answering"
            if not reason.check(ConnectionDone):
                why = f"the connection failed before an answer: {_describe_failure(reason)}"
            d.errback(ConnectionError(why))
        self.closed.callback(None)


def _describe_failure(reason: Failure) -> str:
    """TLS errors arrive as lists of OpenSSL tuples; name the certificate problem plainly."""
    text = reason.getErrorMessage()
    if "certificate" in text.lower():
        match = re.search(r"'([^']*certificate[^']*)'", text, re.IGNORECASE)
        return f"TLS certificate problem: {match.group(1) if match else text}"
    return text


def parse_ack(payload: bytes) -> tuple[str, str]:
    """(MSA-1, text) of an acknowledgment; a batch answer reports its first non-AA code.

    The text is read by the ER7 reader as HL7 means it (``\\F\\`` is ``|``, ``\\.br\\`` a line break): MSA-3, else
    ERR-8, the only place v2.7+ engines may put it. An operator read the escaped ACK text before."""
    decoded = charsets.decode(payload)
    enc = Encoding()
    answers: list[list[str]] = []  # [MSA-1, text] per answer
    for line in SEGMENT_SPLIT.split(decoded.text):
        name = line[:3]
        if name in ("MSH", "BHS", "FHS") and len(line) > 4:
            try:
                enc = Encoding.from_header(line[3], header_fields(line, line[3])[2])
            except Er7Error:
                enc = Encoding()
        elif name == "MSA" and len(line) > 3:
            segment = Segment(line, enc)
            answers.append([segment.get(1), segment.get(3)])
        elif name == "ERR" and answers and not answers[-1][1]:
            answers[-1][1] = Segment(line, enc).get(8)
    if not answers:
        return "??", "no MSA segment in the answer"
    codes = [(code, text) for code, text in answers]
    bad = [c for c in codes if c[0] not in ("AA", "CA")]
    if len(codes) > 1:
        code, text = bad[0] if bad else codes[0]
        return code, f"batch of {len(codes)}: " + ", ".join(c for c, _ in codes) + (f" ({text})" if bad else "")
    return codes[0]


def fresh_suffix(now: float) -> str:
    """A control-id suffix for one run of ``send --fresh-ids``: the second it started, in base 36 (7 characters
    with the dash, so a 13-character id still fits v2.3's 20)."""
    digits, value = "", int(now)
    while value:
        value, rest = divmod(value, 36)
        digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"[rest] + digits
    return "-" + (digits or "0")


def with_fresh_control_id(payload: bytes, suffix: str) -> bytes:
    """The message (each one of a batch) with ``suffix`` after its MSH-10 control id: a resend of the same file
    is a new message to the receiver, which answers a repeated control id as a duplicate."""
    lines = re.split(rb"(\r\n|\r|\n)", payload)
    for index, line in enumerate(lines):
        if line.startswith(b"MSH") and len(line) > 3:
            fields = line.split(line[3:4])
            if len(fields) > 9:
                fields[9] += suffix.encode("ascii")
                lines[index] = line[3:4].join(fields)
    return b"".join(lines)


def client_endpoint_string(to: str | None, endpoint: str | None, connect_timeout: float) -> str:
    if endpoint:
        return endpoint
    host, _, port = (to or "127.0.0.1:2575").rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--to {to!r}: expected HOST:PORT, e.g. 127.0.0.1:2575")
    host = host.strip("[]")
    return f"tcp:host={host}:port={port}:timeout={int(max(1, connect_timeout))}"


@defer.inlineCallbacks
def send_all(
    reactor: object,
    endpoint_string: str,
    messages: Iterable[tuple[str, bytes]],
    read_timeout: float,
    report: Callable[[Reply], None],
):
    """Send each message in turn, waiting for its answer (an ACK being sent is never answered).

    After a read timeout the connection is replaced, so a late answer cannot be taken for the
    next message's."""
    endpoint = endpoints.clientFromString(reactor, endpoint_string)
    client = None
    replies = []
    try:
        for name, payload in messages:
            if client is None:
                client = yield endpoints.connectProtocol(endpoint, _Client())
            if _is_ack(payload):
                client.transport.write(frame(payload))
                reply = Reply(name, "--", "an acknowledgment; receivers never answer one", None)
                report(reply)
                replies.append(reply)
                continue
            d: defer.Deferred[bytes] = defer.Deferred()
            client.waiting = d
            client.transport.write(frame(payload))
            d.addTimeout(read_timeout, reactor)
            try:
                answer = yield d
            except defer.TimeoutError:
                reply = Reply(name, "--", f"no answer within {read_timeout:g} s", None)
                report(reply)
                replies.append(reply)
                client.waiting = None
                client.transport.loseConnection()
                client = None
                continue
            code, text = parse_ack(answer)
            reply = Reply(name, code, text, answer)
            report(reply)
            replies.append(reply)
    finally:
        if client is not None:
            client.transport.loseConnection()
    return replies


def _is_ack(payload: bytes) -> bool:
    """MSH-9.1 is ACK: what an engine would never expect an answer to."""
    head = payload.lstrip()[:300]
    if not head.startswith(b"MSH") or len(head) < 8:
        return False
    sep = head[3:4]
    fields = head.split(b"\r", 1)[0].split(b"\n", 1)[0].split(sep)
    if len(fields) < 9:
        return False
    comp = fields[1][:1] or b"^"
    return fields[8].split(comp, 1)[0].strip().upper() == b"ACK"
