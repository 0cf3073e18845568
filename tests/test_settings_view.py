"""The admin's settings view (``app.settings_view``): the effective configuration as JSON with every secret
redacted by one function. Built from a real configuration file holding known secrets."""

from __future__ import annotations

import json
from pathlib import Path

from hl7bridge.app.config import load
from hl7bridge.app.settings_view import REDACTED, settings_json

from .conftest import ROOT

SECRETS = {
    "control": "control-secret-7f3a9c2e11",
    "sandbox token": "sandbox-secret-token-4b8d",
    "second sandbox token": "read-only-secret-token-9e1f",
    "database password": "db-pass-word-3c5a",
    "proxy password": "proxy-pass-word-8d2b",
}


def _config_with_secrets(tmp_path: Path) -> Path:
    text = (ROOT / "config/hl7bridge.example.toml").read_text()
    text = text.replace('control_token = ""', f'control_token = "{SECRETS["control"]}"')
    text = text.replace('token = "sandbox-demo-token"', f'token = "{SECRETS["sandbox token"]}"')
    text = text.replace('proxy = ""', f'proxy = "http://ops:{SECRETS["proxy password"]}@proxy.example:3128"')
    text += f'\n[[sandbox.tokens]]\ntoken = "{SECRETS["second sandbox token"]}"\nscopes = ["read.journey_instances"]\n'
    database = f"postgresql+psycopg://hl7bridge:{SECRETS['database password']}@db.example/hl7bridge"
    text = text.replace('database = "sqlite:///var/hl7bridge.db"', f'database = "{database}"')
    assert all(secret in text for secret in SECRETS.values())
    path = tmp_path / "secrets.toml"
    path.write_text(text)
    return path


def test_no_secret_of_the_configuration_is_shown(tmp_path: Path) -> None:
    shown = settings_json(load(_config_with_secrets(tmp_path)))
    text = json.dumps(shown)
    leaked = [name for name, secret in SECRETS.items() if secret in text]
    assert leaked == []
    assert shown["sandbox"]["control_token"] == REDACTED
    assert shown["sandbox"]["tokens"] == [
        {"token": REDACTED, "scopes": ["create.journey_instances", "read.journey_instances"]},
        {"token": REDACTED, "scopes": ["read.journey_instances"]},
    ]
    assert shown["service"]["database"] == f"postgresql+psycopg://hl7bridge:{REDACTED}@db.example/hl7bridge"
    assert shown["api"]["proxy"] == f"http://ops:{REDACTED}@proxy.example:3128"


def test_every_section_is_shown_as_plain_json(tmp_path: Path) -> None:
    shown = settings_json(load(_config_with_secrets(tmp_path)))
    assert {"service", "listeners", "api", "dispatch", "routes", "sandbox", "health", "reconcile", "console",
            "source"} <= set(shown)  # fmt: skip
    assert shown["listeners"][0]["endpoint"].startswith("tcp:") and shown["routes"][0]["parameters"]
    assert shown["service"]["retention_days"] == 0 and shown["console"]["listen"]
    # Where a secret is kept is shown (a path, a variable's name), never what the file holds.
    assert shown["api"]["token_file"] == "config/sandbox.token" and shown["api"]["token_env"]
    assert json.loads(json.dumps(shown)) == shown
