"""Stage objects built from the configuration, in one place so that ``serve``, ``check`` and replay build them alike."""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import Engine

from hl7bridge.app.config import Config, ListenerConfig
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


def replayer_for(engine: Engine, config: Config, **options: Any) -> Replayer:
    """The replayer for ``config`` (``hl7bridge replay`` and the service's JSON API alike). A replay is judged as
    its listener judges, with the current routes, but never waits for a verdict: nobody waits for its ACK."""
    acks = AckBuilder(config.service.application, config.service.facility)
    routes = router(config.routes, config.dispatch)
    listeners = {lst.name: lst for lst in config.listeners}

    def intake(name: str) -> Intake:
        listener = listeners.get(name, config.listeners[0])
        return Intake(listener.feed(), acks, listener.charset_fallback, routes, listener.name)

    return Replayer(engine, intake, config.api, **options)
