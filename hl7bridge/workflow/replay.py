"""Replay for operators: logged messages run again through mapping and dispatch.

A replay is logged as a new message (``replay_of`` the original) with its own
commands; the running service's dispatcher sends them, guarded by the
appointment memory so nothing is triggered twice. A dry run describes the
exact API calls instead. ``hl7bridge replay`` and ``POST /api/v1/replay`` both
run ``Replayer.replay``; the intakes come from the configuration
(``app.wiring.replayer_for``), which this layer does not read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge import store
from hl7bridge.core.logs import masked
from hl7bridge.dispatch.journeys import ApiSettings, JourneysClient
from hl7bridge.ingest.intake import Intake
from hl7bridge.mapping.routing import BOOK, CANCEL, MODIFY, RESCHEDULE, SUBFLOW
from hl7bridge.workflow.dispatch_target import dispatch_target


@dataclass
class ReplayResult:
    message_id: int
    new_message_id: int | None = None
    commands: int = 0
    calls: list[str] = field(default_factory=list)
    problem: str = ""
    skipped: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Replayer:
    def __init__(
        self,
        engine: Engine,
        intake_for: Callable[[str], Intake],
        api: ApiSettings,
        clock: Callable[[], float] = time.time,
        actor: str = "",
        phi: bool = False,
        channel: str = "cli",
        reason: str = "",
    ) -> None:
        """``intake_for``: the intake that judges a message of the named listener now (the current routes)."""
        self.engine = engine
        self.intake_for = intake_for
        self.clock = clock
        self.target = dispatch_target(engine, api.base_url)
        api = replace(api, base_url=self.target.base_url)
        self.client = JourneysClient(api, api.tokens())
        #: Who replays, through what and why, for the audit log; the dry run's calls show patient data only with
        #: ``phi``.
        self.actor = actor
        self.phi = phi
        self.channel = channel
        self.reason = reason

    def replay(self, original: dict[str, Any], dry_run: bool, edited: bytes | None = None) -> ReplayResult:
        """Run the original again, or ``edited`` (an operator's corrected copy) in its place; the original row
        never changes. A replay that is done is audited in the same transaction."""
        result = ReplayResult(original["id"])
        raw = edited if edited is not None else original["raw"]
        if raw is None:
            result.problem = "the raw message was purged by retention; it cannot be replayed"
            return result
        intake = self.intake_for(original["listener"])
        if intake.router is None:
            result.problem = "no [[routes]] are configured; there is nothing to dispatch"
            return result
        newer = store.later_message(self.engine, original["appointment_key"] or "", original["id"])
        if newer is not None:
            # Replaying an old booking after a cancel (or an old time after a reschedule) would undo it.
            result.problem = f"superseded by message {newer} for the same appointment; not replayed"
            result.skipped = True
            return result
        received = intake.read_frame(raw).messages[0]
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
        entry = store.AuditEntry(self.actor, self.channel, "replay", "message", reason=self.reason,
                                 details={"edited": edited is not None})  # fmt: skip
        result.new_message_id = store.record_replay(self.engine, original, row, received.commands, entry)
        return result

    def describe(self, command: dict[str, Any]) -> list[str]:
        """The API calls a command would make now, given what the bridge remembers of the appointment."""
        params = json.loads(command["parameters"])
        identifiers = json.loads(command["identifiers"])
        shown_params, shown_ids = (params, identifiers) if self.phi else (_masked(params), _masked(identifiers))
        bot, kind = command["chat_bot_id"], command["kind"]
        memory = store.appointment_state(self.engine, command["appointment_key"])
        active = memory is not None and memory.state == "active"
        if kind != CANCEL and command["start_at"] is not None and command["start_at"] <= self.clock():
            return ["no call: the appointment has already started (the command would be dead-lettered)"]
        if kind in (BOOK, RESCHEDULE, MODIFY, SUBFLOW) and active and memory.parameters == params:
            return ["no call: already triggered with these parameters"]
        calls = []
        if kind == CANCEL or kind in (RESCHEDULE, MODIFY) or (kind == BOOK and active):
            calls.append(_render(*self.client.search_request(bot, shown_ids)))
            method, url, body = self.client.cancel_request(bot, "__id__")
            calls.append(_render(method, url.replace("__id__", "{id}"), body) + "   (for each active instance found)")
        if kind != CANCEL:
            calls.append(
                _render(*self.client.trigger_request(bot, command["flow_id"], command["time_zone"], [shown_params]))
            )
        return calls


def _masked(values: dict[str, Any]) -> dict[str, Any]:
    """Journey parameters masked: any of them may be patient data (the routes decide what they carry)."""
    return {k: masked(v) if isinstance(v, str) else v for k, v in values.items()}


def _render(method: str, url: str, body: Any) -> str:
    return f"{method} {url}" + (f" {json.dumps(body, ensure_ascii=False)}" if body is not None else "")
