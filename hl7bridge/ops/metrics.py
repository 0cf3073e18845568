"""Prometheus metrics: the ``Observer`` (``core.observer``) that measures.

Label values come from closed sets: a sender's text (an event code, say) becomes a label only when HL7 knows
it, and counts as ``other`` otherwise, so that no sender can grow ``/metrics`` without bound.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hl7bridge.hl7 import tables

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_STATUSES = frozenset(str(int(status)) for status in HTTPStatus)
OTHER = "other"


def known(value: str, allowed: Collection[str]) -> str:
    """A label value: ``value`` if it is one of ``allowed``, ``none`` if empty, else ``other``."""
    if not value:
        return "none"
    return value if value in allowed else OTHER


class Metrics:
    """One registry per service (tests run several services in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("hl7bridge_messages_received", "Messages received, by event and ACK code",
                                ["listener", "event", "ack"], registry=r)  # fmt: skip
        self.duplicates = Counter("hl7bridge_duplicates", "Resent messages answered with the original ACK",
                                  ["listener"], registry=r)  # fmt: skip
        self.ack_seconds = Histogram("hl7bridge_ack_latency_seconds", "From a complete frame to its ACK written",
                                     ["listener"], buckets=ACK_BUCKETS, registry=r)  # fmt: skip
        self.connections = Gauge("hl7bridge_open_connections", "Open MLLP connections", ["listener"], registry=r)
        self.outbox_depth = Gauge("hl7bridge_outbox_depth", "Commands waiting to be dispatched", registry=r)
        self.outbox_age = Gauge("hl7bridge_outbox_oldest_age_seconds", "Age of the oldest waiting command",
                                registry=r)  # fmt: skip
        self.api_calls = Counter("hl7bridge_api_calls", "Journeys API calls by operation and HTTP status",
                                 ["operation", "status"], registry=r)  # fmt: skip
        self.api_seconds = Histogram("hl7bridge_api_latency_seconds", "Journeys API call duration", ["operation"],
                                     buckets=API_BUCKETS, registry=r)  # fmt: skip
        self.retries = Counter("hl7bridge_api_retries", "Commands scheduled for another attempt", registry=r)
        self.dead_letters = Counter("hl7bridge_dead_letters", "Commands dead-lettered", registry=r)
        self.paused = Gauge("hl7bridge_dispatch_paused", "1 while the API refuses the token", registry=r)
        self.healthy = Gauge("hl7bridge_healthy", "1 when every health check passes", registry=r)
        # labels() locks and hashes on every call; the per-message series are looked up once.
        self._message_counters: dict[tuple[str, str, str], Counter] = {}
        self._ack_histograms: dict[str, Histogram] = {}
        self._events = tables.table_values("0003")
        self._ack_codes = tables.table_values("0008")

    def message(self, listener: str, event: str, ack: str, duplicate: bool) -> None:
        key = (listener, known(event, self._events), known(ack, self._ack_codes))
        counter = self._message_counters.get(key)
        if counter is None:
            counter = self._message_counters[key] = self.messages.labels(*key)
        counter.inc()
        if duplicate:
            self.duplicates.labels(listener).inc()

    def ack_latency(self, listener: str, seconds: float) -> None:
        histogram = self._ack_histograms.get(listener)
        if histogram is None:
            histogram = self._ack_histograms[listener] = self.ack_seconds.labels(listener)
        histogram.observe(seconds)

    def api_call(self, operation: str, status: int | None, seconds: float) -> None:
        self.api_calls.labels(operation, known(str(status), HTTP_STATUSES) if status is not None else "error").inc()
        self.api_seconds.labels(operation).observe(seconds)

    def retry(self) -> None:
        self.retries.inc()

    def dead_letter(self) -> None:
        self.dead_letters.inc()

    def track_connections(self, listener: str, count: Callable[[], int]) -> None:
        self.connections.labels(listener).set_function(count)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
