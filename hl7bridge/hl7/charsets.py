"""Bytes to text: MSH-18 chooses the character set, a configured fallback covers the rest.

The header itself is ASCII in every character set HL7 allows over MLLP (UTF-16
aside), so MSH-18 can be read from the raw bytes before anything is decoded.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass

from hl7bridge.hl7.er7 import header_fields

# HL7 table 0211 names -> Python codecs.
_TABLE_0211 = {
    "ASCII": "ascii",
    "ISO IR6": "ascii",
    "8859/1": "iso-8859-1",
    "ISO IR100": "iso-8859-1",
    "8859/2": "iso-8859-2",
    "ISO IR101": "iso-8859-2",
    "8859/3": "iso-8859-3",
    "ISO IR109": "iso-8859-3",
    "8859/4": "iso-8859-4",
    "ISO IR110": "iso-8859-4",
    "8859/5": "iso-8859-5",
    "ISO IR144": "iso-8859-5",
    "8859/6": "iso-8859-6",
    "ISO IR127": "iso-8859-6",
    "8859/7": "iso-8859-7",
    "ISO IR126": "iso-8859-7",
    "8859/8": "iso-8859-8",
    "ISO IR138": "iso-8859-8",
    "8859/9": "iso-8859-9",
    "ISO IR148": "iso-8859-9",
    "8859/15": "iso-8859-15",
    "UNICODE UTF-8": "utf-8",
    "UTF-8": "utf-8",
    "ISO IR192": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc-kr",
    "ISO IR87": "iso2022_jp",
    "ISO IR159": "iso2022_jp_1",
    "CNS 11643-1992": "big5",
    "WINDOWS-1252": "cp1252",
}

#: Always decodes, so the message text can be shown even when every declared charset fails.
LAST_RESORT = "iso-8859-1"


@dataclass(slots=True)
class Decoded:
    text: str
    charset: str
    declared: str | None
    note: str | None = None


def codec_for(name: str) -> str | None:
    """Python codec for an MSH-18 value or a configured charset name; None if unknown."""
    key = name.strip().upper()
    if key in _TABLE_0211:
        return _TABLE_0211[key]
    try:
        return codecs.lookup(name.strip()).name
    except LookupError:
        return None


def declared_charset(raw: bytes) -> str | None:
    """MSH-18 (first repetition) read straight from the header bytes."""
    start = raw.find(b"MSH")
    if start < 0 or len(raw) < start + 8:
        return None
    end = len(raw)
    for term in (b"\r", b"\n"):
        pos = raw.find(term, start)
        if 0 <= pos < end:
            end = pos
    header = raw[start:end].decode("latin-1")
    if len(header) < 8:
        return None
    fields = header_fields(header, header[3])
    if len(fields) < 19:
        return None
    rep = fields[2][1:2] or "~"
    value = fields[18].split(rep)[0]
    return value.strip() or None


def decode(raw: bytes, fallback: tuple[str, ...] = ("utf-8",)) -> Decoded:
    """Decode a message: MSH-18 first, then each fallback codec, then ISO-8859-1."""
    declared = declared_charset(raw)
    tried: list[str] = []
    if declared:
        codec = codec_for(declared)
        if codec:
            try:
                return Decoded(raw.decode(codec), codec, declared)
            except UnicodeDecodeError:
                tried.append(codec)
        else:
            tried.append(declared)
    for name in fallback:
        codec = codec_for(name) or name
        if codec in tried:
            continue
        try:
            text = raw.decode(codec)
        except (UnicodeDecodeError, LookupError):
            tried.append(codec)
            continue
        note = None if not declared else f"MSH-18 {declared!r} did not fit; decoded as {codec}"
        return Decoded(text, codec, declared, note)
    return Decoded(
        raw.decode(LAST_RESORT),
        LAST_RESORT,
        declared,
        f"no configured charset fits ({', '.join(tried)}); decoded as {LAST_RESORT}",
    )
