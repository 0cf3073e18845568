"""Stage objects built from the configuration, in one place so that ``serve``, ``check`` and replay build them alike."""

from __future__ import annotations

from hl7bridge.app.config import Config, ListenerConfig
from hl7bridge.app.dispatch_config import router
from hl7bridge.hl7.ack import AckBuilder
from hl7bridge.ingest.intake import Intake


def intake_for(config: Config, listener: ListenerConfig, acks: AckBuilder | None = None) -> Intake:
    """The intake a listener judges messages with. ``serve`` and ``check`` both build it here, so that
    ``check`` answers a message exactly as the running service would."""
    acks = acks or AckBuilder(config.service.application, config.service.facility, config.service.ack_phi)
    return Intake(listener.feed(), acks, listener.charset_fallback, router(config.routes, config.dispatch),
                  listener.name, listener.ack_mode == "dispatched")  # fmt: skip
