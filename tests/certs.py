"""Self-signed certificates for the TLS tests: the benchmarks' own maker
(``benchmarks.tls.self_signed``: 127.0.0.1 and localhost, ECDSA P-256), and
what a client was shown."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import NameOID

from benchmarks.tls import self_signed

__all__ = ["common_name", "self_signed"]


def common_name(der: bytes) -> str:
    """The common name of a DER certificate (what a TLS client was shown)."""
    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
