"""Small validators for settings: each appends "key: what is expected, got what" to a problem list."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Check = Callable[[Any, str, list[str]], Any]

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION = 100 * 366 * 86400.0


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``30m``, ``12h``, ``7d`` or ``2w``; ValueError saying so otherwise."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"{text[:40]!r} is not a duration; use e.g. 90s, 30m, 12h, 7d or 2w")
    seconds = float(m[1]) * _UNITS[m[2]]
    if seconds > MAX_DURATION:
        raise ValueError(f"{text[:40]!r} is longer than 100 years; use e.g. 90s, 30m, 12h, 7d or 2w")
    return seconds


def integer(minimum: int, maximum: int | None = None) -> Check:
    return number(minimum, maximum, integer=True)


def seconds(value: Any, key: str, problems: list[str]) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        problems.append(f"{key}: expected a number of seconds >= 0 (0 = no limit), got {value!r}")
        return 0.0
    return float(value)


def boolean(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, bool):
        problems.append(f"{key}: expected true or false, got {value!r}")
    return value


def string(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str):
        problems.append(f"{key}: expected a string, got {value!r}")
    return value


def choice(*choices: str) -> Check:
    def check(value: Any, key: str, problems: list[str]) -> Any:
        if value not in choices:
            problems.append(f"{key}: expected one of {', '.join(repr(c) for c in choices)}, got {value!r}")
        return value

    return check


def zone(value: Any, key: str, problems: list[str]) -> Any:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        problems.append(f"{key}: expected an IANA time zone such as 'America/Chicago' or 'UTC', got {value!r}")
    return value


def nonempty(value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, str) or not value.strip():
        problems.append(f"{key}: expected a non-empty string, got {value!r}")
    return value


def number(minimum: float, maximum: float | None = None, integer: bool = False) -> Check:
    def check(value: Any, key: str, problems: list[str]) -> Any:
        kinds = (int,) if integer else (int, float)
        if (
            isinstance(value, bool)
            or not isinstance(value, kinds)
            or (isinstance(value, float) and not math.isfinite(value))
        ):
            problems.append(f"{key}: expected {'an integer' if integer else 'a number'}, got {value!r}")
        elif value < minimum or (maximum is not None and value > maximum):
            bound = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            problems.append(f"{key}: expected {'an integer' if integer else 'a number'} {bound}, got {value}")
        return value

    return check


def strings(value: Any, key: str, problems: list[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.append(f"{key}: expected a string or a list of strings, got {value!r}")
        return ()
    return tuple(value)


def table(data: Any, prefix: str, keys: dict[str, Check], problems: list[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        problems.append(f"{prefix}: expected a table")
        return {}
    out = {}
    for key, value in data.items():
        check = keys.get(key)
        if check is None:
            problems.append(f"{prefix}.{key}: unknown setting (known: {', '.join(keys)})")
            continue
        out[key] = check(value, f"{prefix}.{key}", problems)
    return out


def unknown_settings(data: dict[str, Any], known: Collection[str], prefix: str, problems: list[str]) -> None:
    """Name every key that is not a known setting, so that a misspelt one is reported instead of ignored."""
    for extra in sorted(set(data) - set(known)):
        problems.append(f"{prefix}.{extra}: unknown setting (known: {', '.join(sorted(known))})")
