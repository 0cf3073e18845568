"""``check-config`` against the journeys: each route's mapped parameters and flows against the journey it feeds.

The Journeys API publishes no journey schema, so the journeys known are the ones the config declares for the
sandbox (``[[sandbox.journeys]]``). The API wants one value for every parameter of the journey and refuses
any other, so a mapping that disagrees with it fails on every message; this says which route and key at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from hl7bridge.app.config import Config, ConfigError
from hl7bridge.mapping.routing import Route
from hl7bridge.testing.sandbox import Journey


@dataclass
class JourneyCheck:
    #: Mismatches that make the API refuse the route's calls, each naming its key.
    problems: list[str] = field(default_factory=list)
    #: What may fail for some messages, or could not be checked.
    warnings: list[str] = field(default_factory=list)
    #: Routes that fit their journey.
    fitting: list[str] = field(default_factory=list)


def check_routes(routes: tuple[Route, ...], journeys: tuple[Journey, ...]) -> JourneyCheck:
    known = {j.chat_bot_id: j for j in journeys}
    out = JourneyCheck()
    for route in routes:
        key = f"routes[{route.name}]"
        journey = known.get(route.chat_bot_id)
        if journey is None:
            out.warnings.append(f"{key}.chat_bot_id: journey {route.chat_bot_id!r} is not among [[sandbox.journeys]]; "
                                "its parameters are not checked")  # fmt: skip
            continue
        before = len(out.problems)
        declared = set(journey.parameters)
        mapped = {spec.name: spec for spec in route.parameters}
        for name in sorted(mapped.keys() - declared):
            out.problems.append(f"{key}.parameters.{name}: not a parameter of journey {journey.chat_bot_id!r} "
                                f"(its parameters: {', '.join(journey.parameters)})")  # fmt: skip
        for name in sorted(declared - mapped.keys()):
            out.problems.append(f"{key}.parameters: journey {journey.chat_bot_id!r} needs parameter {name!r}, "
                                "which the route does not map")  # fmt: skip
        for setting, flow in (
            ("reschedule_flow_id", route.reschedule_flow_id),
            ("noshow_flow_id", route.noshow_flow_id),
        ):
            if flow and flow not in journey.subflows:
                out.problems.append(f"{key}.{setting}: journey {journey.chat_bot_id!r} has no subflow {flow!r} "
                                    f"(its subflows: {', '.join(journey.subflows) or 'none'})")  # fmt: skip
        for name in sorted(mapped.keys() & declared):
            spec = mapped[name]
            if not (spec.required or spec.default or spec.constant is not None):
                out.warnings.append(f"{key}.parameters.{name}: the journey wants a value on every call, but a message "
                                    "without one sends it empty (the sandbox refuses that); set required = true or a default")  # fmt: skip
        if len(out.problems) == before:
            out.fitting.append(f"route {route.name} fits journey {journey.chat_bot_id!r}")
    return out


@dataclass
class Verdict:
    """check-config's verdict on a file; ``reload`` and the service's SIGHUP handler install only what passes."""

    #: None when the file does not load.
    config: Config | None
    fit: JourneyCheck
    #: Why the file is refused, each "config error: ..." or "journey mismatch: ...", naming its key.
    problems: list[str]


def verdict(load: Callable[[], Config]) -> Verdict:
    """Load the file and check its routes against the declared journeys: one judgement for the three callers,
    so neither ``kill -HUP`` nor a file changed after ``hl7bridge reload`` checked it installs what
    check-config refuses."""
    try:
        config = load()
    except ConfigError as exc:
        return Verdict(None, JourneyCheck(), [f"config error: {problem}" for problem in exc.problems])
    fit = check_routes(config.routes, config.sandbox.journeys) if config.sandbox.journeys else JourneyCheck()
    return Verdict(config, fit, [f"journey mismatch: {problem}" for problem in fit.problems])
