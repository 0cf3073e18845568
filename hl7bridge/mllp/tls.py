"""TLS for MLLP listeners: a pyOpenSSL server context with modern defaults, optional mutual TLS with
client-name pinning, and the refusal reason of each failed handshake.

Twisted's ``ssl:`` endpoint cannot ask for client certificates nor restrict versions and suites, so the
listener binds the same address as plain TCP and wraps its factory in ``TLSMemoryBIOFactory`` with the
context built here (public API only)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

#: ECDHE key exchange with AEAD suites only (forward secrecy; no static RSA, no CBC, no SHA-1 MACs).
#: TLS 1.3 suites are all AEAD and are not affected by this list.
DEFAULT_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
#: Options of Twisted's ssl: endpoint string that this listener understands.
ENDPOINT_OPTIONS = ("privateKey", "certKey", "extraCertChain", "interface", "backlog")
#: OpenSSL's X509_V_ERR_* codes a sender's certificate most often fails with.
_VERIFY_ERRORS = {
    2: "the issuer certificate is unknown",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed",
    19: "a self-signed certificate in the chain",
    20: "the certificate is not signed by tls_client_ca",
    21: "the certificate is not signed by tls_client_ca",
    26: "the certificate is not meant for client authentication",
}


class TlsError(ValueError):
    """A TLS setting cannot be used; ``key`` names the listener setting at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class TlsSettings:
    min_version: str = "1.2"
    ciphers: str = DEFAULT_CIPHERS
    client_ca: str = ""
    client_names: tuple[str, ...] = ()


def endpoint_fields(description: str) -> tuple[list[str], bool]:
    """A Twisted endpoint string split at its colons (``\\`` escapes the next character, as in Twisted), and
    whether it ended inside an escape, which Twisted's own parser refuses."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts, escaped


def endpoint_arguments(fields: list[str]) -> tuple[list[str], dict[str, str]]:
    """An endpoint's fields after its kind, as positional arguments and ``key=value`` options."""
    args = [f for f in fields[1:] if "=" not in f]
    return args, dict(f.split("=", 1) for f in fields[1:] if "=" in f)


def endpoint_port(fields: list[str]) -> str:
    """The port of a ``tcp:``/``ssl:``-style endpoint's fields (positional or ``port=``); "" when none."""
    args, options = endpoint_arguments(fields)
    return options.get("port") or (args[0] if args else "")


def split_endpoint(description: str) -> tuple[str, dict[str, str]]:
    """An ``ssl:PORT:key=value...`` string into its port and options."""
    parts, _dangling = endpoint_fields(description)
    if len(parts) < 2 or parts[0] != "ssl":
        raise TlsError("endpoint", f"expected an ssl:PORT:privateKey=...:certKey=... endpoint, got {description!r}")
    options: dict[str, str] = {}
    port = ""
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep:
            port = port or key
            continue
        if key == "port":
            port = value
            continue
        if key not in ENDPOINT_OPTIONS:
            raise TlsError(
                "endpoint",
                f"ssl: endpoint option {key!r} is not supported (known: port, {', '.join(ENDPOINT_OPTIONS)})",
            )
        options[key] = value
    if not port.isdigit():
        raise TlsError("endpoint", f"ssl: endpoint {description!r} has no port number")
    if "privateKey" not in options:
        raise TlsError(
            "endpoint", "ssl: endpoint needs privateKey=FILE (and certKey=FILE unless the key file holds both)"
        )
    return port, options


def tcp_description(port: str, options: dict[str, str]) -> str:
    """The plain TCP endpoint the TLS listener binds."""
    text = f"tcp:{port}"
    for key in ("interface", "backlog"):
        if key in options:
            text += f":{key}=" + options[key].replace("\\", "\\\\").replace(":", "\\:")
    return text


def load_certificates(path: str, key: str) -> list[crypto.X509]:
    """Every certificate in a PEM bundle; a ``TlsError`` for ``key`` when there is none or it is unreadable."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", text, re.DOTALL)
        certs = [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except OSError as exc:
        raise TlsError(key, f"cannot read {path}: {exc.strerror}") from None
    except crypto.Error:
        raise TlsError(key, f"{path} holds a certificate that cannot be read") from None
    if not certs:
        raise TlsError(key, f"expected a PEM file of certificates: {path} holds none")
    return certs


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The subject's common names and its DNS and URI alternative names."""
    names = [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return names
    return names + san.get_values_for_type(x509.DNSName) + san.get_values_for_type(x509.UniformResourceIdentifier)


def _shown(names: Sequence[str]) -> str:
    """Certificate names for a log line: at most three, each at most 64 printable characters."""
    safe = [re.sub(r"[^\x21-\x7e]", "?", n)[:64] for n in names[:3]]
    return ", ".join(repr(n) for n in safe) + (" ..." if len(names) > 3 else "") if safe else "(none)"


def server_context(options: dict[str, str], settings: TlsSettings) -> SSL.Context:
    """The server context; raises ``TlsError`` naming the setting that is wrong."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(MIN_VERSIONS[settings.min_version])
    ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION)
    try:
        ctx.set_cipher_list(settings.ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TlsError("tls_ciphers", f"{settings.ciphers!r} selects no cipher suite this OpenSSL knows") from None
    key_file = options["privateKey"]
    try:
        ctx.use_certificate_chain_file(options.get("certKey", key_file))
        ctx.use_privatekey_file(key_file)
        ctx.check_privatekey()
        if "extraCertChain" in options:
            for cert in load_certificates(options["extraCertChain"], "endpoint"):
                ctx.add_extra_chain_cert(cert)
    except SSL.Error as exc:
        raise TlsError("endpoint", f"cannot use the certificate and key ({key_file}): {_reason(exc)}") from None
    ctx.set_session_id(b"hl7bridge")
    if settings.client_ca:
        for cert in load_certificates(settings.client_ca, "tls_client_ca"):
            ctx.get_cert_store().add_cert(cert)
            ctx.add_client_ca(cert)
        ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verifier(settings.client_names))
    return ctx


def context_for(endpoint: str, settings: TlsSettings) -> SSL.Context:
    """The context for an ``ssl:`` endpoint string; raises ``TlsError`` naming the setting that is wrong."""
    _port, options = split_endpoint(endpoint)
    return server_context(options, settings)


def _verifier(allowed: tuple[str, ...]) -> Any:
    def verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        if not ok:
            _refuse(conn, _VERIFY_ERRORS.get(code, f"certificate verification failed (X509 error {code})"))
            return False
        if depth or not allowed:
            return True
        names = certificate_names(cert.to_cryptography())
        if any(n in allowed for n in names):
            return True
        _refuse(conn, f"client certificate names {_shown(names)} are not in tls_client_names")
        return False

    return verify


def _refuse(conn: SSL.Connection, reason: str) -> None:
    wrapper = conn.get_app_data()
    inner = getattr(wrapper, "wrappedProtocol", None)
    if inner is not None:
        inner.tls_refusal = reason


def _reason(exc: SSL.Error) -> str:
    """OpenSSL's reason strings, without the library and function names."""
    args = exc.args[0] if exc.args else None
    if isinstance(args, list):
        reasons = [str(item[-1]) for item in args if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or exc.__class__.__name__


def handshake_failure(error: BaseException) -> str | None:
    """OpenSSL's reason when a connection ended in a TLS error; None when it merely closed."""
    return _reason(error) if isinstance(error, SSL.Error) else None


@implementer(IOpenSSLServerConnectionCreator)
class ServerConnections:
    """A connection per accepted socket, carrying its protocol so the verifier can note a refusal."""

    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self.context, None)
        connection.set_app_data(tlsProtocol)
        return connection
