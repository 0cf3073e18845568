"""MLLP framing (``0x0B payload 0x1C 0x0D``), knowing nothing of HL7.

Modelled on Twisted's ``IntNStringReceiver``: a buffer, a ``MAX_LENGTH`` and
one callback per complete frame. A frame over ``MAX_LENGTH`` is not buffered
whole: its head is kept (for the MSH an answer needs) and the rest discarded.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet import protocol

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
HEAD_BYTES = 8192


def frame(payload: bytes) -> bytes:
    return START_BLOCK + payload + END_BLOCK + CARRIAGE_RETURN


class MLLPReceiver(protocol.Protocol):
    """Splits a byte stream into MLLP frames.

    Subclasses implement ``frameReceived`` and may implement ``frameTooLong``,
    ``frameStarted`` and ``junkDiscarded``.
    """

    MAX_LENGTH = 1024 * 1024
    #: Accept ``0x1C`` without the ``0x0D`` that should follow it.
    lenient = True
    #: Frames handed over per call before the rest of the read waits for ``schedule`` (0: no limit).
    frames_per_turn = 0

    _buffer: bytearray
    _inside = False
    _oversized = False
    _held = False
    _expect_cr = False
    junk_bytes = 0
    #: Bytes read but not yet framed: what was left when a turn ended or reading was held.
    _backlog: bytearray | None = None
    _holds: frozenset[str] = frozenset()
    _turn = 0

    def dataReceived(self, data: bytes) -> None:
        if self._backlog is not None:  # an earlier read still has frames waiting: they go first
            self._backlog += data
            return
        self._turn = 0
        self._consume(data)

    def hold(self, reason: str) -> None:
        """Stop reading the socket (and handing over frames) until every reason to hold is released.

        Transports count no pauses, so every reason goes through here: one pause, one resume."""
        if not self._holds and self.transport is not None:
            self.transport.pauseProducing()
        self._holds = self._holds | {reason}

    def release(self, reason: str) -> None:
        if reason not in self._holds:
            return
        self._holds = self._holds - {reason}
        if self._backlog is not None and self._holds == {"backlog"}:
            self.schedule(self._drain)
        if not self._holds and self.transport is not None:
            self.transport.resumeProducing()

    @property
    def backlogged(self) -> bool:
        return self._backlog is not None

    def schedule(self, call: Callable[[], None]) -> None:
        """Run ``call`` on a later turn of the event loop (subclasses with a reactor override this)."""
        call()

    def _yielded(self, view: bytes) -> bool:
        """After a frame was handed over: whether the rest of this read must wait (a turn is used up, or reading
        is held), so that one read of many small frames cannot keep every other connection waiting."""
        self._turn += 1
        held = self._holds - {"backlog"}
        if not view or not (held or (self.frames_per_turn and self._turn >= self.frames_per_turn)):
            return False
        self._backlog = bytearray(view)
        self.hold("backlog")
        if not held:
            self.schedule(self._drain)
        return True

    def _drain(self) -> None:
        if self._backlog is None or self._holds != {"backlog"}:
            return
        data, self._backlog, self._turn = bytes(self._backlog), None, 0
        self._consume(data)
        if self._backlog is None:
            self.release("backlog")
        self.backlogConsumed()

    def _consume(self, data: bytes) -> None:
        if not hasattr(self, "_buffer"):
            self._buffer = bytearray()
        view = data
        while view:
            if self._held:
                # Strict mode: the frame ended a read; its fate depends on the byte after 0x1C.
                self._held = False
                if view[:1] == CARRIAGE_RETURN:
                    view = view[1:]
                    if not self._deliver() or self._yielded(view):
                        return
                else:
                    self._drop()
                continue
            if self._expect_cr:
                self._expect_cr = False
                if view[:1] == CARRIAGE_RETURN:
                    view = view[1:]
                    continue
            if not self._inside:
                start = view.find(START_BLOCK)
                if start < 0:
                    self._junk(len(view))
                    return
                if start:
                    self._junk(start)
                view = view[start + 1 :]
                self._inside = True
                self._oversized = False
                self._buffer.clear()
                self.frameStarted()
                continue
            end = view.find(END_BLOCK)
            restart = view.find(START_BLOCK)
            if 0 <= restart < (end if end >= 0 else len(view)):
                # A new start block before the end: the sender abandoned the frame.
                self._junk(len(self._buffer) + restart + 1)
                self._inside = False
                self._buffer.clear()
                self.frameDropped()
                view = view[restart:]
                continue
            if end < 0:
                self._append(view)
                return
            self._append(view[:end])
            view = view[end + 1 :]
            self._inside = False
            if view[:1] == CARRIAGE_RETURN:
                view = view[1:]
            elif not view:
                if not self.lenient:
                    self._held = True
                    return
                self._expect_cr = True
            elif not self.lenient:
                self._drop()
                continue
            if not self._deliver() or self._yielded(view):
                return

    def _deliver(self) -> bool:
        """Hand over the buffered frame; False once the connection is closing."""
        payload = bytes(self._buffer)
        self._buffer.clear()
        if self._oversized:
            self._oversized = False
            self.frameTooLong(payload)
        else:
            self.frameReceived(payload)
        return not (self.transport is None or getattr(self.transport, "disconnecting", False))

    def _drop(self) -> None:
        """Strict mode: a frame whose 0x1C is not followed by 0x0D is discarded."""
        self._junk(len(self._buffer) + 1)
        self._buffer.clear()
        self._oversized = False
        self.frameDropped()

    def _append(self, chunk: bytes) -> None:
        if self._oversized:
            return
        buf = self._buffer
        if len(buf) + len(chunk) > self.MAX_LENGTH:
            buf += chunk[: max(0, HEAD_BYTES - len(buf))]
            del buf[HEAD_BYTES:]
            self._oversized = True
            return
        buf += chunk

    def _junk(self, count: int) -> None:
        self.junk_bytes += count
        self.junkDiscarded(count)

    @property
    def in_frame(self) -> bool:
        return self._inside

    def frameStarted(self) -> None:
        """A start block arrived (used for the frame timeout)."""

    def frameReceived(self, payload: bytes) -> None:
        raise NotImplementedError

    def frameDropped(self) -> None:
        """A started frame was abandoned (restarted, or refused by strict framing)."""

    def backlogConsumed(self) -> None:
        """Bytes left over from an earlier read were framed (a frame may now be left unfinished)."""

    def frameTooLong(self, head: bytes) -> None:
        """A frame exceeded MAX_LENGTH; ``head`` holds its first bytes."""

    def junkDiscarded(self, count: int) -> None:
        """``count`` bytes outside any frame were dropped."""
