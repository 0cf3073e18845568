"""Stage objects built from the configuration, in one place so that ``serve``, ``check`` and replay build them alike."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.config import Config, ListenerConfig
from hl7bridge.app.config_digest import identity, record_config
from hl7bridge.app.dispatch_config import router
from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.ingest.intake import Intake
from hl7bridge.workflow.replay import Replayer


def intake_for(config: Config, listener: ListenerConfig, acks: AckBuilder | None = None) -> Intake:
    """The intake a listener judges messages with. ``serve`` and ``check`` both build it here, so that
    ``check`` answers a message exactly as the running service would."""
    acks = acks or AckBuilder(config.service.application, config.service.facility, config.service.ack_phi)
    return Intake(listener.feed(), acks, listener.charset_fallback, router(config.routes, config.dispatch),
                  listener.name, listener.ack_mode == "dispatched")  # fmt: skip


def listener_intakes(
    config: Config, clock: Callable[[], float] = time.time, config_id: int | None = None
) -> Callable[[str], Intake]:
    """The intake that judges a logged message of the named listener (an unknown name: the first listener's)
    with ``config``, as its listener would, but never waiting for a verdict: nobody waits for its ACK. Replay and
    ``config diff`` judge logged messages with it; ``clock`` is the time routing takes as now."""
    acks = AckBuilder(config.service.application, config.service.facility)
    routes = router(config.routes, config.dispatch)
    intakes = {lst.name: Intake(lst.feed(), acks, lst.charset_fallback, routes, lst.name, clock=clock)
               for lst in config.listeners}  # fmt: skip
    for intake in intakes.values():
        intake.config_id = config_id
    first = intakes[config.listeners[0].name]
    return lambda name: intakes.get(name, first)


def replayer_for(engine: Engine, config: Config, **options: Any) -> Replayer:
    """The replayer for ``config`` (``hl7bridge replay`` and the service's JSON API alike), with the current
    routes; its commands name ``config`` (recorded in ``configs`` here) as every command does."""
    return Replayer(engine, listener_intakes(config, config_id=record_config(engine, identity(config))), config.api,
                    **options)  # fmt: skip
