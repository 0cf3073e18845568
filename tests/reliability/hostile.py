"""A seeded generator of hostile MLLP input: what it sends and what the framing rules say must come back.

Each ``Item`` is bytes for the wire and what the service owes for them: one answer (``answer`` set: "AA",
"NAK" for AR/AE/CR/CE, or "ANY") or nothing (junk outside frames, an abandoned frame, an incoming ACK).
A valid message carries its control id, which the answer must echo.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from tests.dispatch_support import siu

START, END, CR = b"\x0b", b"\x1c", b"\r"
ANY, AA, NAK = "ANY", "AA", "NAK"


@dataclass
class Item:
    kind: str
    data: bytes
    answer: str | None  # None: no answer is owed
    control: str | None = None  # the MSA-2 the answer must carry
    appointment: str | None = None  # a valid booking: a journey must start
    malformed: bool = True


def trips_short_header_bug(payload: bytes) -> bool:
    """Whether a frame would have reached the IndexError that charsets.declared_charset raised before 0f8d2ee (an
    "MSH" followed by CR or LF within its first four characters, anywhere in a frame of 8 bytes or more). The
    fuzzer draws such frames like any other; a regression test sends three on purpose."""
    start = payload.find(b"MSH")
    if start < 0 or len(payload) < start + 8:
        return False
    ends = [p for p in (payload.find(b"\r", start), payload.find(b"\n", start)) if p >= 0]
    return (min(ends) if ends else len(payload)) - start < 4


def may_stay_silent(payload: bytes) -> bool:
    """Whether MSH-15/MSH-16, read as the service reads them, may legitimately suppress the answer (HL7 table 0155:
    NE, or ER/SU depending on the outcome). Any other value, garbage included, must be answered."""
    text = payload.decode("latin-1").lstrip("\r\n\t ")
    if text.startswith(("FHS", "BHS")):
        return False
    head = re.split(r"\r\n|\r|\n", text, maxsplit=1)[0]
    if not head.startswith("MSH") or len(head) < 4:
        return False
    fields = head.split(head[3])
    rep = fields[1][1:2] if len(fields) > 1 and len(fields[1]) > 1 else "~"

    def readings(n: int) -> set[str]:
        raw = fields[n] if len(fields) > n else ""
        return {raw.strip().upper(), raw.split(rep)[0].strip().upper() if rep else raw.strip().upper()}

    accept, application = readings(14), readings(15)
    if accept == {""} and application == {""}:
        return False
    quiet = {"NE", "ER", "SU"}
    return bool(accept & quiet) and bool(application & (quiet | {""}))


def framed(payload: bytes) -> bytes:
    return START + payload + END + CR


def noise(rng: random.Random, size: int, forbid: bytes = START + END) -> bytes:
    """Random bytes without the MLLP block characters."""
    out = bytearray(rng.getrandbits(8) for _ in range(size))
    for i, b in enumerate(out):
        if b in forbid:
            out[i] = 0x20
    return bytes(out)


class Hostile:
    """Hostile frames for one connection; ``start`` at ``future`` days keeps valid bookings in the future."""

    def __init__(self, seed: int, prefix: str, start: str, max_bytes: int) -> None:
        self.rng = random.Random(seed)
        self.prefix = prefix
        self.start = start
        self.max_bytes = max_bytes
        self.n = 0
        self.redrawn: Counter = Counter()

    def control(self) -> str:
        self.n += 1
        return f"{self.prefix}-{self.n}"

    def valid(self, event: str = "S23") -> tuple[bytes, str]:
        control = self.control()
        return siu(event, control, f"{self.prefix}-SLOT{self.n}", self.start), control

    # -- one item of each kind ---------------------------------------------------------------------------
    def item(self) -> Item:
        """One item; frames whose MSH-15/16 may legitimately ask for no answer are drawn again."""
        for _ in range(100):
            item = self._draw()
            complete = item.data.startswith(START) and item.data.endswith(END + CR)
            if complete and may_stay_silent(item.data[1:-2]):
                self.redrawn["MSH-15/16 may ask for no answer"] += 1
            else:
                return item
        raise AssertionError("the generator keeps drawing frames that may ask for no answer")

    def _draw(self) -> Item:
        kinds = (
            (self.valid_item, 8), (self.valid_booking, 1), (self.random_frame, 14), (self.broken_msh, 16),
            (self.wrong_delimiters, 10), (self.mutated, 14), (self.huge, 3), (self.pathological, 6),
            (self.junk, 6), (self.abandoned, 6), (self.incoming_ack, 4), (self.batch, 3), (self.empty, 2),
            (self.binary_msh, 4),
        )  # fmt: skip
        make = self.rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
        return make()

    def valid_item(self) -> Item:
        payload, control = self.valid()
        return Item("valid", framed(payload), AA, control, malformed=False)

    def valid_booking(self) -> Item:
        control = self.control()
        appointment = f"{self.prefix}-BOOK{self.n}"
        payload = siu("S12", control, appointment, self.start)
        return Item("valid booking", framed(payload), AA, control, appointment, malformed=False)

    def random_frame(self) -> Item:
        size = self.rng.choice([1, 2, 3, 8, 40, 200, 1000, 4000])
        data = noise(self.rng, self.rng.randint(1, size))
        while data.lstrip(b"\r\n\t ").startswith((b"MSH", b"FHS", b"BHS")):
            data = noise(self.rng, len(data))
        return Item("random bytes", framed(data), NAK)

    def empty(self) -> Item:
        return Item("empty frame", framed(self.rng.choice([b"", b"\r", b"\r\n\r\n", b"   "])), NAK)

    def broken_msh(self) -> Item:
        payload, control = self.valid()
        text = payload.decode()
        msh, rest = text.split("\r", 1)
        fields = msh.split("|")
        variant = self.rng.randrange(11)
        echo = control
        if variant == 0:
            msh = "|".join(fields[: self.rng.randint(1, 8)])  # cut short: no MSH-9/10/12
            echo = None
        elif variant == 1:
            fields[8] = self.rng.choice(["ADT^A01", "ORM^O01", "SIU", "ACKX^S12", "^S12"])
            msh = "|".join(fields)
        elif variant == 2:
            fields[11] = self.rng.choice(["9.9", "", "2.1", "3.0", "2.5.1.9.9", "v2"])
            msh = "|".join(fields)
        elif variant == 3:
            fields[9] = ""
            msh = "|".join(fields)
            echo = None
        elif variant == 4:
            msh = self.rng.choice(["msh", "MHS", "MS", "XSH", "MSX", "M\x00H"]) + msh[3:]
            echo = None
        elif variant == 5:
            fields[8] = "SIU^" + self.rng.choice(["X12", "", "S", "12", "S1^", "A01"])
            msh = "|".join(fields)
        elif variant == 6:
            msh = self.rng.choice(["MSH", "MSH|", "MSH|^~\\&", "MSH|^~\\&|", "MSH||||||||||||"])
            echo = None
        elif variant == 7:
            fields[8] = ""
            msh = "|".join(fields)
        elif variant == 8:
            rest = ""  # the header alone, no SCH/PID: a booking without its segments
            fields[8] = "SIU^S12^SIU_S12"
            msh = "|".join(fields)
            return Item("broken MSH", framed((msh + "\r").encode()), NAK, control)
        elif variant == 9:
            fields[11] = "2." + "9" * self.rng.randint(1, 300)
            msh = "|".join(fields)
        else:
            fields[9] = control + "C" * self.rng.randint(200, 8000)  # past MSH-10's 199: refused, not echoed
            msh = "|".join(fields)
            echo = None
        return Item("broken MSH", framed((msh + "\r" + rest).encode()), NAK, echo)

    def binary_msh(self) -> Item:
        """An MSH whose separators are control characters, NULs or multi-byte characters."""
        sep = self.rng.choice(["\x00", "\x01", "\x7f", "\xe9", "€", "\t", " ", "\n", "\x1b", "M"])
        enc = self.rng.choice(["^~\\&", "", "^", "\x00\x00\x00\x00", sep * 4, "^~\\&#"])
        body = sep.join(["MSH", enc, "EPIC", "MAIN", "B", "X", "20270101", "", "SIU^S23", self.control(), "P", "2.5"])
        return Item("binary MSH", framed(body.encode("utf-8", "surrogatepass") + CR), ANY)

    def wrong_delimiters(self) -> Item:
        payload, control = self.valid()
        text = payload.decode()
        variant = self.rng.randrange(6)
        if variant == 0:
            text = text.replace("\r", "\n")
        elif variant == 1:
            text = text.replace("\r", "\r\n")
        elif variant == 2:
            text = text.replace("|", "#")  # a consistent custom separator
        elif variant == 3:
            head, rest = text.split("\r", 1)
            text = head + "\r" + rest.replace("|", "#")  # MSH says | but the segments use #
        elif variant == 4:
            text = text.replace("^", "|").replace("MSH|||", "MSH|^~\\&|", 1)
        else:
            text = text.replace("MSH|^~\\&", "MSH|" + self.rng.choice(["^^^^", "||||", "~", "^~\\&^~\\&", "\\\\"]), 1)
        return Item("wrong delimiters", framed(text.encode()), ANY, control)

    def mutated(self) -> Item:
        """A valid message with random bytes changed after the MSH (the header stays readable)."""
        payload, control = self.valid(self.rng.choice(["S12", "S13", "S15", "S23"]))
        cut = payload.index(b"\r") + 1
        body = bytearray(payload[cut:])
        for _ in range(self.rng.randint(1, 12)):
            at = self.rng.randrange(len(body))
            body[at] = self.rng.choice([self.rng.getrandbits(8), ord("|"), ord("^"), ord("~"), ord("\\"), ord("&"), 13])
            if body[at] in (0x0B, 0x1C):
                body[at] = 0x21
        return Item("mutated body", framed(payload[:cut] + bytes(body)), ANY, control)

    def huge(self) -> Item:
        """A field far over the size limit: answered AR (from the frame's head), the rest discarded."""
        payload, control = self.valid()
        size = self.max_bytes + self.rng.choice([1, 100, 5000, 3 * self.max_bytes])
        blob = b"X" * size
        return Item("huge field", framed(payload.replace(b"TESTPATIENT", blob, 1)), NAK, control)

    def pathological(self) -> Item:
        """Under the limit, but shaped to be expensive: repetitions, components, escapes, empty segments."""
        payload, control = self.valid(self.rng.choice(["S12", "S23"]))
        room = self.max_bytes - len(payload) - 64
        unit = self.rng.choice(["~", "^", "&", "\\X41\\", "\\F\\", "\\E\\", "\r", "~^&", "\\H\\x\\N\\"])
        blob = (unit * (room // len(unit))).encode()
        where = self.rng.choice([b"TESTPATIENT", b"MRN100", b"CHECKUP", b"ROUTINE"])
        return Item("pathological fields", framed(payload.replace(where, blob, 1)), ANY, control)

    def junk(self) -> Item:
        """Bytes between frames: discarded, never answered."""
        return Item("junk between frames", noise(self.rng, self.rng.randint(1, 600), forbid=START), None)

    def abandoned(self) -> Item:
        """A frame started and never ended: the next start block abandons it, without an answer."""
        payload, _control = self.valid()
        return Item("abandoned frame", START + payload[: self.rng.randint(0, len(payload) - 1)], None)

    def incoming_ack(self) -> Item:
        control = self.control()
        ack = f"MSH|^~\\&|EPIC|MAIN|BRIDGE|X|20270101120000||ACK^S12^ACK|{control}|P|2.5.1\rMSA|AA|X{control}\r"
        return Item("incoming ACK", framed(ack.encode()), None, malformed=False)

    def batch(self) -> Item:
        messages = [self.valid()[0] for _ in range(self.rng.randint(0, 4))]
        if self.rng.random() < 0.5:
            messages.append(noise(self.rng, 50))
        body = b"BHS|^~\\&|EPIC|MAIN\r" + b"".join(messages) + f"BTS|{len(messages)}\r".encode()
        return Item("batch", framed(body), ANY)


# ---- crafted shapes: inside the size limit, built to be expensive (issue 16) -----------------------------

#: Shape name -> (what it is, the field or segment a bound names when it is exceeded).
CRAFTED = {
    "repetitions": ("PID-3: N^^^H^XX repeated, the MR identifier last (the where-clause reads each)", "PID-3"),
    "components": ("PID-3: one identifier with components ^x ... ", "PID-3"),
    "subcomponents": ("PID-3.4: an authority with subcomponents &x ...", "PID-3"),
    "escapes": ("PID-5.1: the family name as \\X41\\ escapes", None),
    "hex_escape": ("PID-5.1: one \\X4141...\\ escape", None),
    "segments": ("NTE segments after PID", "NTE"),
}


def crafted(shape: str, size: int, control: str, start: str) -> bytes:
    """A valid S12 (the test route's fields, PID-3 read through ``where PID-3.5 = MR``) grown to about
    ``size`` bytes by one expensive shape. It is readable: within the reader's limits it is answered AA."""
    base = siu("S12", control, f"{control}-APPT", start)
    room = max(0, size - len(base))
    mrn = b"MRN100^^^HOSP^MR"
    if shape == "repetitions":
        return base.replace(mrn, b"N^^^H^XX~" * (room // 9) + mrn, 1)
    if shape == "components":
        return base.replace(mrn, mrn + b"^x" * (room // 2), 1)
    if shape == "subcomponents":
        return base.replace(mrn, b"MRN100^^^HOSP" + b"&x" * (room // 2) + b"^MR", 1)
    if shape == "escapes":
        return base.replace(b"TESTPATIENT", b"T" + b"\\X41\\" * (room // 5), 1)
    if shape == "hex_escape":
        return base.replace(b"TESTPATIENT", b"T\\X" + b"41" * (room // 2) + b"\\", 1)
    if shape == "segments":
        return base + b"NTE|1||x\r" * (room // 9)
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(CRAFTED)})")
