"""Which route (journey) an appointment event goes to, and the commands it asks for.

Pure: an event in, a ``Plan`` out. The dispatcher later turns commands into API
calls with the appointment's memory; here only the intent is decided.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from zoneinfo import ZoneInfo

from hl7bridge.core.status import MessageStatus
from hl7bridge.hl7.problems import REQUIRED_FIELD_MISSING, Problem
from hl7bridge.hl7.siu import AppointmentEvent
from hl7bridge.mapping.parameters import Context, MappingError, ParameterSpec, evaluate

#: Command kinds the dispatcher understands.
BOOK, RESCHEDULE, MODIFY, CANCEL, SUBFLOW = "book", "reschedule", "modify", "cancel", "subflow"


@dataclass(frozen=True)
class Criteria:
    """Value lists per attribute; an empty list places no condition."""

    sending_application: tuple[str, ...] = ()
    sending_facility: tuple[str, ...] = ()
    location: tuple[str, ...] = ()
    department: tuple[str, ...] = ()
    appointment_type: tuple[str, ...] = ()
    provider: tuple[str, ...] = ()

    def _checks(self, event: AppointmentEvent) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
        return [
            (self.sending_application, (event.sending_application,)),
            (self.sending_facility, (event.sending_facility,)),
            (self.location, (event.location, event.location_facility)),
            (self.department, (event.department,)),
            (self.appointment_type, (event.appointment_type_code, event.appointment_type)),
            (self.provider, (event.provider_id, event.provider_name)),
        ]

    def all_match(self, event: AppointmentEvent) -> bool:
        return all(not wanted or _hit(wanted, values) for wanted, values in self._checks(event))

    def any_match(self, event: AppointmentEvent) -> bool:
        return any(wanted and _hit(wanted, values) for wanted, values in self._checks(event))


def _hit(wanted: tuple[str, ...], values: tuple[str, ...]) -> bool:
    have = {v.strip().upper() for v in values if v}
    return any(w.strip().upper() in have for w in wanted)


@dataclass(frozen=True)
class Route:
    name: str
    chat_bot_id: str
    time_zone: str
    parameters: tuple[ParameterSpec, ...]
    instance_identifiers: tuple[str, ...]
    flow_id: str | None = None
    listeners: tuple[str, ...] = ()
    match: Criteria = field(default_factory=Criteria)
    exclude: Criteria = field(default_factory=Criteria)
    reschedule: str = "retrigger"
    reschedule_flow_id: str = ""
    noshow: str = "cancel"
    noshow_flow_id: str = ""
    content_errors: str = "reject"
    skip_started: bool = True
    skip_statuses: tuple[str, ...] = ()

    def applies(self, event: AppointmentEvent, listener: str) -> bool:
        if self.listeners and listener not in self.listeners:
            return False
        return self.match.all_match(event) and not self.exclude.any_match(event)

    @property
    def identifier_specs(self) -> tuple[ParameterSpec, ...]:
        return tuple(p for p in self.parameters if p.name in self.instance_identifiers)


@dataclass(frozen=True)
class Command:
    """One thing to do for an appointment, in the order its message arrived."""

    kind: str
    route: str
    chat_bot_id: str
    time_zone: str
    flow_id: str | None
    parameters: dict[str, str]
    identifiers: dict[str, str]
    appointment_key: str
    start_at: float | None


@dataclass
class Plan:
    """What routing decided: commands, or why there are none."""

    commands: list[Command] = field(default_factory=list)
    route: str | None = None
    status: str = MessageStatus.ACCEPTED
    note: str = ""
    problem: Problem | None = None
    accept_anyway: bool = False


@dataclass(frozen=True)
class Router:
    routes: tuple[Route, ...]
    unrouted: str = "ignore"

    def plan(self, event: AppointmentEvent, listener: str, source_zone: ZoneInfo, now: float | None = None) -> Plan:
        """Route and map one event; ``source_zone`` is the feed's zone for naive timestamps."""
        if event.action == "ignore":
            return Plan(status=MessageStatus.IGNORED, note=f"{event.event} needs no action")
        route = next((r for r in self.routes if r.applies(event, listener)), None)
        if route is None:
            if self.unrouted == "reject":
                return Plan(status=MessageStatus.REJECTED, note="no route matches this appointment",
                            problem=Problem("MSH-4", REQUIRED_FIELD_MISSING, "no route matches this appointment"))  # fmt: skip
            return Plan(status=MessageStatus.IGNORED, note="no route matches this appointment")
        now = time.time() if now is None else now
        if event.status and event.status.upper() in {s.upper() for s in route.skip_statuses}:
            return Plan(
                route=route.name, status=MessageStatus.IGNORED, note=f"status {event.status} is skipped by the route"
            )
        start_at = event.start.timestamp() if event.start else None
        creating = event.action in ("book", "reschedule", "modify")
        if creating and route.skip_started and start_at is not None and start_at <= now:
            return Plan(route=route.name, status=MessageStatus.IGNORED, note="the appointment has already started")
        if event.action == "noshow" and route.noshow == "ignore":
            return Plan(route=route.name, status=MessageStatus.IGNORED, note="no-show is ignored by the route")
        ctx = Context(event, source_zone, ZoneInfo(route.time_zone))
        try:
            identifiers = evaluate(route.identifier_specs, ctx)
            missing = [name for name, value in identifiers.items() if not value]
            if missing:
                spec = next(p for p in route.identifier_specs if p.name == missing[0])
                raise MappingError(spec.name, spec.location, "instance identifier is empty")
            parameters = evaluate(route.parameters, ctx) if creating else dict(identifiers)
        except MappingError as exc:
            problem = Problem(exc.location, exc.code, str(exc), value=exc.value)
            return Plan(route=route.name, status=MessageStatus.REJECTED, note=str(exc), problem=problem,
                        accept_anyway=route.content_errors == "accept")  # fmt: skip

        def command(kind: str, flow_id: str | None, params: dict[str, str], starts: float | None = start_at) -> Command:
            return Command(kind, route.name, route.chat_bot_id, route.time_zone, flow_id, params, identifiers,
                           event.appointment_key, starts)  # fmt: skip

        action = event.action
        if action == "book":
            commands = [command(BOOK, route.flow_id, parameters)]
        elif action in ("reschedule", "modify"):
            if route.reschedule == "subflow" and route.reschedule_flow_id:
                commands = [command(SUBFLOW, route.reschedule_flow_id, parameters)]
            else:
                commands = [command(RESCHEDULE if action == "reschedule" else MODIFY, route.flow_id, parameters)]
        elif action == "noshow" and route.noshow == "subflow" and route.noshow_flow_id:
            # A no-show is reported after the start by nature: never "too late" for its subflow.
            commands = [command(SUBFLOW, route.noshow_flow_id, dict(identifiers), starts=None)]
        else:  # cancel, noshow (cancel), end (quiet cancel)
            commands = [command(CANCEL, None, dict(identifiers))]
        return Plan(commands=commands, route=route.name, note=f"{action} via route {route.name}")
