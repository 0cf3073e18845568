"""Replay for operators: logged messages run again through mapping and dispatch.

A replay is logged as a new message (``replay_of`` the original) with its own
commands; the running service's dispatcher sends them, guarded by the
appointment memory so nothing is triggered twice. ``--dry-run`` prints the
exact API calls instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge import store
from hl7bridge.app.config import Config, ListenerConfig
from hl7bridge.app.dispatch_config import router
from hl7bridge.dispatch.journeys import JourneysClient
from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.ingest.intake import Intake
from hl7bridge.mapping.routing import BOOK, CANCEL, MODIFY, RESCHEDULE, SUBFLOW


@dataclass
class ReplayResult:
    message_id: int
    new_message_id: int | None = None
    commands: int = 0
    calls: list[str] = field(default_factory=list)
    problem: str = ""
    skipped: bool = False


class Replayer:
    def __init__(self, engine: Engine, config: Config, clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.config = config
        self.clock = clock
        self.router = router(config.routes, config.dispatch)
        api = config.api
        self.client = JourneysClient(api, api.tokens())
        self.acks = AckBuilder(config.service.application, config.service.facility)

    def _listener(self, name: str) -> ListenerConfig:
        return next((lst for lst in self.config.listeners if lst.name == name), self.config.listeners[0])

    def replay(self, original: dict[str, Any], dry_run: bool) -> ReplayResult:
        result = ReplayResult(original["id"])
        if original["raw"] is None:
            result.problem = "the raw message was purged by retention; it cannot be replayed"
            return result
        if self.router is None:
            result.problem = "no [[routes]] are configured; there is nothing to dispatch"
            return result
        newer = store.later_message(self.engine, original["appointment_key"] or "", original["id"])
        if newer is not None:
            # Replaying an old booking after a cancel (or an old time after a reschedule) would undo it.
            result.problem = f"superseded by message {newer} for the same appointment; not replayed"
            result.skipped = True
            return result
        listener = self._listener(original["listener"])
        intake = Intake(listener.feed(), self.acks, listener.charset_fallback, self.router, listener.name)
        received = intake.read_frame(original["raw"]).messages[0]
        if received.problem is not None and not received.commands:
            result.problem = f"still not dispatchable: {received.problem.describe()}"
            return result
        if not received.commands:
            result.problem = f"nothing to dispatch ({received.note or received.status})"
            return result
        result.commands = len(received.commands)
        if dry_run:
            for command in received.commands:
                result.calls.extend(self.describe(command))
            return result
        row = received.row(original["listener"], "replay", self.clock())
        result.new_message_id = store.record_replay(self.engine, original, row, received.commands)
        return result

    def describe(self, command: dict[str, Any]) -> list[str]:
        """The API calls a command would make now, given what the bridge remembers of the appointment."""
        params = json.loads(command["parameters"])
        identifiers = json.loads(command["identifiers"])
        bot, kind = command["chat_bot_id"], command["kind"]
        memory = store.appointment_state(self.engine, command["appointment_key"])
        active = memory is not None and memory.state == "active"
        if kind != CANCEL and command["start_at"] is not None and command["start_at"] <= self.clock():
            return ["no call: the appointment has already started (the command would be dead-lettered)"]
        if kind in (BOOK, RESCHEDULE, MODIFY, SUBFLOW) and active and memory.parameters == params:
            return ["no call: already triggered with these parameters"]
        calls = []
        if kind == CANCEL or kind in (RESCHEDULE, MODIFY) or (kind == BOOK and active):
            calls.append(_render(*self.client.search_request(bot, identifiers)))
            method, url, body = self.client.cancel_request(bot, "__id__")
            calls.append(_render(method, url.replace("__id__", "{id}"), body) + "   (for each active instance found)")
        if kind != CANCEL:
            calls.append(_render(*self.client.trigger_request(bot, command["flow_id"], command["time_zone"], [params])))
        return calls


def _render(method: str, url: str, body: Any) -> str:
    return f"{method} {url}" + (f" {json.dumps(body, ensure_ascii=False)}" if body is not None else "")
