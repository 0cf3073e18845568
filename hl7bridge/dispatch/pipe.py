"""The pipes between the service and its dispatcher process: every line either end writes, spelled once.

The parent writes the child's stdin: the ``ChildSpec`` (one JSON line), then orders of one short line each
(``w`` wake, ``a`` the service is alive, ``n`` dispatch now, ``f N`` answer when command N is final, ``d N`` / ``e N TEXT`` your write N is committed /
failed, ``s GRACE`` stop). The child writes events to fd ``EVENTS_FD``, one JSON object a line, each with
one of the keys below. ``state`` carries a ``DispatchState`` whenever it changes, so the service's
``/status`` and gauges know of a hold or an auth pause within a poll (``child.STATE_POLL``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

EVENTS_FD = 3
#: The longest line either side accepts (a write of 16 commands' outcomes stays far below it).
MAX_LINE = 16 * 1024 * 1024

#: Order kinds, parent to child.
WAKE, NOW, WAIT_FOR, COMMITTED, FAILED, STOP, ALIVE = b"w", b"n", b"f", b"d", b"e", b"s", b"a"
WAKE_LINE = WAKE + b"\n"
#: Sent every ``ALIVE_EVERY`` s: a leader that stops hearing the service lets its lease lapse.
ALIVE_LINE = ALIVE + b"\n"
ALIVE_EVERY = 1.0
NOW_LINE = NOW + b"\n"

#: Event keys, child to parent.
READY, WRITE, FINAL, STATE, METRIC, STOPPED = "ready", "write", "final", "state", "metric", "stopped"


def wait_for(command_id: int) -> bytes:
    return b"%s %d\n" % (WAIT_FOR, command_id)


def committed(number: int) -> bytes:
    return b"%s %d\n" % (COMMITTED, number)


def failed(number: int, text: str) -> bytes:
    return b"%s %d %s\n" % (FAILED, number, text.encode(errors="replace"))


def stop(grace: float) -> bytes:
    return b"%s %g\n" % (STOP, grace)


@dataclass(frozen=True)
class Order:
    """A parent's line as the child reads it: its kind (``WAKE``, ``WAIT_FOR``, ...),
    the number it carries (a command id, a write number, or a stop's grace in seconds) and any text."""

    kind: bytes
    number: float = 0.0
    text: str = ""


def read_order(line: bytes) -> Order:
    if line[:1] == STOP:
        return Order(STOP, float(line[1:] or 10.0))
    kind, _, rest = line.partition(b" ")
    if kind in (WAIT_FOR, COMMITTED, FAILED):
        number, _, text = rest.partition(b" ")
        return Order(kind, int(number), text.decode(errors="replace"))
    return Order(kind)


@dataclass(frozen=True)
class DispatchState:
    """Whether dispatching flows, as the dispatcher knows it: held (the API does not answer: one command at a
    time probes it), paused (the API refused the token: nothing is sent until a probe, at ``paused_until``),
    or down (the dispatcher itself is not running). Times are epoch seconds; reasons name no patient data."""

    held_reason: str | None = None
    held_since: float | None = None
    paused_reason: str | None = None
    paused_since: float | None = None
    paused_until: float | None = None
    down_reason: str | None = None

    @property
    def held(self) -> bool:
        return self.held_reason is not None

    @property
    def paused(self) -> bool:
        return self.paused_reason is not None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DispatchState:
        return cls(**data)


def metric(name: str, *args: Any) -> dict[str, Any]:
    return {METRIC: name, "args": list(args)}


class LineBuffer:
    """Splits a byte stream into lines in time linear in its length: each byte is searched once (joining
    the buffer and each read before splitting took time quadratic in a long line's length). A line longer
    than ``max_length`` is dropped whole and counted in ``dropped``."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.dropped = 0
        self._parts: list[bytes] = []
        self._size = 0
        self._dropping = False

    def feed(self, data: bytes) -> list[bytes]:
        lines = []
        start = 0
        while (end := data.find(b"\n", start)) != -1:
            piece = data[start:end]
            if self._dropping or self._size + len(piece) > self.max_length:
                self.dropped += 1
            else:
                lines.append(b"".join([*self._parts, piece]))
            self._parts, self._size, self._dropping = [], 0, False
            start = end + 1
        rest = data[start:]
        if rest and not self._dropping:
            self._size += len(rest)
            self._dropping = self._size > self.max_length
            self._parts = [] if self._dropping else [*self._parts, rest]
        return lines
