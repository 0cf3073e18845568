"""Prometheus metrics: the ``Observer`` (``core.observer``) that measures.

Label values come from closed sets: a sender's text (an event code, say) becomes a label only when HL7 knows
it, and counts as ``other`` otherwise, so that no sender can grow ``/metrics`` without bound.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from http import HTTPStatus

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from hl7bridge.hl7 import tables

ACK_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
API_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
HTTP_STATUSES = frozenset(str(int(status)) for status in HTTPStatus)
OTHER = "other"
LOGIN_RESULTS = ("ok", "failed", "throttled")


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
        self.commits_unknown = Counter("hl7bridge_commit_outcome_unknown", "Messages left unanswered, their "
                                       "connection closed, as the database connection was lost during their "
                                       "COMMIT", ["listener"], registry=r)  # fmt: skip
        self.paused = Gauge("hl7bridge_dispatch_paused", "1 while nothing flows to the API as usual: held, "
                            "auth paused, or the dispatcher down", registry=r)  # fmt: skip
        self.held = Gauge("hl7bridge_dispatch_held", "1 while the API does not answer and dispatching holds to "
                          "one command at a time", registry=r)  # fmt: skip
        self.auth_paused = Gauge("hl7bridge_dispatch_auth_paused", "1 while the API refuses the token and "
                                 "dispatching is paused", registry=r)  # fmt: skip
        self.dead_letters_open = Gauge("hl7bridge_dead_letters_open", "Dead letters waiting for an operator",
                                       registry=r)  # fmt: skip
        self.last_message = Gauge("hl7bridge_last_message_timestamp_seconds", "When the listener last received a "
                                  "message (epoch seconds; 0 = never)", ["listener"], registry=r)  # fmt: skip
        self.token_expires = Gauge("hl7bridge_api_token_expiry_timestamp_seconds", "When the API token expires "
                                   "(epoch seconds; 0 = api.token_expires not set)", registry=r)  # fmt: skip
        self.healthy = Gauge("hl7bridge_healthy", "1 when every health check passes", registry=r)
        self.console_logins = Counter("hl7bridge_console_logins", "Console and API logins by result: ok, failed "
                                      "(wrong name or password), throttled (refused by the limiter)", ["result"],
                                      registry=r)  # fmt: skip
        for result in LOGIN_RESULTS:
            self.console_logins.labels(result)
        # labels() locks and hashes on every call; the per-message series are looked up once.
        self._message_counters: dict[tuple[str, str, str], Counter] = {}
        self._ack_histograms: dict[str, Histogram] = {}
        #: Per listener, when it last received a message (epoch seconds): ``/status`` and the gauge read it.
        self.last_message_at: dict[str, float] = {}
        self._events = tables.table_values("0003")
        self._ack_codes = tables.table_values("0008")

    def message(self, listener: str, event: str, ack: str, duplicate: bool) -> None:
        key = (listener, known(event, self._events), known(ack, self._ack_codes))
        counter = self._message_counters.get(key)
        if counter is None:
            counter = self._message_counters[key] = self.messages.labels(*key)
        counter.inc()
        self.last_message_at[listener] = time.time()
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

    def login(self, result: str) -> None:
        """A console or API login (``LOGIN_RESULTS``); safe from any thread."""
        self.console_logins.labels(known(result, LOGIN_RESULTS)).inc()

    def retry(self) -> None:
        self.retries.inc()

    def dead_letter(self) -> None:
        self.dead_letters.inc()

    def commit_unknown(self, listener: str) -> None:
        self.commits_unknown.labels(listener).inc()

    def track_listener(self, listener: str, count: Callable[[], int]) -> None:
        """Its open connections and its last message time, read when scraped."""
        self.connections.labels(listener).set_function(count)
        self.commits_unknown.labels(listener)
        self.last_message.labels(listener).set_function(lambda: self.last_message_at.get(listener, 0.0))

    def seen_before(self, listener: str, at: float | None) -> None:
        """The last message time the log holds from before this start (unless one has arrived since)."""
        if at is not None:
            self.last_message_at.setdefault(listener, at)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
