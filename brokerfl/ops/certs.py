"""A small certificate authority for tests and small deployments (``provision --tls``).

Two ways to give a participant its certificate (CN = its broker user: RabbitMQ's
certificate login takes the user from the CN):

- **Participant-made keys** (like NVFlare's distributed provisioning): the participant runs
  ``brokerfl keygen --user USER --out DIR``, which writes its private key ``USER.key``
  (0600, never sent anywhere) and a certificate signing request ``USER.csr``; it sends the
  request to the operator, who signs it (``brokerfl provision ... --sign USER.csr`` or
  ``brokerfl sign-csr``) after checking that the CN is a participant of the run
  (:func:`sign_request`), and sends back ``USER.pem`` and ``ca.pem``.
- **Operator-made keys** (one trusted operator, tests): :func:`issue` makes the key and the
  certificate together.

The authority's key lives in a directory of its own (``ca_dir``, 0700, ``ca.key`` 0600;
:func:`authority_in` makes it once and loads it after), never in the directory handed to the
broker: that one gets ``ca.pem`` only, beside the broker's ``broker.pem``/``broker.key``
(server certificate; subject alternative names = the names and addresses clients connect
to, which TLS verifies). Keys are EC P-256, certificates valid for a year. A real deployment
may use its own PKI instead; only the CN convention matters.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from brokerfl.storage.private_files import private_directory, write_private, write_public
from brokerfl.wire.names import bounded

VALID_DAYS = 365
MAX_REQUEST_BYTES = 64 * 1024  # a P-256 request is under 1 KiB, an RSA-4096 one under 4 KiB
ACCEPTED_CURVES = (ec.SECP256R1, ec.SECP384R1)
MIN_RSA_BITS = 2048
USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")  # also a file name: no path


class SigningRefused(ValueError):
    """A certificate signing request the operator's CA will not sign, and why."""


@dataclass
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "brokerfl"),
        ]
    )


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
    )


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def new_authority(common_name: str = "brokerfl CA") -> Authority:
    key = new_key()
    cert = (
        _builder(_name(common_name), _name(common_name), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Authority(cert, key)


def authority_in(ca_dir: str | Path, common_name: str = "brokerfl CA") -> Authority:
    """The authority kept in ``ca_dir`` (``ca.pem``, ``ca.key``), made there the first time.
    Re-provisioning with the same ``ca_dir`` keeps the CA, so certificates already handed
    out stay valid. The directory is made (again) 0700."""
    ca_dir = private_directory(ca_dir)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if key_path.exists() != cert_path.exists():
        raise ValueError(f"{ca_dir} holds only one of ca.pem and ca.key: restore the other or empty the directory")
    if key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise ValueError(f"{cert_path} is not the certificate of {key_path}")
        key_path.chmod(0o600)  # an earlier copy's loose mode does not stay
        return Authority(cert, key)
    authority = new_authority(common_name)
    write_pair(ca_dir, "ca", authority.cert, authority.key)
    return authority


def _leaf(ca: Authority, subject: x509.Name, public_key, server_names: Iterable[str] = ()) -> x509.Certificate:
    builder = _builder(subject, ca.cert.subject, public_key).add_extension(
        x509.BasicConstraints(ca=False, path_length=None), critical=True
    )
    names = list(dict.fromkeys(server_names))
    if names:
        alt = [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n) for n in names]
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        usage = ExtendedKeyUsageOID.SERVER_AUTH
    else:
        usage = ExtendedKeyUsageOID.CLIENT_AUTH
    return builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False).sign(ca.key, hashes.SHA256())


def issue(
    ca: Authority, common_name: str, *, server_names: list[str] = ()
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate and its key, both made here: a server's (``server_names`` as DNS/IP
    alternative names) or a client's."""
    key = new_key()
    return _leaf(ca, _name(common_name), key.public_key(), server_names), key


def signing_request(user: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """A participant's certificate signing request: CN = its broker user, signed by its key."""
    return x509.CertificateSigningRequestBuilder().subject_name(_name(user)).sign(key, hashes.SHA256())


def write_signing_request(directory: str | Path, user: str, *, replace: bool = False) -> tuple[Path, Path]:
    """The participant's side (``brokerfl keygen``): a new private key ``<user>.key`` (0600,
    ``directory`` 0700) and the request ``<user>.csr`` to send to the operator. An existing
    key is kept unless ``replace``: a certificate signed for it would stop matching."""
    if not USER_NAME.fullmatch(user):
        raise ValueError(f"{bounded(user, 80)} is not a broker user name (letters, digits, '.', '_', '-')")
    if not replace and (Path(directory) / f"{user}.key").exists():
        raise ValueError(
            f"{Path(directory) / f'{user}.key'} exists (a certificate may be signed for it): remove it or pass "
            "--replace to make a new key"
        )
    directory = private_directory(directory)
    key = new_key()
    key_path = write_private(
        directory / f"{user}.key",
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    csr_path = write_public(
        directory / f"{user}.csr", signing_request(user, key).public_bytes(serialization.Encoding.PEM)
    )
    return key_path, csr_path


def read_signing_request(data: bytes, source: str = "the request") -> tuple[str, x509.CertificateSigningRequest]:
    """A PEM certificate signing request checked for signing: its own signature holds (whoever
    made it holds the key), it names exactly one common name, and its key is one we accept.
    Returns (the common name, the request); :class:`SigningRefused` says why not."""
    if len(data) > MAX_REQUEST_BYTES:
        raise SigningRefused(
            f"{source} is {len(data)} bytes, more than a certificate signing request ({MAX_REQUEST_BYTES})"
        )
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as exc:
        raise SigningRefused(f"{source} is not a PEM certificate signing request ({bounded(str(exc), 120)})") from None
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError, TypeError):  # an algorithm the library cannot check
        valid = False
    if not valid:
        raise SigningRefused(f"{source}: its signature does not verify (it was not made with the key it carries)")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1 or not isinstance(names[0].value, str):
        raise SigningRefused(f"{source} names {len(names)} common names, not one (the CN is the broker user)")
    key = csr.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ACCEPTED_CURVES):
            raise SigningRefused(f"{source}: curve {bounded(key.curve.name, 40)} is not one we sign (P-256, P-384)")
    elif isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SigningRefused(f"{source}: a {key.key_size}-bit RSA key is too short (at least {MIN_RSA_BITS})")
    else:
        raise SigningRefused(f"{source}: a {type(key).__name__} key is not one we sign (EC P-256/P-384, RSA)")
    return names[0].value, csr


def check_request(
    data: bytes, participants: Iterable[str], source: str = "the request"
) -> tuple[str, x509.CertificateSigningRequest]:
    """:func:`read_signing_request`, and its CN must be one of ``participants`` (the run's
    broker users)."""
    user, csr = read_signing_request(data, source)
    allowed = set(participants)
    if user not in allowed:
        raise SigningRefused(
            f"{source} is for {bounded(user, 80)}, not a participant of this run ({', '.join(sorted(allowed))})"
        )
    return user, csr


def sign_request(ca: Authority, csr: x509.CertificateSigningRequest) -> x509.Certificate:
    """The operator's side: a client certificate for a request :func:`check_request` passed.
    Only the request's key and CN are used: whatever extensions it asks for, the
    certificate is a client certificate (no CA, no alternative names)."""
    user = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return _leaf(ca, _name(str(user)), csr.public_key())


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def write_certificate(directory: Path, stem: str, cert: x509.Certificate) -> Path:
    return write_public(directory / f"{stem}.pem", cert.public_bytes(serialization.Encoding.PEM))


def write_pair(
    directory: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    """``<stem>.pem`` and its key ``<stem>.key`` (0600) in ``directory`` (made 0700)."""
    directory = private_directory(directory)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return write_certificate(directory, stem, cert), write_private(directory / f"{stem}.key", pem)


def issue_federation(
    directory: str | Path,
    *,
    broker_names: list[str],
    users: list[str],
    ca: Authority | None = None,
    signed: Mapping[str, x509.Certificate] | None = None,
) -> Authority:
    """Under ``directory`` (0700): ``ca.pem`` (the certificate only), the broker's certificate
    and key, and a certificate per user: those in ``signed`` (from their own requests) get it
    without a key; the others get a key made here. ``ca``: the authority (default: a new one,
    whose key is then nowhere on disk: pass one from :func:`authority_in` to sign later)."""
    directory = private_directory(directory)
    ca = ca or new_authority()
    signed = signed or {}
    write_certificate(directory, "ca", ca.cert)
    write_pair(directory, "broker", *issue(ca, broker_names[0], server_names=broker_names))
    for user in users:
        if user in signed:
            write_certificate(directory, user, signed[user])
            (directory / f"{user}.key").unlink(missing_ok=True)  # an operator-made key of an earlier provisioning
        else:
            write_pair(directory, user, *issue(ca, user))
    return ca
