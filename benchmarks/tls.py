"""TLS for the load clients (``--tls``): a self-signed certificate for the daemon,
and the client context every connection of a TLS run uses.

The context lives in a context variable rather than in every call's arguments:
the runner sets it around the scenarios of a TLS column, and every connection
made meanwhile (subscribers, publishers, readiness probes) picks it up, since
asyncio tasks inherit the context they were created in. Child processes of the
load client (S6's storm, JL's room) get the certificate's path in their job.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from contextvars import ContextVar
from pathlib import Path

CLIENT_TLS: ContextVar[ssl.SSLContext | None] = ContextVar("client_tls", default=None)
"""The context that client connections wrap their sockets in (None: plain TCP)."""
CLIENT_CAFILE: ContextVar[str | None] = ContextVar("client_cafile", default=None)
"""The certificate that context trusts, for the load client's child processes."""
CERTIFICATE_DAYS = 1


def client_context(cafile: str | Path) -> ssl.SSLContext:
    """A client context trusting only ``cafile``, checking the name (127.0.0.1 is in
    the certificate), TLS 1.2 or newer: what a careful client does."""
    context = ssl.create_default_context(cafile=str(cafile))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def trust(cafile: str | Path | None) -> None:
    """Make the connections of this context (and of tasks created from it) use TLS,
    trusting ``cafile``; None: plain TCP."""
    CLIENT_TLS.set(None if cafile is None else client_context(cafile))
    CLIENT_CAFILE.set(None if cafile is None else str(cafile))


def client_cafile() -> str | None:
    """The certificate the load client trusts in this context (None: plain TCP)."""
    return CLIENT_CAFILE.get()


def server_hostname(host: str) -> str | None:
    """``server_hostname`` for ``create_connection``: the host when TLS is on."""
    return host if CLIENT_TLS.get() is not None else None


def self_signed(folder: Path, name: str = "broadcastd-bench") -> tuple[Path, Path]:
    """A P-256 certificate for 127.0.0.1 and localhost, and its key, written to
    ``folder/name.pem`` and ``folder/name.key``. ECDSA P-256 is what most sites
    serve today, and its handshake is cheaper than RSA 2048's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERTIFICATE_DAYS))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file
