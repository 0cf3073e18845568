"""Which configuration this is: a digest of the settings that decide what a message becomes.

Two files that read, route and map every message alike have the same digest, however they are laid out or
commented, and whatever their secrets, endpoints or timeouts; any change to reading, routing or mapping
changes it. The log records it with every command (``configs``), the service logs it at start and on
reload, and ``config diff`` names the two it compared by it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from sqlalchemy.engine import Engine

from hl7bridge.app.config import Config, ListenerConfig
from hl7bridge.hl7.er7 import Path

#: A listener's settings that change how a message is read or answered (not where or how it is received).
_READING = ("name", "ack_mode", "time_zone", "start_sources", "charset_fallback", "validation", "max_message_bytes",
            "max_segments", "max_repetitions", "max_components", "max_subcomponents", "max_batch_messages")  # fmt: skip


def effective_settings(config: Config) -> dict[str, Any]:
    """The settings that decide each message's ACK and commands, as plain JSON values; no secret is among them."""
    return {
        "ack": {
            "application": config.service.application,
            "facility": config.service.facility,
            "ack_phi": config.service.ack_phi,
        },
        "listeners": [_reading(listener) for listener in config.listeners],
        "unrouted": config.dispatch.unrouted,
        "routes": [asdict(route) for route in config.routes],
    }


def _reading(listener: ListenerConfig) -> dict[str, Any]:
    return {key: getattr(listener, key) for key in _READING}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return asdict(value)
    raise TypeError(f"{type(value).__name__} has no canonical form")


def digest(config: Config) -> str:
    """SHA-256 of the canonical JSON (sorted keys, no spaces) of ``effective_settings``."""
    canonical = orjson.dumps(effective_settings(config), option=orjson.OPT_SORT_KEYS, default=_plain)
    return hashlib.sha256(canonical).hexdigest()


@dataclass(frozen=True)
class ConfigIdentity:
    """A loaded configuration as the log records it: its digest, the file and the file's mtime."""

    digest: str
    path: str
    mtime: float | None

    @property
    def short(self) -> str:
        return self.digest[:12]

    def describe(self) -> str:
        return f"{self.path} (digest {self.short})"

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "digest": self.digest, "mtime": self.mtime}


def identity(config: Config) -> ConfigIdentity:
    """The identity of a loaded configuration; ``Config.source`` is the file it was read from."""
    try:
        mtime: float | None = os.stat(config.source).st_mtime
    except OSError:
        return ConfigIdentity(digest(config), config.source, None)
    return ConfigIdentity(digest(config), os.path.abspath(config.source), mtime)


def record_config(engine: Engine, config: ConfigIdentity) -> int:
    """The ``configs`` id of ``config``, added when new (a replay's commands name the configuration that made them)."""
    from hl7bridge.store.configs import register_config

    with engine.begin() as conn:
        return register_config(conn, config.digest, config.path, config.mtime, time.time())
