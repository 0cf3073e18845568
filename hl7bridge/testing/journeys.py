"""An in-memory Journeys API client: the dispatcher's calls answered without HTTP, for tests that are about
the bridge and not about the wire (``testing.sandbox`` is the one to use for the wire).

It answers as the API documents and as ``JourneysClient`` classifies: a trigger creates one active instance
per parameter set, a search returns the instances whose parameters equal the searched ones, a cancel ends
an instance (an unknown one counts as cancelled, as a 404 does). ``fail_next`` queues answers to give
instead, to drive retries, pauses and dead letters.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hl7bridge.dispatch.journeys import ApiResult, Verdict

ACTIVE = "InProgress"
CANCELLED = "Cancelled"


@dataclass
class Call:
    operation: str
    chat_bot_id: str
    detail: Any


@dataclass
class FakeJourneys:
    """Stands in for ``JourneysClient`` (``trigger``, ``search``, ``cancel``); safe to call from several threads."""

    #: Every call, in order, answered or failed.
    calls: list[Call] = field(default_factory=list)
    #: Instances per chat bot: ``{"id", "status", "flowId", "timeZone", "parameters"}``.
    instances: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    _failures: deque[ApiResult] = field(default_factory=deque)
    _ids: Any = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def fail_next(self, verdict: Verdict, status: int | None, message: str = "injected by FakeJourneys") -> None:
        """The next call gets this answer instead, and changes nothing."""
        with self._lock:
            self._failures.append(ApiResult("", verdict, status, "", message, 0.0, (message,)))

    def active(self, chat_bot_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(i) for i in self.instances.get(chat_bot_id, []) if i["status"] == ACTIVE]

    def trigger(
        self, chat_bot_id: str, flow_id: str | None, time_zone: str, instances: list[dict[str, str]]
    ) -> ApiResult:
        summary = f"POST bulk chatBotId={chat_bot_id} flowId={flow_id} timeZone={time_zone} instances={len(instances)}"
        with self._lock:
            self.calls.append(Call("trigger", chat_bot_id, [dict(p) for p in instances]))
            if failed := self._failed("trigger", summary):
                return failed
            for parameters in instances:
                instance = {"id": f"fake-{next(self._ids)}", "status": ACTIVE, "flowId": flow_id, "timeZone": time_zone}
                self.instances.setdefault(chat_bot_id, []).append(instance | {"parameters": dict(parameters)})
        return ApiResult("trigger", Verdict.SUCCESS, 204, summary, "", 0.0)

    def search(self, chat_bot_id: str, parameters: dict[str, str]) -> ApiResult:
        summary = f"POST search chatBotId={chat_bot_id} by {','.join(parameters)}"
        with self._lock:
            self.calls.append(Call("search", chat_bot_id, dict(parameters)))
            if failed := self._failed("search", summary):
                return failed
            found = [
                {"id": i["id"], "status": i["status"], "parameters": dict(i["parameters"])}
                for i in self.instances.get(chat_bot_id, [])
                if all(i["parameters"].get(name) == value for name, value in parameters.items())
            ]
        return ApiResult("search", Verdict.SUCCESS, 200, summary, "", 0.0, data=found)

    def cancel(self, chat_bot_id: str, instance_id: str) -> ApiResult:
        summary = f"DELETE instance {instance_id}"
        with self._lock:
            self.calls.append(Call("cancel", chat_bot_id, instance_id))
            if failed := self._failed("cancel", summary):
                return failed
            for instance in self.instances.get(chat_bot_id, []):
                if instance["id"] == instance_id:
                    instance["status"] = CANCELLED
                    return ApiResult("cancel", Verdict.SUCCESS, 204, summary, "", 0.0)
        return ApiResult(
            "cancel", Verdict.SUCCESS, 404, summary, "", 0.0, ("instance not found; counted as cancelled",)
        )

    def _failed(self, operation: str, summary: str) -> ApiResult | None:
        if not self._failures:
            return None
        failure = self._failures.popleft()
        return ApiResult(operation, failure.verdict, failure.status, summary, failure.response_body, 0.0,
                         failure.messages, reached=failure.status is not None)  # fmt: skip
