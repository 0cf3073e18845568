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
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hl7bridge.testing.client import BlockingClient
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
    ca_key: ec.EllipticCurvePrivateKey | None = None


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey,
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


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> None:
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
        ca_key=ca_key,
    )
    _write_cert(pki.ca_cert, ca_cert)
    _write_cert(ca_dir / "ca.pem", ca_cert)
    _write_key(pki.server_key, server_key)
    _write_cert(pki.server_cert, server_cert)
    _write_key(pki.client_key, client_key)
    _write_cert(pki.client_cert, client_cert)
    return pki


def issue(
    pki: Pki, where: Path, subject: str, san: list[x509.GeneralName] | None = None, server_rsa: bool = False
) -> tuple[Path, Path]:
    """Another certificate from the test CA: a client one, or an RSA server one (static-RSA suites need it)."""
    assert pki.ca_key is not None
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = rsa.generate_private_key(65537, 2048) if server_rsa else ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_rsa else ExtendedKeyUsageOID.CLIENT_AUTH
    if server_rsa:
        san = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    cert = _issue(subject, key, ca.subject, pki.ca_key, usage=usage, san=san)
    stem = subject.replace(" ", "_")
    _write_cert(where / f"{stem}.pem", cert)
    _write_key(where / f"{stem}.key", key)
    return where / f"{stem}.pem", where / f"{stem}.key"


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
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3"), c.sock.version()  # the floor the listener sets
        assert ("DNS", "localhost") in c.sock.getpeercert()["subjectAltName"]  # the PKI's server certificate
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


# --- protocol versions, cipher suites, pinned client names ----------------------------------------


@dataclass
class Policy:
    service: RunningService
    ports: dict[str, int]
    certs: dict[str, tuple[Path, Path]]


@pytest.fixture(scope="module")
def tls_policy(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Policy]:
    """An RSA-keyed listener on the defaults, a TLS 1.3-only one, and a mutual one pinned to two names."""
    running = start_policy(tmp_path_factory.mktemp("tls-policy"), pki)
    yield running
    running.service.stop()


@pytest.fixture
def own_tls_policy(tmp_path: Path, pki: Pki) -> Iterator[Policy]:
    """The same listeners for a test that stops the service to read its log (in any order of the tests)."""
    running = start_policy(tmp_path, pki)
    yield running
    running.service.stop()


def start_policy(tmp_path: Path, pki: Pki) -> Policy:
    certs = {
        "rsa": issue(pki, tmp_path, "localhost", server_rsa=True),
        "named": issue(pki, tmp_path, "epic-feed-2"),
        "san": issue(pki, tmp_path, "some host", san=[x509.DNSName("cerner.feed.example.org")]),
        "other": issue(pki, tmp_path, "intruder"),
    }
    ports = {name: free_port() for name in ("rsa", "tls13", "pinned")}
    rsa_cert, rsa_key = certs["rsa"]
    config = (
        f'[listeners.rsa]\nendpoint = "ssl:{ports["rsa"]}:interface=127.0.0.1:privateKey={rsa_key}:certKey={rsa_cert}"\n\n'
        f'[listeners.tls13]\nendpoint = "{ssl_endpoint(ports["tls13"], pki)}"\ntls_min_version = "1.3"\n\n'
        f'[listeners.pinned]\nendpoint = "{ssl_endpoint(ports["pinned"], pki)}"\ntls_client_ca = "{pki.ca_cert}"\n'
        'tls_client_names = ["epic-feed-2", "cerner.feed.example.org"]\n'
    )
    return Policy(start_service(tmp_path, config, listen=[]), ports, certs)


def _tls_client(
    pki: Pki, version: ssl.TLSVersion | None = None, ciphers: str | None = None, cert: tuple[Path, Path] | None = None
) -> ssl.SSLContext:
    ctx = client_context(pki)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


def _answer(port: int, ctx: ssl.SSLContext) -> tuple[str, list[str]]:
    """The TLS version negotiated and the MSA of one message's answer."""
    ctrl = control()
    with BlockingClient("127.0.0.1", port, timeout=10, ssl_context=ctx, server_hostname="localhost") as c:
        version = c.sock.version()
        ack = msa(c.request(message(ctrl)))
    assert ack[2] == ctrl
    return version, ack[1:2]


def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    try:
        _answer(port, ctx)
    except (ssl.SSLError, ConnectionError):
        return True
    return False


@pytest.mark.parametrize("suite", ["AES128-SHA", "AES256-SHA", "AES128-GCM-SHA256", "ECDHE-RSA-AES128-SHA"])
def test_tls12_static_rsa_and_cbc_suites_are_refused(tls_policy: Policy, pki: Pki, suite: str) -> None:
    ctx = _tls_client(pki, ssl.TLSVersion.TLSv1_2, f"{suite}:@SECLEVEL=0")
    assert _refused(tls_policy.ports["rsa"], ctx), f"the server accepted {suite}"


def test_tls11_is_refused(tls_policy: Policy, pki: Pki) -> None:
    ctx = _tls_client(pki, ssl.TLSVersion.TLSv1_1, "DEFAULT:@SECLEVEL=0")
    assert _refused(tls_policy.ports["rsa"], ctx)


def test_tls12_ecdhe_aead_is_accepted_and_tls13_is_preferred(tls_policy: Policy, pki: Pki) -> None:
    port = tls_policy.ports["rsa"]
    for suite in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-CHACHA20-POLY1305"):
        assert _answer(port, _tls_client(pki, ssl.TLSVersion.TLSv1_2, suite)) == ("TLSv1.2", ["AA"])
    assert _answer(port, _tls_client(pki)) == ("TLSv1.3", ["AA"])


def test_tls_min_version_13_refuses_tls12(tls_policy: Policy, pki: Pki) -> None:
    port = tls_policy.ports["tls13"]
    assert _refused(port, _tls_client(pki, ssl.TLSVersion.TLSv1_2))
    assert _answer(port, _tls_client(pki, ssl.TLSVersion.TLSv1_3)) == ("TLSv1.3", ["AA"])


def test_pinned_client_names_accept_cn_or_san_and_refuse_others_with_a_log_line(
    own_tls_policy: Policy, pki: Pki
) -> None:
    tls_policy = own_tls_policy
    port = tls_policy.ports["pinned"]
    for name in ("named", "san"):
        assert _answer(port, _tls_client(pki, cert=tls_policy.certs[name])) == ("TLSv1.3", ["AA"])
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        # Signed by the right CA, but not a pinned name (nor is the first client's "epic-feed").
        assert _refused(port, _tls_client(pki, version, cert=tls_policy.certs["other"]))
        assert _refused(port, _tls_client(pki, version, cert=(pki.client_cert, pki.client_key)))
    assert _refused(port, _tls_client(pki))  # no certificate at all
    stderr = tls_policy.service.stop()
    assert "Traceback" not in stderr
    refusals = [line for line in stderr.splitlines() if "TLS handshake from 127.0.0.1:" in line]
    assert any("'intruder'" in line and "not in tls_client_names" in line and "on pinned" in line for line in refusals)
    assert any("'epic-feed'" in line for line in refusals)
    assert any("certificate" in line and "intruder" not in line and "epic-feed" not in line for line in refusals)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ('tls_ciphers = "NO-SUCH-SUITE"', "tls_ciphers: 'NO-SUCH-SUITE' selects no cipher suite"),
        ('tls_min_version = "1.1"', "tls_min_version: expected one of '1.2', '1.3'"),
        ('tls_client_names = ["x"]', "tls_client_names: needs tls_client_ca"),
    ],
)
def test_bad_tls_settings_are_one_clear_config_error(pki: Pki, tmp_path: Path, setting: str, expected: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'[listeners.main]\nendpoint = "{ssl_endpoint(free_port(), pki)}"\n{setting}\n')
    result = subprocess.run(
        [sys.executable, "-m", "hl7bridge", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"listeners.main.{expected}" in result.stderr
