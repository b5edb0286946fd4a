"""How to reach and log in to RabbitMQ: URL, TLS, and which user we are.

- ``amqp://user:password@host:port/vhost``: PLAIN login as ``user``.
- ``amqps://user:password@host:port/vhost``: the same over TLS; the broker's certificate is
  verified against ``ca`` (else the system's CAs) and its hostname must match the URL's host.
- ``amqps://host:port/vhost`` (no user) with a client certificate: certificate login
  (RabbitMQ's EXTERNAL mechanism, plugin ``rabbitmq_auth_mechanism_ssl`` with
  ``ssl_cert_login_from = common_name``): the user is the certificate's common name.

TLS files come from :class:`TlsOptions` (CLI flags ``--tls-ca/--tls-cert/--tls-key``) or the
``BROKERFL_TLS_CA``, ``BROKERFL_TLS_CERT`` and ``BROKERFL_TLS_KEY`` variables.

A RabbitMQ cluster is several URLs, one per node (a list, or one string with commas:
``--broker amqp://u:p@node1:5672/,amqp://u:p@node2:5672/``; a comma in a password is
written ``%2C``). A connection tries them in order; a lost one reconnects to the others
first (:class:`brokerfl.transports.amqp.AmqpTransport`). Every URL must log in as the same
user: a process has one identity.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Sequence
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


def broker_urls(urls: str | Sequence[str]) -> list[str]:
    """The node URLs of one broker: a URL, a comma-separated string of them, or a sequence."""
    items = [urls] if isinstance(urls, str) else list(urls)
    found = [url.strip() for item in items for url in str(item).split(",") if url.strip()]
    if not found:
        raise ValueError("no broker URL given")
    return found


def cluster_parameters(
    urls: str | Sequence[str], tls: TlsOptions | None = None
) -> tuple[list[pika.URLParameters], str]:
    """pika's parameters for every node URL (in order) and the one user they log in as."""
    pairs = [connection_parameters(url, tls) for url in broker_urls(urls)]
    users = sorted({user for _, user in pairs})
    if len(users) > 1:
        raise ValueError(f"the broker URLs log in as different users ({', '.join(users)}): a process has one identity")
    return [params for params, _ in pairs], users[0]
