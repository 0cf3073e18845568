"""MLLPReceiver, the framing class, driven directly over an in-memory transport (no reactor, no sockets)."""

from __future__ import annotations

from twisted.internet.testing import StringTransport

from hl7bridge.mllp.framing import HEAD_BYTES, MLLPReceiver, frame

MSG_A = b"MSH|^~\\&|A|B|C|D|20270101000000||SIU^S12|1|P|2.5.1\rPID|1||111\r"
MSG_B = b"MSH|^~\\&|A|B|C|D|20270101000000||SIU^S13|2|P|2.5.1\rPID|1||222\r"
MSG_C = b"MSH|^~\\&|A|B|C|D|20270101000000||SIU^S14|3|P|2.5.1\rPID|1||333\r"


class Collector(MLLPReceiver):
    """Records every callback so the tests can check exactly what the framing delivered."""

    def __init__(self, max_length: int | None = None, lenient: bool = True) -> None:
        if max_length is not None:
            self.MAX_LENGTH = max_length
        self.lenient = lenient
        self.frames: list[bytes] = []
        self.too_long: list[bytes] = []
        self.started = 0
        self.junk_reports: list[int] = []

    def frameReceived(self, payload: bytes) -> None:
        self.frames.append(payload)

    def frameTooLong(self, head: bytes) -> None:
        self.too_long.append(head)

    def frameStarted(self) -> None:
        self.started += 1

    def junkDiscarded(self, count: int) -> None:
        self.junk_reports.append(count)


def connected(**kwargs: object) -> tuple[Collector, StringTransport]:
    proto = Collector(**kwargs)
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport


def feed_bytewise(proto: MLLPReceiver, data: bytes) -> None:
    for i in range(len(data)):
        proto.dataReceived(data[i : i + 1])


def test_several_frames_in_one_chunk_are_delivered_in_order() -> None:
    proto, _ = connected()
    proto.dataReceived(frame(MSG_A) + frame(MSG_B) + frame(MSG_C))
    assert proto.frames == [MSG_A, MSG_B, MSG_C]
    assert proto.started == 3
    assert proto.junk_bytes == 0
    assert not proto.in_frame


def test_one_frame_split_byte_by_byte_is_delivered_once_and_whole() -> None:
    proto, _ = connected()
    data = frame(MSG_A) + frame(MSG_B)
    feed_bytewise(proto, data[: len(frame(MSG_A)) - 2])
    assert proto.frames == []
    assert proto.in_frame
    feed_bytewise(proto, data[len(frame(MSG_A)) - 2 :])
    assert proto.frames == [MSG_A, MSG_B]
    assert proto.junk_bytes == 0
    assert proto.junk_reports == []


def test_junk_before_the_start_block_is_counted_and_dropped() -> None:
    proto, _ = connected()
    proto.dataReceived(b"\r\nhello ")
    assert proto.junk_bytes == 8
    proto.dataReceived(b"xx" + frame(MSG_A) + b"trailing" + frame(MSG_B))
    assert proto.frames == [MSG_A, MSG_B]
    assert proto.junk_bytes == 8 + 2 + len(b"trailing")
    assert sum(proto.junk_reports) == proto.junk_bytes


def test_lenient_missing_cr_delivers_at_once_and_a_late_cr_is_not_junk() -> None:
    proto, _ = connected(lenient=True)
    proto.dataReceived(b"\x0b" + MSG_A + b"\x1c")
    # Delivered without waiting for the 0x0D that may never come.
    assert proto.frames == [MSG_A]
    proto.dataReceived(b"\x0d")
    assert proto.junk_bytes == 0
    # 0x1C directly followed by the next frame's start block: also accepted.
    proto.dataReceived(b"\x0b" + MSG_B + b"\x1c" + frame(MSG_C))
    assert proto.frames == [MSG_A, MSG_B, MSG_C]
    assert proto.junk_bytes == 0


def test_strict_mode_drops_a_frame_whose_end_block_lacks_cr() -> None:
    proto, _ = connected(lenient=False)
    proto.dataReceived(b"\x0b" + MSG_A + b"\x1cX" + frame(MSG_B))
    assert proto.frames == [MSG_B]
    assert proto.junk_bytes > len(MSG_A)
    assert proto.too_long == []


def test_strict_mode_drops_a_frame_lacking_cr_even_when_split_after_the_end_block() -> None:
    proto, _ = connected(lenient=False)
    proto.dataReceived(b"\x0b" + MSG_A + b"\x1c")
    proto.dataReceived(b"X" + frame(MSG_B))
    assert proto.frames == [MSG_B]


def test_frame_over_max_length_reports_its_head_once_and_never_buffers_more() -> None:
    limit = 4 * HEAD_BYTES
    proto, _ = connected(max_length=limit)
    big = b"MSH|^~\\&|A|B|C|D|20270101000000||SIU^S12|BIG|P|2.5.1\r" + b"NTE|1||" + b"x" * (limit * 3) + b"\r"
    data = frame(big)
    largest_after_overflow = 0
    for start in range(0, len(data), 1000):
        proto.dataReceived(data[start : start + 1000])
        if proto.too_long or proto._oversized:
            largest_after_overflow = max(largest_after_overflow, len(proto._buffer))
        # Never more than a normal frame may hold, and only the head once it overflowed.
        assert len(proto._buffer) <= limit
    assert largest_after_overflow <= HEAD_BYTES
    assert proto.frames == []
    assert len(proto.too_long) == 1
    head = proto.too_long[0]
    assert 0 < len(head) <= HEAD_BYTES
    assert big.startswith(head)
    # The next frame on the same stream is unaffected.
    proto.dataReceived(frame(MSG_A))
    assert proto.frames == [MSG_A]
    assert len(proto.too_long) == 1


def test_frame_over_a_small_max_length_in_one_chunk_keeps_at_most_head_bytes() -> None:
    proto, _ = connected(max_length=1024)
    big = MSG_A + b"NTE|1||" + b"y" * 50_000 + b"\r"
    proto.dataReceived(frame(big) + frame(MSG_B))
    assert len(proto.too_long) == 1
    assert len(proto.too_long[0]) <= HEAD_BYTES
    assert proto.too_long[0].startswith(MSG_A)
    assert proto.frames == [MSG_B]


def test_a_start_block_inside_an_unterminated_frame_restarts_the_frame() -> None:
    proto, _ = connected()
    abandoned = b"MSH|^~\\&|partial"
    proto.dataReceived(b"\x0b" + abandoned)
    assert proto.in_frame
    proto.dataReceived(frame(MSG_A))
    assert proto.frames == [MSG_A]
    assert proto.started == 2
    # The abandoned bytes and their start block are junk, not part of the delivered frame.
    assert proto.junk_bytes == len(abandoned) + 1
    # Same thing within a single chunk.
    proto.dataReceived(b"\x0b" + abandoned + frame(MSG_B))
    assert proto.frames == [MSG_A, MSG_B]
    assert proto.junk_bytes == 2 * (len(abandoned) + 1)


def test_delivery_stops_once_the_transport_is_disconnecting() -> None:
    class Closer(Collector):
        def frameReceived(self, payload: bytes) -> None:
            super().frameReceived(payload)
            self.transport.loseConnection()

    proto = Closer()
    transport = StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(frame(MSG_A) + frame(MSG_B))
    assert proto.frames == [MSG_A]
    assert transport.disconnecting


class Turns(Collector):
    """Hands over at most two frames per turn; the turns are run by the test."""

    frames_per_turn = 2

    def __init__(self) -> None:
        super().__init__()
        self.turns: list = []

    def schedule(self, call) -> None:
        self.turns.append(call)

    def backlogConsumed(self) -> None:
        self.turns.append("consumed")


def test_one_read_of_many_frames_is_handed_over_a_few_per_turn_in_order() -> None:
    """One read of 64 KiB can hold 21,000 empty frames: handed over all at once, they kept every other connection
    waiting (1.9 s). The rest of the read waits for a later turn, reading is paused meanwhile, and bytes that
    still arrive go after it."""
    proto, transport = Turns(), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(frame(MSG_A) + frame(MSG_B) + frame(MSG_C) + frame(MSG_A))
    assert proto.frames == [MSG_A, MSG_B] and transport.producerState == "paused" and len(proto.turns) == 1
    proto.dataReceived(frame(MSG_B))  # arrived before the pause took effect: it queues behind the rest
    assert proto.frames == [MSG_A, MSG_B]
    proto.turns.pop(0)()
    assert proto.frames == [MSG_A, MSG_B, MSG_C, MSG_A] and proto.turns[1:] == ["consumed"]
    proto.turns.pop(0)()
    assert proto.frames == [MSG_A, MSG_B, MSG_C, MSG_A, MSG_B]
    assert proto.turns == ["consumed", "consumed"] and not proto.backlogged
    assert transport.producerState == "producing"


def test_a_backlog_that_ends_inside_a_frame_says_so() -> None:
    """The listener starts its frame timer from a read that leaves a frame unfinished; the rest of a read that
    waited for its turn is such a read too (else a frame that never ends after a flood would never time out)."""
    proto, transport = Turns(), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(frame(MSG_A) + frame(MSG_B) + frame(MSG_C) + frame(MSG_A)[:10])
    proto.turns.pop(0)()
    assert proto.frames == [MSG_A, MSG_B, MSG_C] and proto.turns == ["consumed"] and proto.in_frame


def test_a_hold_stops_the_handing_over_until_released() -> None:
    """A connection with too many answers owed holds reading; the frames already read wait with it."""

    class Holding(Collector):
        def frameReceived(self, payload: bytes) -> None:
            super().frameReceived(payload)
            self.hold("in_flight")

    proto, transport = Holding(), StringTransport()
    proto.makeConnection(transport)
    proto.dataReceived(frame(MSG_A) + frame(MSG_B) + frame(MSG_C))
    assert proto.frames == [MSG_A] and proto.backlogged and transport.producerState == "paused"
    proto.release("in_flight")  # the default schedule runs the rest at once; each frame holds again
    assert proto.frames == [MSG_A, MSG_B] and transport.producerState == "paused"
    proto.release("in_flight")
    proto.release("in_flight")
    assert proto.frames == [MSG_A, MSG_B, MSG_C] and not proto.backlogged
    proto.release("in_flight")
    assert transport.producerState == "producing"
