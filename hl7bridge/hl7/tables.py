"""HL7 structure knowledge, taken from hl7apy's version-specific tables.

hl7apy is the project's authority on which segment holds which field, of which
datatype, with which components. Reading its tables is cheap (no message
objects are built), so the hot path and the config check both use them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import cache, lru_cache
from types import ModuleType

from hl7bridge.hl7.er7 import Path

SUPPORTED_VERSIONS = ("2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2")
#: hl7apy has no separate 2.7.1 tables; 2.7.1 changed no structure SIU uses.
_LIBRARY = {"2.7.1": "2.7"}
TIMESTAMP_TYPES = frozenset({"TS", "DTM", "DT", "DR", "DIN"})


@dataclass(frozen=True, slots=True)
class Element:
    """What a path points at: its long name and datatype."""

    name: str
    datatype: str | None
    table: str | None = None


def supported(version: str) -> bool:
    return version in SUPPORTED_VERSIONS


@cache
def _library(version: str) -> ModuleType:
    version = _LIBRARY.get(version, version)
    return importlib.import_module("hl7apy.v" + version.replace(".", "_"))


def segment_fields(version: str, segment: str) -> tuple[str, ...] | None:
    """hl7apy's field names of a segment (``('SCH_1', ...)``), None if the version lacks it."""
    entry = _library(version).SEGMENTS.get(segment)
    if entry is None:
        return None
    return tuple(child[0] for child in entry[1])


def field(version: str, segment: str, number: int) -> Element | None:
    fields = _library(version).FIELDS
    entry = fields.get(f"{segment}_{number}")
    if entry is None:
        return None
    return Element(_title(entry[3]), entry[2], entry[4])


def components(version: str, datatype: str) -> tuple[Element, ...]:
    """Components of a composite datatype (empty for primitives)."""
    lib = _library(version)
    struct = lib.DATATYPES_STRUCTS.get(datatype)
    if not struct:
        return ()
    out = []
    for child in struct:
        entry = lib.DATATYPES[child[0]]
        out.append(Element(_title(entry[3]), entry[2], entry[4]))
    return tuple(out)


@lru_cache(maxsize=4096)
def element(version: str, path: Path) -> Element | None:
    """The element a path designates, following datatypes down to the subcomponent."""
    if path.field is None:
        return Element(path.segment, None)
    if path.segment.startswith("Z"):
        return Element(f"{path.segment}-{path.field}", None)
    current = field(version, path.segment, path.field)
    if current is None:
        return None
    for position in (path.component, path.subcomponent):
        if position is None:
            break
        parts = components(version, current.datatype or "")
        if not parts:
            # A primitive reads as its own first component (ER7 allows ``X`` == ``X^``).
            if position == 1:
                continue
            return None
        if position > len(parts):
            return None
        current = parts[position - 1]
    return current


def check_path(path: Path, versions: tuple[str, ...] = SUPPORTED_VERSIONS) -> str | None:
    """Why a path is valid in none of the versions, or None when at least one version has it."""
    if path.segment.startswith("Z"):
        return None
    having = [v for v in versions if segment_fields(v, path.segment) is not None]
    if not having:
        return f"{path.segment} is not a segment of HL7 v{versions[0]} to v{versions[-1]}"
    if path.field is None or any(element(v, path) is not None for v in having):
        return None
    widest = max(having, key=lambda v: len(segment_fields(v, path.segment) or ()))
    count = len(segment_fields(widest, path.segment) or ())
    if path.field > count:
        return f"{path.segment} has {count} fields (v{widest}); there is no field {path.field}"
    datatype = (field(widest, path.segment, path.field) or Element("", None)).datatype
    return f"{path} does not exist: {path.segment}-{path.field} is {datatype}, which has no such component"


@lru_cache(maxsize=1024)
def timestamp_component(version: str, path: Path) -> Path:
    """Where the DTM value of a timestamp path lives.

    A TS is a composite whose first part is the DTM; inside a component it is a
    subcomponent (SCH-11.4 is TQ.4 = TS, so the time is SCH-11.4.1).
    """
    target = element(version, path)
    if target is None or target.datatype != "TS":
        return path
    if path.component is None:
        return Path(path.segment, path.segment_index, path.field, path.repetition, 1)
    if path.subcomponent is None:
        return Path(path.segment, path.segment_index, path.field, path.repetition, path.component, 1)
    return path


def _title(long_name: str) -> str:
    return long_name.replace("_", " ").title() if long_name else ""


def warm(versions: tuple[str, ...] = SUPPORTED_VERSIONS) -> None:
    """Import the tables up front so the first message does not pay for it."""
    for version in versions:
        _library(version)


@cache
def table_values(table: str) -> frozenset[str]:
    """The codes of an HL7 table (``"0003"``, event types) in any supported version hl7apy has tables for."""
    codes: set[str] = set()
    for version in SUPPORTED_VERSIONS:
        entry = getattr(_library(version), "TABLES", {}).get(f"HL7{table}")
        if entry is not None:
            codes.update(entry[1])
    return frozenset(codes)
