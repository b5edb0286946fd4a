"""How to reach and log in to RabbitMQ: URL, TLS, and which user we are.

- ``amqp://user:password@host:port/vhost``: PLAIN login as ``user``.
- ``amqps://user:password@host:port/vhost``: the same over TLS; the broker's certificate is
  verified against ``ca`` (else the system's CAs) and its hostname must match the URL's host.
- ``amqps://host:port/vhost`` (no user) with a client certificate: certificate login
  (RabbitMQ's EXTERNAL mechanism, plugin ``rabbitmq_auth_mechanism_ssl`` with
  ``ssl_cert_login_from = common_name``): the user is the certificate's common name.

TLS files come from :class:`TlsOptions` (CLI flags ``--tls-ca/--tls-cert/--tls-key``) or the
``BROKERFL_TLS_CA``, ``BROKERFL_TLS_CERT`` and ``BROKERFL_TLS_KEY`` variables.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import pika
from pika.credentials import ExternalCredentials


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None  # CA bundle that signed the broker's certificate (None: the system's)
    cert: str | None = None  # our certificate (PEM), for mutual TLS / certificate login
    key: str | None = None  # its private key (PEM)

    @classmethod
    def from_env(cls) -> TlsOptions:
        return cls(*(os.environ.get(f"BROKERFL_TLS_{name}") or None for name in ("CA", "CERT", "KEY")))

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca)  # verifies the chain and the hostname
        if self.cert:
            context.load_cert_chain(self.cert, self.key)
        return context


def certificate_user(cert_path: str) -> str:
    """The common name of a PEM certificate: the user of a certificate login."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    with open(cert_path, "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not names:
        raise ValueError(f"certificate {cert_path} has no common name")
    return str(names[0].value)


def connection_parameters(url: str, tls: TlsOptions | None = None) -> tuple[pika.URLParameters, str]:
    """pika's parameters for ``url`` and the broker user we log in as. ``tls`` (for
    ``amqps://``; default :meth:`TlsOptions.from_env`)."""
    params = pika.URLParameters(url)
    parts = urlsplit(url)
    if parts.scheme != "amqps":
        return params, params.credentials.username
    tls = tls if tls is not None else TlsOptions.from_env()
    params.ssl_options = pika.SSLOptions(tls.context(), server_hostname=parts.hostname)
    if parts.username is None and tls.cert:
        params.credentials = ExternalCredentials()
        return params, certificate_user(tls.cert)
    return params, unquote(parts.username or params.credentials.username)
