"""The console's jinja2 environment: templates shipped in the package, autoescaped, with the filters the pages
share (times, ages, counts).

Undefined names raise (``StrictUndefined``): a template that reads a key its page did not give fails its test
instead of rendering an empty cell. Times go out as ``<time datetime>`` in UTC; ``console.js`` shows them in the
viewer's zone, and without JavaScript the UTC text stays readable.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from hl7bridge.dispatch.rules import masked_outcome

ENV = Environment(
    loader=PackageLoader("hl7bridge.api.console", "templates"),
    autoescape=True,
    undefined=StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)


def when(value: float | str | None) -> Markup:
    """A ``<time>`` element for epoch seconds or an ISO 8601 text (``/status`` gives those): UTC text, shown in
    the viewer's zone once ``console.js`` runs."""
    if value is None or value == "":
        return Markup('<span class="none">—</span>')
    try:
        moment = (
            datetime.fromisoformat(value) if isinstance(value, str) else datetime.fromtimestamp(value, UTC)
        ).astimezone(UTC)
    except (ValueError, OverflowError, OSError):
        return Markup('<span class="none">{}</span>').format(value)
    iso = moment.isoformat(timespec="seconds").replace("+00:00", "Z")
    return Markup('<time datetime="{}">{}</time>').format(iso, moment.strftime("%Y-%m-%d %H:%M:%S UTC"))


def age(seconds: float | None) -> str:
    """A duration as an operator reads it at a glance: ``45 s``, ``12 min``, ``3 h 05 min``, ``2 d 4 h``."""
    if seconds is None:
        return "—"
    s = max(0, int(seconds))
    if s < 120:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def count(value: int | float | None) -> str:
    """A count with thousands separated (``1,000,000``)."""
    return "—" if value is None else f"{value:,}"


def pretty(value: Any) -> str:
    """A value of a timeline (dict, list, text) as indented text for a ``<pre>``."""
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def segments(raw: str | Sequence[str] | None) -> Markup:
    """HL7 (text, or its segments) as one line per segment, the segment id emphasised (the text escaped)."""
    if not raw:
        return Markup("")
    lines = raw.replace("\r\n", "\r").replace("\n", "\r").split("\r") if isinstance(raw, str) else raw
    return Markup("\n").join(
        Markup('<span class="seg">{}</span>{}').format(line[:3], line[3:]) for line in lines if line
    )


ENV.filters.update(when=when, age=age, count=count, pretty=pretty, segments=segments, outcome=masked_outcome)


def render(template: str, **context: Any) -> bytes:
    """A page as UTF-8 bytes."""
    return ENV.get_template(template).render(**context).encode("utf-8")
