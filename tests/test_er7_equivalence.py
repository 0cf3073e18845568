"""The hot-path ER7 reader reads every fixture exactly as hl7apy does, leaf by leaf."""

from __future__ import annotations

import re

import pytest
from hl7apy.parser import parse_message

from hl7bridge.hl7 import charsets
from hl7bridge.hl7.er7 import SEGMENT_SPLIT, Er7Message

from .conftest import FIXTURES, MANIFEST

_POSITION = re.compile(r"_(\d+)$")
#: hl7apy 1.3.5 has no 2.7.1 tables and its 2.7 tables crash on TQ1-1/SCH-11; 2.8 reads the same ER7.
_HL7APY_VERSION = {"2.7": "2.8", "2.7.1": "2.8"}


def _position(name: str | None) -> int:
    if name is None:
        return 1  # hl7apy's v2.6 tables leave withdrawn XTN-1 unnamed; it is the only such leaf here
    m = _POSITION.search(name)
    return int(m.group(1)) if m else 1


def _messages() -> list[tuple[str, str]]:
    """(id, text) of every readable message in the fixtures, batches split."""
    out = []
    for relative, expected in sorted(MANIFEST.items()):
        raw = (FIXTURES / relative).read_bytes()
        text = charsets.decode(raw).text
        if "messages" in expected:
            lines = [s for s in SEGMENT_SPLIT.split(text) if s and s[:3] not in ("FHS", "BHS", "BTS", "FTS")]
            bodies: list[list[str]] = []
            for line in lines:
                if line.startswith("MSH"):
                    bodies.append([])
                bodies[-1].append(line)
            out += [(f"{relative}#{i}", "\r".join(b)) for i, b in enumerate(bodies, 1)]
        elif expected.get("ack") in ("AA", "CA", "AE", "CE"):
            out.append((relative, text))
    return out


def _hl7apy_leaves(text: str, version: str) -> dict[tuple, str]:
    body = "\r".join(s for s in SEGMENT_SPLIT.split(text) if s.strip())
    forced = _HL7APY_VERSION.get(version)
    if forced:
        head, _, rest = body.partition("\r")
        sep = head[3]
        fields = head.split(sep)
        fields[11] = forced + fields[11][len(version) :]
        body = sep.join(fields) + "\r" + rest
    msg = parse_message(body, find_groups=False)
    leaves: dict[tuple, str] = {}
    seen: dict[str, int] = {}
    for segment in msg.children:
        index = seen[segment.name] = seen.get(segment.name, 0) + 1
        reps: dict[int, int] = {}
        for fld in segment.children:
            number = _position(fld.name)
            rep = reps[number] = reps.get(number, 0) + 1
            for comp in fld.children:
                for sub in comp.children:
                    value = sub.value.value
                    if not isinstance(value, str):
                        value = sub.value.to_er7()  # dates come back as datetime objects
                    if value:
                        key = (segment.name, index, number, rep, _position(comp.name), _position(sub.name))
                        leaves[key] = str(value)
    return leaves


def _reader_leaves(text: str) -> dict[tuple, str]:
    return {tuple(leaf[:-1]): leaf[-1] for leaf in Er7Message.parse(text).walk() if leaf[-1]}


@pytest.mark.parametrize(("name", "text"), _messages(), ids=[m[0] for m in _messages()])
def test_reader_matches_hl7apy(name: str, text: str) -> None:
    msg = Er7Message.parse(text)
    version = msg.msh.get(12, 1, 1)
    ours = _reader_leaves(text)
    theirs = _hl7apy_leaves(text, version)
    if version in _HL7APY_VERSION:
        ours[("MSH", 1, 12, 1, 1, 1)] = theirs[("MSH", 1, 12, 1, 1, 1)]
    assert ours == theirs
