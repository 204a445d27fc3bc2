"""A throwaway PKI generated at test time: a CA and server certificates.

Keys are EC P-256 (fast to generate). Certificates are valid from one day
ago until one day from now, so clock skew never matters and nothing generated
here is useful outside a test run.

Typical use::

    ca = make_ca()
    cert_pem, key_pem = issue(ca, ["api.external.test", "127.0.0.1"])
    endpoint = SSL4ServerEndpoint(
        reactor, 0, server_context_factory(cert_pem, key_pem), interface="127.0.0.1"
    )
    client_options = optionsForClientTLS(
        "api.external.test", trustRoot=Certificate.loadPEM(ca.cert_pem)
    )
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from typing import Any

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

__all__ = [
    "CA",
    "Pki",
    "ServerTLS",
    "issue",
    "make_ca",
    "make_pki",
    "server_context_factory",
    "write_pem",
]

#: How far validity extends on either side of "now".
VALIDITY = datetime.timedelta(days=1)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "llmproxy tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


@attrs.frozen
class CA:
    """A certificate authority: its key and self-signed certificate.

    Attributes:
        key: The CA's private key.
        cert: The CA's self-signed certificate.
    """

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        """The CA certificate, PEM-encoded (a client's trust root)."""
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The CA private key, PEM-encoded (unencrypted PKCS#8)."""
        return _key_pem(self.key)


@attrs.frozen
class Pki:
    """A CA plus one server certificate it issued, all PEM-encoded.

    Attributes:
        ca_cert_pem: The CA certificate.
        ca_key_pem: The CA private key.
        cert_pem: The server certificate.
        key_pem: The server private key.
        names: The names the server certificate is valid for.
    """

    ca_cert_pem: bytes
    ca_key_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    names: tuple[str, ...]


def make_ca(common_name: str = "llmproxy test CA") -> CA:
    """Create a fresh self-signed CA.

    Args:
        common_name: The CA's subject (and issuer) common name.

    Returns:
        The new CA.
    """
    key = _new_key()
    name = _name(common_name)
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALIDITY)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CA(key=key, cert=cert)


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def issue(ca: CA, names: Sequence[str]) -> tuple[bytes, bytes]:
    """Issue a server certificate signed by ``ca``.

    Args:
        ca: The issuing CA.
        names: The subject alternative names; one that parses as an IP
            address becomes an IP address entry, anything else a DNS name.
            The first one is also the subject common name.

    Returns:
        ``(cert_pem, key_pem)`` for the new certificate and its fresh key.

    Raises:
        ValueError: ``names`` is empty.
    """
    if not names:
        raise ValueError("a server certificate needs at least one name")
    key = _new_key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(names[0]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - VALIDITY)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def make_pki(names: Sequence[str], common_name: str = "llmproxy test CA") -> Pki:
    """Create a CA and one server certificate for ``names`` in one go.

    Args:
        names: The server certificate's names (see :func:`issue`).
        common_name: The CA's common name.

    Returns:
        Everything PEM-encoded.
    """
    ca = make_ca(common_name)
    cert_pem, key_pem = issue(ca, names)
    return Pki(
        ca_cert_pem=ca.cert_pem,
        ca_key_pem=ca.key_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        names=tuple(names),
    )


def write_pem(path: str | os.PathLike[str], *pems: bytes) -> str:
    """Write the concatenation of ``pems`` to ``path``.

    Args:
        path: Where to write (overwritten).
        *pems: PEM blocks, e.g. a certificate and its key, or a CA bundle.

    Returns:
        ``path`` as a string, handy for config files and environment variables.
    """
    data = b"".join(p if p.endswith(b"\n") else p + b"\n" for p in pems)
    with open(path, "wb") as f:
        f.write(data)
    return os.fspath(path)


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """TLS server settings presenting one certificate (TLS 1.2 and later).

    Unlike ``CertificateOptions`` it hands cryptography objects to
    pyOpenSSL, which avoids pyOpenSSL's deprecation of its own X509/PKey
    objects. The context is built once, on first use.

    Attributes:
        cert: The server certificate.
        key: Its private key.
    """

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self._context: SSL.Context | None = None

    def context(self) -> SSL.Context:
        """The shared OpenSSL context."""
        if self._context is None:
            context = SSL.Context(SSL.TLS_SERVER_METHOD)
            context.set_min_proto_version(SSL.TLS1_2_VERSION)
            context.set_options(SSL.OP_NO_TICKET)
            context.use_certificate(self.cert)
            context.use_privatekey(self.key)
            context.check_privatekey()
            self._context = context
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """A new server-side connection (IOpenSSLServerConnectionCreator)."""
        return SSL.Connection(self.context(), None)


def server_context_factory(cert_pem: bytes, key_pem: bytes) -> ServerTLS:
    """TLS server settings presenting ``cert_pem`` with ``key_pem``.

    Usable as the context factory of ``SSL4ServerEndpoint``,
    ``reactor.listenSSL`` or ``TLSMemoryBIOFactory``. (For
    ``serverFromString("ssl:...")`` write the PEMs with :func:`write_pem`
    and pass ``certKey=``/``privateKey=`` instead.)

    Args:
        cert_pem: The server certificate.
        key_pem: Its private key (EC, unencrypted).

    Returns:
        An ``IOpenSSLServerConnectionCreator``.

    Raises:
        TypeError: The key is not an EC key.
    """
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"expected an EC private key, got {type(key).__name__}")
    return ServerTLS(x509.load_pem_x509_certificate(cert_pem), key)
