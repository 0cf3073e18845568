"""An exact, allocation-light reader for HL7 v2 ER7 (pipe-and-hat) messages.

hl7apy builds a full object tree per message (20-28 ms for a 1 KB SIU); the
hot path only needs a few dozen values, so this reader splits lazily with
``str.split`` and decodes escape sequences only when a value is read. A test
proves its reading equal to hl7apy's on every fixture.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

SEGMENT_SPLIT = re.compile(r"\r\n|\r|\n")
_SEGMENT_NAME = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_PATH = re.compile(
    r"^(?P<seg>[A-Z][A-Z0-9]{2})(?:\[(?P<segidx>\d+)\])?"
    r"(?:-(?P<field>\d+)(?:\((?P<rep>\d+)\))?"
    r"(?:\.(?P<comp>\d+)(?:\.(?P<sub>\d+))?)?)?$"
)

_HEADER_SEGMENTS = frozenset({"MSH", "FHS", "BHS"})

#: HL7's explicit null: the field is present and has no value (the receiver deletes what it held).
NULL = '""'

#: Escape sequences for formatted text that carry no characters of their own.
_FORMATTING = {"H": "", "N": "", ".br": "\n", ".sp": "\n", ".fi": "", ".nf": ""}


class Er7Error(ValueError):
    """The bytes cannot be read as HL7 ER7; ``location`` names where."""

    def __init__(self, message: str, location: str = "MSH", code: int = 100, value: str = "") -> None:
        super().__init__(message)
        self.location = location
        self.code = code
        self.value = value


@dataclass(frozen=True, slots=True)
class Encoding:
    """The delimiters a message declares in MSH-1 and MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str | None = None

    @property
    def msh2(self) -> str:
        return self.component + self.repetition + self.escape + self.subcomponent + (self.truncation or "")

    @classmethod
    def from_header(cls, field_sep: str, msh2: str) -> Encoding:
        """Validate MSH-1/MSH-2 as the standard requires: 4 or 5 distinct characters."""
        if len(msh2) not in (4, 5):
            raise Er7Error(f"MSH-2 must hold 4 or 5 encoding characters, found {len(msh2)}", "MSH-2", 102, msh2)
        chars = field_sep + msh2
        if len(set(chars)) != len(chars) or any(c.isalnum() or c in "\r\n " for c in chars):
            raise Er7Error(
                "MSH-1/MSH-2 encoding characters must be distinct, non-alphanumeric characters",
                "MSH-2",
                102,
            )
        return cls(field_sep, msh2[0], msh2[1], msh2[2], msh2[3], msh2[4] if len(msh2) == 5 else None)

    def escape_text(self, text: str) -> str:
        """Escape a value of our own making (e.g. ACK text) for these delimiters."""
        e = self.escape
        out = text.replace(e, f"{e}E{e}")
        for char, code in (
            (self.field, "F"),
            (self.component, "S"),
            (self.subcomponent, "T"),
            (self.repetition, "R"),
        ):
            out = out.replace(char, f"{e}{code}{e}")
        if self.truncation:
            out = out.replace(self.truncation, f"{e}P{e}")
        return out.replace("\r", " ").replace("\n", " ")


@dataclass(frozen=True, slots=True)
class Limits:
    """Shapes a sane feed never reaches, per listener; a message past one is refused, naming where.

    The reader is linear in the message's size, so these bound the work and memory one frame can ask
    for rather than guard against a blow-up."""

    segments: int = 1000
    repetitions: int = 1000
    components: int = 100
    subcomponents: int = 100
    batch_messages: int = 1000


DEFAULT_ENCODING = Encoding()
DEFAULT_LIMITS = Limits()
_VALID_NAMES: set[str] = set()


@lru_cache(maxsize=64)
def _encoding(field_sep: str, msh2: str) -> Encoding:
    return Encoding.from_header(field_sep, msh2)


@dataclass(frozen=True, slots=True)
class Path:
    """A location such as ``PID-3(2).4.1`` or ``AIS[2]-4``; indexes are 1-based."""

    segment: str
    segment_index: int = 1
    field: int | None = None
    repetition: int | None = None
    component: int | None = None
    subcomponent: int | None = None

    @classmethod
    @lru_cache(maxsize=1024)
    def parse(cls, text: str) -> Path:
        m = _PATH.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not an HL7 path; expected e.g. PID-3, PID-3.1, PID-3(2).4.1 or AIS[2]-4")

        def num(name: str) -> int | None:
            value = m.group(name)
            if value is None:
                return None
            if int(value) < 1:
                raise ValueError(f"{text!r}: positions in an HL7 path start at 1")
            return int(value)

        return cls(m["seg"], num("segidx") or 1, num("field"), num("rep"), num("comp"), num("sub"))

    def __str__(self) -> str:
        out = self.segment
        if self.segment_index != 1:
            out += f"[{self.segment_index}]"
        if self.field is not None:
            out += f"-{self.field}"
            if self.repetition is not None:
                out += f"({self.repetition})"
            if self.component is not None:
                out += f".{self.component}"
                if self.subcomponent is not None:
                    out += f".{self.subcomponent}"
        return out


class Segment:
    """One segment; ``fields[n]`` is field n as raw (still escaped) text, split on first use.

    A field's repetitions are split once and kept, as the fields are: a reader that visits every
    repetition (``where``, the patient ids) would otherwise split the whole field again per repetition,
    quadratic in the field's size."""

    __slots__ = ("_fields", "_reps", "encoding", "name", "text")

    def __init__(self, text: str, encoding: Encoding) -> None:
        self.text = text
        self.name = text[:3]
        self.encoding = encoding
        self._fields: list[str] | None = None
        self._reps: dict[int, list[str]] | None = None

    @property
    def fields(self) -> list[str]:
        fields = self._fields
        if fields is None:
            text, sep = self.text, self.encoding.field
            fields = header_fields(text, sep) if self.name in _HEADER_SEGMENTS else text.split(sep)
            self._fields = fields
        return fields

    def __repr__(self) -> str:
        return f"<Segment {self.name} ({len(self.fields) - 1} fields)>"

    def field(self, number: int) -> str:
        fields = self.fields
        return fields[number] if number < len(fields) else ""

    def repetitions(self, number: int) -> list[str]:
        """Field ``number``'s raw repetitions (a shared list: do not modify it)."""
        cache = self._reps
        if cache is None:
            cache = self._reps = {}
        reps = cache.get(number)
        if reps is None:
            raw = self.field(number)
            if number <= 2 and self.name in _HEADER_SEGMENTS:
                reps = [raw]
            else:
                reps = raw.split(self.encoding.repetition) if raw else []
            cache[number] = reps
        return reps

    def raw(
        self, field: int, repetition: int = 1, component: int | None = None, subcomponent: int | None = None
    ) -> str:
        """Raw text at a position; empty when absent."""
        fields = self.fields
        if field >= len(fields):
            return ""
        value = fields[field]
        if not value:
            return ""
        if field <= 2 and self.name in _HEADER_SEGMENTS:
            return value if repetition == 1 and component in (None, 1) else ""
        enc = self.encoding
        if enc.repetition in value:
            reps = self.repetitions(field)
            if repetition > len(reps):
                return ""
            value = reps[repetition - 1]
        elif repetition != 1:
            return ""
        if component is None:
            return value
        return component_of(value, enc, component, subcomponent)

    def get(
        self, field: int, repetition: int = 1, component: int | None = None, subcomponent: int | None = None
    ) -> str:
        """The value at a position as a reader means it (see ``value_of``)."""
        value = self.raw(field, repetition, component, subcomponent)
        enc = self.encoding
        if (enc.escape in value or '"' in value or enc.truncation) and not _delimiters(self.name, field):
            return value_of(value, enc)
        return value


def header_fields(segment: str, sep: str) -> list[str]:
    """A header segment's (MSH, BHS, FHS) fields, numbered as HL7 numbers them: MSH-1 is the field separator
    itself, so field n is split part n-1."""
    return [segment[:3], sep, *segment[4:].split(sep)]


def component_of(value: str, enc: Encoding, component: int, subcomponent: int | None = None) -> str:
    """Component (and subcomponent) of one raw repetition."""
    if enc.component in value:
        comps = value.split(enc.component)
        if component > len(comps):
            return ""
        value = comps[component - 1]
    elif component != 1:
        return ""
    if subcomponent is None:
        return value
    if enc.subcomponent in value:
        subs = value.split(enc.subcomponent)
        return subs[subcomponent - 1] if subcomponent <= len(subs) else ""
    return value if subcomponent == 1 else ""


def _delimiters(segment: str, field: int | None) -> bool:
    """MSH-1/MSH-2 (FHS, BHS): the delimiters themselves, never escaped or cut."""
    return field is not None and field <= 2 and segment in _HEADER_SEGMENTS


def value_of(raw: str, enc: Encoding, charset: str = "utf-8") -> str:
    """What a raw value means to a reader: HL7's explicit null ``""`` ("no value / delete") is no value,
    and the v2.7 truncation character only marks a cut (a literal one arrives escaped as ``\\P\\``).

    Reading, not the leaf walk, applies these rules: hl7apy keeps both as leaf text, and the
    equivalence test compares raw leaves."""
    if not raw:
        return raw
    if NULL in raw and raw.strip() == NULL:
        return ""
    if enc.truncation and enc.truncation in raw:
        raw = raw.replace(enc.truncation, "")
    return unescape(raw, enc, charset) if enc.escape in raw else raw


def unescape(value: str, enc: Encoding, charset: str = "utf-8") -> str:
    """Resolve HL7 escape sequences (``\\F\\``, ``\\X41\\``, ``\\.br\\``...).

    Escape characters pair up in order, so one ``split`` finds every sequence: the odd parts are the
    codes. An escape character left without its partner stays as written."""
    esc = enc.escape
    if esc not in value:
        return value
    parts = value.split(esc)
    tail = esc + parts.pop() if len(parts) % 2 == 0 else ""
    known = _sequences(enc)
    other: dict[str, str] = {}
    for i in range(1, len(parts), 2):
        code = parts[i]
        text = known.get(code)
        if text is None:
            text = other.get(code)
            if text is None:
                text = other[code] = _escape_sequence(code, charset, esc + code + esc)
        parts[i] = text
    return "".join(parts) + tail


@lru_cache(maxsize=64)
def _sequences(enc: Encoding) -> dict[str, str]:
    """The escape codes whose text depends only on the delimiters."""
    known = {"F": enc.field, "S": enc.component, "T": enc.subcomponent, "R": enc.repetition, "E": enc.escape}
    if enc.truncation:
        known["P"] = enc.truncation
    return {**_FORMATTING, **known}


def _escape_sequence(code: str, charset: str, literal: str) -> str:
    if code[:1] == "X" and len(code) > 1 and len(code) % 2 == 1:
        try:
            return bytes.fromhex(code[1:]).decode(charset, errors="replace")
        except ValueError:
            return literal
    if code[:1] in ("C", "M") or code[:3] in (".in", ".ti", ".sk", ".ce"):
        return ""
    return literal


def _no_segment_id(position: int, before: list[Segment], line: str) -> Er7Error:
    """Named by the segment before it, never by its own text: a line that is no segment is usually the rest
    of a value (a patient's name, say) that a stray line break cut off."""
    after = before[-1].name if before else "MSH"
    return Er7Error(
        f"segment {position} (after {after}) has no valid segment ID (3 letters or digits, then the field separator)",
        after,
        100,
        line[:8],
    )


class Er7Message:
    """A message read from decoded text: segments and lazy field access."""

    __slots__ = ("_index", "charset", "encoding", "segments")

    def __init__(self, segments: list[Segment], encoding: Encoding, charset: str = "utf-8") -> None:
        self.segments = segments
        self.encoding = encoding
        self.charset = charset
        self._index: dict[str, list[Segment]] | None = None

    @classmethod
    def parse(cls, text: str, charset: str = "utf-8", limits: Limits | None = None) -> Er7Message:
        """Read a message; with ``limits``, one past them raises ``Er7Error`` naming the segment or field."""
        parts = text.split("\r") if "\n" not in text else SEGMENT_SPLIT.split(text)
        lines = [s for s in parts if s and not s.isspace()]
        if not lines or not lines[0].startswith("MSH") or len(lines[0]) < 8:
            raise Er7Error("the message does not begin with an MSH segment", "MSH", 100)
        if limits is not None and len(lines) > limits.segments:
            name = lines[limits.segments][:3]
            raise Er7Error(
                f"the message has {len(lines)} segments, more than the {limits.segments} accepted",
                name if _SEGMENT_NAME.match(name) else "MSH",
                100,
            )
        head = lines[0]
        enc_end = head.find(head[3], 4)
        encoding = _encoding(head[3], head[4:enc_end] if enc_end > 0 else head[4:])
        segments = []
        valid = _VALID_NAMES
        for position, line in enumerate(lines, 1):
            segment = Segment(line, encoding)
            name = segment.name
            if name not in valid:
                if (len(line) > 3 and line[3] != encoding.field) or not _SEGMENT_NAME.match(name):
                    raise _no_segment_id(position, segments, line)
                if len(valid) < 4096:
                    valid.add(name)
            elif len(line) > 3 and line[3] != encoding.field:
                raise _no_segment_id(position, segments, line)
            segments.append(segment)
        msg = cls(segments, encoding, charset)
        if limits is not None:
            msg._check_shape(text, limits)
        return msg

    def _check_shape(self, text: str, limits: Limits) -> None:
        """Repetitions per field, components per repetition, subcomponents per component.

        A count over the whole text clears a message at once; only a part whose own count is over the
        limit is split and looked into, so the work stays linear and a normal message costs three scans."""
        enc = self.encoding
        for char, limit, what in (
            (enc.repetition, limits.repetitions, "repetitions"),
            (enc.component, limits.components, "components in one repetition"),
            (enc.subcomponent, limits.subcomponents, "subcomponents in one component"),
        ):
            if text.count(char) < limit:
                continue
            for seg in self.segments:
                if seg.text.count(char) < limit:
                    continue
                for number, value in enumerate(seg.fields):
                    if value.count(char) < limit or (number <= 2 and seg.name in _HEADER_SEGMENTS):
                        continue
                    parts = [value] if char == enc.repetition else seg.repetitions(number)
                    if char == enc.subcomponent:
                        parts = [c for rep in parts if rep.count(char) >= limit for c in rep.split(enc.component)]
                    worst = max((part.count(char) for part in parts), default=0) + 1
                    if worst > limit:
                        raise Er7Error(
                            f"{seg.name}-{number} holds {worst} {what}, more than the {limit} accepted",
                            f"{seg.name}-{number}",
                            102,
                        )

    def _segments_by_name(self) -> dict[str, list[Segment]]:
        if self._index is None:
            index: dict[str, list[Segment]] = {}
            for seg in self.segments:
                index.setdefault(seg.name, []).append(seg)
            self._index = index
        return self._index

    def all(self, name: str) -> list[Segment]:
        return self._segments_by_name().get(name, [])

    def segment(self, name: str, index: int = 1) -> Segment | None:
        segs = self._segments_by_name().get(name)
        if not segs or index > len(segs):
            return None
        return segs[index - 1]

    @property
    def msh(self) -> Segment:
        return self.segments[0]

    def raw(self, path: Path | str) -> str:
        if isinstance(path, str):
            path = Path.parse(path)
        seg = self.segment(path.segment, path.segment_index)
        if seg is None:
            return ""
        if path.field is None:
            return self.encoding.field.join(seg.fields)
        return seg.raw(path.field, path.repetition or 1, path.component, path.subcomponent)

    def get(self, path: Path | str) -> str:
        """The value at a path (see ``value_of``), '' when absent."""
        if isinstance(path, str):
            path = Path.parse(path)
        raw = self.raw(path)
        return raw if _delimiters(path.segment, path.field) else self.value(raw)

    def value(self, raw: str) -> str:
        return value_of(raw, self.encoding, self.charset)

    def unescape(self, value: str) -> str:
        return unescape(value, self.encoding, self.charset)

    def has(self, name: str) -> bool:
        return name in self._segments_by_name()

    def walk(self) -> Iterator[tuple[str, int, int, int, int, int, str]]:
        """Every leaf as (segment, segment index, field, repetition, component, subcomponent, raw)."""
        seen: dict[str, int] = {}
        enc = self.encoding
        for seg in self.segments:
            idx = seen[seg.name] = seen.get(seg.name, 0) + 1
            for fno in range(1, len(seg.fields)):
                for rno, rep in enumerate(seg.repetitions(fno), 1):
                    if fno <= 2 and seg.name in _HEADER_SEGMENTS:
                        yield seg.name, idx, fno, rno, 1, 1, rep
                        continue
                    for cno, comp in enumerate(rep.split(enc.component), 1):
                        for sno, sub in enumerate(comp.split(enc.subcomponent), 1):
                            yield seg.name, idx, fno, rno, cno, sno, sub
