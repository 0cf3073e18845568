"""The effective configuration as JSON for the admin's settings view (``GET /api/v1/settings``, ``/settings``),
every secret redacted by one function, so no section can show one by forgetting.

What counts as a secret: the sandbox's API tokens and its control token, and the password in any URL
(``service.database``, ``api.proxy``, ``api.base_url``). File paths and variable names are shown (``token_file``,
``token_env``, a TLS ``privateKey`` path): they say where a secret is, and no file is read here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from hl7bridge.app.config import Config

REDACTED = "[redacted]"
#: Keys whose values are secrets whatever they hold (the sandbox's control token; any future password field).
SECRET_KEYS = frozenset({"control_token", "password", "secret", "token"})
#: ``scheme://user:password@host``: the password part.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/@:\s]*:)(?P<password>[^@/\s]*)(?=@)")


def settings_json(config: Config) -> dict[str, Any]:
    """``config`` as JSON-ready data, secrets redacted."""
    return redacted(config)


def redacted(value: Any, key: str = "") -> Any:
    """``value`` (dataclasses, mappings, sequences, scalars) as JSON-ready data with every secret replaced."""
    if key in SECRET_KEYS:
        return REDACTED if value else value
    if key == "tokens" and isinstance(value, Mapping):
        # The sandbox's accepted API tokens: the keys are the secrets; their scopes say what each may do.
        return [{"token": REDACTED, "scopes": sorted(scopes)} for scopes in value.values()]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: redacted(getattr(value, f.name), f.name) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): redacted(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redacted(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(redacted(v) for v in value)
    if isinstance(value, str):
        return _URL_PASSWORD.sub(lambda m: m["head"] + REDACTED, value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)
