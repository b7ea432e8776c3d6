"""A private certificate authority for one appliance: the CA, server and client certificates.

``sensorhub stack up`` makes one under ``DIR/tls`` (:func:`ensure_pki`) so that mosquitto's TLS
listener and the chdb-server's HTTPS have certificates no one else issued. An operator with a
plant PKI points the settings at its files instead; nothing here is then used.

Keys are ECDSA P-256 (small, fast handshakes, accepted by OpenSSL 3, mosquitto and Python's ssl);
certificates are valid for ``days`` (default 825, the longest a browser accepts for a server) and
name the hosts they serve as subjectAltName DNS and IP entries.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sensorhub.security import write_private

__all__ = ["CertPair", "ensure_pki", "make_ca", "make_client_cert", "make_server_cert"]

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load(pair: CertPair) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{pair.key}: not an EC private key")
    return cert, key


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def make_ca(directory: Path, name: str = "sensorhub private CA", days: int = 3650) -> CertPair:
    """A self-signed CA certificate (``ca.crt``) and its key (``ca.key``, mode 0600) in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    pair = CertPair(directory / "ca.crt", directory / "ca.key")
    write_private(pair.key, _key_pem(key))
    directory.mkdir(parents=True, exist_ok=True)
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def _issue(
    ca: CertPair, directory: Path, stem: str, common_name: str, usage: x509.ObjectIdentifier,
    hosts: Sequence[str] = (), days: int = 825,
) -> CertPair:
    ca_cert, ca_key = _load(ca)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for h in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                names.append(x509.DNSName(h))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    write_private(pair.key, _key_pem(key))
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return pair


def make_server_cert(
    ca: CertPair, directory: Path, stem: str = "server", hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 825
) -> CertPair:
    """A server certificate for ``hosts`` (IP addresses and DNS names), signed by ``ca``."""
    return _issue(ca, directory, stem, hosts[0] if hosts else stem, ExtendedKeyUsageOID.SERVER_AUTH, hosts, days)


def make_client_cert(ca: CertPair, directory: Path, name: str, days: int = 825) -> CertPair:
    """A client certificate whose common name is ``name`` (a device or service account)."""
    return _issue(ca, directory, name, name, ExtendedKeyUsageOID.CLIENT_AUTH, (), days)


def ensure_pki(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS) -> tuple[CertPair, CertPair]:
    """The CA and server certificate under ``directory``, made the first time, kept afterwards.

    Returns ``(ca, server)``. A stack restarted on the same directory keeps its CA, so the
    clients that trust it keep working.
    """
    ca = CertPair(directory / "ca.crt", directory / "ca.key")
    if not (ca.cert.exists() and ca.key.exists()):
        ca = make_ca(directory)
    server = CertPair(directory / "server.crt", directory / "server.key")
    if not (server.cert.exists() and server.key.exists()):
        server = make_server_cert(ca, directory, hosts=hosts)
    return ca, server
