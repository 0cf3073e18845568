"""The JSON API as the tests meet it: the real service (its own process) with the console listener on loopback,
accounts of each role made through ``workflow.accounts`` on the same log, and a small HTTP client over real
sockets (``requests``, no proxies)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from hl7bridge.store import open_engine
from hl7bridge.workflow import accounts

from .conftest import RunningService, free_port, start_service

PASSWORD = "correct horse battery staple"
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; form-action 'self'",
    "Referrer-Policy": "no-referrer",
}


def console_toml(port: int) -> str:
    return f'\n[console]\nlisten = "tcp:{port}:interface=127.0.0.1"\n'


@dataclass
class Api:
    """The console listener of a running service, with a bearer token per role."""

    service: RunningService
    port: int
    tokens: dict[str, str] = field(default_factory=dict)
    #: Every answer the tests received, for the checks that hold for all of them (headers, no PHI).
    seen: list[requests.Response] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, *, role: str | None = None, session: requests.Session | None = None,
             **kwargs: Any) -> requests.Response:  # fmt: skip
        headers = dict(kwargs.pop("headers", {}) or {})
        if role is not None:
            headers["Authorization"] = f"Bearer {self.tokens[role]}"
        if session is None:
            headers.setdefault("Connection", "close")  # the listener takes so many connections at once
        sender = session or requests.Session()
        sender.trust_env = False
        response = sender.request(method, self.url + path, headers=headers, timeout=30, allow_redirects=False,
                                  **kwargs)  # fmt: skip
        self.seen.append(response)
        return response

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.call("GET", path, **kwargs)

    def post(self, path: str, body: Any = None, **kwargs: Any) -> requests.Response:
        return self.call("POST", path, json=body, **kwargs)

    def login(self, name: str, password: str = PASSWORD) -> tuple[requests.Session, dict[str, Any]]:
        session = requests.Session()
        answer = self.call("POST", "/api/v1/session", session=session, json={"name": name, "password": password})
        assert answer.status_code == 200, answer.text
        return session, answer.json()

    def raw(self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None,
            source: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:  # fmt: skip
        """One request from a chosen loopback source address (the login limiter counts per peer)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers=headers or {})
            answer = conn.getresponse()
            return answer.status, dict(answer.getheaders()), answer.read()
        finally:
            conn.close()


def start_api(workdir: Path, config_text: str, env: dict[str, str] | None = None) -> Api:
    port = free_port()
    service = start_service(workdir, config_text + console_toml(port), env=env)
    api = Api(service, port)
    engine = open_engine(service.url, create=False)
    try:
        for role in ("viewer", "operator", "admin"):
            accounts.add_user(engine, role, role, PASSWORD, actor="test")
            api.tokens[role] = accounts.issue_token(engine, role, actor="test", label="tests")
    finally:
        engine.dispose()
    return api


def body_of(response: requests.Response) -> Any:
    return json.loads(response.content) if response.content else None
