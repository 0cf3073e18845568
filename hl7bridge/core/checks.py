"""Small validators for settings: each appends "key: what is expected, got what" to a problem list."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

Check = Callable[[Any, str, list[str]], Any]


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
