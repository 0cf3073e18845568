"""A scriptable hostile stand-in for the Journeys API on loopback, for unit tests and reliability scenarios.

It speaks raw HTTP/1.1 over a socket, so it can answer what no well-behaved framework would: an interim
``103`` before the final answer, a body dripped one byte at a time, an endless chunked stream, redirects,
bodies with lone surrogates or control characters. Each of the three endpoints (``bulk``, ``search``,
``cancel``) answers from its script (a list of ``Answer``, the last one repeating), else as the API
documents: 204 for bulk and cancel, and for search the instances of the bulk calls answered 204 whose
parameters match the search's (the API's own answer, without its cancels). Every request is recorded in
``seen``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

REASONS = {200: "OK", 204: "No Content", 301: "Moved Permanently", 302: "Found", 307: "Temporary Redirect",
           400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 503: "Service Unavailable"}  # fmt: skip


@dataclass(frozen=True)
class Answer:
    """One scripted answer. ``body`` may be bytes, or any value (sent as JSON)."""

    status: int = 200
    body: Any = b""
    headers: dict[str, str] = field(default_factory=dict)
    #: Sent before the final answer: raw interim responses such as ``103 Early Hints``.
    interim: tuple[int, ...] = ()
    #: Seconds between the interim answers and the final one (the final one then lands on a pooled connection).
    interim_gap: float = 0.0
    #: Seconds between the bytes of the body (a drip); 0 sends it at once.
    drip: float = 0.0
    #: Drip the status line and headers too.
    drip_head: bool = False
    #: Seconds of silence after the headers, before the body.
    stall: float = 0.0
    #: A chunked body of ``body`` repeated until the client goes away.
    endless: bool = False

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


def json_answer(status: int, value: Any, **headers: str) -> Answer:
    """JSON written as Python's json module writes it, lone surrogates (as ``\\udfff`` escapes) included."""
    return Answer(status, json.dumps(value).encode(), {"Content-Type": "application/json", **headers})


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class HostileApi:
    def __init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.seen: list[Seen] = []
        self._scripts: dict[str, list[Answer]] = {}
        self._triggered: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="hostile-api", daemon=True).start()

    # -- scripting -----------------------------------------------------------------------------------
    def script(self, endpoint: str, *answers: Answer) -> None:
        """Answers for ``bulk``, ``search`` or ``cancel``, in order; the last repeats."""
        with self._lock:
            self._scripts[endpoint] = list(answers)

    def reset(self) -> None:
        with self._lock:
            self._scripts.clear()
            self.seen.clear()
            self._triggered.clear()

    def requests(self, endpoint: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if endpoint is None or _endpoint(s.method, s.path) == endpoint]

    def close(self) -> None:
        self._closed = True
        self._server.close()

    # -- serving -------------------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            reader = conn.makefile("rb")
            try:
                while True:
                    request = _read_request(reader)
                    if request is None:
                        return
                    with self._lock:
                        self.seen.append(request)
                        answer = self._next(request)
                    if not _answer(conn, answer):
                        return
            except OSError:
                return

    def _next(self, request: Seen) -> Answer:
        endpoint = _endpoint(request.method, request.path)
        script = self._scripts.get(endpoint)
        if script:
            answer = script.pop(0) if len(script) > 1 else script[0]
        elif endpoint == "search":
            answer = json_answer(200, self._found(request.json))
        else:
            answer = Answer(204) if endpoint in ("bulk", "cancel") else Answer(404)
        if endpoint == "bulk" and 200 <= answer.status < 300:  # a 2xx may have done the work
            self._triggered.extend(i["parameters"] for i in request.json["instances"])
        return answer

    def _found(self, search: dict) -> list[dict]:
        wanted = {s["parameterName"]: s["rightOperand"] for s in search["filterSpecification"]["specifications"]}
        return [{"id": f"instance-{n}", "status": "InProgress", "parameters": p}
                for n, p in enumerate(self._triggered) if all(p.get(k) == v for k, v in wanted.items())]  # fmt: skip


def _endpoint(method: str, path: str) -> str:
    if method == "POST" and path.endswith("/instances/bulk"):
        return "bulk"
    if method == "POST" and path.endswith("/instances/search"):
        return "search"
    if method == "DELETE" and path.endswith("/execution"):
        return "cancel"
    return "other"


def _read_request(reader: Any) -> Seen | None:
    line = reader.readline(65537)
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while (header := reader.readline(65537)) not in (b"\r\n", b"\n", b""):
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", "0")))
    return Seen(method, path, headers, body, time.monotonic())


def _answer(conn: socket.socket, answer: Answer) -> bool:
    """Send one answer; False when the connection must end (it was an endless or dripped one, or broke)."""
    for status in answer.interim:
        conn.sendall(f"HTTP/1.1 {status} Interim\r\nLink: </style.css>; rel=preload\r\n\r\n".encode())
    if answer.interim and answer.interim_gap:
        time.sleep(answer.interim_gap)
    body = answer.payload()
    head = [f"HTTP/1.1 {answer.status} {REASONS.get(answer.status, 'Whatever')}"]
    head += [f"{k}: {v}" for k, v in answer.headers.items()]
    if answer.endless:
        head.append("Transfer-Encoding: chunked")
    elif answer.status != 204 and answer.status >= 200:
        head.append(f"Content-Length: {len(body)}")
    try:
        if answer.drip_head:
            for byte in ("\r\n".join(head) + "\r\n\r\n").encode("latin-1"):
                conn.sendall(bytes([byte]))
                time.sleep(answer.drip)
        else:
            conn.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        time.sleep(answer.stall)
        if answer.endless:
            chunk = b"%x\r\n%s\r\n" % (len(body), body)
            while True:
                conn.sendall(chunk)
        if answer.drip:
            for i in range(len(body)):
                conn.sendall(body[i : i + 1])
                time.sleep(answer.drip)
            return False
        conn.sendall(body)
    except OSError:
        return False
    return True


@pytest.fixture(scope="module", name="server")
def server_fixture() -> Iterator[HostileApi]:
    """One hostile API per test module (import ``server_fixture`` and ``api_fixture`` to use it)."""
    running = HostileApi()
    yield running
    running.close()


@pytest.fixture(name="api")
def api_fixture(server: HostileApi) -> HostileApi:
    server.reset()
    return server
