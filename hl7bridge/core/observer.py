"""The interface through which the listener, the pipeline and the dispatcher report what they measure.

It lives below every stage so that each can report without knowing Prometheus; ``ops.metrics`` implements it.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def message(self, listener: str, event: str, ack: str, duplicate: bool) -> None: ...

    def ack_latency(self, listener: str, seconds: float) -> None: ...

    def api_call(self, operation: str, status: int | None, seconds: float) -> None: ...

    def retry(self) -> None: ...

    def dead_letter(self) -> None: ...

    def commit_unknown(self, listener: str) -> None: ...


class NullObserver:
    """What components use when nobody measures."""

    def message(self, listener: str, event: str, ack: str, duplicate: bool) -> None:
        return None

    def ack_latency(self, listener: str, seconds: float) -> None:
        return None

    def api_call(self, operation: str, status: int | None, seconds: float) -> None:
        return None

    def retry(self) -> None:
        return None

    def dead_letter(self) -> None:
        return None

    def commit_unknown(self, listener: str) -> None:
        return None
