"""MLLP over TLS against the real service, with a throwaway CA, server and client certificates."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hl7bridge.mllp import BlockingClient
from tests.conftest import ROOT, RunningService, fixture_bytes, free_port, segments, start_service, unique_control

BASE = fixture_bytes("siu/s12_epic_v251.hl7")
RUN = uuid.uuid4().hex[:8].upper()
_counter = itertools.count(1)


def control() -> str:
    return f"TL{RUN}{next(_counter):05d}"


def message(control_id: str) -> bytes:
    return unique_control(BASE, control_id)


def msa(ack: bytes) -> list[str]:
    return segments(ack)["MSA"]


# --- a throwaway PKI ------------------------------------------------------------------------------


@dataclass
class Pki:
    ca_cert: Path
    ca_dir: Path  # holds only the CA certificate, as <name>.pem
    server_key: Path
    server_cert: Path
    client_key: Path
    client_cert: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    ca: bool = False,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def make_pki(where: Path) -> Pki:
    where.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _issue("hl7bridge test CA", ca_key, _name("hl7bridge test CA"), ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "localhost",
        server_key,
        ca_cert.subject,
        ca_key,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _issue("epic-feed", client_key, ca_cert.subject, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_dir = where / "trusted"
    ca_dir.mkdir()
    pki = Pki(
        ca_cert=where / "ca.pem",
        ca_dir=ca_dir,
        server_key=where / "server.key",
        server_cert=where / "server.pem",
        client_key=where / "client.key",
        client_cert=where / "client.pem",
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_cert(ca_dir / "ca.pem", ca_cert)
    _write_key(pki.server_key, server_key)
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.client_key, client_key)
    _write_cert(pki.client_cert, client_cert)
    return pki


def client_context(pki: Pki, with_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_cert:
        ctx.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    return ctx


def ssl_endpoint(port: int, pki: Pki, extra: str = "") -> str:
    return f"ssl:{port}:interface=127.0.0.1:privateKey={pki.server_key}:certKey={pki.server_cert}{extra}"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_service(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RunningService]:
    port = free_port()
    running = start_service(tmp_path_factory.mktemp("tls"), listen=[ssl_endpoint(port, pki)], port=port)
    yield running
    running.stop()


# --- tests ----------------------------------------------------------------------------------------


def test_tls_listener_answers_aa(tls_service: RunningService, pki: Pki) -> None:
    ctrl = control()
    ctx = client_context(pki)
    with BlockingClient("127.0.0.1", tls_service.port, timeout=10, ssl_context=ctx, server_hostname="localhost") as c:
        assert c.sock.version() is not None  # really TLS
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
    rows = [r for r in tls_service.log() if r["control_id"] == ctrl]
    assert [r["status"] for r in rows] == ["accepted"]


def test_tls_listener_refuses_plaintext_mllp(tls_service: RunningService) -> None:
    ctrl = control()
    with BlockingClient("127.0.0.1", tls_service.port, timeout=10) as c:
        c.send(message(ctrl))
        data = b""
        try:
            while chunk := c.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    assert b"MSA" not in data
    assert ctrl not in {r["control_id"] for r in tls_service.log()}


def test_cli_send_over_tls_endpoint_prints_aa(tls_service: RunningService, pki: Pki, tmp_path: Path) -> None:
    ctrl = control()
    path = tmp_path / "one.hl7"
    path.write_bytes(message(ctrl))
    endpoint = f"tls:host=127.0.0.1:port={tls_service.port}:trustRoots={pki.ca_dir}"
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "send", "--endpoint", endpoint, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "AA"
    assert str(path) in result.stdout
    assert "1 of 1 message(s) accepted" in result.stderr
    assert [r["status"] for r in tls_service.log() if r["control_id"] == ctrl] == ["accepted"]


def _send_to_untrusted(tls_service: RunningService, tmp_path: Path, ctrl: str) -> subprocess.CompletedProcess:
    other = make_pki(tmp_path / "other")  # a CA that did not sign the server's certificate
    path = tmp_path / "one.hl7"
    path.write_bytes(message(ctrl))
    endpoint = f"tls:host=localhost:port={tls_service.port}:trustRoots={other.ca_dir}"
    return subprocess.run(
        [sys.executable, "-m", "hl7bridge", "send", "--endpoint", endpoint, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_cli_send_to_an_untrusted_server_fails_naming_the_certificate(
    tls_service: RunningService, tmp_path: Path
) -> None:
    ctrl = control()
    result = _send_to_untrusted(tls_service, tmp_path, ctrl)
    assert result.returncode != 0
    assert "AA" not in result.stdout
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # The reason must be the certificate, not a misleading "the server closed the connection".
    assert "certificate" in result.stderr.lower()
    assert ctrl not in {r["control_id"] for r in tls_service.log()}


def test_ca_certs_dir_endpoint_option_is_refused_with_one_clear_line(pki: Pki, tmp_path: Path) -> None:
    # Twisted's ssl: server endpoint has no caCertsDir option; mutual TLS is tls_client_ca.
    endpoint = ssl_endpoint(free_port(), pki, f":caCertsDir={pki.ca_dir}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hl7bridge",
            "serve",
            "--database",
            f"sqlite:///{tmp_path}/log.db",
            "--listen",
            endpoint,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "caCertsDir" in lines[0]


@pytest.fixture(scope="module")
def mutual_tls_service(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[RunningService]:
    port = free_port()
    config = f'[listeners.main]\nendpoint = "{ssl_endpoint(port, pki)}"\ntls_client_ca = "{pki.ca_cert}"\n'
    running = start_service(tmp_path_factory.mktemp("mtls"), config, listen=[], port=port)
    yield running
    running.stop()


def _mtls_client(port: int, ctx: ssl.SSLContext) -> BlockingClient:
    return BlockingClient("127.0.0.1", port, timeout=10, ssl_context=ctx, server_hostname="localhost")


def test_mutual_tls_refuses_a_client_without_certificate(mutual_tls_service: RunningService, pki: Pki) -> None:
    ctrl = control()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with _mtls_client(mutual_tls_service.port, client_context(pki)) as c:
            c.request(message(ctrl))
    assert ctrl not in {r["control_id"] for r in mutual_tls_service.log()}


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mutual_tls_service: RunningService, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other")
    ctx = client_context(pki)
    ctx.load_cert_chain(str(other.client_cert), str(other.client_key))
    ctrl = control()
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with _mtls_client(mutual_tls_service.port, ctx) as c:
            c.request(message(ctrl))
    assert ctrl not in {r["control_id"] for r in mutual_tls_service.log()}


def test_mutual_tls_accepts_a_client_with_a_certificate(mutual_tls_service: RunningService, pki: Pki) -> None:
    ctrl = control()
    with _mtls_client(mutual_tls_service.port, client_context(pki, with_cert=True)) as c:
        assert msa(c.request(message(ctrl)))[1:3] == ["AA", ctrl]
    assert [r["status"] for r in mutual_tls_service.log() if r["control_id"] == ctrl] == ["accepted"]


def test_cli_send_with_a_client_certificate_over_mutual_tls(
    mutual_tls_service: RunningService, pki: Pki, tmp_path: Path
) -> None:
    ctrl = control()
    path = tmp_path / "one.hl7"
    path.write_bytes(message(ctrl))
    endpoint = (
        f"tls:host=127.0.0.1:port={mutual_tls_service.port}:trustRoots={pki.ca_dir}"
        f":certificate={pki.client_cert}:privateKey={pki.client_key}"
    )
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "send", "--endpoint", endpoint, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] == "AA"


@dataclass
class RefusingTls:
    service: RunningService
    ports: dict[str, int]


@pytest.fixture
def refusing_tls(tmp_path: Path, pki: Pki) -> Iterator[RefusingTls]:
    """TLS listeners that must refuse 127.0.0.1: one by its allowlist, one (once busy) by its connection limit."""
    ports = {"denied": free_port(), "limited": free_port()}
    config = (
        f'[listeners.denied]\nendpoint = "{ssl_endpoint(ports["denied"], pki)}"\nallow = ["10.0.0.0/8"]\n\n'
        f'[listeners.limited]\nendpoint = "{ssl_endpoint(ports["limited"], pki)}"\nmax_connections = 1\n'
    )
    running = start_service(tmp_path, config, listen=[])
    yield RefusingTls(running, ports)
    running.stop()


def _tls_answer_or_close(port: int, pki: Pki, payload: bytes | None, wait: float) -> bytes | None:
    """What a TLS client gets: b"" when the server closed or refused, None when nothing happened in time."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=wait) as raw:
            with client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
                if payload is not None:
                    tls.sendall(b"\x0b" + payload + b"\x1c\x0d")
                return tls.recv(65536)
    except TimeoutError:
        return None
    except (ssl.SSLError, ConnectionError):
        return b""


def test_allowlist_refused_tls_peer_gets_no_answer_and_nothing_is_stored(refusing_tls: RefusingTls, pki: Pki) -> None:
    ctrl = control()
    assert _tls_answer_or_close(refusing_tls.ports["denied"], pki, message(ctrl), wait=5) == b""
    assert refusing_tls.service.process.poll() is None  # the listener survives the refusal
    assert ctrl not in {r["control_id"] for r in refusing_tls.service.log()}


@pytest.mark.parametrize("listener", ["denied", "limited"])
def test_refused_tls_connection_is_closed_by_the_server(refusing_tls: RefusingTls, pki: Pki, listener: str) -> None:
    port = refusing_tls.ports[listener]
    holder = None
    if listener == "limited":
        holder = _mtls_client(port, client_context(pki))
        ctrl = control()
        assert msa(holder.request(message(ctrl)))[1:3] == ["AA", ctrl]
    try:
        # Send nothing: a refused peer must be disconnected by the server, not left open.
        assert _tls_answer_or_close(port, pki, None, wait=2.5) == b""
        if holder is not None:  # the connection holding the only slot is unaffected
            ctrl = control()
            assert msa(holder.request(message(ctrl)))[1:3] == ["AA", ctrl]
    finally:
        if holder is not None:
            holder.close()
    stderr = refusing_tls.service.stop()
    assert "Traceback" not in stderr
    assert stderr.count("refused connection") == 1
