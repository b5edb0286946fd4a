"""A small certificate authority for tests and small deployments (``provision --tls``).

``issue_federation(dir, broker_names, users)`` writes ``ca.pem``/``ca.key``, the broker's
``broker.pem``/``broker.key`` (server certificate; subject alternative names = the names and
addresses clients connect to, which TLS verifies) and ``<user>.pem``/``<user>.key`` per
participant (client certificates, CN = the broker user: RabbitMQ's certificate login takes
the user from the CN). Keys are EC P-256, certificates valid for a year. A real deployment
may use its own PKI instead; only the CN convention matters.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 365


@dataclass
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name), x509.NameAttribute(NameOID.ORGANIZATION_NAME, "brokerfl")])


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def new_authority(common_name: str = "brokerfl CA") -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(_name(common_name), _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def issue(ca: Authority, common_name: str, *, server_names: list[str] = ()) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate: a server's (``server_names`` as DNS/IP alternative names) or a client's."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _builder(_name(common_name), ca.cert.subject, key.public_key()).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if server_names:
        alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in dict.fromkeys(server_names)]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(ca.key, hashes.SHA256()), key


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def write_pair(directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    return cert_path, key_path


def issue_federation(directory: str | Path, *, broker_names: list[str], users: list[str], ca_name: str = "brokerfl CA") -> Authority:
    """A CA, the broker's certificate and one client certificate per user, under ``directory``."""
    directory = Path(directory)
    ca = new_authority(ca_name)
    write_pair(directory, "ca", ca.cert, ca.key)
    write_pair(directory, "broker", *issue(ca, broker_names[0], server_names=broker_names))
    for user in users:
        write_pair(directory, user, *issue(ca, user))
    return ca
