"""The console listener itself: over TLS (an ``ssl:`` endpoint) the session cookie is marked Secure and the
same-origin check expects https; the listener takes at most ``max_connections`` connections at once and closes
one that sends nothing for ``idle_timeout``."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .api_support import PASSWORD, SECURITY_HEADERS
from .conftest import RunningService, free_port, start_service, wait_until
from .test_tls import Pki, make_pki

MAX_CONNECTIONS = 3
#: Long enough that a connection closed well before it was refused by the cap, not timed out.
IDLE = 8
#: A request must be whole this long after its first line, however steadily it drips.
REQUEST = 3


@pytest.fixture(scope="module")
def tls_console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningService, int, Pki]]:
    from hl7bridge.store import open_engine
    from hl7bridge.workflow import accounts

    workdir = tmp_path_factory.mktemp("console-tls")
    pki = make_pki(workdir / "pki")
    port = free_port()
    endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}"
    config = (f'[console]\nlisten = "{endpoint}"\nmax_connections = {MAX_CONNECTIONS}\nidle_timeout = {IDLE}\n'
              f"request_timeout = {REQUEST}\n")  # fmt: skip
    service = start_service(workdir, config)
    engine = open_engine(service.url, create=False)
    accounts.add_user(engine, "olivia", "operator", PASSWORD, actor="test")
    engine.dispose()
    yield service, port, pki
    service.stop()


def https(port: int, pki: Pki) -> requests.Session:
    session = requests.Session()
    session.trust_env = False
    session.verify = str(pki.ca_cert)
    return session


def test_over_tls_the_session_cookie_is_secure(tls_console: tuple[RunningService, int, Pki]) -> None:
    _, port, pki = tls_console
    url = f"https://127.0.0.1:{port}"
    with https(port, pki) as session:
        login = session.post(f"{url}/api/v1/session", json={"name": "olivia", "password": PASSWORD}, timeout=30)
        assert login.status_code == 200, login.text
        cookie = login.headers["Set-Cookie"]
        assert "; Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert login.headers["Strict-Transport-Security"] == "max-age=31536000"
        assert all(login.headers[k] == v for k, v in SECURITY_HEADERS.items())
        csrf = login.json()["csrf"]
        # The page's own origin is https here; the http spelling of it is another origin.
        foreign = session.delete(f"{url}/api/v1/session", headers={"X-CSRF-Token": csrf, "Origin": f"http://127.0.0.1:{port}"},
                                 timeout=30)  # fmt: skip
        assert foreign.status_code == 403
        own = session.delete(f"{url}/api/v1/session", headers={"X-CSRF-Token": csrf, "Origin": url}, timeout=30)
        assert own.status_code == 204


def _tls_socket(port: int, pki: Pki) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def _closed_by_server(sock: socket.socket, wait: float) -> bool:
    """Whether the server closes ``sock`` within ``wait`` seconds (it sends nothing else)."""
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_connections_past_the_cap_are_closed_and_idle_ones_time_out(
    tls_console: tuple[RunningService, int, Pki],
) -> None:
    _, port, pki = tls_console
    held = [_tls_socket(port, pki) for _ in range(MAX_CONNECTIONS)]
    try:
        try:
            extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        except ConnectionResetError:
            pass  # closed while connecting: refused all the same
        else:
            with extra:
                assert _closed_by_server(extra, IDLE / 2)
        # Sending nothing, the held connections are closed after idle_timeout, which frees the listener.
        for sock in held:
            assert _closed_by_server(sock, IDLE * 4)
    finally:
        for sock in held:
            sock.close()
    with https(port, pki) as session:
        answer = wait_until(lambda: _get(session, port), message="the console taking connections again")
        assert answer.status_code == 200


def _get(session: requests.Session, port: int) -> requests.Response | None:
    try:
        return session.get(f"https://127.0.0.1:{port}/api/v1/openapi.json", timeout=10, headers={"Connection": "close"})
    except requests.ConnectionError:
        return None


def test_tls_marks_cookies_secure_only_for_ssl_endpoints(tmp_path: Path) -> None:
    from hl7bridge.app.config import ConsoleConfig

    assert ConsoleConfig(listen="ssl:8443:privateKey=k.pem:certKey=c.pem").tls
    assert not ConsoleConfig(listen="tcp:8081:interface=127.0.0.1").tls


def test_a_request_dripping_a_header_line_at_a_time_is_cut_off(tls_console: tuple[RunningService, int, Pki]) -> None:
    """Slowloris: each line arrives well within idle_timeout, so only the request's own deadline ends it."""
    _, port, pki = tls_console
    with _tls_socket(port, pki) as sock:
        sock.sendall(b"GET /api/v1/openapi.json HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed = False
        for n in range(IDLE * 2):
            try:
                sock.sendall(f"X-Drip-{n}: 1\r\n".encode())
            except (ConnectionError, ssl.SSLError, OSError):
                closed = True
                break
            if _closed_by_server(sock, 1.0):
                closed = True
                break
        assert closed and n < IDLE, "cut off by request_timeout, long before the drip would have ended"
    with https(port, pki) as session:
        assert _get(session, port) is not None and _get(session, port).status_code == 200  # type: ignore[union-attr]
